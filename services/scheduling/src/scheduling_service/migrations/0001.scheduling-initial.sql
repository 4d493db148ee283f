-- depends: 0000.messaging-outbox-inbox
-- Scheduling's own copy of the site registry (from site.registered events).
CREATE TABLE sites (
    site_id        text PRIMARY KEY,
    region         text NOT NULL,
    timezone       text NOT NULL,
    active         boolean NOT NULL,
    approvals      jsonb NOT NULL,
    daily_capacity jsonb NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE slots (
    slot_id                  uuid PRIMARY KEY,
    order_id                 uuid NOT NULL,
    coi                      text NOT NULL,
    site_id                  text NOT NULL,
    product_code             text NOT NULL,
    manufacturing_start_date date NOT NULL,
    apheresis_date           date NOT NULL,
    status                   text NOT NULL CHECK (status IN ('held', 'confirmed', 'released', 'consumed')),
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
-- one live slot per order
CREATE UNIQUE INDEX slots_one_live_per_order ON slots (order_id) WHERE status IN ('held', 'confirmed');
CREATE INDEX slots_usage ON slots (site_id, product_code, manufacturing_start_date) WHERE status IN ('held', 'confirmed');

-- orders waiting for capacity, first come first served
CREATE TABLE waitlist (
    order_id     uuid PRIMARY KEY,
    request      jsonb NOT NULL,    -- the order.submitted data (no patient data)
    reason       text NOT NULL,
    enqueued_at  timestamptz NOT NULL DEFAULT now()
);
