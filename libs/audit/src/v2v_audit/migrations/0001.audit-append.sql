-- Appending entries in one round trip (v2v_audit.trail.append): the chain lock, the tail read under it,
-- the server's clock, and for each entry its hash and its row, in one call right before COMMIT. The client
-- sends each entry's canonical form without the four values only the database knows (v2v_audit.chain
-- .template: `head` up to the previous hash, `middle` between it and the time); the hash is SHA-256 over
-- the same bytes as the verifier's `canonical`, and the client checks every returned hash against its own.
-- The insert trigger (audit_trail_append_check) still checks every row's seq, previous hash and time.
CREATE FUNCTION audit_append(
    heads text[], middles text[], entry_ids uuid[], client_ids text[], user_ids text[], kinds text[],
    entity_ids text[], actions text[], object_types text[], object_ids text[], olds text[], news text[],
    reasons text[], causes text[])
RETURNS TABLE (chain_schema text, seq bigint, recorded_at timestamptz, prev_hash bytea, entry_hash bytea)
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    s text := current_schema();
    n bigint;
    prev bytea;
    at timestamptz;
    at_text text;
    h bytea;
BEGIN
    IF s !~ '^[a-z_][a-z0-9_]*$' THEN  -- its JSON text is then the name in quotes, as in Python's
        RAISE EXCEPTION 'audit_append: schema name % is not a plain identifier', s
            USING ERRCODE = 'invalid_schema_name';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('v2v.audit_trail:' || s, 0));
    SELECT t.seq, t.entry_hash INTO n, prev FROM audit_trail t ORDER BY t.seq DESC LIMIT 1;
    n := coalesce(n, 0);
    prev := coalesce(prev, decode(repeat('00', 32), 'hex'));
    at := clock_timestamp();
    at_text := to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
    FOR i IN 1 .. coalesce(cardinality(heads), 0) LOOP
        n := n + 1;
        h := sha256(convert_to(heads[i] || encode(prev, 'hex') || middles[i] || at_text || '","schema":"' || s
                               || '","seq":' || n::text || '}', 'UTF8'));
        INSERT INTO audit_trail (seq, entry_id, recorded_at, actor_client_id, actor_user_id, actor_kind,
                                 actor_entity_id, action, object_type, object_id, old_values, new_values,
                                 reason, cause, prev_hash, entry_hash)
        VALUES (n, entry_ids[i], at, client_ids[i], user_ids[i], kinds[i], entity_ids[i], actions[i],
                object_types[i], object_ids[i], olds[i]::jsonb, news[i]::jsonb, reasons[i], causes[i], prev, h);
        chain_schema := s;
        seq := n;
        recorded_at := at;
        prev_hash := prev;
        entry_hash := h;
        RETURN NEXT;
        prev := h;
    END LOOP;
END
$$;
