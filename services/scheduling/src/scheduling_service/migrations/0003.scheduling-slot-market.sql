-- depends: 0002.scheduling-lifecycle
-- A slot remembers the order's market (use, regulator) and region, so that when its site loses the
-- approval for that market (or is deactivated) the slot moves elsewhere like a site outage rebook.
-- Slots booked before this migration have none: they are left where they are.
ALTER TABLE slots ADD COLUMN order_type text;
ALTER TABLE slots ADD COLUMN regulator text;
ALTER TABLE slots ADD COLUMN region text;
CREATE INDEX slots_live_at_site ON slots (site_id) WHERE status IN ('held', 'confirmed');
