-- depends: 0003.logistics-lifecycle
-- A run's outbound shipment that was compromised or cancelled does not block its replacement
-- (after a recollection runs start again at 1; a rejected product is replaced by a new one).
DROP INDEX shipments_one_outbound_per_run;
CREATE UNIQUE INDEX shipments_one_live_outbound_per_run ON shipments (order_id, run)
    WHERE leg = 'outbound_product' AND run IS NOT NULL AND status NOT IN ('compromised', 'cancelled');
