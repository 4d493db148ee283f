-- depends: 0001.site-initial
-- The site's part of the lifecycle: registry changes over HTTP (capacity, active, outages), bookings
-- cancelled or affected, and manufacturing per booking with an append-only history.

-- outages: the windows published in site.registered; api_managed: fields changed over the registry API
-- ('active', 'daily_capacity:<product>') that a restart's seed load leaves as they are
ALTER TABLE sites
    ADD COLUMN outages     jsonb  NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN api_managed text[] NOT NULL DEFAULT '{}';

-- treatment_center_id and product_code come with the slot (NULL for bookings made before this migration)
ALTER TABLE bookings
    ADD COLUMN treatment_center_id text,
    ADD COLUMN product_code        text,
    ADD COLUMN status_reason       text,
    ADD COLUMN updated_at          timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT bookings_status CHECK (status IN ('confirmed', 'affected', 'cancelled'));
CREATE INDEX bookings_by_order ON bookings (order_id, site_id);

-- one manufacture per booking (the material of one collection); runs 2.. come from retained material
CREATE TABLE manufacturing (
    booking_id          uuid PRIMARY KEY REFERENCES bookings (booking_id),
    order_id            uuid NOT NULL,
    coi                 text NOT NULL,
    treatment_center_id text NOT NULL,
    site_id             text NOT NULL REFERENCES sites (site_id),
    product_code        text,
    state               text NOT NULL CHECK (state IN (
                            'awaiting_material', 'material_received', 'activation', 'transduction',
                            'expansion', 'harvest', 'qc_pending', 'released', 'out_of_specification',
                            'failed', 'rejected', 'stopped')),
    run                 integer NOT NULL CHECK (run >= 0),
    steps_completed     integer NOT NULL CHECK (steps_completed BETWEEN 0 AND 5),
    failed_step         text,
    retained_material   boolean NOT NULL DEFAULT false,
    reason              text,
    received_at         timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX manufacturing_by_order ON manufacturing (order_id, site_id, created_at);

-- every receipt, step, QC disposition, remanufacture and stop, as it happened (never updated or deleted)
CREATE TABLE manufacturing_history (
    id           bigserial PRIMARY KEY,
    booking_id   uuid NOT NULL REFERENCES manufacturing (booking_id),
    order_id     uuid NOT NULL,
    site_id      text NOT NULL,
    run          integer NOT NULL,
    action       text NOT NULL CHECK (action IN ('receipt', 'step', 'step_failed', 'qc', 'remanufacture', 'stop')),
    step         text,
    state_before text NOT NULL,
    state_after  text NOT NULL,
    reason       text,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX manufacturing_history_by_booking ON manufacturing_history (booking_id, id);

CREATE FUNCTION manufacturing_history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'manufacturing_history is append-only';
END;
$$;
CREATE TRIGGER manufacturing_history_append_only
    BEFORE UPDATE OR DELETE ON manufacturing_history
    FOR EACH ROW EXECUTE FUNCTION manufacturing_history_append_only();
