-- depends: 0003.site-origin-trace
-- Reasons are codes (issue 8): no free text is stored, logged or published by the site. The detail of a
-- refusal, a failure or a QC finding stays in the site's own quality system; an MES report may name its
-- document there with an opaque `reference` (an identifier, kept in the history beside the code).
ALTER TABLE manufacturing_history ADD COLUMN reference text;

-- Outages declared before reasons were codes: their free text becomes 'other' (the published entry
-- must carry a code, and the text must not stay behind).
UPDATE sites SET outages = (
    SELECT coalesce(jsonb_agg(
               CASE WHEN o ->> 'reason' IN ('maintenance', 'equipment_failure', 'contamination', 'utilities',
                                            'staffing', 'regulatory_hold', 'other')
                    THEN o
                    ELSE jsonb_set(o, '{reason}', '"other"') END
               ORDER BY n), '[]'::jsonb)
    FROM jsonb_array_elements(outages) WITH ORDINALITY AS t(o, n))
WHERE outages <> '[]'::jsonb;
