-- depends: 0005.logistics-carriers
-- Issue 10: excursions judged by the product's rule (limit AND cumulative time outside it), readings
-- only in transit or as a logger download after delivery, and the second id of each handoff's pair
-- (inbound: the collection's DIN; outbound: the run's lot).

ALTER TABLE shipments
    ADD COLUMN product_code             text,     -- whose limits it travels by (NULL: the seed's defaults)
    ADD COLUMN excursion_tolerance_min  numeric NOT NULL DEFAULT 0 CHECK (excursion_tolerance_min >= 0),
    ADD COLUMN picked_up_at             timestamptz,  -- first milestone showing the material left
    ADD COLUMN delivered_at             timestamptz,
    ADD COLUMN excursion_minutes        numeric,      -- minutes outside the limit when the rule was breached
    ADD COLUMN din                      text,         -- inbound: the collection's DIN
    ADD COLUMN lot                      text;         -- outbound: the run's lot

-- shipments recorded before: their pickup and delivery from the chain of custody
UPDATE shipments s SET
    picked_up_at = (SELECT min(occurred_at) FROM custody_events c
                    WHERE c.shipment_id = s.shipment_id
                      AND c.milestone IN ('picked_up', 'in_transit', 'delivered')),
    delivered_at = (SELECT min(occurred_at) FROM custody_events c
                    WHERE c.shipment_id = s.shipment_id AND c.milestone = 'delivered');

-- what each handoff presented beside the COI, and whether it was checked against a known value
ALTER TABLE custody_events
    ADD COLUMN din            text,
    ADD COLUMN lot            text,
    ADD COLUMN pair_verified  boolean NOT NULL DEFAULT false;

-- a logger's data downloaded after delivery
ALTER TABLE temperature_readings DROP CONSTRAINT temperature_readings_source_check;
ALTER TABLE temperature_readings ADD CONSTRAINT temperature_readings_source_check
    CHECK (source IN ('courier', 'milestone', 'logger_download'));

-- the product of each order (order.submitted, site.booking_confirmed): the outbound leg's limits
CREATE TABLE order_products (
    order_id      uuid PRIMARY KEY,
    product_code  text NOT NULL,
    as_of         timestamptz NOT NULL
);
