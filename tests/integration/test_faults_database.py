"""The database goes away, or goes read-only, while the services run (real Postgres and broker).

- a read-only window (as after a fail-over: the old primary comes back as a standby) is the
  infrastructure's failure: the consumer retries and redelivers, never dead-letters, and processes the
  messages once the database takes writes again;
- a Postgres restart drops the relay's LISTEN connection: it is re-established (with backoff), and a row
  written afterwards is published at once, not after the (long) poll interval.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from v2v_contracts import CloudEvent, EventData, dead_letter_topic, topic_for
from v2v_harness import pytest_plugin
from v2v_harness.catalog import BY_NAME
from v2v_harness.e2e import eventually
from v2v_harness.infra import Infrastructure
from v2v_harness.postgres import LocalPostgres
from v2v_harness.processes import free_port
from v2v_harness.provision import provision, with_database
from v2v_messaging import (
    MIGRATIONS_DIR,
    ConsumerPolicy,
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
from v2v_messaging import outbox as outbox_module
from v2v_persistence import apply_migrations, create_pool

pytestmark = pytest.mark.integration

SERVICE, SCHEMA = "order", "ordering"


class SchedulingProbeV1(EventData):
    TYPE = "scheduling.fault_probe.v1"
    SERVICE = "scheduling"
    n: int


class OrderProbeV1(EventData):
    TYPE = "order.fault_probe.v1"
    SERVICE = "order"
    n: int


@pytest.fixture
def kafka(infra: Infrastructure) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=infra.bootstrap_servers,
        enable_idempotence=infra.kafka_idempotence,
        fetch_max_wait_ms=infra.kafka_fetch_max_wait_ms,
    )


# --- a read-only window --------------------------------------------------------------------------------


async def test_a_read_only_window_is_waited_out_never_dead_lettered(
    test_db: pytest_plugin.TestDatabase, kafka: KafkaSettings
) -> None:
    url, owner_url = test_db.urls[SERVICE], test_db.owner_urls[SERVICE]
    await apply_migrations(owner_url, SCHEMA, [MIGRATIONS_DIR])
    owner = await asyncpg.connect(owner_url)  # the schema's owner creates; the service's role uses
    await owner.execute("CREATE TABLE it_effects (event_id uuid PRIMARY KEY, n int NOT NULL)")
    await owner.close()
    pool = await create_pool(url, max_size=4)
    admin = await asyncpg.connect(with_database(test_db.admin_url, test_db.name))
    namespace = f"it{uuid.uuid4().hex[:8]}"
    topic, dlq = topic_for("scheduling", namespace), dead_letter_topic("order", namespace)
    await ensure_topics(kafka, [topic, dlq])

    registry = HandlerRegistry[Tx]()

    @registry.on(SchedulingProbeV1)
    async def handle(tx: Tx, data: SchedulingProbeV1, meta: EventMeta) -> None:
        await tx.conn.execute("INSERT INTO it_effects (event_id, n) VALUES ($1, $2)", meta.id, data.n)

    uow: UnitOfWork[Any] = UnitOfWork(pool, topic_for("order", namespace), notify_channel(SCHEMA))
    broker = make_broker(kafka, "it-read-only", tracer_provider=None)
    consumer = EventConsumer(
        service="order",
        purpose="probe",
        topics=[topic],
        handlers=registry,
        uow=uow,
        broker=broker,
        dead_letter_topic=dlq,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        namespace=namespace,
        # two failures of its own would dead-letter a message: the window must not count as such
        policy=ConsumerPolicy(max_attempts=2, base_backoff_s=0.05, max_backoff_s=0.3, transient_attempts=4),
    )
    consumer.subscriber._connection_args.update(session_timeout_ms=1000, heartbeat_interval_ms=250)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, acks="all", enable_idempotence=False
    )
    await producer.start()
    role = BY_NAME[SERVICE].role

    async def cut_sessions() -> None:  # as a fail-over does: every session of the service is dropped
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND usename = $2",
            test_db.name,
            role,
        )

    def probe(n: int) -> bytes:
        return CloudEvent(
            source="/v2v/scheduling", type=SchedulingProbeV1.TYPE, subject=f"order-{n}", data={"n": n}
        ).to_json()

    try:
        await broker.start()
        await producer.send_and_wait(topic, probe(0), key=b"order-0")
        await eventually(lambda: consumer.stats.processed == 1, 30, what="the consumer to work")

        await admin.execute(f'ALTER DATABASE "{test_db.name}" SET default_transaction_read_only = on')
        await cut_sessions()
        for n in (1, 2):
            await producer.send_and_wait(topic, probe(n), key=f"order-{n}".encode())
        # the window lasts: several redeliveries' worth of read-only failures
        await eventually(lambda: consumer.stats.transient_failures >= 10, 30, what="read-only failures")
        assert consumer.stats.processed == 1
        assert consumer.stats.dead_lettered == 0
        assert consumer.stats.poison_failures == 0

        await admin.execute(f'ALTER DATABASE "{test_db.name}" RESET default_transaction_read_only')
        await cut_sessions()
        await eventually(lambda: consumer.stats.processed == 3, 30, what="the messages after the window")
        assert consumer.stats.dead_lettered == 0
        assert await admin.fetchval("SELECT count(*) FROM ordering.dead_letters") == 0
        assert sorted(r["n"] for r in await admin.fetch("SELECT n FROM ordering.it_effects")) == [0, 1, 2]
    finally:
        await admin.execute(f'ALTER DATABASE "{test_db.name}" RESET default_transaction_read_only')
        await broker.stop()
        await producer.stop()
        await admin.close()
        await pool.close()


# --- a Postgres restart and the relay's LISTEN --------------------------------------------------------


@pytest.fixture
def own_postgres(state_dir: Path) -> Iterator[LocalPostgres]:
    """A Postgres of this test's own, which it can restart."""
    pg = LocalPostgres(state_dir / f"pg-{uuid.uuid4().hex[:6]}", free_port(), durable=False)
    pg.start(state_dir / "logs" / f"postgres-{pg.port}.log")
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
async def restartable_pool(own_postgres: LocalPostgres) -> AsyncIterator[asyncpg.Pool]:
    urls = await provision(own_postgres.admin_url, "v2v_listen")
    await apply_migrations(urls.owner_urls[SERVICE], SCHEMA, [MIGRATIONS_DIR])
    pool = await create_pool(urls[SERVICE], max_size=6)
    try:
        yield pool
    finally:
        await pool.close()


async def test_the_relay_listens_again_after_a_postgres_restart(
    own_postgres: LocalPostgres,
    restartable_pool: asyncpg.Pool,
    kafka: KafkaSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no quicker polling while LISTEN is down either: only a NOTIFY can explain a prompt publish
    monkeypatch.setattr(outbox_module, "FALLBACK_POLL_S", 120.0)
    pool = restartable_pool
    topic = topic_for("order", f"it{uuid.uuid4().hex[:8]}")
    await ensure_topics(kafka, [topic])
    uow: UnitOfWork[Any] = UnitOfWork(pool, topic, notify_channel(SCHEMA))
    broker = make_broker(kafka, "it-listen", tracer_provider=None)
    await broker.connect()
    # a poll so slow that only a NOTIFY can explain a prompt publish
    relay = OutboxRelay(pool, broker, SCHEMA, topic, kafka, poll_interval=120.0, broker_check_interval=120.0)
    supervisor = Supervisor(backoff_initial_s=0.2, backoff_max_s=1.0)
    supervisor.spawn("outbox-relay", relay.run, beats=True)
    supervisor.spawn("outbox-listener", relay.listen, beats=True)

    async def write(n: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:  # the pool's connections died with the server: the first tries may fail
            try:
                async with uow.begin() as tx:
                    await tx.publish(OrderProbeV1(n=n))
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    try:
        await eventually(lambda: relay.listening, 10, what="the relay to listen")
        await asyncio.sleep(0.5)  # the first pass is done: the relay now waits on NOTIFY (or 120 s)
        await write(1)
        await eventually(lambda: relay.published_total == 1, 5, what="the first row, woken by NOTIFY")

        await asyncio.to_thread(own_postgres.stop)
        await asyncio.to_thread(
            own_postgres.start, own_postgres.data_dir.parent / f"pg-{own_postgres.port}-2.log"
        )
        await eventually(
            lambda: supervisor.health()["outbox-listener"].restarts >= 1, 20, what="the lost LISTEN"
        )
        await eventually(lambda: relay.listening, 20, what="LISTEN to be re-established")
        await asyncio.sleep(1.0)  # the pass the reconnection woke is over: the relay waits again

        await write(2)
        started = asyncio.get_running_loop().time()
        await eventually(lambda: relay.published_total == 2, 5, what="the row written after the restart")
        assert asyncio.get_running_loop().time() - started < 5
        assert supervisor.problems() == {}
    finally:
        await relay.stop()
        await supervisor.stop()
        await broker.stop()
