-- The audit trail (v2v_audit), identical in every service's own schema: append-only, one hash chain per
-- schema. 21 CFR 11.10(e), EU GMP Annex 11 §9. Run by the schema's owner role; the service's runtime role
-- may only add entries and read them.
CREATE TABLE audit_trail (
    seq              bigint      PRIMARY KEY CHECK (seq >= 1),   -- gapless, in chain order
    entry_id         uuid        NOT NULL UNIQUE,
    recorded_at      timestamptz NOT NULL,                       -- the database server's clock
    actor_client_id  text        NOT NULL,                       -- the OAuth client, or the service's consumer
    actor_user_id    text,                                       -- the individual, when one signed in
    actor_kind       text        NOT NULL,                       -- centre | carrier | site | qa | ... | system
    actor_entity_id  text,                                       -- the actor's organisation (centre, site, ...)
    action           text        NOT NULL,                       -- e.g. order.cancelled, slot.reserved
    object_type      text        NOT NULL,
    object_id        text        NOT NULL,
    old_values       jsonb,
    new_values       jsonb,
    reason           text,                                       -- reason code
    cause            text,                                       -- event:<id> for a consumer, trace:<id> for a request
    prev_hash        bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    entry_hash       bytea       NOT NULL UNIQUE CHECK (octet_length(entry_hash) = 32)
);
CREATE INDEX audit_trail_object ON audit_trail (object_type, object_id, seq);

-- Nothing in the trail is ever changed or removed, by anybody the triggers apply to (the runtime role has
-- no such privilege either; the owner would have to drop the triggers first, and the verifier would see).
CREATE FUNCTION audit_trail_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_trail is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_trail_no_update BEFORE UPDATE OR DELETE ON audit_trail
    FOR EACH ROW EXECUTE FUNCTION audit_trail_refuse();
CREATE TRIGGER audit_trail_no_truncate BEFORE TRUNCATE ON audit_trail
    FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_refuse();

-- A new entry continues the chain: the next seq, after the current tail's hash, timed within this
-- transaction by the server's clock (never back-dated by a client).
CREATE FUNCTION audit_trail_append_check() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    tail_hash bytea;
BEGIN
    IF NEW.recorded_at < transaction_timestamp() OR NEW.recorded_at > clock_timestamp() THEN
        RAISE EXCEPTION 'audit entry % must be timed by the server within its transaction', NEW.seq
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.seq = 1 THEN
        tail_hash := decode(repeat('00', 32), 'hex');
    ELSE
        SELECT entry_hash INTO tail_hash FROM audit_trail WHERE seq = NEW.seq - 1;
    END IF;
    IF tail_hash IS NULL OR NEW.prev_hash <> tail_hash THEN
        RAISE EXCEPTION 'audit entry % does not continue the chain', NEW.seq
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_trail_append BEFORE INSERT ON audit_trail
    FOR EACH ROW EXECUTE FUNCTION audit_trail_append_check();

-- The writer's serialization point: an advisory lock of this schema's chain, held until COMMIT, then the
-- tail read under it (a fresh snapshot: it sees the entries committed by the previous holder) and the
-- server's clock. Writers call it right before COMMIT with all their entries (v2v_audit.trail).
CREATE FUNCTION audit_chain_tail(OUT chain_schema text, OUT tail_seq bigint, OUT tail_hash bytea,
                                 OUT server_time timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    chain_schema := current_schema();
    PERFORM pg_advisory_xact_lock(hashtextextended('v2v.audit_trail:' || chain_schema, 0));
    SELECT t.seq, t.entry_hash INTO tail_seq, tail_hash FROM audit_trail t ORDER BY t.seq DESC LIMIT 1;
    server_time := clock_timestamp();
END
$$;

-- Take back what the owner's default privileges gave other roles on the trail: they keep SELECT and
-- INSERT. Run by the migration and again at every start (v2v_audit.service), since provisioning grants
-- every table's DML to the runtime role again.
CREATE FUNCTION audit_trail_lockdown() RETURNS integer LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
DECLARE
    r record;
    n integer := 0;
    table_owner name := (SELECT pg_get_userbyid(c.relowner) FROM pg_class c
                         WHERE c.oid = 'audit_trail'::regclass);
BEGIN
    FOR r IN SELECT DISTINCT g.grantee FROM information_schema.role_table_grants g
             WHERE g.table_schema = current_schema() AND g.table_name = 'audit_trail'
               AND g.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER')
               AND g.grantee <> table_owner
    LOOP
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON audit_trail FROM %s',
                       CASE WHEN r.grantee = 'PUBLIC' THEN 'PUBLIC' ELSE quote_ident(r.grantee) END);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION audit_trail_lockdown() FROM PUBLIC;
DO $$ BEGIN PERFORM audit_trail_lockdown(); END $$;
