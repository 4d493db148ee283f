"""A broker that forgets while the services run (real Postgres, a Tansu of this test's own).

Tansu keeps nothing across a restart: topics, records and committed offsets vanish. The relay notices at
run time (not only at start), creates the topics again and replays the retained outbox rows; a consumer
that was stopped meanwhile then gets what it had not consumed, and its inbox drops what it had.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from faststream.kafka import KafkaBroker

from v2v_contracts import CloudEvent, EventData, all_topics, dead_letter_topic, topic_for
from v2v_harness import pytest_plugin
from v2v_harness.e2e import eventually
from v2v_harness.kafka import LocalTansu
from v2v_harness.processes import free_port
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
