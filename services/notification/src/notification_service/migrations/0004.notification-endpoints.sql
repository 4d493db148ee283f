-- depends: 0003.notification-edge
-- Issue 9 (one dead endpoint delays everyone; webhook duplicates past the lease).
-- 1. Each webhook endpoint (a subscription's URL) has a circuit breaker: `open` (its deliveries are
--    attempted, a few at once), `parked` after consecutive failures (its deliveries wait, none attempted,
--    until `parked_until`), `probing` (one delivery sent to see whether it answers again; `parked_until`
--    is then the end of the probe's lease). The owning centre sees it on the subscription and in the log.
-- 2. A lease has a token: an attempt's outcome is recorded only by the holder of the current lease.
-- 3. `seq`: the order deliveries were queued in (an order's deliveries to one target go in this order).
CREATE TABLE webhook_endpoints (
    subscription_id       uuid PRIMARY KEY REFERENCES subscriptions (subscription_id),
    state                 text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'parked', 'probing')),
    consecutive_failures  integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    parks                 integer NOT NULL DEFAULT 0 CHECK (parks >= 0),
    parked_until          timestamptz,
    probe_delivery_id     uuid,
    changed_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoints_parked_until_when_not_open CHECK ((state = 'open') = (parked_until IS NULL))
);
INSERT INTO webhook_endpoints (subscription_id) SELECT subscription_id FROM subscriptions;
-- every subscription has its endpoint's breaker, however it was made
CREATE FUNCTION webhook_endpoint_of_new_subscription() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_endpoints (subscription_id) VALUES (NEW.subscription_id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER subscriptions_have_an_endpoint AFTER INSERT ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION webhook_endpoint_of_new_subscription();

ALTER TABLE deliveries
    ADD COLUMN lease_token uuid,
    ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
ALTER TABLE email_deliveries
    ADD COLUMN lease_token uuid,
    ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
-- a delivery leased before this has no token: it is leased anew (with one) once its lease runs out

-- per endpoint: its due deliveries oldest first, its newest first attempts, and an order's lane
CREATE INDEX deliveries_due_by_endpoint ON deliveries (subscription_id, next_attempt_at, seq)
    WHERE status = 'pending';
CREATE INDEX deliveries_new_by_endpoint ON deliveries (subscription_id, seq)
    WHERE status = 'pending' AND attempts = 0;
CREATE INDEX deliveries_lane ON deliveries (subscription_id, order_id, seq) WHERE status = 'pending';
-- those leased (a few per endpoint: an endpoint's room, a lane's being busy)
CREATE INDEX deliveries_leased ON deliveries (subscription_id, order_id)
    WHERE status = 'pending' AND lease_until IS NOT NULL;

CREATE OR REPLACE VIEW delivery_log AS
    SELECT 'webhook'::text AS channel, d.delivery_id, d.subscription_id, NULL::uuid AS recipient_id,
           d.event_id, d.event_type, d.order_id, d.coi, d.treatment_center_id, d.status, d.attempts,
           d.last_status_code, d.last_error, d.created_at, d.delivered_at, d.next_attempt_at,
           coalesce(e.state, 'open') AS endpoint_state, e.parked_until
      FROM deliveries d LEFT JOIN webhook_endpoints e ON e.subscription_id = d.subscription_id
    UNION ALL
    SELECT 'email'::text, delivery_id, NULL::uuid, recipient_id, event_id,
           event_type, order_id, coi, treatment_center_id, status, attempts, last_status_code, last_error,
           created_at, delivered_at, next_attempt_at, NULL::text, NULL::timestamptz
      FROM email_deliveries;
