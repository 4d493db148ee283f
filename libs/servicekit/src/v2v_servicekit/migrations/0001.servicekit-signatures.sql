-- Electronic signatures (21 CFR 11.50, 11.70; EU GMP Annex 11 §14), identical in every service's own
-- schema. See v2v_servicekit.signatures.
--
-- signatures: one row per signature — who (user id, printed name, roles, organisation), through which
-- registered client, what it means, when (server UTC), and the SHA-256 of the canonical form of the signed
-- record (object type, id and its relevant fields). Rows are never changed or removed: a trigger refuses
-- UPDATE, DELETE and TRUNCATE for every role (a record changed later shows unsigned; it is not re-signed
-- by editing the signature).
CREATE TABLE signatures (
    signature_id     uuid        PRIMARY KEY,
    object_type      text        NOT NULL CHECK (length(object_type) BETWEEN 1 AND 64),
    object_id        text        NOT NULL CHECK (length(object_id) BETWEEN 1 AND 200),
    meaning          text        NOT NULL CHECK (length(meaning) BETWEEN 1 AND 64),
    signer_user_id   text        NOT NULL CHECK (length(signer_user_id) BETWEEN 1 AND 255),
    signer_name      text        NOT NULL CHECK (length(signer_name) BETWEEN 1 AND 255),
    signer_roles     text[]      NOT NULL,
    signer_org_kind  text        NOT NULL CHECK (signer_org_kind IN ('site', 'centre')),
    signer_org       text        NOT NULL,
    client_id        text        NOT NULL,        -- the system the signature was collected through
    record_sha256    text        NOT NULL CHECK (record_sha256 ~ '^[0-9a-f]{64}$'),
    canonicalization text        NOT NULL,        -- the canonical form's version (v2v-jcs-1)
    token_jti        text        NOT NULL UNIQUE, -- the signing token: one signature per token
    auth_time        timestamptz NOT NULL,        -- when the password was entered at the identity provider
    signed_at        timestamptz NOT NULL,        -- server time of the insert (clock_timestamp())
    issuer           text        NOT NULL
);
CREATE INDEX signatures_object ON signatures (object_type, object_id, signed_at);

CREATE FUNCTION servicekit_signatures_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'signatures are append-only (21 CFR 11.70): % refused', TG_OP;
END
$$;
CREATE TRIGGER signatures_no_update_or_delete BEFORE UPDATE OR DELETE ON signatures
    FOR EACH ROW EXECUTE FUNCTION servicekit_signatures_append_only();
CREATE TRIGGER signatures_no_truncate BEFORE TRUNCATE ON signatures
    FOR EACH STATEMENT EXECUTE FUNCTION servicekit_signatures_append_only();

-- signature_token_uses: each signing token's id, claimed when a request presenting it is verified, so that
-- a token signs once across all replicas of the service; purged a day after the token expired.
CREATE TABLE signature_token_uses (
    jti        text        PRIMARY KEY,
    used_at    timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX signature_token_uses_expires_at ON signature_token_uses (expires_at);
