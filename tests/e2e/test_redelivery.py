"""Every consumer receives every event a second time: nothing changes the second time."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from v2v_contracts import topic_for
from v2v_harness.e2e import Parties, eventually, order_body
from v2v_harness.platform import Platform
from v2v_harness.provision import with_database

pytestmark = pytest.mark.e2e

PUBLISHERS = ["order", "scheduling", "site", "logistics"]
GROUPS = ["order.saga", "scheduling.slots", "site.bookings", "logistics.shipments", "notification.webhooks"]
TABLES = [
    "ordering.orders",
    "ordering.order_timeline",
    "ordering.outbox",
    "ordering.inbox",
    "scheduling.slots",
    "scheduling.waitlist",
    "scheduling.outbox",
    "scheduling.inbox",
    "site.bookings",
    "site.outbox",
    "site.inbox",
    "logistics.shipments",
    "logistics.outbox",
    "logistics.inbox",
    "notification.deliveries",
    "notification.outbox",
    "notification.inbox",
]


async def snapshot(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}
    finally:
        await conn.close()


async def read_all(bootstrap: str, topics: list[str]) -> list[tuple[str, bytes | None, bytes, list]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or set())]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or set())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out += [(r.topic, r.key, r.value, list(r.headers)) for r in records]
        return out
    finally:
        await consumer.stop()


async def lag(bootstrap: str, namespace: str, topics: list[str]) -> int:
    """Messages the five consumer groups have not committed yet, on the partitions they consume."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await probe.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in (probe.partitions_for_topic(t) or set())]
        ends = await probe.end_offsets(tps)
    finally:
        await probe.stop()
    total = 0
    for group in GROUPS:
        reader = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=f"{namespace}.{group}", enable_auto_commit=False
        )
        await reader.start()
        try:
            for tp in tps:
                committed = await reader.committed(tp)
                if committed is not None:  # None: this group does not read that partition
                    total += max(0, ends[tp] - committed)
        finally:
            await reader.stop()
    return total


async def pending_outbox(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        schemas = ["ordering", "scheduling", "site", "logistics", "notification"]
        total = 0
        for s in schemas:
            total += int(await conn.fetchval(f"SELECT count(*) FROM {s}.outbox WHERE published_at IS NULL"))
        return total
    finally:
        await conn.close()


async def test_every_event_delivered_twice_changes_nothing(platform: Platform, parties: Parties) -> None:
    orders = []  # (centre, order id): each centre places and reads its own
    for centre in ("TC-US-NJ-001", "TC-CH-ZH-001"):
        resp = await parties.centre(centre).post(
            f"{platform.url('order')}/v1/orders", json=order_body(centre)
        )
        assert resp.status_code == 201, resp.text
        orders.append((centre, resp.json()["order_id"]))

    async def all_planned() -> bool:
        for centre, oid in orders:
            body = (await parties.centre(centre).get(f"{platform.url('order')}/v1/orders/{oid}")).json()
            if body["status"] != "inbound_shipment_planned":
                return False
        return True

    await eventually(all_planned, timeout=15, what="orders planned")

    bootstrap = platform.infra.bootstrap_servers
    topics = [topic_for(s, platform.namespace) for s in PUBLISHERS]
    db_url = with_database(platform.infra.admin_url, platform.database)

    async def settled() -> bool:
        return await pending_outbox(db_url) == 0 and await _zero(bootstrap, platform, topics)

    await eventually(settled, timeout=20, what="outboxes drained and consumers caught up")
    before = await snapshot(db_url)

    messages = await read_all(bootstrap, topics)
    assert len(messages) >= 8  # at least the four steps of our two orders
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic, key, value, headers in messages:
            await producer.send_and_wait(topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()

    await eventually(settled, timeout=20, what="duplicates consumed")
    await asyncio.sleep(1.0)  # let any (wrong) second-order effect settle
    after = await snapshot(db_url)
    assert after == before


async def _zero(bootstrap: str, platform: Platform, topics: list[str]) -> bool:
    return await lag(bootstrap, platform.namespace, topics) == 0
