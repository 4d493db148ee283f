-- depends: 0006.ordering-edge
-- Who placed an order and under which Idempotency-Key, written in the order's own transaction: a retry
-- whose first attempt committed the order but could not store the key's answer (the database went away
-- between the two) is recognised by its key and answered with that order, not 409 open-order-exists.
ALTER TABLE orders ADD COLUMN placed_by text, ADD COLUMN placement_key text;
CREATE UNIQUE INDEX orders_by_placement ON orders (placed_by, placement_key) WHERE placement_key IS NOT NULL;
