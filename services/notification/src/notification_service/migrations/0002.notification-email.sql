-- depends: 0001.notification-initial
-- E-mail alerts for exceptions: recipients per treatment centre, deliveries (outbox-like, written by the
-- consumer with its inbox entry), one row per SMTP attempt; and the delivery log across both channels.
CREATE TABLE email_recipients (
    recipient_id         uuid PRIMARY KEY,
    treatment_center_id  text NOT NULL,
    email                text NOT NULL,
    event_types          text[],                 -- NULL: every exception type
    active               boolean NOT NULL DEFAULT true,
    created_at           timestamptz NOT NULL DEFAULT now(),
    removed_at           timestamptz
);
CREATE UNIQUE INDEX email_recipients_once_per_centre
    ON email_recipients (treatment_center_id, lower(email)) WHERE active;

CREATE TABLE email_deliveries (
    delivery_id      uuid PRIMARY KEY,
    recipient_id     uuid NOT NULL REFERENCES email_recipients (recipient_id),
    event_id         uuid NOT NULL,
    event_type       text NOT NULL,
    order_id         uuid,
    coi              text,
    treatment_center_id text NOT NULL,
    subject          text NOT NULL,              -- rendered from allow-listed fields only (no patient data)
    body             text NOT NULL,
    trace_headers    jsonb NOT NULL DEFAULT '{}'::jsonb,
    status           text NOT NULL CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    last_status_code integer,                    -- SMTP reply code
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (recipient_id, event_id)
);
CREATE INDEX email_deliveries_due ON email_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX email_deliveries_by_order ON email_deliveries (order_id);

CREATE TABLE email_delivery_attempts (
    delivery_id   uuid NOT NULL REFERENCES email_deliveries (delivery_id),
    attempt       integer NOT NULL,
    attempted_at  timestamptz NOT NULL DEFAULT now(),
    status_code   integer,                       -- SMTP reply code, when the server answered
    error         text,
    duration_ms   integer NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);

-- GET /v1/deliveries: one log over both channels
CREATE VIEW delivery_log AS
    SELECT 'webhook'::text AS channel, delivery_id, subscription_id, NULL::uuid AS recipient_id, event_id,
           event_type, order_id, coi, treatment_center_id, status, attempts, last_status_code, last_error,
           created_at, delivered_at, next_attempt_at
      FROM deliveries
    UNION ALL
    SELECT 'email'::text, delivery_id, NULL::uuid, recipient_id, event_id,
           event_type, order_id, coi, treatment_center_id, status, attempts, last_status_code, last_error,
           created_at, delivered_at, next_attempt_at
      FROM email_deliveries;

CREATE VIEW delivery_attempt_log AS
    SELECT 'webhook'::text AS channel, delivery_id, attempt, attempted_at, status_code, error, duration_ms
      FROM delivery_attempts
    UNION ALL
    SELECT 'email'::text, delivery_id, attempt, attempted_at, status_code, error, duration_ms
      FROM email_delivery_attempts;
