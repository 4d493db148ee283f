-- depends: 0003.scheduling-slot-market
-- Issue 11: offers a centre holds before it orders, and an explicit priority on the waitlist.

-- A centre's hold on one offer (site, manufacturing day, planned apheresis): it uses that day's capacity
-- while active; it is claimed by the order that names it (order.submitted's offer_id), released by the
-- centre, or expires (the sweeper: the slot returns to the pool and the waitlist is served).
CREATE TABLE holds (
    hold_id                  uuid PRIMARY KEY,
    treatment_center_id      text NOT NULL,
    site_id                  text NOT NULL,
    product_code             text NOT NULL,
    order_type               text NOT NULL,
    regulator                text NOT NULL,
    region                   text NOT NULL,
    manufacturing_start_date date NOT NULL,
    apheresis_date           date NOT NULL,
    predicted_delivery       date,
    status                   text NOT NULL CHECK (status IN ('active', 'claimed', 'expired', 'released')),
    expires_at               timestamptz NOT NULL,
    order_id                 uuid,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX holds_capacity_used ON holds (product_code, manufacturing_start_date, site_id)
    WHERE status = 'active';
CREATE INDEX holds_expiry ON holds (expires_at) WHERE status = 'active';
CREATE UNIQUE INDEX holds_one_per_order ON holds (order_id) WHERE order_id IS NOT NULL;

-- Waitlist priority, highest first, then first come first served: a patient moved by a recollection or a
-- site (outage, lost approval) waits at 1, ahead of new orders (0); ops may set any 0..9.
ALTER TABLE waitlist ADD COLUMN priority integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9);
CREATE INDEX waitlist_priority ON waitlist (product_code, priority DESC, enqueued_at, order_id);

-- a centre's quota counts its slots per manufacturing day
CREATE INDEX slots_centre_usage ON slots (treatment_center_id, product_code, manufacturing_start_date)
    WHERE status IN ('held', 'confirmed', 'consumed');
