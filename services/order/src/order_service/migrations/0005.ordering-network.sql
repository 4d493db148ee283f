-- depends: 0004.ordering-rebook-pending
-- The order service's own copy of the manufacturing network, fed by `site.registered` events: which
-- sites exist, whether they are active, and which markets, uses and products each is approved for.
-- Intake refuses an order no active site may make for the centre's market.
CREATE TABLE network_sites (
    site_id     text PRIMARY KEY,
    active      boolean NOT NULL,
    as_of       timestamptz NOT NULL,   -- time of the site.registered event this row reflects
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE site_approvals (
    site_id       text NOT NULL REFERENCES network_sites (site_id) ON DELETE CASCADE,
    regulator     text NOT NULL,
    use           text NOT NULL CHECK (use IN ('commercial', 'clinical')),
    product_code  text NOT NULL,
    PRIMARY KEY (site_id, regulator, use, product_code)
);
CREATE INDEX site_approvals_by_market ON site_approvals (regulator, use, product_code);
