-- depends: 0000.messaging-outbox-inbox
CREATE TABLE subscriptions (
    subscription_id      uuid PRIMARY KEY,
    treatment_center_id  text NOT NULL,
    url                  text NOT NULL,
    secret               text NOT NULL,          -- whsec_<base64>; needed to sign, never returned
    event_types          text[],                 -- NULL: every type
    active               boolean NOT NULL DEFAULT true,
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_by_centre ON subscriptions (treatment_center_id) WHERE active;

CREATE TABLE deliveries (
    delivery_id      uuid PRIMARY KEY,
    subscription_id  uuid NOT NULL REFERENCES subscriptions (subscription_id),
    event_id         uuid NOT NULL,
    event_type       text NOT NULL,
    order_id         uuid,
    coi              text,
    treatment_center_id text NOT NULL,
    payload          bytea NOT NULL,             -- the CloudEvent as received (no patient data in events)
    trace_headers    jsonb NOT NULL DEFAULT '{}'::jsonb,
    status           text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (subscription_id, event_id)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX deliveries_by_order ON deliveries (order_id);

CREATE TABLE delivery_attempts (
    delivery_id   uuid NOT NULL REFERENCES deliveries (delivery_id),
    attempt       integer NOT NULL,
    attempted_at  timestamptz NOT NULL DEFAULT now(),
    status_code   integer,
    error         text,
    duration_ms   integer NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
