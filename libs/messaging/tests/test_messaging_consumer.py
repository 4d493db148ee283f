"""Idempotent consumers on a real Kafka-protocol broker and real Postgres.

- a duplicate (same CloudEvent id) is a no-op: effect once, one inbox row;
- a poison message is retried `max_attempts` times, dead-lettered with its error and origin, and the
  next message on the same partition is processed;
- a message that is not a CloudEvent is dead-lettered at once and the partition goes on;
- the offset is committed after the database commit: a restarted consumer of the same group does not
  handle the message again, and an infrastructure failure is redelivered rather than lost;
- an event that is not from the service whose topic it was read from, or an order event without a valid
  chain-of-identity id, is dead-lettered at once (table and topic, with the reason) and never handled.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from faststream.kafka import KafkaBroker

from v2v_contracts import CloudEvent, EventData, SlotReservedV1, new_event
from v2v_contracts.coi import make_coi
from v2v_messaging import (
    ConsumerPolicy,
    EventConsumer,
    EventMeta,
    HandlerRegistry,
    KafkaSettings,
    Tx,
    UnitOfWork,
    make_broker,
    notify_channel,
)
from v2v_messaging.consumer import BATCH_MAX

pytestmark = pytest.mark.integration

EVENT_TYPE = "scheduling.it_test.v1"
FAST = ConsumerPolicy(max_attempts=2, base_backoff_s=0.01)

Handler = Callable[[Tx, CloudEvent], Awaitable[None]]


class ItTestV1(EventData):
    """The test's own event type (routed by the registry like any contract)."""

    TYPE = EVENT_TYPE
    SERVICE = "scheduling"
    n: int


def registry_of(handlers: dict[str, Handler]) -> HandlerRegistry[Tx]:
    """The tests' handlers look at the whole envelope (ids, offsets): give them meta.envelope."""
    registry = HandlerRegistry[Tx]()
    for event_type, fn in handlers.items():
        assert event_type == ItTestV1.TYPE

        async def typed(tx: Tx, data: ItTestV1, meta: EventMeta, fn: Handler = fn) -> None:
            await fn(tx, meta.envelope)

        registry.add(ItTestV1, typed)
    return registry


def make_event(subject: str, n: int = 0) -> CloudEvent:
    return CloudEvent(source="/v2v/scheduling", type=EVENT_TYPE, subject=subject, data={"n": n})


def headers_of(record: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (record.headers or ())}


async def write_effect(tx: Tx, event: CloudEvent, note: str = "handled") -> None:
    await tx.conn.execute("INSERT INTO it_effects (event_id, note) VALUES ($1, $2)", event.id, note)


@pytest.fixture
async def producer(kafka: KafkaSettings) -> AsyncIterator[AIOKafkaProducer]:
    """A plain producer standing in for another service."""
    p = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, acks="all", enable_idempotence=kafka.enable_idempotence
    )
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


StartConsumer = Callable[..., Awaitable[tuple[EventConsumer, KafkaBroker]]]


@pytest.fixture
async def start_consumer(kafka: KafkaSettings, messaging_db: Any) -> AsyncIterator[StartConsumer]:
    """Builds an EventConsumer on its own real broker connection and starts it; stops them all at the end."""
    brokers: list[KafkaBroker] = []
    uow = UnitOfWork(messaging_db.pool, "it.unused.v2v.scheduling", notify_channel(messaging_db.schema))

    async def start(
        *,
        service: str,
        topic: str,
        dlq: str,
        handlers: dict[str, Handler],
        policy: ConsumerPolicy = FAST,
        batch_max: int = BATCH_MAX,
    ) -> tuple[EventConsumer, KafkaBroker]:
        broker = make_broker(kafka, f"it-{service}-{uuid.uuid4().hex[:4]}", tracer_provider=None)
        consumer = EventConsumer(
            service=service,
            purpose="it",
            topics=[topic],
            handlers=registry_of(handlers),
            uow=uow,
            broker=broker,
            dead_letter_topic=dlq,
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            policy=policy,
            batch_max=batch_max,
        )
        # Tansu holds a JoinGroup for half the session timeout, and numbers the first generation 0, for
        # which aiokafka sends no LeaveGroup on stop: a restarted member then waits for the old one's
        # session to expire. With the default 10 s session a join takes 5 s and a restart 18 s; a 1 s
        # session keeps these tests at about a second each without changing what is tested.
        consumer.subscriber._connection_args.update(session_timeout_ms=1000, heartbeat_interval_ms=250)
        brokers.append(broker)
        await broker.start()
        return consumer, broker

    try:
        yield start
    finally:
        for broker in brokers:
            await broker.stop()


def unique_service() -> str:
    return f"it{uuid.uuid4().hex[:8]}"  # group id `<service>.it`: unique per test


async def inbox_rows(pool: Any, group_id: str) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT * FROM inbox WHERE consumer = $1 ORDER BY kafka_partition, kafka_offset", group_id
        )
    )


# --- (a) duplicates -------------------------------------------------------------------------------------


async def test_the_same_event_twice_is_applied_once(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    eventually: Any,
) -> None:
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    event = make_event("order-dup")
    first = await producer.send_and_wait(topic, event.to_json(), key=b"order-dup")
    second = await producer.send_and_wait(topic, event.to_json(), key=b"order-dup")  # redelivered copy
    assert second.offset == first.offset + 1

    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: write_effect}
    )
    await eventually(lambda: consumer.stats.processed + consumer.stats.duplicates >= 2, what="both copies")

    assert consumer.stats.processed == 1
    assert consumer.stats.duplicates == 1
    assert consumer.stats.dead_lettered == 0
    effects = await pool.fetch("SELECT event_id FROM it_effects")
    assert [r["event_id"] for r in effects] == [event.id]
    inbox = await inbox_rows(pool, consumer.group_id)
    assert len(inbox) == 1
    row = inbox[0]
    assert (row["event_id"], row["event_type"], row["topic"]) == (event.id, EVENT_TYPE, topic)
    assert (row["kafka_partition"], row["kafka_offset"]) == (first.partition, first.offset)


# --- (b) poison message -------------------------------------------------------------------------------


async def test_a_poison_message_is_dead_lettered_and_the_partition_goes_on(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    reader: Any,
    eventually: Any,
) -> None:
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    poison, good = make_event("order-p", 1), make_event("order-p", 2)
    calls: list[uuid.UUID] = []

    async def handle(tx: Tx, event: CloudEvent) -> None:
        calls.append(event.id)
        await write_effect(tx, event)  # rolled back with the failure
        if event.id == poison.id:
            raise ValueError(f"poison pill {event.id}")

    sent_poison = await producer.send_and_wait(topic, poison.to_json(), key=b"order-p")
    sent_good = await producer.send_and_wait(topic, good.to_json(), key=b"order-p")
    assert sent_good.partition == sent_poison.partition  # same key, same partition, after the poison

    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: handle}
    )
    await eventually(lambda: consumer.stats.processed >= 1, what="the message after the poison")

    assert calls == [poison.id, poison.id, good.id]  # max_attempts=2, then the next message
    assert consumer.stats.dead_lettered == 1
    assert consumer.stats.processed == 1
    effects = await pool.fetch("SELECT event_id FROM it_effects")
    assert [r["event_id"] for r in effects] == [good.id]
    inbox = await inbox_rows(pool, consumer.group_id)
    assert [(r["event_id"], r["kafka_offset"]) for r in inbox] == [(good.id, sent_good.offset)]

    [dead] = await reader(dlq, expect=1)
    assert dead.value == poison.to_json()
    assert dead.key == b"order-p"
    headers = headers_of(dead)
    assert "ValueError" in headers["x-v2v-dlq-error"]
    assert f"poison pill {poison.id}" in headers["x-v2v-dlq-error"]
    assert headers["x-v2v-dlq-consumer"] == consumer.group_id
    assert headers["x-v2v-dlq-topic"] == topic
    assert headers["x-v2v-dlq-partition"] == str(sent_poison.partition)
    assert headers["x-v2v-dlq-offset"] == str(sent_poison.offset)
    assert headers["x-v2v-dlq-attempts"] == "2"


# --- (c) not a CloudEvent -------------------------------------------------------------------------------


async def test_a_message_that_is_not_a_cloudevent_is_dead_lettered_and_the_partition_goes_on(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    reader: Any,
    eventually: Any,
) -> None:
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    garbage = b"this is not json {"
    not_an_event = b'{"specversion": "1.0", "type": "x"}'  # JSON, but not a valid CloudEvent
    good = make_event("order-g")
    calls: list[uuid.UUID] = []

    async def handle(tx: Tx, event: CloudEvent) -> None:
        calls.append(event.id)
        await write_effect(tx, event)

    sent = [await producer.send_and_wait(topic, raw, key=b"order-g") for raw in (garbage, not_an_event)]
    sent_good = await producer.send_and_wait(topic, good.to_json(), key=b"order-g")
    assert {s.partition for s in sent} == {sent_good.partition}

    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: handle}
    )
    await eventually(lambda: consumer.stats.processed >= 1, what="the valid event after the bad ones")

    assert calls == [good.id]
    assert consumer.stats.dead_lettered == 2
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM it_effects")] == [good.id]
    assert [r["event_id"] for r in await inbox_rows(pool, consumer.group_id)] == [good.id]

    dead = sorted(await reader(dlq, expect=2), key=lambda r: int(headers_of(r)["x-v2v-dlq-offset"]))
    assert [d.value for d in dead] == [garbage, not_an_event]
    for record, original in zip(dead, sent, strict=True):
        headers = headers_of(record)
        assert headers["x-v2v-dlq-error"].startswith("not a CloudEvent")
        assert headers["x-v2v-dlq-consumer"] == consumer.group_id
        assert headers["x-v2v-dlq-topic"] == topic
        assert headers["x-v2v-dlq-partition"] == str(original.partition)
        assert headers["x-v2v-dlq-offset"] == str(original.offset)


# --- (d) offsets committed after the database commit ------------------------------------------------------


async def test_a_restarted_consumer_does_not_handle_a_processed_message_again(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    eventually: Any,
) -> None:
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    service = unique_service()
    before, after = make_event("order-r", 1), make_event("order-r", 2)
    calls: list[tuple[int, uuid.UUID]] = []

    def handler(generation: int) -> Handler:
        async def handle(tx: Tx, event: CloudEvent) -> None:
            calls.append((generation, event.id))
            await write_effect(tx, event, f"generation {generation}")

        return handle

    await producer.send_and_wait(topic, before.to_json(), key=b"order-r")
    first, first_broker = await start_consumer(
        service=service, topic=topic, dlq=dlq, handlers={EVENT_TYPE: handler(1)}
    )
    await eventually(lambda: first.stats.processed == 1, what="the first consumer to handle the event")
    await first_broker.stop()  # no commit on stop: only the ack after the handler commits the offset

    # same group id, new process; the next event on the same partition proves where it resumed
    second, _ = await start_consumer(service=service, topic=topic, dlq=dlq, handlers={EVENT_TYPE: handler(2)})
    assert second.group_id == first.group_id
    await producer.send_and_wait(topic, after.to_json(), key=b"order-r")
    await eventually(
        lambda: second.stats.processed >= 1, what="the restarted consumer to handle the new event"
    )

    assert calls == [(1, before.id), (2, after.id)]
    assert second.stats.processed == 1
    assert second.stats.duplicates == 0  # `before` was not even redelivered
    effects = await pool.fetch("SELECT event_id, note FROM it_effects ORDER BY id")
    assert [(r["event_id"], r["note"]) for r in effects] == [
        (before.id, "generation 1"),
        (after.id, "generation 2"),
    ]


async def test_a_backlog_is_committed_in_runs_and_its_last_record_at_once(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    eventually: Any,
) -> None:
    """While records wait behind the one handled, its offset is left to the next commit (one broker
    round trip per run of records, not per record); the record that ends the backlog is committed at once,
    so a restarted member of the group reads nothing again."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    service = unique_service()
    events = [make_event("order-b", n) for n in range(250)]
    for event in events:  # one key: one partition, in order
        await producer.send(topic, event.to_json(), key=b"order-b")
    await producer.flush()

    async def handle(tx: Tx, event: CloudEvent) -> None:
        await write_effect(tx, event)

    consumer, broker = await start_consumer(
        service=service, topic=topic, dlq=dlq, handlers={EVENT_TYPE: handle}
    )
    kafka_consumer = consumer.subscriber.consumer
    assert kafka_consumer is not None
    commits: list[dict[Any, Any] | None] = []
    commit = kafka_consumer.commit

    async def counting_commit(offsets: Any = None) -> None:
        commits.append(offsets)
        await commit(offsets)

    kafka_consumer.commit = counting_commit  # type: ignore[method-assign]
    await eventually(lambda: consumer.stats.processed == 250, timeout=120, what="the backlog to be handled")
    assert 1 <= len(commits) < 25, f"{len(commits)} commits for 250 records"
    partition = (await inbox_rows(pool, consumer.group_id))[-1]["kafka_partition"]
    tp = TopicPartition(topic, partition)
    last = max(r["kafka_offset"] for r in await inbox_rows(pool, consumer.group_id))
    assert await kafka_consumer.committed(tp) == last + 1  # the end of the backlog, at once
    await broker.stop()

    # a new member of the group starts after the committed end: nothing is read again
    after = make_event("order-b", 250)
    second, _ = await start_consumer(service=service, topic=topic, dlq=dlq, handlers={EVENT_TYPE: handle})
    await producer.send_and_wait(topic, after.to_json(), key=b"order-b")
    await eventually(lambda: second.stats.processed == 1, what="the new event after the restart")
    assert second.stats.duplicates == 0
    effects = await pool.fetch("SELECT event_id FROM it_effects ORDER BY id")
    assert [r["event_id"] for r in effects] == [e.id for e in events] + [after.id]


async def test_an_infrastructure_failure_is_redelivered_not_lost_nor_dead_lettered(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    reader: Any,
    eventually: Any,
) -> None:
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    event = make_event("order-t")
    calls: list[uuid.UUID] = []

    async def flaky(tx: Tx, ev: CloudEvent) -> None:
        calls.append(ev.id)
        await write_effect(tx, ev)
        if len(calls) <= 3:  # more than transient_attempts: the consumer gives the message back (nack)
            raise ConnectionRefusedError("database briefly unreachable")

    policy = ConsumerPolicy(max_attempts=2, base_backoff_s=0.01, transient_attempts=2)
    await producer.send_and_wait(topic, event.to_json(), key=b"order-t")
    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: flaky}, policy=policy
    )
    await eventually(lambda: consumer.stats.processed == 1, what="the redelivered event to succeed")

    assert calls == [event.id] * 4  # 2 attempts, redelivery, 2 attempts
    assert consumer.stats.dead_lettered == 0
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM it_effects")] == [event.id]
    assert len(await inbox_rows(pool, consumer.group_id)) == 1
    assert await reader(dlq, expect=0, settle=0.2) == []


# --- (e) provenance: an event must come from the service whose topic it is read from --------------------


async def test_a_forged_event_on_the_wrong_topic_is_dead_lettered_at_once_and_never_handled(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    reader: Any,
    eventually: Any,
) -> None:
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    # the order service (say) writing an event of scheduling's type onto scheduling's topic
    wrong_source = CloudEvent(source="/v2v/order", type=EVENT_TYPE, subject="order-f", data={"n": 1})
    # an order-bound event of scheduling's, from scheduling, but whose chain-of-identity id is not valid
    slot = SlotReservedV1(
        order_id=uuid.uuid4(),
        coi=make_coi("V2V00", 2026, 7),
        treatment_center_id="TC-DE-BE-001",
        slot_id=uuid.uuid4(),
        site_id="DE-BER-01",
        product_code="AXI-CEL",
        order_type="commercial",
        apheresis_date=date(2030, 1, 10),
        manufacturing_start_date=date(2030, 1, 11),
    )
    bad_coi = new_event(slot).model_copy(update={"coi": "V2V00-26-000007-K"})
    genuine = make_event("order-f", 2)
    calls: list[uuid.UUID] = []

    async def handle(tx: Tx, event: CloudEvent) -> None:
        calls.append(event.id)
        await write_effect(tx, event)

    sent = [await producer.send_and_wait(topic, e.to_json(), key=b"order-f") for e in (wrong_source, bad_coi)]
    sent_genuine = await producer.send_and_wait(topic, genuine.to_json(), key=b"order-f")
    assert {s.partition for s in sent} == {sent_genuine.partition}

    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: handle}
    )
    await eventually(lambda: consumer.stats.processed >= 1, what="the genuine event after the forged ones")

    assert calls == [genuine.id]  # the forged ones never reached a handler, not even once
    assert consumer.stats.rejected == 2 and consumer.stats.dead_lettered == 2
    assert consumer.stats.rejected_by_reason == {"source-mismatch": 1, "coi-invalid": 1}
    assert consumer.stats.poison_failures == 0  # refused before any attempt
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM it_effects")] == [genuine.id]
    assert [r["event_id"] for r in await inbox_rows(pool, consumer.group_id)] == [genuine.id]

    rows = await pool.fetch(
        """SELECT event_id, event_type, topic, kafka_partition, kafka_offset, error, attempts, payload
           FROM dead_letters WHERE consumer = $1 ORDER BY kafka_offset""",
        consumer.group_id,
    )
    assert [(r["event_id"], r["event_type"]) for r in rows] == [
        (wrong_source.id, EVENT_TYPE),
        (bad_coi.id, "scheduling.slot_reserved.v1"),
    ]
    for row, original, event in zip(rows, sent, (wrong_source, bad_coi), strict=True):
        assert (row["topic"], row["kafka_partition"], row["kafka_offset"]) == (
            topic,
            original.partition,
            original.offset,
        )
        assert row["attempts"] == 1
        assert bytes(row["payload"]) == event.to_json()
    assert rows[0]["error"] == (
        f"rejected (source-mismatch): the source is not /v2v/scheduling, the only publisher on topic {topic}"
    )
    assert rows[1]["error"].startswith("rejected (coi-invalid): scheduling.slot_reserved.v1")
    assert "V2V00-26-000007-K" not in rows[1]["error"]  # the claim itself is not echoed

    dead = sorted(await reader(dlq, expect=2), key=lambda r: int(headers_of(r)["x-v2v-dlq-offset"]))
    assert [d.value for d in dead] == [wrong_source.to_json(), bad_coi.to_json()]
    assert [headers_of(d)["x-v2v-dlq-error"] for d in dead] == [r["error"] for r in rows]


# --- (f) the records of a poll share one transaction ---------------------------------------------------


async def send_all(producer: AIOKafkaProducer, topic: str, events: list[CloudEvent], key: bytes) -> None:
    """The events written to `topic` under one key (one partition), before any consumer starts."""
    for event in events:
        await producer.send(topic, event.to_json(), key=key)
    await producer.flush()


async def effects_with_their_inbox_rows(pool: Any, consumer: EventConsumer, events: list[CloudEvent]) -> int:
    """Every event's effect, in order, written by the transaction that wrote its inbox row; returns how
    many transactions wrote them."""
    rows = await pool.fetch(
        """SELECT e.event_id, e.xmin::text AS effect_tx, i.xmin::text AS inbox_tx
           FROM it_effects e JOIN inbox i ON i.event_id = e.event_id AND i.consumer = $1
           ORDER BY e.id""",
        consumer.group_id,
    )
    assert [r["event_id"] for r in rows] == [e.id for e in events]
    assert all(r["effect_tx"] == r["inbox_tx"] for r in rows)
    return len({r["effect_tx"] for r in rows})


async def test_the_records_of_a_poll_are_applied_in_one_transaction_and_committed_together(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    eventually: Any,
) -> None:
    """Records waiting together are applied in one transaction (each one's inbox row and effects), not
    one transaction each: every inbox row was written by the same transaction as its record's effects,
    and there are fewer transactions than records."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    events = [make_event("order-a", n) for n in range(10)]
    await send_all(producer, topic, events, key=b"order-a")

    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: write_effect}
    )
    await eventually(lambda: consumer.stats.processed == 10, what="the ten events")

    transactions = await effects_with_their_inbox_rows(pool, consumer, events)
    assert transactions < len(events), "one transaction per poll, not per record"


async def test_the_inbox_rows_of_a_batch_after_its_first_record_go_with_its_commit(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    eventually: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a batch, the first record's inbox row goes with the BEGIN and finds it new; the later records
    of its partition are then new too (the inbox holds only a run of records that a previous reader
    processed without committing their offsets), and their inbox rows go with the COMMIT: one round
    trip for the batch's inbox rows instead of one per record. Every row is still written, in the
    transaction of its record's effects."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    events = [make_event("order-b", n) for n in range(6)]
    await send_all(producer, topic, events, key=b"order-b")

    asked: list[str] = []  # inbox inserts that went on their own (one round trip per record)
    committed_with: list[str] = []
    fetchval, execute = asyncpg.Connection.fetchval, asyncpg.Connection.execute

    async def counting_fetchval(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if "INTO inbox" in query:
            asked.append(query)
        return await fetchval(self, query, *args, **kwargs)

    async def counting_execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if query.endswith("; COMMIT") and "INTO inbox" in query:
            committed_with.append(query)
        return await execute(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "fetchval", counting_fetchval)
    monkeypatch.setattr(asyncpg.Connection, "execute", counting_execute)
    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: write_effect}
    )
    await eventually(lambda: consumer.stats.processed == 6, what="the six events")

    transactions = await effects_with_their_inbox_rows(pool, consumer, events)
    assert transactions < len(events)
    assert asked == []  # not one inbox insert of its own
    # each batch of more than one record sent its later records' rows with its COMMIT
    deferred = sum(q.count("('") for q in committed_with)
    assert deferred == len(events) - transactions
    assert consumer.stats.duplicates == 0 and consumer.stats.poison_failures == 0


async def test_a_poison_record_in_a_batch_is_dead_lettered_alone_and_the_others_are_applied_once(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    reader: Any,
    eventually: Any,
) -> None:
    """A handler failing in a batch rolls the batch back; its records are processed again one at a
    time: the poison one spends its budget (the failure in the batch counts) and is dead-lettered, the
    others are applied once each, in order."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    events = [make_event("order-m", n) for n in range(5)]
    poison = events[2]
    calls: list[uuid.UUID] = []

    async def handle(tx: Tx, event: CloudEvent) -> None:
        calls.append(event.id)
        await write_effect(tx, event)  # rolled back with the failure (and with the batch)
        if event.id == poison.id:
            raise ValueError(f"poison pill {event.id}")

    for event in events:
        await producer.send(topic, event.to_json(), key=b"order-m")
    await producer.flush()
    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: handle}
    )
    await eventually(lambda: consumer.stats.processed == 4, what="the four good events")

    good = [e.id for e in events if e.id != poison.id]
    assert calls.count(poison.id) == FAST.max_attempts  # its budget, the attempt in the batch included
    assert consumer.stats.dead_lettered == 1
    effects = await pool.fetch("SELECT event_id FROM it_effects ORDER BY id")
    assert [r["event_id"] for r in effects] == good  # each once, in order
    assert [r["event_id"] for r in await inbox_rows(pool, consumer.group_id)] == good
    [dead] = await reader(dlq, expect=1)
    assert dead.value == poison.to_json()
    assert headers_of(dead)["x-v2v-dlq-attempts"] == str(FAST.max_attempts)
    assert (
        await pool.fetchval("SELECT count(*) FROM dead_letters WHERE consumer = $1", consumer.group_id) == 1
    )


async def test_a_crash_in_the_middle_of_a_batch_leaves_nothing_of_it_and_nothing_is_applied_twice(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    eventually: Any,
) -> None:
    """The consumer dies while a batch is open: none of its records' effects are kept and none of their
    offsets committed; the next member of the group applies every record exactly once."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    service = unique_service()
    events = [make_event("order-x", n) for n in range(5)]
    stuck = asyncio.Event()
    first_calls: list[uuid.UUID] = []

    async def hangs_on_the_third(tx: Tx, event: CloudEvent) -> None:
        first_calls.append(event.id)
        await write_effect(tx, event, "first")
        if event.id == events[2].id:
            stuck.set()
            await asyncio.Event().wait()  # never returns: the process dies here

    for event in events:
        await producer.send(topic, event.to_json(), key=b"order-x")
    await producer.flush()
    first, first_broker = await start_consumer(
        service=service, topic=topic, dlq=dlq, handlers={EVENT_TYPE: hangs_on_the_third}
    )
    await asyncio.wait_for(stuck.wait(), 20)
    for task in list(first.subscriber.tasks):  # killed: no graceful stop, nothing after this line runs
        task.cancel()
    await first_broker.stop()
    kept = await pool.fetchval("SELECT count(*) FROM it_effects WHERE note = 'first'")
    assert kept == first.stats.processed  # what was open in the batch is gone

    second, _ = await start_consumer(
        service=service, topic=topic, dlq=dlq, handlers={EVENT_TYPE: write_effect}
    )
    await eventually(
        lambda: first.stats.processed + second.stats.processed == 5, what="every event applied once"
    )
    effects = await pool.fetch("SELECT event_id FROM it_effects ORDER BY id")
    assert [r["event_id"] for r in effects] == [e.id for e in events]
    assert len(await inbox_rows(pool, second.group_id)) == 5


# --- (g) a poll drains every partition; its batches go in time order ----------------------------------


async def send_to_partitions(
    producer: AIOKafkaProducer, topic: str, events: list[tuple[int, CloudEvent]]
) -> None:
    """Each (partition, event) written in turn, each after the last was stored, a few ms apart (their
    timestamps increase), before any consumer starts."""
    for partition, event in events:
        await producer.send_and_wait(topic, event.to_json(), partition=partition)
        await asyncio.sleep(0.003)


async def test_a_poll_takes_every_partition_and_its_batches_apply_them_in_time_order(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    eventually: Any,
) -> None:
    """Records buffered in two partitions are applied in the order they were written, across the
    partitions, in transactions of at most `batch_max` (a poll of `batch_max` taken partition by
    partition would apply one partition's first, whatever their times)."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    events = [make_event(f"order-{n % 2}", n) for n in range(12)]
    await send_to_partitions(producer, topic, [(n % 2, e) for n, e in enumerate(events)])

    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: write_effect}, batch_max=4
    )
    await eventually(lambda: consumer.stats.processed == 12, what="the twelve events")

    transactions = await effects_with_their_inbox_rows(pool, consumer, events)  # in the written order
    sizes = await pool.fetch(
        """SELECT count(*) AS n FROM it_effects e JOIN inbox i ON i.event_id = e.event_id
           WHERE i.consumer = $1 GROUP BY e.xmin::text""",
        consumer.group_id,
    )
    assert transactions >= 3 and all(r["n"] <= 4 for r in sizes), [r["n"] for r in sizes]


async def test_a_record_handed_back_in_a_poll_brings_back_the_later_batches_of_every_partition(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    reader: Any,
    eventually: Any,
) -> None:
    """The positions of a drained poll are past all its records: when a record of its first batch is
    handed back (infrastructure unavailable), every partition goes back to its first record not
    processed, the one whose records were all in later batches too. Nothing is lost, nothing applied
    twice, and the order holds."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    events = [make_event("order-early" if n < 5 else "order-late", n) for n in range(10)]
    await send_to_partitions(producer, topic, [(0 if n < 5 else 1, e) for n, e in enumerate(events)])
    failures = 0

    async def flaky(tx: Tx, ev: CloudEvent) -> None:
        nonlocal failures
        await write_effect(tx, ev)
        if ev.data["n"] == 1 and failures < 3:  # more than transient_attempts: handed back
            failures += 1
            raise ConnectionRefusedError("database briefly unreachable")

    policy = ConsumerPolicy(max_attempts=2, base_backoff_s=0.01, transient_attempts=2)
    consumer, _ = await start_consumer(
        service=unique_service(),
        topic=topic,
        dlq=dlq,
        handlers={EVENT_TYPE: flaky},
        policy=policy,
        batch_max=3,
    )
    await eventually(lambda: consumer.stats.processed == 10, timeout=30, what="all ten events")

    assert failures == 3
    await effects_with_their_inbox_rows(pool, consumer, events)  # each once, in the written order
    assert len(await inbox_rows(pool, consumer.group_id)) == 10
    assert consumer.stats.dead_lettered == 0
    assert await reader(dlq, expect=0, settle=0.2) == []


async def test_a_bug_in_a_batch_of_a_poll_hands_back_that_batch_and_every_later_one(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: StartConsumer,
    eventually: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should processing a batch raise (a bug, not a handler's failure), the positions are past the
    poll's later batches: they are sought back with it, so that none of them is lost."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    events = [make_event(f"order-{n % 2}", n) for n in range(9)]
    await send_to_partitions(producer, topic, [(n % 2, e) for n, e in enumerate(events)])
    real = EventConsumer._consume_records
    calls = 0

    async def buggy(self: EventConsumer, records: list[Any], **kwargs: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:  # the poll's second batch, before any of it is applied
            raise RuntimeError("a bug")
        return await real(self, records, **kwargs)

    monkeypatch.setattr(EventConsumer, "_consume_records", buggy)
    consumer, _ = await start_consumer(
        service=unique_service(), topic=topic, dlq=dlq, handlers={EVENT_TYPE: write_effect}, batch_max=3
    )
    await eventually(lambda: consumer.stats.processed == 9, timeout=30, what="all nine events")
    assert calls > 3
    await effects_with_their_inbox_rows(pool, consumer, events)  # each once, in the written order
