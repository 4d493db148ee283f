"""A broker that forgets while the services run (real Postgres, a Tansu of this test's own).

Tansu keeps nothing across a restart: topics, records and committed offsets vanish. The relay notices at
run time (not only at start), creates the topics again and replays the retained outbox rows; a consumer
that was stopped meanwhile then gets what it had not consumed, and its inbox drops what it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker

from v2v_contracts import CloudEvent, EventData, all_topics, dead_letter_topic, new_event, topic_for
from v2v_harness import pytest_plugin
from v2v_harness.e2e import eventually
from v2v_harness.kafka import LocalTansu
from v2v_harness.processes import clean_env, free_port, spawn, stop
from v2v_messaging import (
    MIGRATIONS_DIR,
    EventConsumer,
    EventMeta,
    HandlerRegistry,
    KafkaSettings,
    OutboxRelay,
    Supervisor,
    Tx,
    UnitOfWork,
    describe_broker,
    ensure_topics,
    make_broker,
    notify_channel,
)
from v2v_persistence import apply_migrations, create_pool

pytestmark = pytest.mark.integration

SERVICE, SCHEMA = "order", "ordering"


class OrderProbeV1(EventData):
    TYPE = "order.fault_probe.v1"
    SERVICE = "order"
    n: int


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[LocalTansu]:
    broker = LocalTansu(free_port())
    broker.start(tmp_path / "tansu.log")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def pool(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    url, owner_url = test_db.urls[SERVICE], test_db.owner_urls[SERVICE]
    await apply_migrations(owner_url, SCHEMA, [MIGRATIONS_DIR])
    owner = await asyncpg.connect(owner_url)  # the schema's owner creates; the service's role uses
    await owner.execute("CREATE TABLE it_effects (event_id uuid PRIMARY KEY, n int NOT NULL)")
    # one row per application (no unique key): an event applied twice shows as two rows
    await owner.execute("CREATE TABLE it_applied (event_id uuid NOT NULL, n int NOT NULL)")
    await owner.close()
    p = await create_pool(url, max_size=8)
    try:
        yield p
    finally:
        await p.close()


async def start_consumer(
    kafka: KafkaSettings, uow: UnitOfWork[Any], topic: str, dlq: str, service: str
) -> tuple[EventConsumer, KafkaBroker]:
    registry = HandlerRegistry[Tx]()

    @registry.on(OrderProbeV1)
    async def handle(tx: Tx, data: OrderProbeV1, meta: EventMeta) -> None:
        await tx.conn.execute("INSERT INTO it_effects (event_id, n) VALUES ($1, $2)", meta.id, data.n)

    broker = make_broker(kafka, f"it-consumer-{uuid.uuid4().hex[:4]}", tracer_provider=None)
    consumer = EventConsumer(
        service=service,
        purpose="probe",
        topics=[topic],
        handlers=registry,
        uow=uow,
        broker=broker,
        dead_letter_topic=dlq,
        fetch_max_wait_ms=20,
    )
    # Tansu holds a join for half the session timeout (see libs/messaging/tests/test_messaging_consumer)
    consumer.subscriber._connection_args.update(session_timeout_ms=1000, heartbeat_interval_ms=250)
    await broker.start()
    return consumer, broker


async def test_events_not_yet_consumed_survive_a_broker_restart_while_the_services_run(
    tansu: LocalTansu, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    kafka = KafkaSettings(
        bootstrap_servers=tansu.bootstrap_servers, enable_idempotence=False, fetch_max_wait_ms=20
    )
    namespace = f"it{uuid.uuid4().hex[:8]}"
    topic, dlq = topic_for("order", namespace), dead_letter_topic("order", namespace)
    topics = all_topics(namespace)
    await ensure_topics(kafka, topics)
    uow: UnitOfWork[Any] = UnitOfWork(pool, topic, notify_channel(SCHEMA))
    relay_broker = make_broker(kafka, "it-relay", tracer_provider=None)
    await relay_broker.connect()
    relay = OutboxRelay(
        pool, relay_broker, SCHEMA, topic, kafka, poll_interval=0.2, broker_check_interval=0.3, topics=topics
    )
    supervisor = Supervisor(backoff_initial_s=0.1, backoff_max_s=1.0)
    supervisor.spawn("outbox-relay", relay.run, beats=True)
    supervisor.spawn("outbox-listener", relay.listen, beats=True)

    async def write(n: int) -> CloudEvent:
        async with uow.begin() as tx:
            return await tx.publish(OrderProbeV1(n=n))

    async def effects() -> dict[uuid.UUID, int]:
        return {r["event_id"]: r["n"] for r in await pool.fetch("SELECT * FROM it_effects")}

    consumer_service = f"it{uuid.uuid4().hex[:6]}"
    consumer_brokers: list[KafkaBroker] = []
    try:
        consumer, broker = await start_consumer(kafka, uow, topic, dlq, consumer_service)
        consumer_brokers.append(broker)
        first = [await write(n) for n in (1, 2)]
        await eventually(
            lambda: consumer.stats.processed == 2, 30, what="the consumer to process the first two"
        )
        await broker.stop()  # the consumer is paused (its service stopped, say)

        later = [await write(n) for n in (3, 4)]
        await eventually(lambda: relay.published_total == 4, 10, what="the relay to publish the next two")
        assert relay.broker_resets == 0

        tansu.stop()  # the broker restarts, memory-only: every topic, record and offset is gone
        tansu.start(tmp_path / "tansu-2.log")

        await eventually(lambda: relay.broker_resets >= 1, 20, what="the relay to notice the fresh broker")
        await eventually(lambda: relay.replayed_total >= 4 and not relay.replaying, 20, what="the replay")
        assert set(topics) <= set(await list_topics(kafka))  # created again, dead-letter topics too

        consumer, broker = await start_consumer(kafka, uow, topic, dlq, consumer_service)  # resumes
        consumer_brokers.append(broker)
        await eventually(lambda: consumer.stats.processed == 2, 30, what="the events not consumed before")
        await eventually(lambda: consumer.stats.duplicates == 2, 10, what="the replayed ones to be dropped")

        assert await effects() == {e.id: e.data["n"] for e in [*first, *later]}
        assert consumer.stats.dead_lettered == 0
        assert supervisor.problems() == {}

        # and the platform goes on as before on the new broker
        fifth = await write(5)
        await eventually(lambda: consumer.stats.processed == 3, 20, what="a new event after the restart")
        assert (await effects())[fifth.id] == 5
    finally:
        await relay.stop()
        await supervisor.stop()
        for b in consumer_brokers:
            await b.stop()
        await relay_broker.stop()


async def list_topics(kafka: KafkaSettings) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


# ---- a broker that forgets under a consumer that is paused, or running ------------------------------------
#
# After the broker restarts, the consumer's group is gone with it: the consumer joins it again (its
# topic changed under it, or a heartbeat was answered "unknown member"), and Tansu holds that join for
# half the session timeout (5 s with the services' settings). Meanwhile the consumer still holds its old
# assignment and the positions it had on the old broker: a handler that finishes would commit them, and
# the broker would take the commit from the member it is re-admitting (no member id, generation -1: the
# group on the fresh broker has no members). The join would complete, the consumer resume from those
# positions, and the records the relay put below them on the fresh broker (numbered from 0 again, new
# rows first, then the replay) would never be read; Tansu answers a fetch past the end of a partition
# with nothing rather than an error, so nothing says so. A consumer paused in the middle of an event (a
# long handler, or SIGSTOP) is the one this happens to. So no member commits outside the group's
# current generation (`v2v_messaging.kafka._no_commit_outside_the_group`), and the consumer notices that
# the broker forgot and starts again from the beginning of what it holds, its inbox dropping what it had
# (a start over that a rebalance interrupts is done again at the next assignment).

SERVICES_GROUP = {"session_timeout_ms": 10_000, "heartbeat_interval_ms": 3_000}  # the services' defaults


class Platform:
    """The order service's side: its outbox, a supervised relay, a Tansu of the test's own."""

    def __init__(self, tansu: LocalTansu, pool: asyncpg.Pool, tmp_path: Path) -> None:
        self.tansu = tansu
        self.pool = pool
        self.tmp_path = tmp_path
        self.kafka = KafkaSettings(
            bootstrap_servers=tansu.bootstrap_servers, enable_idempotence=False, fetch_max_wait_ms=20
        )
        namespace = f"it{uuid.uuid4().hex[:8]}"
        self.topic, self.dlq = topic_for("order", namespace), dead_letter_topic("order", namespace)
        self.topics = all_topics(namespace)
        self.uow: UnitOfWork[Any] = UnitOfWork(pool, self.topic, notify_channel(SCHEMA))
        self.written: dict[uuid.UUID, int] = {}
        self.restarts = 0

    async def __aenter__(self) -> Platform:
        await ensure_topics(self.kafka, self.topics)
        self.relay_broker = make_broker(self.kafka, "it-relay", tracer_provider=None)
        await self.relay_broker.connect()
        self.relay = OutboxRelay(
            self.pool,
            self.relay_broker,
            SCHEMA,
            self.topic,
            self.kafka,
            poll_interval=0.2,
            # the services' setting: a relay meets the fresh broker up to 5 s after the consumers do
            broker_check_interval=5.0,
            topics=self.topics,
        )
        self.supervisor = Supervisor(backoff_initial_s=0.1, backoff_max_s=1.0)
        self.supervisor.spawn("outbox-relay", self.relay.run, beats=True)
        self.supervisor.spawn("outbox-listener", self.relay.listen, beats=True)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.relay.stop()
        await self.supervisor.stop()
        await self.relay_broker.stop()

    async def write(self, count: int) -> None:
        """`count` probe events, one transaction each (no order id: the relay spreads them over the
        partitions)."""
        for _ in range(count):
            n = len(self.written)
            async with self.uow.begin() as tx:
                event = await tx.publish(OrderProbeV1(n=n))
            self.written[event.id] = n

    def published(self) -> bool:
        return self.relay.published_total >= len(self.written)

    async def restart_broker(self, *, then_write: int = 0) -> None:
        """`kill -9` the broker and start it again at once, as the harness does under `make run`
        (memory-only: everything it held is gone); write `then_write` events at once (orders keep
        coming: the relay publishes them before it notices, so they are the first records of the fresh
        broker); wait for the relay to notice, create the topics again and replay what it had
        published."""
        resets, replayed, published = self.relay.broker_resets, self.relay.replayed_total, len(self.written)
        assert self.tansu.proc is not None
        self.tansu.proc.kill()
        self.tansu.proc.wait(10)
        self.tansu.proc = None
        self.restarts += 1
        self.tansu.start(self.tmp_path / f"tansu-{self.restarts}.log")
        await self.write(then_write)
        await eventually(lambda: self.relay.broker_resets > resets, 20, what="the relay to notice")
        await eventually(
            lambda: self.relay.replayed_total - replayed >= published and not self.relay.replaying,
            30,
            what="the replay",
        )

    async def applied(self) -> dict[uuid.UUID, int]:
        """How many times each event was applied."""
        rows = await self.pool.fetch("SELECT event_id, count(*) AS n FROM it_applied GROUP BY event_id")
        return {r["event_id"]: r["n"] for r in rows}

    async def applied_total(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM it_applied"))

    async def all_applied(self) -> bool:
        return set(await self.applied()) >= set(self.written)

    async def check_exactly_once(self, group: str, within: float) -> None:
        """Every event written so far is processed, exactly once (inbox and effects), none skipped."""
        with contextlib.suppress(AssertionError):
            await eventually(self.all_applied, within, interval=0.2, what="every event")
        await asyncio.sleep(0.5)  # a second application would show by now
        applied = await self.applied()
        missing = sorted(self.written[e] for e in self.written if e not in applied)
        twice = sorted(self.written[e] for e, n in applied.items() if n > 1)
        assert not missing, f"events never processed (skipped): {missing} of {len(self.written)}"
        assert not twice, f"events processed more than once: {twice}"
        inbox = await self.pool.fetch("SELECT event_id FROM inbox WHERE consumer = $1", group)
        assert sorted(r["event_id"] for r in inbox) == sorted(self.written)
        assert await self.pool.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert self.supervisor.problems() == {}


def probe_consumer(
    platform: Platform, registry: HandlerRegistry[Tx], service: str
) -> tuple[EventConsumer, KafkaBroker]:
    broker = make_broker(platform.kafka, f"it-{service}", tracer_provider=None)
    consumer = EventConsumer(
        service=service,
        purpose="probe",
        topics=[platform.topic],
        handlers=registry,
        uow=platform.uow,
        broker=broker,
        dead_letter_topic=platform.dlq,
        fetch_max_wait_ms=20,
        **SERVICES_GROUP,
    )
    return consumer, broker


async def apply(tx: Tx, data: OrderProbeV1, meta: EventMeta) -> None:
    await tx.conn.execute("INSERT INTO it_applied (event_id, n) VALUES ($1, $2)", meta.id, data.n)


async def test_broker_restart_while_a_consumer_is_paused_in_a_handler(
    tansu: LocalTansu, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A consumer paused in a long handler (not polling) across a broker restart, which finishes
    while the consumer joins its group again on the fresh broker: every event is processed exactly
    once afterwards, none skipped."""
    service = f"it{uuid.uuid4().hex[:6]}"
    held = 12  # the handler of this event waits until the test lets it go
    entered, release = asyncio.Event(), asyncio.Event()
    registry = HandlerRegistry[Tx]()

    @registry.on(OrderProbeV1)
    async def handle(tx: Tx, data: OrderProbeV1, meta: EventMeta) -> None:
        if data.n == held and not release.is_set():
            entered.set()
            await release.wait()
        await apply(tx, data, meta)

    async with Platform(tansu, pool, tmp_path) as platform:
        consumer, broker = probe_consumer(platform, registry, service)
        await broker.start()
        try:
            await platform.write(20)
            await asyncio.wait_for(entered.wait(), 30)  # paused in a handler, its backlog waiting
            await eventually(platform.published, 10, what="the relay to publish")

            async def release_when_rejoining() -> None:
                # the consumer finds out that its group is gone (or that its topic changed) and joins
                # it again: the handler finishes while it does
                kafka_consumer: Any = consumer.subscriber.consumer
                await eventually(
                    lambda: kafka_consumer._subscription.reassignment_in_progress,
                    30,
                    interval=0.01,
                    what="a re-join",
                )
                release.set()

            releaser = asyncio.create_task(release_when_rejoining())
            await platform.restart_broker(then_write=12)
            await platform.write(3)  # published to the fresh broker
            await eventually(platform.published, 20, what="the relay to publish after the restart")
            await asyncio.wait_for(releaser, 20)
            await platform.check_exactly_once(consumer.group_id, within=40)

            await platform.write(3)  # and it goes on as before on the fresh broker
            await platform.check_exactly_once(consumer.group_id, within=20)
            assert consumer.stats.dead_lettered == 0
        finally:
            release.set()
            await broker.stop()


async def test_broker_restart_while_a_consumer_process_is_paused(
    tansu: LocalTansu, pool: asyncpg.Pool, tmp_path: Path, test_db: pytest_plugin.TestDatabase
) -> None:
    """Issue 9's acceptance test: a consumer process stopped (SIGSTOP, as the chaos nemesis does) in
    the middle of a backlog of slow events while the broker restarts and forgets; resumed (SIGCONT),
    it processes every event exactly once: those it had not reached, those published after the
    restart, none skipped, none twice."""
    service = f"it{uuid.uuid4().hex[:6]}"
    async with Platform(tansu, pool, tmp_path) as platform:
        child = spawn(
            [
                sys.executable,
                str(Path(__file__).with_name("probe_consumer.py")),
                tansu.bootstrap_servers,
                test_db.urls[SERVICE],
                platform.topic,
                platform.dlq,
                service,
                "1.0",  # from the 13th on, an event takes a second: paused, the consumer is in one
                "12",
                # one record per transaction, so that twelve are applied and the 13th is in flight when
                # it is paused (a poll's records in one transaction would commit all 20 together; the
                # batch path's kill-and-resume is tested in libs/messaging)
                "1",
            ],
            env=clean_env(),
            log_path=tmp_path / "consumer.log",
        )
        try:
            await platform.write(20)
            await eventually(platform.published, 10, what="the relay to publish")
            await eventually(
                lambda: _at_least(platform, 12), 40, interval=0.05, what="the consumer to process twelve"
            )
            await asyncio.sleep(0.5)  # in the middle of the 13th
            child.send_signal(signal.SIGSTOP)  # paused: not polling, not heart-beating
            assert await platform.applied_total() < 20, "the consumer was to be paused with a backlog"

            await platform.restart_broker(then_write=12)
            await platform.write(2)  # published to the fresh broker while the consumer is paused
            await eventually(platform.published, 20, what="the relay to publish after the restart")

            child.send_signal(signal.SIGCONT)
            await platform.check_exactly_once(f"{service}.probe", within=60)

            await platform.write(2)  # and it goes on as before on the fresh broker
            await platform.check_exactly_once(f"{service}.probe", within=30)
        finally:
            if child.poll() is None:
                child.send_signal(signal.SIGCONT)
            stop(child, signal.SIGTERM, timeout=10)
            print((tmp_path / "consumer.log").read_text()[-6000:])


async def test_broker_restart_while_a_consumer_is_running(
    tansu: LocalTansu, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """The broker restarts under a consumer busy with a backlog of events that take a while each (a
    slow dependency), while orders keep coming: every event is processed exactly once, none skipped."""
    service = f"it{uuid.uuid4().hex[:6]}"
    registry = HandlerRegistry[Tx]()

    @registry.on(OrderProbeV1)
    async def handle(tx: Tx, data: OrderProbeV1, meta: EventMeta) -> None:
        await asyncio.sleep(0.5)
        await apply(tx, data, meta)

    async with Platform(tansu, pool, tmp_path) as platform:
        consumer, broker = probe_consumer(platform, registry, service)
        await broker.start()
        try:
            await platform.write(16)
            await eventually(lambda: consumer.stats.processed >= 4, 40, what="the consumer to be busy")
            await platform.restart_broker(then_write=3)
            await platform.write(3)
            await platform.check_exactly_once(consumer.group_id, within=60)
            assert consumer.stats.dead_lettered == 0
        finally:
            await broker.stop()


async def _at_least(platform: Platform, count: int) -> bool:
    return await platform.applied_total() >= count


async def test_topics_are_created_with_their_partitions_never_by_asking_about_them(
    tansu: LocalTansu, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """After a broker restart, no client creates a topic by asking about it (Tansu would create it with
    its own 4 partitions, before a relay could create it with the configured count): a producer asking
    leaves it missing; a consumer whose topic the broker lost creates it again, explicitly, with the
    partitions it had, finds it again and reads from it."""
    kafka = KafkaSettings(bootstrap_servers=tansu.bootstrap_servers, enable_idempotence=False)
    namespace = f"it{uuid.uuid4().hex[:8]}"
    topic, dlq = topic_for("order", namespace), dead_letter_topic("order", namespace)
    await ensure_topics(kafka, [topic, dlq])
    registry = HandlerRegistry[Tx]()
    registry.add(OrderProbeV1, apply)
    broker = make_broker(kafka, "it-consumer", tracer_provider=None)
    consumer = EventConsumer(
        service=f"it{uuid.uuid4().hex[:6]}",
        purpose="probe",
        topics=[topic],
        handlers=registry,
        uow=UnitOfWork(pool, topic, notify_channel(SCHEMA)),
        broker=broker,
        dead_letter_topic=dlq,
        fetch_max_wait_ms=20,
        broker_check_interval_s=0.5,
    )
    consumer.subscriber._connection_args.update(session_timeout_ms=1000, heartbeat_interval_ms=250)
    await broker.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    try:
        kafka_consumer: Any = consumer.subscriber.consumer
        await eventually(lambda: kafka_consumer.assignment(), 20, what="an assignment")
        tansu.stop()
        tansu.start(tmp_path / "tansu-2.log")  # both topics are gone

        await producer.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(producer.partitions_for(dlq), 1.0)
        assert dlq not in (await describe_broker(kafka, [dlq])).partitions

        async def partitions() -> int | None:
            return (await describe_broker(kafka, [topic])).partitions.get(topic)

        assert await eventually(partitions, 20, what="the consumer to create its topic") == kafka.partitions
        event = new_event(OrderProbeV1(n=1))
        await producer.send_and_wait(topic, event.to_json(), key=b"k")
        await eventually(lambda: consumer.stats.processed == 1, 20, what="the consumer to read from it")
    finally:
        await producer.stop()
        await broker.stop()
