"""Shared fixtures for the messaging integration tests: a migrated schema, fresh topics, a topic reader.

Everything runs against the real infrastructure of `v2v_harness.pytest_plugin` (embedded Postgres and
the Tansu broker); nothing is mocked.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from v2v_harness.infra import Infrastructure
from v2v_harness.provision import ProvisionedDatabase
from v2v_harness.pytest_plugin import TestDatabase
from v2v_messaging import MIGRATIONS_DIR, KafkaSettings, ensure_topics
from v2v_persistence import apply_migrations, create_pool

SERVICE = "order"  # any service role will do: the messaging tables are identical in every schema
SCHEMA = "ordering"


@dataclass
class MessagingDb:
    pool: asyncpg.Pool  # the service's runtime role, as a running service connects
    url: str
    schema: str
    owner_url: str  # the schema owner's role: migrations and test tables


def owner_urls(test_db: TestDatabase) -> dict[str, str]:
    """Each service's schema-owner URL, beside the runtime URLs of `test_db.urls`."""
    urls = test_db.urls
    assert isinstance(urls, ProvisionedDatabase), "test_db.urls comes from v2v_harness.provision"
    return urls.owner_urls


@pytest.fixture
def kafka(infra: Infrastructure) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=infra.bootstrap_servers,
        enable_idempotence=infra.kafka_idempotence,
        fetch_max_wait_ms=infra.kafka_fetch_max_wait_ms,
    )


@pytest.fixture
async def messaging_db(test_db: TestDatabase) -> AsyncIterator[MessagingDb]:
    """One service schema with the outbox/inbox migration and a test table for handler effects, both
    created by the schema's owner; the pool is the service's runtime role."""
    url, owner_url = test_db.urls[SERVICE], owner_urls(test_db)[SERVICE]
    await apply_migrations(owner_url, SCHEMA, [MIGRATIONS_DIR])
    owner = await asyncpg.connect(owner_url)
    try:
        await owner.execute(
            """CREATE TABLE it_effects (id bigserial PRIMARY KEY, event_id uuid, note text NOT NULL,
                                        written_at timestamptz NOT NULL DEFAULT now())"""
        )
    finally:
        await owner.close()
    pool = await create_pool(url, max_size=6)
    try:
        yield MessagingDb(pool, url, SCHEMA, owner_url)
    finally:
        await pool.close()


TopicFactory = Callable[[str], Awaitable[str]]


@pytest.fixture
def new_topic(kafka: KafkaSettings) -> TopicFactory:
    """Creates a topic no other test uses; returns its name."""

    async def make(suffix: str = "v2v.order") -> str:
        topic = f"it.{uuid.uuid4().hex[:8]}.{suffix}"
        await ensure_topics(kafka, [topic])
        return topic

    return make


async def read_topic(
    kafka: KafkaSettings,
    topic: str,
    *,
    expect: int,
    timeout: float = 10.0,
    settle: float = 0.5,
) -> list[ConsumerRecord]:
    """Every record on `topic` from the beginning: waits for at least `expect` of them, then keeps
    reading for `settle` seconds so that extra (duplicate) records would be seen too."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        assert partitions, f"topic {topic} has no partitions"
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        records: list[ConsumerRecord] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        settle_until: float | None = None
        while True:
            now = loop.time()
            if settle_until is None and len(records) >= expect:
                settle_until = now + settle
            if settle_until is not None and now >= settle_until:
                break
            if now >= deadline:
                break
            batch = await consumer.getmany(timeout_ms=50)
            for recs in batch.values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


async def _eventually(
    check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Polls `check` every 20 ms until it is true; fails after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


Reader = Callable[..., Awaitable[list[ConsumerRecord]]]


@pytest.fixture
def reader(kafka: KafkaSettings) -> Reader:
    """`await reader(topic, expect=n)`: the records on a topic (see `read_topic`)."""

    async def read(topic: str, **kwargs: Any) -> list[ConsumerRecord]:
        return await read_topic(kafka, topic, **kwargs)

    return read


@pytest.fixture
def eventually() -> Callable[..., Awaitable[None]]:
    """`await eventually(check, timeout=..., what=...)`: polls until `check()` is true."""
    return _eventually


async def _write_events(uow: Any, events: list[Any]) -> None:
    async with uow.begin() as tx:
        for event in events:
            await tx.outbox.add(event)


@pytest.fixture
def write_events() -> Callable[..., Awaitable[None]]:
    """`await write_events(uow, events)`: the events' outbox rows, written in one transaction."""
    return _write_events
