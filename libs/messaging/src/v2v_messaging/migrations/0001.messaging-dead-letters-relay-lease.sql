-- Dead letters kept in Postgres (besides the dead-letter topic), and the relay's leadership lease.

-- A message a consumer gave up on (poison), or an outbox row the broker refused (moved aside by the
-- relay, consumer = 'outbox-relay'): the raw message as it was, where it came from, and why.
CREATE TABLE dead_letters (
    id               bigserial   PRIMARY KEY,
    consumer         text        NOT NULL,          -- consumer group, or 'outbox-relay'
    topic            text        NOT NULL,          -- where the message was read from / was going to
    kafka_partition  integer,                       -- NULL for a row the relay moved aside
    kafka_offset     bigint,
    event_id         uuid,                          -- NULL when the message is not a CloudEvent
    event_type       text,
    message_key      bytea,
    payload          bytea       NOT NULL,          -- the raw message, exactly as received / stored
    headers          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error            text        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 1,
    occurrences      integer     NOT NULL DEFAULT 1, -- dead-lettered again after a replay
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz,
    replays          integer     NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX dead_letters_consumer_event ON dead_letters (consumer, event_id) WHERE event_id IS NOT NULL;
CREATE INDEX dead_letters_newest ON dead_letters (dead_lettered_at DESC, id DESC);

-- One row per schema: which relay leads (a lease renewed by the leader; another replica takes over
-- after it expires; the epoch fences a resumed ex-leader's writes), the broker it last saw and where
-- each partition's log had got to (to notice a broker that lost it), and the replay cursor.
CREATE TABLE outbox_relay (
    name             text        PRIMARY KEY,
    holder           text,
    epoch            bigint      NOT NULL DEFAULT 0,
    expires_at       timestamptz,
    cluster_id       text,
    broker_marks     jsonb       NOT NULL DEFAULT '{}'::jsonb,  -- {"topic": {"partition": high watermark}}
    replay_next_id   bigint,
    replay_end_id    bigint,
    replay_started_at timestamptz,
    replay_reason    text
);
