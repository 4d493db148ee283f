-- depends: 0008.ordering-material-at-risk
-- Issue 11 (items 4 and 5): treatment gates at the centre and the patient's journey.
--
-- indication, weight_kg: clinical data of the order (the product's indication code, the patient's weight
-- where the indication's dose is per kg); they stay in the order service, as patient_ref does.
-- delivery_confirmed: the courier booked (or picked up) the product's delivery: lymphodepletion may start.
-- lymphodepletion_on: the recorded LD's start in the centre's calendar (the infusion window counts from
-- it); lymphodepletions: LD regimens recorded in all (a repeat counts). A product lost after LD clears
-- lymphodepletion_at and lymphodepletion_on (the audit trail keeps the values).
-- paused_from, hold_reason: an order on hold (status on_hold) and where its own steps stand beneath the
-- hold; the hold's reason code.
-- end_material: what physically existed when the order ended (cancelled or failed): material
-- (apheresis_material | product) and location (centre | in_transit | site); its disposition is recorded
-- in material_dispositions.
ALTER TABLE orders
    ADD COLUMN indication         text CHECK (indication IS NULL OR indication ~ '^[a-z][a-z0-9_]{0,31}$'),
    ADD COLUMN weight_kg          double precision CHECK (weight_kg IS NULL OR (weight_kg > 0 AND weight_kg <= 400)),
    ADD COLUMN delivery_confirmed boolean NOT NULL DEFAULT false,
    ADD COLUMN lymphodepletion_on date,
    ADD COLUMN lymphodepletions   integer NOT NULL DEFAULT 0 CHECK (lymphodepletions >= 0),
    ADD COLUMN paused_from        text,
    ADD COLUMN hold_reason        text,
    ADD COLUMN end_material       jsonb;

UPDATE orders SET lymphodepletions = 1, lymphodepletion_on = lymphodepletion_at::date
WHERE lymphodepletion_at IS NOT NULL;

-- what was done with the material or product left when the order ended: destroyed or returned, recorded
-- by the centre (or the manufacturer's QA for the site), once per material
CREATE TABLE material_dispositions (
    disposition_id     uuid        PRIMARY KEY,
    order_id           uuid        NOT NULL REFERENCES orders (order_id),
    material           text        NOT NULL CHECK (material IN ('apheresis_material', 'product')),
    location           text        NOT NULL,
    outcome            text        NOT NULL CHECK (outcome IN ('destroyed', 'returned')),
    reason_code        text        NOT NULL,
    document_reference text,
    performed_at       timestamptz NOT NULL,
    recorded_by        text        NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, material)
);
