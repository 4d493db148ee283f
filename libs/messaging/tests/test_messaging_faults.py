"""The relay and the consumers under faults, against real Postgres and the real Kafka-protocol broker.

- leadership is a lease, not a lock: a leader paused in the middle of a publish holds no transaction; after
  its lease expires another relay takes over, and the paused one's marks are refused when it resumes;
- a paused replica idling in a transaction with the lease row locked does not stall another relay beyond
  the idle-in-transaction timeout (Postgres ends that session) and the lease;
- an outbox row the broker refuses (too large) is moved to `dead_letters` and the rows after it go out;
  an event above the outbox's cap is refused at write time;
- a replay to a broker that lost our events is bounded per pass and new rows go first;
- consumers: database unavailability (read-only, disk full, shutdown, timeouts) is retried and never
  dead-lettered, and it does not use up the poison budget; dead letters are recorded in Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faststream.kafka import KafkaBroker

from v2v_contracts import CloudEvent, EventData
from v2v_contracts.errors import Invalid
from v2v_messaging import (
    RELAY_CONSUMER,
    ConsumerPolicy,
    EventConsumer,
    EventMeta,
    EventTooLarge,
    HandlerRegistry,
    KafkaSettings,
    OutboxRelay,
    Tx,
    UnitOfWork,
    make_broker,
    notify_channel,
)
from v2v_messaging.consumer import CATCH_UP_LAG
from v2v_persistence import DbTimeouts, create_pool

pytestmark = pytest.mark.integration


def make_event(subject: str, n: int = 0, **extra: Any) -> CloudEvent:
    return CloudEvent(source="/v2v/order", type="order.it_test.v1", subject=subject, data={"n": n, **extra})


async def pending(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


@pytest.fixture
async def brokers(kafka: KafkaSettings) -> AsyncIterator[Callable[[], Awaitable[KafkaBroker]]]:
    """`await brokers()`: a connected producer-side broker (one per simulated replica)."""
    made: list[KafkaBroker] = []

    async def make() -> KafkaBroker:
        b = make_broker(kafka, f"it-faults-{uuid.uuid4().hex[:6]}", tracer_provider=None)
        await b.connect()
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            await b.stop()


class PausableBroker:
    """A broker whose publishes stop at a gate, as a process stopped (SIGSTOP) mid-publish would."""

    def __init__(self, inner: KafkaBroker) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.reached = asyncio.Event()

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        self.reached.set()
        await self.gate.wait()
        return await self.inner.publish(*args, **kwargs)


# --- leadership: a lease, not a lock ---------------------------------------------------------------------


async def test_a_leader_paused_mid_publish_holds_nothing_is_replaced_and_its_late_marks_are_refused(
    messaging_db: Any,
    kafka: KafkaSettings,
    brokers: Any,
    new_topic: Any,
    reader: Any,
    eventually: Any,
    write_events: Any,
) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    events = [make_event("order-L", i) for i in range(3)]
    await write_events(uow, events)

    other_pool = await create_pool(messaging_db.url, max_size=2)  # a second replica
    paused_broker = PausableBroker(await brokers())
    paused = OutboxRelay(pool, paused_broker, schema, topic, kafka, lease_ttl=1.0)  # type: ignore[arg-type]
    other = OutboxRelay(other_pool, await brokers(), schema, topic, kafka, lease_ttl=1.0)
    try:
        stuck = asyncio.create_task(paused.publish_pending())
        await asyncio.wait_for(paused_broker.reached.wait(), 10)  # leader, claimed, now "stopped"
        assert paused.is_leader
        # waiting for the broker, the paused leader holds no transaction (and so no lock)
        idle_in_tx = await other_pool.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE datname = current_database() AND state LIKE 'idle in transaction%'"""
        )
        assert idle_in_tx == 0
        assert await other.publish_pending() == 0  # its lease is still valid: the other waits

        async def took_over() -> bool:
            return await other.publish_pending() == 3

        await eventually(took_over, timeout=10, what="the other relay to take over after the lease")
        assert other.is_leader and other.epoch == (paused.epoch or 0) + 1
        assert await pending(pool) == 0

        paused_broker.gate.set()  # the paused process resumes: publishes (duplicates), its marks refused
        assert await asyncio.wait_for(stuck, 20) == 0
        assert not paused.is_leader
        assert paused.fenced_out_total == 1
        assert paused.published_total == 0
        # one subject, one partition: the new leader's copies in outbox order, then the late duplicates
        records = sorted(await reader(topic, expect=6), key=lambda r: r.offset)
        assert [CloudEvent.from_json(r.value).id for r in records] == [e.id for e in events] * 2
    finally:
        paused_broker.gate.set()
        await other_pool.close()


async def test_a_paused_replica_idling_in_a_transaction_with_the_relay_lock_does_not_stall_another(
    messaging_db: Any, kafka: KafkaSettings, brokers: Any, new_topic: Any, reader: Any, eventually: Any
) -> None:
    """The paused replica took the leadership (lease row, and the advisory lock older relays used) and
    then stopped inside a transaction, as a SIGSTOPped process would: Postgres ends its session after the
    idle-in-transaction timeout, and the other relay leads once the lease has expired."""
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    timeouts = DbTimeouts(statement_ms=5_000, lock_ms=300, idle_in_transaction_ms=1_000)
    paused_pool = await create_pool(messaging_db.url, max_size=1, timeouts=timeouts)
    other_pool = await create_pool(messaging_db.url, max_size=3, timeouts=timeouts)
    paused_conn = await paused_pool.acquire()
    tx = paused_conn.transaction()
    await tx.start()
    await paused_conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('v2v-outbox-relay:' || current_schema()))"
    )
    if await paused_conn.fetchval("SELECT to_regclass('outbox_relay') IS NOT NULL"):
        await paused_conn.execute(
            """INSERT INTO outbox_relay (name, holder, epoch, expires_at)
               VALUES ('relay', 'paused-replica', 1, clock_timestamp() + interval '1 second')
               ON CONFLICT (name) DO UPDATE SET holder = 'paused-replica'"""
        )
    # ...and now it sits there, in its transaction, holding what it took

    uow = UnitOfWork(pool, topic, notify_channel(schema))
    event = make_event("order-P")
    async with uow.begin() as wtx:
        await wtx.outbox.add(event)

    relay = OutboxRelay(other_pool, await brokers(), schema, topic, kafka, poll_interval=0.1, lease_ttl=1.0)
    task = asyncio.create_task(relay.run())
    try:
        started = asyncio.get_running_loop().time()
        await eventually(lambda: relay.published_total >= 1, timeout=8, what="the other relay to publish")
        # bounded by the idle-in-transaction timeout and the lease, not by the paused replica
        assert asyncio.get_running_loop().time() - started < 6
        [record] = await reader(topic, expect=1)
        assert CloudEvent.from_json(record.value).id == event.id
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await paused_conn.fetchval("SELECT 1")  # Postgres ended the paused session
    finally:
        await relay.stop()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        with contextlib.suppress(Exception):
            await paused_pool.release(paused_conn)
        await paused_pool.close()
        await other_pool.close()


# --- refused rows and oversized events ---------------------------------------------------------------


async def test_an_outbox_row_the_broker_refuses_is_moved_to_dead_letters_and_the_next_rows_go_out(
    messaging_db: Any, kafka: KafkaSettings, brokers: Any, new_topic: Any, reader: Any
) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    before, after = make_event("order-S", 1), make_event("order-S", 3)
    huge = make_event("order-S", 2, blob="x" * 1_500_000)  # above the broker's 1 MiB
    async with uow.begin() as tx:
        await tx.outbox.add(before)
    # written by an older writer, before the outbox capped event sizes
    await pool.execute(
        """INSERT INTO outbox (event_id, event_type, topic, message_key, payload)
           VALUES ($1, $2, $3, $4, $5)""",
        huge.id,
        huge.type,
        topic,
        huge.subject,
        huge.to_json(),
    )
    async with uow.begin() as tx:
        await tx.outbox.add(after)

    relay = OutboxRelay(pool, await brokers(), schema, topic, kafka)
    assert await relay.publish_pending() == 2
    assert await pending(pool) == 0
    assert relay.moved_aside_total == 1
    records = sorted(await reader(topic, expect=2), key=lambda r: r.offset)
    assert [CloudEvent.from_json(r.value).id for r in records] == [before.id, after.id]

    [dead] = await pool.fetch("SELECT * FROM dead_letters")
    assert dead["consumer"] == RELAY_CONSUMER
    assert (dead["event_id"], dead["event_type"], dead["topic"]) == (huge.id, huge.type, topic)
    assert bytes(dead["payload"]) == huge.to_json()
    assert bytes(dead["message_key"]) == b"order-S"
    assert "MessageSizeTooLarge" in dead["error"]
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE event_id = $1", huge.id) == 0
    assert await relay.publish_pending() == 0  # nothing left to retry forever


async def test_an_event_above_the_outbox_cap_is_refused_at_write_time(messaging_db: Any) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    uow = UnitOfWork(pool, "it.unused.v2v.order", notify_channel(schema))  # the default cap: 256 KiB
    with pytest.raises(EventTooLarge) as refused:
        async with uow.begin() as tx:
            await tx.outbox.add(make_event("order-X", blob="y" * 300_000))
    assert isinstance(refused.value, Invalid)  # a domain error: 422 over HTTP, poison in a consumer
    assert [e.as_dict() for e in refused.value.errors] == [{"field": "event", "reason": "too large"}]
    assert "yyyy" not in str(refused.value)
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0

    small = UnitOfWork(pool, "it.unused.v2v.order", notify_channel(schema), max_event_bytes=512)
    async with small.begin() as tx:
        await tx.outbox.add(make_event("order-X", 1))
    with pytest.raises(EventTooLarge):
        async with small.begin() as tx:
            await tx.outbox.add(make_event("order-X", 2, blob="z" * 600))
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1


# --- replay: bounded, batched, new rows first --------------------------------------------------------


async def test_a_replay_goes_in_bounded_slices_after_the_new_rows(
    messaging_db: Any, kafka: KafkaSettings, brokers: Any, new_topic: Any, reader: Any, write_events: Any
) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")  # empty: a broker that lost what we had published
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    retained = [make_event("order-R", i) for i in range(10)]
    await write_events(uow, retained)
    await pool.execute("UPDATE outbox SET published_at = now() - interval '1 hour'")
    relay = OutboxRelay(pool, await brokers(), schema, topic, kafka, replay_batch_size=4)
    assert await relay.replay_if_broker_is_fresh() == 10

    new = make_event("order-N", 100)  # written while the replay is under way, for another order
    same = make_event("order-R", 101)  # ... and for the order being replayed: it waits for its elders
    async with uow.begin() as tx:
        await tx.outbox.add(new)
        await tx.outbox.add(same)
    assert await relay.publish_pending() == 1 + 4  # the new row of another order, then a slice
    assert await relay.publish_pending() == 4
    assert await relay.publish_pending() == 2  # the replay's last rows of order-R
    assert await relay.publish_pending() == 1  # order-R's new row, after all of its older ones
    assert await relay.publish_pending() == 0  # replay complete
    assert not relay.replaying
    assert relay.replayed_total == 10 and relay.published_total == 2

    records = await reader(topic, expect=12)
    by_subject: dict[str, list[Any]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):  # one subject: one partition
        event = CloudEvent.from_json(r.value)
        by_subject.setdefault(str(event.subject), []).append(event.id)
    assert by_subject["order-N"] == [new.id]
    assert by_subject["order-R"] == [e.id for e in retained] + [same.id]  # in the order written


# --- consumers: the infrastructure's failures are not the message's -----------------------------------


class ItFaultV1(EventData):
    TYPE = "scheduling.it_fault.v1"
    SERVICE = "scheduling"
    n: int


def fault_event(subject: str, n: int = 0) -> CloudEvent:
    return CloudEvent(source="/v2v/scheduling", type=ItFaultV1.TYPE, subject=subject, data={"n": n})


@pytest.fixture
async def producer(kafka: KafkaSettings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, acks="all", enable_idempotence=kafka.enable_idempotence
    )
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def start_consumer(kafka: KafkaSettings, messaging_db: Any) -> AsyncIterator[Any]:
    started: list[KafkaBroker] = []
    uow = UnitOfWork(messaging_db.pool, "it.unused.v2v.scheduling", notify_channel(messaging_db.schema))

    async def start(
        handler: Callable[[Tx, ItFaultV1, EventMeta], Awaitable[None]],
        topic: str,
        dlq: str,
        policy: Any,
        service: str | None = None,
    ) -> EventConsumer:
        registry = HandlerRegistry[Tx]()
        registry.add(ItFaultV1, handler)
        broker = make_broker(kafka, f"it-fault-{uuid.uuid4().hex[:4]}", tracer_provider=None)
        consumer = EventConsumer(
            service=service or f"it{uuid.uuid4().hex[:8]}",
            purpose="it",
            topics=[topic],
            handlers=registry,
            uow=uow,
            broker=broker,
            dead_letter_topic=dlq,
            fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            policy=policy,
        )
        # see test_messaging_consumer: Tansu holds a join for half the session timeout
        consumer.subscriber._connection_args.update(session_timeout_ms=1000, heartbeat_interval_ms=250)
        started.append(broker)
        await broker.start()
        return consumer

    try:
        yield start
    finally:
        for broker in started:
            await broker.stop()


async def test_database_unavailability_is_retried_never_dead_lettered_and_spends_no_poison_budget(
    messaging_db: Any, new_topic: Any, producer: AIOKafkaProducer, start_consumer: Any, eventually: Any
) -> None:
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    event = fault_event("order-T")
    # read-only after a fail-over, disk full, shut down, a lock timeout, one bug of its own, then fine
    failures: list[BaseException] = [
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.DiskFullError("could not extend file: No space left on device"),
        ValueError("the handler's own failure, once"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
    ]
    calls: list[str] = []

    async def handle(tx: Tx, data: ItFaultV1, meta: EventMeta) -> None:
        if failures:
            exc = failures.pop(0)
            calls.append(type(exc).__name__)
            raise exc
        calls.append("ok")
        await tx.conn.execute("INSERT INTO it_effects (event_id, note) VALUES ($1, 'done')", meta.id)

    policy = ConsumerPolicy(max_attempts=2, base_backoff_s=0.01, max_backoff_s=0.05, transient_attempts=3)
    await producer.send_and_wait(topic, event.to_json(), key=b"order-T")
    consumer = await start_consumer(handle, topic, dlq, policy)
    await eventually(lambda: consumer.stats.processed == 1, timeout=20, what="the event to be processed")

    assert calls[-1] == "ok" and len(calls) == 7
    assert consumer.stats.dead_lettered == 0
    assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM it_effects")] == [event.id]


async def test_dead_letters_are_recorded_in_postgres_with_the_raw_message_and_its_origin(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: Any,
    eventually: Any,
    reader: Any,
) -> None:
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    poison, garbage = fault_event("order-D", 1), b"not a cloudevent"

    async def handle(tx: Tx, data: ItFaultV1, meta: EventMeta) -> None:
        raise ValueError(f"cannot handle n={data.n}")

    sent_poison = await producer.send_and_wait(
        topic,
        poison.to_json(),
        key=b"order-D",
        headers=[("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")],
    )
    sent_garbage = await producer.send_and_wait(topic, garbage, key=b"order-D")
    consumer = await start_consumer(handle, topic, dlq, ConsumerPolicy(max_attempts=2, base_backoff_s=0.01))
    await eventually(lambda: consumer.stats.dead_lettered == 2, timeout=20, what="two dead letters")

    rows = await pool.fetch("SELECT * FROM dead_letters ORDER BY kafka_offset")
    assert len(rows) == 2
    first, second = rows
    assert first["consumer"] == second["consumer"] == consumer.group_id
    assert (first["topic"], first["kafka_partition"], first["kafka_offset"]) == (
        topic,
        sent_poison.partition,
        sent_poison.offset,
    )
    assert (first["event_id"], first["event_type"]) == (poison.id, ItFaultV1.TYPE)
    assert bytes(first["payload"]) == poison.to_json() and bytes(first["message_key"]) == b"order-D"
    assert "cannot handle n=1" in first["error"] and first["attempts"] == 2
    headers = first["headers"] if isinstance(first["headers"], dict) else json.loads(first["headers"])
    assert headers["traceparent"].startswith("00-aaaa")  # the original headers, kept for a replay
    assert first["replayed_at"] is None and first["dead_lettered_at"] is not None
    assert second["event_id"] is None and bytes(second["payload"]) == garbage
    assert second["kafka_offset"] == sent_garbage.offset
    assert second["error"].startswith("not a CloudEvent")
    assert len(await reader(dlq, expect=2)) == 2  # the dead-letter topic still gets them too


async def test_purge_deletes_expired_rows_in_bounded_batches(
    messaging_db: Any, kafka: KafkaSettings, brokers: Any
) -> None:
    pool, schema = messaging_db.pool, messaging_db.schema
    uow = UnitOfWork(pool, "it.unused.v2v.order", notify_channel(schema))
    async with uow.begin() as tx:
        for i in range(7):
            await tx.outbox.add(make_event("order-E", i))
    await pool.execute("UPDATE outbox SET published_at = now() - interval '8 days' WHERE id % 2 = 1")
    relay = OutboxRelay(pool, await brokers(), schema, "it.unused", kafka, retention=timedelta(days=7))
    assert await relay.purge_expired(batch=2) == 4
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 3


async def test_a_healthy_broker_is_never_taken_for_one_that_forgot(
    messaging_db: Any, kafka: KafkaSettings, brokers: Any, new_topic: Any
) -> None:
    """Batched publishes (many records per produce request, on one partition) and checks in between:
    no replay. (Tansu reports the last batch's base offset + 1 as a partition's latest offset.)"""
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    relay = OutboxRelay(pool, await brokers(), schema, topic, kafka, batch_size=50)
    for round_ in range(3):
        async with uow.begin() as tx:
            for i in range(40):
                await tx.outbox.add(make_event("order-H", round_ * 100 + i))
        assert await relay.publish_pending() == 40
        assert await relay.check_broker() == 0
        assert await relay.check_broker() == 0
    assert relay.broker_resets == 0 and not relay.replaying


async def test_catching_up_skips_what_the_inbox_holds_without_a_transaction_each(
    messaging_db: Any,
    new_topic: Any,
    producer: AIOKafkaProducer,
    start_consumer: Any,
    eventually: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading a topic again from the beginning (a broker that forgot): the records the inbox already
    holds are skipped with one read each, not a transaction each; the new ones are processed once."""
    pool = messaging_db.pool
    topic, dlq = await new_topic("v2v.scheduling"), await new_topic("v2v.order.dlq")
    service = f"itc{uuid.uuid4().hex[:8]}"
    events = [fault_event("order-C", i) for i in range(125)]
    for event in events[:120]:  # processed before the broker forgot
        await pool.execute(
            """INSERT INTO inbox (consumer, event_id, event_type, topic, kafka_partition, kafka_offset)
               VALUES ($1, $2, $3, $4, 0, 0)""",
            f"{service}.it",
            event.id,
            event.type,
            topic,
        )
    for event in events:
        await producer.send_and_wait(topic, event.to_json(), key=b"order-C")
    transactions = 0
    begin = UnitOfWork.begin

    def counting_begin(self: UnitOfWork[Any]) -> Any:
        nonlocal transactions
        transactions += 1
        return begin(self)

    monkeypatch.setattr(UnitOfWork, "begin", counting_begin)
    commits = 0
    commit = AIOKafkaConsumer.commit

    async def counting_commit(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        nonlocal commits
        commits += 1
        return await commit(self, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaConsumer, "commit", counting_commit)
    seen: list[int] = []

    async def handle(tx: Tx, data: ItFaultV1, meta: EventMeta) -> None:
        seen.append(data.n)

    policy = ConsumerPolicy(max_attempts=2, base_backoff_s=0.01, max_backoff_s=0.05)
    consumer = await start_consumer(handle, topic, dlq, policy, service=service)
    await eventually(lambda: consumer.stats.processed == 5, timeout=30, what="the five new events")
    assert seen == [120, 121, 122, 123, 124]
    assert consumer.stats.duplicates == 120
    # the records within CATCH_UP_LAG of the end open a transaction (the inbox insert decides there)
    assert transactions <= 5 + CATCH_UP_LAG + 1, transactions
    assert commits <= 5 + CATCH_UP_LAG + 1, commits  # and no offset commit for each one skipped


async def test_after_an_idle_second_the_broker_is_checked_before_an_orders_new_event_goes_out(
    messaging_db: Any, kafka: KafkaSettings, brokers: Any, new_topic: Any, reader: Any
) -> None:
    """A broker that forgot while the relay had nothing to publish: the next event of an order is not
    published ahead of that order's older event, which the replay publishes first."""
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    relay = OutboxRelay(pool, await brokers(), schema, topic, kafka, idle_check_after=0.2)
    older, newer = make_event("order-I", 1), make_event("order-I", 2)
    async with uow.begin() as tx:
        await tx.outbox.add(older)
    assert await relay.publish_pending() == 1
    # the broker forgets while the relay is idle: its partitions now end below what the relay had reached
    relay._marks = {key: mark + 1000 for key, mark in relay._marks.items()}
    async with uow.begin() as tx:
        await tx.outbox.add(newer)
    await asyncio.sleep(0.3)
    assert await relay.publish_pending() == 1  # noticed first: the replay of `older`, `newer` waits
    assert relay.broker_resets == 1
    assert await relay.publish_pending() == 1  # then `newer`
    records = sorted(await reader(topic, expect=3), key=lambda r: r.offset)
    ids = [CloudEvent.from_json(r.value).id for r in records]
    assert ids == [older.id, older.id, newer.id]


async def test_a_lost_producer_connection_has_the_broker_checked_before_the_next_rows_go_out(
    messaging_db: Any, kafka: KafkaSettings, brokers: Any, new_topic: Any, reader: Any
) -> None:
    """A broker that restarted while the relay keeps publishing (never idle): the producer's connection
    dropped, so the broker is checked before an order's next event goes out to it."""
    pool, schema = messaging_db.pool, messaging_db.schema
    topic = await new_topic("v2v.order")
    uow = UnitOfWork(pool, topic, notify_channel(schema))
    broker = await brokers()
    relay = OutboxRelay(pool, broker, schema, topic, kafka, idle_check_after=1e9)
    older, newer = make_event("order-K", 1), make_event("order-K", 2)
    async with uow.begin() as tx:
        await tx.outbox.add(older)
    assert await relay.publish_pending() == 1
    assert not relay._producer_reconnected()  # steady: the same live connections
    # the broker restarts and forgets: its connections close, its partitions end below the relay's marks
    relay._marks = {key: mark + 1000 for key, mark in relay._marks.items()}
    client = broker.config.producer._producer.producer.client  # type: ignore[attr-defined]
    for conn in list(client._conns.values()):
        conn.close()
    async with uow.begin() as tx:
        await tx.outbox.add(newer)
    assert await relay.publish_pending() == 1  # noticed first: the replay of `older`, `newer` waits
    assert relay.broker_resets == 1
    assert await relay.publish_pending() == 1  # then `newer`
    records = sorted(await reader(topic, expect=3), key=lambda r: r.offset)
    assert [CloudEvent.from_json(r.value).id for r in records] == [older.id, older.id, newer.id]
