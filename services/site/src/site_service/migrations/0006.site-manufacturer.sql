-- depends: 0005.site-release
-- Issue 11: the company that runs each site, a vendor-neutral code (`novartis`, `kite`, `janssen`,
-- `fraunhofer-izi` ...); a site is approved only for products of its manufacturer or of which it is a
-- declared contract manufacturer. NULL for rows written before the seed named it: the next seed load
-- (every start) fills it in.
ALTER TABLE sites ADD COLUMN manufacturer text CHECK (manufacturer ~ '^[a-z][a-z0-9-]{1,39}$');
