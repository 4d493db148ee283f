-- Idempotency keys (IETF httpapi Idempotency-Key), identical in every service's own schema: one row per
-- (client, key), the request's fingerprint (method, path, SHA-256 of the body), and once done the final
-- response to replay (status, the headers worth keeping such as Location, body). See
-- v2v_servicekit.idempotency.
CREATE TABLE idempotency_keys (
    client_id        text        NOT NULL,
    idempotency_key  text        NOT NULL,
    fingerprint      text        NOT NULL,
    state            text        NOT NULL CHECK (state IN ('in_flight', 'done')),
    owner            uuid        NOT NULL,          -- the attempt holding the claim
    lease_until      timestamptz,                   -- in_flight: renewed while it runs; taken over after
    status_code      integer,
    response_headers jsonb,                         -- [[name, value], ...]
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (client_id, idempotency_key),
    CHECK (state = 'in_flight' OR status_code IS NOT NULL)
);
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
