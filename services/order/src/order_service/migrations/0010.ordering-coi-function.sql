-- depends: 0009.ordering-treatment-gates
-- Issue 12: placing an order takes its COI sequence number in the statement that inserts the order, so
-- that the counter's row lock (which serialises every placing of the year) is held from that statement
-- to COMMIT, not from the first check. The COI is made here as `v2v_contracts.coi.make_coi` makes it:
-- the 5-character facility id, the 2-digit year, the 6-digit sequence, and the ISO 7064 MOD 37-2 check
-- character over those 13 characters (`G123498654321` -> `H`). The service compares what this returns
-- with its own `make_coi` and refuses to commit on a difference.
CREATE FUNCTION coi_of(facility text, year integer, seq integer) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    alphabet constant text := '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ*';
    din text;
    total integer := 0;
BEGIN
    IF facility !~ '^[A-Z][A-Z0-9]{4}$' THEN
        RAISE EXCEPTION 'facility id must be a letter followed by 4 letters or digits';
    END IF;
    IF seq < 1 OR seq > 999999 THEN
        RAISE EXCEPTION 'sequence must be 1..999999';
    END IF;
    din := facility || lpad((year % 100)::text, 2, '0') || lpad(seq::text, 6, '0');
    FOR i IN 1..13 LOOP
        total := ((total + strpos(alphabet, substr(din, i, 1)) - 1) * 2) % 37;
    END LOOP;
    RETURN din || substr(alphabet, (38 - total) % 37 + 1, 1);
END
$$;
