-- depends: 0000.messaging-outbox-inbox
CREATE TABLE sites (
    site_id        text PRIMARY KEY,
    name           text NOT NULL,
    country        text NOT NULL,
    region         text NOT NULL,
    timezone       text NOT NULL,
    operator       text NOT NULL CHECK (operator IN ('own', 'cmo')),
    active         boolean NOT NULL,
    approvals      jsonb NOT NULL,
    daily_capacity jsonb NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bookings (
    booking_id               uuid PRIMARY KEY,
    order_id                 uuid NOT NULL,
    coi                      text NOT NULL,
    slot_id                  uuid NOT NULL UNIQUE,
    site_id                  text NOT NULL REFERENCES sites (site_id),
    manufacturing_start_date date NOT NULL,
    apheresis_date           date NOT NULL,
    status                   text NOT NULL,
    created_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bookings_by_site_day ON bookings (site_id, manufacturing_start_date);
