-- depends: 0004.logistics-outbound-replacement
-- The carrier (specialist courier, seed/logistics.yaml) that carries each shipment: the tenant of the
-- courier API. Chosen when the shipment is planned; shipments planned before carriers existed have none
-- (only QA and ops see them).
ALTER TABLE shipments ADD COLUMN carrier_id text;
CREATE INDEX shipments_by_carrier ON shipments (carrier_id, created_at);

-- The region of each site and treatment centre, learnt from site.registered and order.submitted: what
-- the choice of a leg's carrier needs. A fact older than the one recorded does not replace it.
CREATE TABLE location_regions (
    location_id  text PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('site', 'centre')),
    region       text NOT NULL,
    as_of        timestamptz NOT NULL
);
