-- depends: 0000.messaging-outbox-inbox
CREATE TABLE treatment_centers (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    country     text NOT NULL,
    region      text NOT NULL,
    regulator   text NOT NULL,
    timezone    text NOT NULL,
    certified   boolean NOT NULL DEFAULT true
);

CREATE TABLE products (
    code        text PRIMARY KEY,
    name        text NOT NULL,
    attributes  jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE coi_sequences (
    year        integer PRIMARY KEY,
    last_value  integer NOT NULL
);

CREATE TABLE orders (
    order_id                 uuid PRIMARY KEY,
    coi                      text NOT NULL UNIQUE,
    treatment_center_id      text NOT NULL REFERENCES treatment_centers (id),
    product_code             text NOT NULL REFERENCES products (code),
    order_type               text NOT NULL CHECK (order_type IN ('commercial', 'clinical')),
    patient_ref              text NOT NULL,      -- patient-identifying: never leaves this service
    requested_apheresis_date date NOT NULL,
    status                   text NOT NULL,
    site_id                  text,
    slot_id                  uuid,
    apheresis_date           date,
    manufacturing_start_date date,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    version                  integer NOT NULL DEFAULT 1
);
CREATE INDEX orders_by_centre ON orders (treatment_center_id, created_at, order_id);

CREATE TABLE order_timeline (
    id            bigserial PRIMARY KEY,
    order_id      uuid NOT NULL REFERENCES orders (order_id),
    event_id      uuid NOT NULL,
    event_type    text NOT NULL,
    source        text NOT NULL,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    status_before text,
    status_after  text,
    reason        text NOT NULL,
    UNIQUE (order_id, event_id)
);
