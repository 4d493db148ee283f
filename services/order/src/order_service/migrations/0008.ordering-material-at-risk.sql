-- depends: 0007.ordering-placement-key
-- Issue 10: material at risk is a QA decision, identity per collection and per run, tracked
-- authority notifications.
--
-- at_risk: while an order is held (material_at_risk, awaiting_physician), why: the cause (OOS, excursion,
-- receipt), the fact's code, the leg / run / shipment and QA's request (domain.order.AtRisk).
-- status_before_quarantine keeps its name: it is where a held order returns when QA releases it.
-- din: the donation identification number of the order's current collection (ISBT 128 shape, issued
-- at apheresis); lot: the lot of the run the site released (learned from site.product_released), checked
-- at receipt and infusion with the COI; expanded_access: an OOS product the physician accepted in a
-- market that treats it as expanded access (FDA).
ALTER TABLE orders
    ADD COLUMN at_risk         jsonb,
    ADD COLUMN din             text,
    ADD COLUMN lot             text,
    ADD COLUMN expanded_access boolean NOT NULL DEFAULT false;

-- a product quarantined after an outbound excursion (before this workflow) is held material now
UPDATE orders
SET status = 'material_at_risk',
    at_risk = '{"cause": "excursion", "reason": "temperature_excursion", "leg": "outbound_product"}'::jsonb
WHERE status = 'quarantined';

-- one row per collection: its DIN, unique across the platform (COIs and DINs share one sequence)
CREATE TABLE collections (
    order_id     uuid        NOT NULL REFERENCES orders (order_id),
    collection   integer     NOT NULL CHECK (collection >= 1),
    din          text        NOT NULL UNIQUE,
    collected_at timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, collection)
);

-- tasks the order service tracks for QA: the notification of the competent authority within 48 hours
-- of administering a non-conforming product on physician request (EU GMP for ATMPs Part IV §11.5).
-- due_at is set when the infusion is recorded (infused_at + 48 h); done by QA through the API.
CREATE TABLE authority_tasks (
    task_id        uuid        PRIMARY KEY,
    order_id       uuid        NOT NULL REFERENCES orders (order_id),
    kind           text        NOT NULL CHECK (kind IN ('authority_notification')),
    regulator      text        NOT NULL,
    cause          text        NOT NULL,
    run            integer     NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    administered_at timestamptz,
    due_at         timestamptz,
    state          text        NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'done')),
    completed_at   timestamptz,
    completed_by   text,
    reference      text,
    UNIQUE (order_id, kind, run)
);
CREATE INDEX authority_tasks_open ON authority_tasks (state, due_at);

-- signed decisions on an order (QA disposition, physician decision, cancellation after manufacture
-- started): what was decided, as signed. The signature (table `signatures`, object type `decision`, the
-- decision id) binds the SHA-256 of these fields (21 CFR 11.70): a row changed later shows unsigned.
CREATE TABLE signed_decisions (
    decision_id uuid        PRIMARY KEY,
    order_id    uuid        NOT NULL REFERENCES orders (order_id),
    meaning     text        NOT NULL,
    fields      jsonb       NOT NULL,
    decided_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX signed_decisions_by_order ON signed_decisions (order_id, decided_at);
