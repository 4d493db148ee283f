-- depends: 0000.messaging-outbox-inbox
CREATE TABLE shipments (
    shipment_id          uuid PRIMARY KEY,
    order_id             uuid NOT NULL,
    coi                  text NOT NULL,
    leg                  text NOT NULL CHECK (leg IN ('inbound_apheresis', 'outbound_product')),
    origin               text NOT NULL,
    destination          text NOT NULL,
    material_condition   text NOT NULL,
    min_temp_c           numeric NOT NULL,
    max_temp_c           numeric NOT NULL,
    planned_pickup_date  date NOT NULL,
    status               text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX shipments_one_live_leg ON shipments (order_id, leg) WHERE status <> 'cancelled';
