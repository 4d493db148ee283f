-- depends: 0001.ordering-initial
-- The whole vein-to-vein lifecycle: manufacturing runs, recollections, actual dates, quarantine.
ALTER TABLE orders
    ADD COLUMN run                      integer NOT NULL DEFAULT 1,
    ADD COLUMN recollections            integer NOT NULL DEFAULT 0,
    ADD COLUMN status_before_quarantine text,
    ADD COLUMN apheresis_collected_at   timestamptz,
    ADD COLUMN material_received_at     timestamptz,
    ADD COLUMN released_at              timestamptz,
    ADD COLUMN delivered_at             timestamptz,
    ADD COLUMN product_received_at      timestamptz,
    ADD COLUMN lymphodepletion_at       timestamptz,
    ADD COLUMN infused_at               timestamptz,
    ADD COLUMN ended_reason             text,
    ADD COLUMN first_trace              jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX orders_by_status ON orders (status);
