-- depends: 0004.scheduling-offers
-- Issue 11: the order's live slot remembers when the material was collected (`order.apheresis_completed`:
-- the UTC date of `collected_at`; a recollection overwrites it). When the site then loses the approval for
-- the order's market or goes inactive, the slot moves elsewhere with the collection date fixed (the
-- material exists), not re-planned as if it were still to be collected. A rebooked slot keeps it.
-- Slots without it (not collected yet, or booked before this migration) move as before.
ALTER TABLE slots ADD COLUMN collected_on date;
