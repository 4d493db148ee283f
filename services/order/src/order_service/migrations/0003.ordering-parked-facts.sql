-- depends: 0002.ordering-lifecycle
-- Facts that arrived before the facts they follow (different topics keep no order between them):
-- kept here and applied as soon as the order reaches a state where they apply.
CREATE TABLE parked_facts (
    id         bigserial PRIMARY KEY,
    order_id   uuid NOT NULL REFERENCES orders (order_id),
    event_id   uuid NOT NULL,
    event      bytea NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, event_id)
);
