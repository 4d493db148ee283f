-- depends: 0002.logistics-custody
-- The whole lifecycle of a shipment: outbound legs, temperature readings, excursions, cancellations,
-- COI-mismatch stops and quarantine decisions.

ALTER TABLE shipments
    ADD COLUMN booking_id           uuid,         -- inbound: the site booking it serves
    ADD COLUMN run                  integer,      -- outbound: the manufacturing run whose product it carries
    ADD COLUMN ready_for_pickup_at  timestamptz,  -- inbound: when the centre reported apheresis done
    ADD COLUMN excursion_at         timestamptz,  -- first out-of-range reading (excursion published once)
    ADD COLUMN held_from_status     text,         -- the status it had when compromised or stopped
    ADD COLUMN quarantine_decision  text CHECK (quarantine_decision IN ('release', 'reject')),
    ADD COLUMN status_reason        text,
    ADD COLUMN updated_at           timestamptz NOT NULL DEFAULT now();

-- One shipment per (order, leg) holds the lane; a cancelled, compromised or delivered one frees it so a
-- recollection or a remanufactured product can get a new leg (domain.LANE_FREED).
DROP INDEX shipments_one_live_leg;
CREATE UNIQUE INDEX shipments_one_live_leg_per_order ON shipments (order_id, leg)
    WHERE status NOT IN ('cancelled', 'compromised', 'delivered');
CREATE UNIQUE INDEX shipments_one_outbound_per_run ON shipments (order_id, run)
    WHERE leg = 'outbound_product' AND run IS NOT NULL;
CREATE INDEX shipments_by_order ON shipments (order_id, leg);

-- Every status change with its reason (append-only).
CREATE TABLE shipment_status_log (
    id             bigserial PRIMARY KEY,
    shipment_id    uuid NOT NULL REFERENCES shipments (shipment_id),
    status_before  text,
    status_after   text NOT NULL,
    reason         text NOT NULL,
    changed_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX shipment_status_log_by_shipment ON shipment_status_log (shipment_id, id);

-- Every temperature reading, from the courier's logger API or carried by a milestone (append-only).
CREATE TABLE temperature_readings (
    id                bigserial PRIMARY KEY,
    shipment_id       uuid NOT NULL REFERENCES shipments (shipment_id),
    reading_c         numeric NOT NULL,
    measured_at       timestamptz NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    source            text NOT NULL CHECK (source IN ('courier', 'milestone')),
    custody_event_id  bigint REFERENCES custody_events (id),
    min_c             numeric NOT NULL,  -- the shipment's range the reading was checked against
    max_c             numeric NOT NULL,
    in_range          boolean NOT NULL,
    coi_verified      boolean NOT NULL
);
CREATE INDEX temperature_by_shipment ON temperature_readings (shipment_id, measured_at, id);

-- Orders that were cancelled or failed: a late fact (booking confirmed, product released) crossing the
-- cancellation on another topic plans nothing for them.
CREATE TABLE ended_orders (
    order_id   uuid PRIMARY KEY,
    outcome    text NOT NULL CHECK (outcome IN ('cancelled', 'failed')),
    reason     text NOT NULL,
    ended_at   timestamptz NOT NULL DEFAULT now()
);
