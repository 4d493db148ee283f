-- depends: 0005.ordering-network
-- One open order per centre, patient and product: a second one is refused (409 open-order-exists) by
-- this index, however two requests interleave. Open = not in a terminal status (completed, cancelled,
-- failed; `domain.order.TERMINAL`). Open duplicates placed before this rule are marked and left alone
-- (the index skips them), so the migration applies to a database that already has some.
ALTER TABLE orders ADD COLUMN predates_open_order_rule boolean NOT NULL DEFAULT false;
UPDATE orders o SET predates_open_order_rule = true
WHERE o.status NOT IN ('completed', 'cancelled', 'failed')
  AND EXISTS (
      SELECT 1 FROM orders p
      WHERE p.treatment_center_id = o.treatment_center_id
        AND p.patient_ref = o.patient_ref
        AND p.product_code = o.product_code
        AND p.status NOT IN ('completed', 'cancelled', 'failed')
        AND (p.created_at, p.order_id) < (o.created_at, o.order_id));
CREATE UNIQUE INDEX orders_one_open_per_patient_product
    ON orders (treatment_center_id, patient_ref, product_code)
    WHERE status NOT IN ('completed', 'cancelled', 'failed') AND NOT predates_open_order_rule;

-- The free-text note staff typed with an action (cancel, apheresis date, quarantine decision): it stays
-- here, on the order's timeline; events, logs and spans carry the action's reason code only.
ALTER TABLE order_timeline ADD COLUMN note text CHECK (note IS NULL OR char_length(note) <= 500);
