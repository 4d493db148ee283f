-- depends: 0002.site-lifecycle
-- The trace of the order's first causal chain, so MES reports (later inputs) can link back to it.
ALTER TABLE bookings ADD COLUMN origin_trace jsonb NOT NULL DEFAULT '{}'::jsonb;
