-- depends: 0004.site-reason-codes
-- Issue 10: release as it is done. A lot per run, QC results with a certificate-of-analysis reference,
-- QC `passed` waiting for the signed release (qc_passed), material held at receipt until QA decides
-- (held_at_receipt), and what the site learns of each order from the order service (its market, and the
-- DIN of its latest collection) to check a receipt's pair (COI + DIN) and to know who must sign.
ALTER TABLE manufacturing DROP CONSTRAINT manufacturing_state_check;
ALTER TABLE manufacturing ADD CONSTRAINT manufacturing_state_check CHECK (state IN (
    'awaiting_material', 'held_at_receipt', 'material_received', 'activation', 'transduction',
    'expansion', 'harvest', 'qc_pending', 'qc_passed', 'released', 'out_of_specification', 'failed',
    'rejected', 'stopped'));
ALTER TABLE manufacturing
    ADD COLUMN lot           text,       -- the current run's lot
    ADD COLUMN exceptional   boolean NOT NULL DEFAULT false,
    ADD COLUMN qc_results    jsonb,      -- the current run's QC summary: numbers and codes only
    ADD COLUMN coa_reference text,       -- its certificate of analysis: an opaque document id
    ADD COLUMN din           text;       -- the DIN verified at receipt
CREATE UNIQUE INDEX manufacturing_lot ON manufacturing (lot) WHERE lot IS NOT NULL;

ALTER TABLE manufacturing_history DROP CONSTRAINT manufacturing_history_action_check;
ALTER TABLE manufacturing_history ADD CONSTRAINT manufacturing_history_action_check CHECK (action IN (
    'receipt', 'step', 'step_failed', 'qc', 'remanufacture', 'stop', 'disposition', 'signature', 'release'));
ALTER TABLE manufacturing_history ADD COLUMN lot text;

-- lot numbers: <site prefix>-<8 digits> (site_service.domain.release.make_lot)
CREATE SEQUENCE lot_numbers AS bigint MINVALUE 1 MAXVALUE 99999999 NO CYCLE;

-- per order, as the order service published it: the market (order.submitted) and the DIN of the latest
-- collection (order.apheresis_completed); nothing patient-identifying
CREATE TABLE order_facts (
    order_id     uuid PRIMARY KEY,
    regulator    text,
    order_type   text,
    country      text,
    region       text,
    din          text,
    collection   integer,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
