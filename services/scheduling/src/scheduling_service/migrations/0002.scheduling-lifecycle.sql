-- depends: 0001.scheduling-initial
-- The order lifecycle in scheduling: rebook, release (cancel, failure), consumption, site outages.

-- Site outages (from site.registered): windows, end date inclusive, in which no manufacturing starts.
ALTER TABLE sites ADD COLUMN outages jsonb NOT NULL DEFAULT '[]'::jsonb;

-- Why a slot was reserved (initial | waitlist | rebook:<kind>) and why it was released.
ALTER TABLE slots ADD COLUMN treatment_center_id text;
ALTER TABLE slots ADD COLUMN reserved_reason text NOT NULL DEFAULT 'initial';
ALTER TABLE slots ADD COLUMN release_reason text;
ALTER TABLE slots ADD COLUMN released_at timestamptz;
-- a consumed slot (material received, manufacturing under way) keeps its day's capacity used
CREATE INDEX slots_capacity_used ON slots (product_code, manufacturing_start_date, site_id)
    WHERE status IN ('held', 'confirmed', 'consumed');

-- The waitlist remembers what asked for the slot: an order.submitted or an order.rebook_requested
-- (kind, reason, the site to avoid), so that serving it later books exactly what was asked for.
ALTER TABLE waitlist ADD COLUMN request_type text NOT NULL DEFAULT 'order.submitted.v1';
ALTER TABLE waitlist ADD COLUMN product_code text;
ALTER TABLE waitlist ADD COLUMN exclude_site_id text;
ALTER TABLE waitlist ADD COLUMN rebook_kind text;
UPDATE waitlist SET product_code = request ->> 'product_code' WHERE product_code IS NULL;
ALTER TABLE waitlist ALTER COLUMN product_code SET NOT NULL;
ALTER TABLE waitlist ADD CONSTRAINT waitlist_request_type
    CHECK (request_type IN ('order.submitted.v1', 'order.rebook_requested.v1'));
CREATE INDEX waitlist_fifo ON waitlist (product_code, enqueued_at, order_id);

-- Orders that are over for scheduling (cancelled, failed): later requests for them are ignored.
CREATE TABLE closed_orders (
    order_id   uuid PRIMARY KEY,
    status     text NOT NULL CHECK (status IN ('cancelled', 'failed')),
    reason     text NOT NULL,
    closed_at  timestamptz NOT NULL DEFAULT now()
);
