-- depends: 0001.logistics-initial
-- The trace of the order's first causal chain, so later inputs (courier scans) can link back to it.
ALTER TABLE shipments ADD COLUMN origin_trace jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Chain of custody: every handoff or movement, who/where/when/from whom/condition, append-only.
CREATE TABLE custody_events (
    id             bigserial PRIMARY KEY,
    shipment_id    uuid NOT NULL REFERENCES shipments (shipment_id),
    milestone      text NOT NULL CHECK (milestone IN ('booked', 'picked_up', 'in_transit', 'delivered')),
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    location       text NOT NULL,
    handled_by     text NOT NULL,
    received_from  text,
    temperature_c  numeric,
    coi_verified   boolean NOT NULL
);
CREATE INDEX custody_by_shipment ON custody_events (shipment_id, occurred_at);
