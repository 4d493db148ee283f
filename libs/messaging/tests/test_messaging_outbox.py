"""Transactional outbox and relay against real Postgres and the real Kafka-protocol broker.

- the state change and its event commit or roll back together (and the relay is woken only on commit);
- the relay publishes pending rows in id order, key = subject, value = the stored CloudEvent JSON,
  with the writer's W3C trace context, marks them published and never sends them again;
- a pass sends its rows of one partition as one record batch; a row not handed over by the pass's
  deadline fails and the rows after it wait, in order, for the next pass;
- each published record has a "create" span under the span it was written in (its traceparent) and
  the publish metrics, as FastStream's telemetry middleware made them, and no "publish" span;
- two relays draining the same outbox concurrently never publish a row twice;
- a broker that lost everything (empty topic) gets the retained rows again.

(The faults — a broker that forgets at run time, leases, refused rows — are in test_messaging_faults.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from faststream.kafka import KafkaBroker
from opentelemetry.sdk.trace import TracerProvider

from v2v_contracts import CONTENT_TYPE, CloudEvent
from v2v_messaging import KafkaSettings, OutboxRelay, UnitOfWork, make_broker, notify_channel
from v2v_messaging.outbox import RelayBackoff
from v2v_persistence import create_pool

pytestmark = pytest.mark.integration


def make_event(subject: str, n: int = 0) -> CloudEvent:
    return CloudEvent(source="/v2v/order", type="order.it_test.v1", subject=subject, data={"n": n})


def headers_of(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (record.headers or ())}


def trace_id_of(traceparent: str) -> str:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16 and len(flags) == 2
    return trace_id


@pytest.fixture
async def broker(kafka: KafkaSettings) -> AsyncIterator[KafkaBroker]:
    b = make_broker(kafka, f"it-relay-{uuid.uuid4().hex[:6]}", tracer_provider=None)
    await b.connect()
    try:
        yield b
    finally:
        await b.stop()


async def pending(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


# --- (a) atomicity ----------------------------------------------------------------------------------


class Boom(Exception):
    pass


async def test_effect_and_outbox_row_roll_back_together_and_commit_together(messaging_db: Any) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    channel = notify_channel(schema)
    uow = UnitOfWork(pool, "it.unused.v2v.order", channel)

    notifications: list[str] = []
    listener = await asyncpg.connect(messaging_db.url)
    await listener.add_listener(channel, lambda _conn, _pid, _channel, payload: notifications.append(payload))
    try:
        rolled_back = make_event("order-rb")
        with pytest.raises(Boom):
            async with uow.begin() as tx:
                await tx.conn.execute(
                    "INSERT INTO it_effects (event_id, note) VALUES ($1, 'rolled back')", rolled_back.id
                )
                await tx.outbox.add(rolled_back)
                # both are really written inside the transaction...
                assert (
                    await tx.conn.fetchval("SELECT count(*) FROM outbox WHERE event_id = $1", rolled_back.id)
                    == 1
                )
                assert await tx.conn.fetchval("SELECT count(*) FROM it_effects") == 1
                raise Boom
        # ...and both are gone after the rollback
        assert await pool.fetchval("SELECT count(*) FROM it_effects") == 0
        assert await pool.fetchval("SELECT count(*) FROM outbox") == 0

        committed = make_event("order-ok", 1)
        async with uow.begin() as tx:
            await tx.conn.execute(
                "INSERT INTO it_effects (event_id, note) VALUES ($1, 'committed')", committed.id
            )
            await tx.outbox.add(committed)
        effect = await pool.fetch("SELECT event_id, note FROM it_effects")
        assert [(r["event_id"], r["note"]) for r in effect] == [(committed.id, "committed")]
        rows = await pool.fetch("SELECT * FROM outbox")
        assert len(rows) == 1
        row = rows[0]
        assert row["event_id"] == committed.id
        assert row["event_type"] == "order.it_test.v1"
        assert row["topic"] == "it.unused.v2v.order"
        assert row["message_key"] == "order-ok"
        assert bytes(row["payload"]) == committed.to_json()
        assert row["published_at"] is None

        # the relay is woken by the commit only: exactly one notification, none for the rollback
        for _ in range(100):
            if notifications:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        assert notifications == [""]
    finally:
        await listener.close()


# --- (b) relay: order, key, value, trace context, exactly once ---------------------------------------


async def test_relay_publishes_pending_rows_in_order_with_key_payload_and_traceparent(
    messaging_db: Any, broker: KafkaBroker, kafka: KafkaSettings, new_topic: Any, reader: Any
) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    tracer = TracerProvider().get_tracer("it-outbox")

    written: list[tuple[CloudEvent, str]] = []  # (event, trace id of the span it was written in)
    for i, subject in enumerate(["order-A", "order-B", "order-A", "order-A", "order-B"]):
        event = make_event(subject, i)
        with tracer.start_as_current_span(f"write {i}") as span:
            async with uow.begin() as tx:
                await tx.outbox.add(event)
            written.append((event, format(span.get_span_context().trace_id, "032x")))

    stored = await pool.fetch("SELECT id, event_id, message_key, payload, headers FROM outbox ORDER BY id")
    assert [r["event_id"] for r in stored] == [e.id for e, _ in written]
    stored_traceparent: dict[uuid.UUID, str] = {}
    for row, (_, trace_id) in zip(stored, written, strict=True):
        headers = row["headers"] if isinstance(row["headers"], dict) else json.loads(row["headers"])
        assert trace_id_of(headers["traceparent"]) == trace_id  # written inside the active span
        stored_traceparent[row["event_id"]] = headers["traceparent"]

    relay = OutboxRelay(pool, broker, schema, topic, kafka, batch_size=2)
    assert [await relay.publish_pending() for _ in range(4)] == [2, 2, 1, 0]
    assert await pending(pool) == 0
    assert relay.published_total == 5

    records = await reader(topic, expect=5)
    assert len(records) == 5
    by_id = {row["event_id"]: row for row in stored}
    for record in records:
        event = CloudEvent.from_json(record.value)
        row = by_id[event.id]
        assert record.key == row["message_key"].encode() == event.subject.encode()
        assert record.value == bytes(row["payload"])  # the CloudEvent JSON exactly as stored
        headers = headers_of(record)
        assert headers["content-type"] == CONTENT_TYPE
        assert "traceparent" in headers, headers
        assert trace_id_of(headers["traceparent"]) == trace_id_of(stored_traceparent[event.id])

    # one subject -> one partition, in outbox id order
    for subject in ("order-A", "order-B"):
        mine = sorted((r for r in records if r.key == subject.encode()), key=lambda r: r.offset)
        assert len({r.partition for r in mine}) == 1
        published = [CloudEvent.from_json(r.value).id for r in mine]
        expected = [row["event_id"] for row in stored if row["message_key"] == subject]
        assert published == expected

    # published rows are marked and never sent again
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == 5
    assert await relay.publish_pending() == 0
    assert len(await reader(topic, expect=5, settle=0.5)) == 5


async def test_a_pass_sends_its_rows_of_one_partition_as_one_record_batch(
    messaging_db: Any,
    broker: KafkaBroker,
    kafka: KafkaSettings,
    new_topic: Any,
    reader: Any,
    monkeypatch: pytest.MonkeyPatch,
    write_events: Any,
) -> None:
    """The rows of a pass reach the producer without the event loop running its sender in between: one
    record batch (one request, one object in Tansu's memory engine) per partition, not one per row."""
    from aiokafka.producer import message_accumulator

    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    events = [make_event("order-A", i) for i in range(10)]
    await write_events(uow, events)
    relay = OutboxRelay(pool, broker, schema, topic, kafka, batch_size=10)
    await relay.publish_pending()  # connects and learns the topic's partitions: its batch may be alone
    assert await pending(pool) == 0

    built: list[object] = []
    original = message_accumulator.MessageBatch.__init__

    def counted(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(message_accumulator.MessageBatch, "__init__", counted)
    more = [make_event("order-A", 10 + i) for i in range(10)]
    await write_events(uow, more)
    assert await relay.publish_pending() == 10
    assert len(built) == 1, f"{len(built)} record batches for one pass of 10 rows of one partition"

    records = await reader(topic, expect=20)
    assert [CloudEvent.from_json(r.value).id for r in sorted(records, key=lambda r: r.offset)] == [
        e.id for e in events + more
    ]


async def test_a_published_record_has_a_create_span_under_its_writer_and_the_publish_metrics(
    messaging_db: Any, kafka: KafkaSettings, new_topic: Any, reader: Any
) -> None:
    """What FastStream's telemetry middleware made for a published record, made by the relay: one
    "create" PRODUCER span per record, a child of the span the row was written in, whose context is the
    record's traceparent (the consumer's span hangs off it), and the publish metrics; no "publish"
    span."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(spans))
    metrics = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[metrics])
    broker = make_broker(
        kafka, f"it-relay-{uuid.uuid4().hex[:6]}", tracer_provider=tracing, meter_provider=meters
    )
    await broker.connect()
    try:
        pool, schema = messaging_db.pool, messaging_db.schema
        topic = await new_topic("v2v.order")
        uow = UnitOfWork(pool, topic, notify_channel(schema))
        writers = {}
        for i, subject in enumerate(["order-A", "order-B"]):
            event = make_event(subject, i)
            with tracing.get_tracer("it-outbox").start_as_current_span(f"write {i}") as span:
                async with uow.begin() as tx:
                    await tx.outbox.add(event)
            writers[event.id] = span.get_span_context()
        relay = OutboxRelay(pool, broker, schema, topic, kafka)
        assert await relay.publish_pending() == 2
        records = await reader(topic, expect=2)
    finally:
        await broker.stop()

    finished = [s for s in spans.get_finished_spans() if not s.name.startswith("write ")]
    assert sorted((s.name, s.kind.name) for s in finished) == [(f"{topic} create", "PRODUCER")] * 2
    by_span = {format(s.context.span_id, "016x"): s for s in finished}
    for record in records:
        event = CloudEvent.from_json(record.value)
        headers = headers_of(record)
        assert headers["content-type"] == CONTENT_TYPE and headers["correlation_id"]
        _, trace_id, span_id, _ = headers["traceparent"].split("-")
        create = by_span[span_id]  # the record carries its create span's context
        writer = writers[event.id]
        assert create.parent is not None and create.parent.span_id == writer.span_id
        assert trace_id == format(writer.trace_id, "032x")
        assert create.attributes is not None
        assert create.attributes["messaging.destination.name"] == topic
        assert create.attributes["messaging.message.conversation_id"] == headers["correlation_id"]
        assert (
            create.attributes["messaging.kafka.message.key"] == event.subject.encode()
        )  # as FastStream set it

    data = metrics.get_metrics_data()
    assert data is not None
    measured = {
        m.name: sum(getattr(p, "count", getattr(p, "value", 0)) for p in m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert measured["messaging.publish.messages"] == 2
    assert measured["messaging.publish.duration"] == 2
    meters.shutdown()


async def test_a_row_not_handed_over_by_the_deadline_fails_and_the_rest_wait_in_order(
    messaging_db: Any,
    broker: KafkaBroker,
    kafka: KafkaSettings,
    new_topic: Any,
    reader: Any,
    write_events: Any,
) -> None:
    """One deadline (`publish_timeout`) bounds handing a pass's rows to the producer: the row that does
    not get there in time fails, the rows after it are not sent, and the next pass sends them in order."""
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    events = [make_event(f"order-{i}", i) for i in range(4)]
    await write_events(uow, events)
    relay = OutboxRelay(pool, broker, schema, topic, kafka, batch_size=10, publish_timeout=0.5)
    original = relay._send
    stuck = {events[2].id}

    async def send(row: Any) -> Any:
        if row["event_id"] in stuck:
            await asyncio.sleep(5)  # a producer that does not take the record (a full buffer, no metadata)
        return await original(row)

    relay._send = send  # type: ignore[method-assign]
    with pytest.raises(RelayBackoff):  # after marking what did go out; the relay's loop backs off
        await relay.publish_pending()
    assert relay.published_total == 2
    ids = await pool.fetch("SELECT event_id FROM outbox WHERE published_at IS NULL ORDER BY id")
    assert [r["event_id"] for r in ids] == [e.id for e in events[2:]]

    stuck.clear()
    assert await relay.publish_pending() == 2
    assert relay.published_total == 4
    assert await pending(pool) == 0
    records = await reader(topic, expect=4)
    assert sorted(CloudEvent.from_json(r.value).id for r in records) == sorted(e.id for e in events)


# --- (c) two relays at once ----------------------------------------------------------------------------


async def test_two_relays_draining_concurrently_never_publish_a_row_twice(
    messaging_db: Any, kafka: KafkaSettings, new_topic: Any, reader: Any
) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    total = 120
    async with uow.begin() as tx:
        for i in range(total):
            await tx.outbox.add(make_event(f"order-{i % 12}", i))

    other_pool = await create_pool(messaging_db.url, max_size=2)  # a second replica: its own pool...
    brokers = [
        make_broker(kafka, f"it-relay-{n}-{uuid.uuid4().hex[:6]}", tracer_provider=None) for n in (1, 2)
    ]
    for b in brokers:  # ...and its own producer
        await b.connect()
    relays = [
        OutboxRelay(pool, brokers[0], schema, topic, kafka, batch_size=7),
        OutboxRelay(other_pool, brokers[1], schema, topic, kafka, batch_size=7),
    ]
    calls = {0: 0, 1: 0}

    async def drain(n: int) -> None:
        relay = relays[n]
        while True:
            calls[n] += 1
            published = await relay.publish_pending()
            if published == 0:
                if await pending(pool) == 0:
                    return
                await asyncio.sleep(0.002)

    try:
        await asyncio.wait_for(asyncio.gather(drain(0), drain(1)), timeout=30)
    finally:
        for b in brokers:
            await b.stop()
        await other_pool.close()

    assert calls[0] > 1 and calls[1] > 1  # both really competed for the same rows
    assert relays[0].published_total + relays[1].published_total == total
    assert await pending(pool) == 0
    records = await reader(topic, expect=total, settle=1.0)
    ids = [CloudEvent.from_json(r.value).id for r in records]
    assert len(ids) == total
    assert len(set(ids)) == total
    # per subject, still in outbox order
    stored = await pool.fetch("SELECT event_id, message_key FROM outbox ORDER BY id")
    for key in {r["message_key"] for r in stored}:
        mine = sorted((r for r in records if r.key == key.encode()), key=lambda r: r.offset)
        assert [CloudEvent.from_json(r.value).id for r in mine] == [
            r["event_id"] for r in stored if r["message_key"] == key
        ]


# --- (d) replay to a broker that lost everything -------------------------------------------------------


async def test_replay_republishes_retained_rows_when_the_topic_is_empty(
    messaging_db: Any,
    broker: KafkaBroker,
    kafka: KafkaSettings,
    new_topic: Any,
    reader: Any,
    write_events: Any,
) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")  # empty: like a Tansu that restarted and forgot everything
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    recent = [make_event(f"order-{i}", i) for i in range(3)]
    expired = make_event("order-old", 99)
    await write_events(uow, [*recent, expired])
    # marked published earlier (to the broker that lost them): three within retention, one beyond it
    await pool.execute(
        "UPDATE outbox SET published_at = now() - interval '1 hour' WHERE event_id = ANY($1::uuid[])",
        [e.id for e in recent],
    )
    await pool.execute(
        "UPDATE outbox SET published_at = now() - interval '10 days' WHERE event_id = $1", expired.id
    )
    relay = OutboxRelay(pool, broker, schema, topic, kafka, retention=timedelta(days=7))

    assert await relay.replay_if_broker_is_fresh() == 3
    # the replay reads the retained rows from a cursor: they stay published, nothing becomes pending
    assert await pending(pool) == 0
    assert await relay.replay_remaining() == 3
    assert await pool.fetchval("SELECT published_at IS NOT NULL FROM outbox WHERE event_id = $1", expired.id)

    assert await relay.publish_pending() == 3
    records = await reader(topic, expect=3)
    assert sorted(CloudEvent.from_json(r.value).id for r in records) == sorted(e.id for e in recent)
    assert await pending(pool) == 0

    # the topic now holds our events: no second replay
    assert await relay.replay_if_broker_is_fresh() == 0
    assert await pending(pool) == 0


# --- (e) a relay in the same process is woken without NOTIFY while it leads ---------------------------


async def _notifications_on(url: str, channel: str) -> tuple[asyncpg.Connection, list[str]]:
    got: list[str] = []
    conn = await asyncpg.connect(url)
    await conn.add_listener(channel, lambda _conn, _pid, _channel, payload: got.append(payload))
    return conn, got


async def test_a_leading_relay_of_the_process_is_woken_in_process_after_commit_without_notify(
    messaging_db: Any, broker: KafkaBroker, kafka: KafkaSettings, new_topic: Any, reader: Any
) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    channel = notify_channel(schema)
    uow = UnitOfWork(pool, topic, channel)
    # it polls every 30 s: publishing sooner than that is the wake-up's doing
    relay = OutboxRelay(pool, broker, schema, topic, kafka, poll_interval=30.0)
    uow.attach_relay(relay)
    watcher, notifications = await _notifications_on(messaging_db.url, channel)
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(relay.listen())]
    try:
        for _ in range(200):
            if relay.leads() and relay.listening:
                break
            await asyncio.sleep(0.02)
        assert relay.leads() and relay.listening
        await asyncio.sleep(0.2)  # the relay's first passes are done: it waits for a wake-up

        first, second = make_event("order-L1"), make_event("order-L2", 1)
        async with uow.begin() as tx:
            await tx.outbox.add(first)
            assert not relay._wake.is_set()  # not before COMMIT: the relay would not see the row yet
        # the consumers' way: an explicit transaction committed later
        opened = await uow.start()
        await opened.tx.outbox.add(second)
        await opened.commit()

        started = asyncio.get_running_loop().time()
        for _ in range(250):
            if relay.published_total >= 2:
                break
            await asyncio.sleep(0.02)
        assert relay.published_total == 2 and asyncio.get_running_loop().time() - started < 5
        records = await reader(topic, expect=2)
        assert {CloudEvent.from_json(r.value).id for r in records} == {first.id, second.id}
        await asyncio.sleep(0.1)
        assert notifications == []  # no NOTIFY: no backend listening in the database was woken

        # once this process's relay no longer leads (here: stopped; another process's may lead), a commit
        # NOTIFYs again (that relay is woken by it)
        await relay.stop()
        assert not relay.leads()
        async with uow.begin() as tx:
            await tx.outbox.add(make_event("order-L3", 2))
        for _ in range(100):
            if notifications:
                break
            await asyncio.sleep(0.02)
        assert notifications == [""]
    finally:
        await relay.stop()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await watcher.close()
