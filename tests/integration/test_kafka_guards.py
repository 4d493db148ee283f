"""No produce to a topic the broker does not have (`v2v_messaging.kafka._no_produce_to_missing_topics`).

A memory-only Tansu that restarted has no topics, but a producer that knew the old one still has them in
its metadata and sends at once. Tansu takes that produce (acknowledged, readable, the topic still
unknown to its metadata), and once the topic is created its partitions are broken: acknowledged records
are never readable, or two share an offset. A relay publishing just after a restart, before its check
noticed, lost events that way. The guard makes a producer's first produce on each new connection wait
until the broker has the topic: nothing is produced before, and nothing acknowledged is lost after.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, KafkaError

import v2v_messaging.kafka  # noqa: F401  (installs the guards in every aiokafka client of this process)
from v2v_harness.kafka import LocalTansu
from v2v_harness.processes import free_port

pytestmark = pytest.mark.integration
PARTITIONS = 6


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[LocalTansu]:
    broker = LocalTansu(free_port())
    broker.start(tmp_path / "tansu.log")
    try:
        yield broker
    finally:
        broker.stop()


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()


async def read_all(bootstrap: str, topic: str, expected: int) -> list[tuple[int, int, bytes]]:
    """Every record of `topic` from the beginning: (partition, offset, value)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[int, int, bytes]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        idle_until = None
        while loop.time() < deadline:
            got = await consumer.getmany(timeout_ms=200)
            for tp, records in got.items():
                out += [(tp.partition, r.offset, r.value or b"") for r in records]
            if len(out) >= expected:  # and a little more, in case some record came twice
                idle_until = idle_until or loop.time() + 0.5
                if loop.time() >= idle_until:
                    break
        return out
    finally:
        await consumer.stop()


async def test_a_producer_meeting_a_restarted_tansu_waits_for_the_topic_and_loses_nothing(
    tansu: LocalTansu, tmp_path: Path
) -> None:
    topic = f"it-guard-{uuid.uuid4().hex[:8]}"
    bootstrap = tansu.bootstrap_servers
    await create_topic(bootstrap, topic)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, request_timeout_ms=5000
    )
    await producer.start()
    early: list[Any] = []

    async def send(value: bytes, key: int) -> None:
        metadata = await (await producer.send(topic, value, key=b"%d" % key))
        early.append((metadata, value))

    try:
        await asyncio.gather(*[await producer.send(topic, b"old", key=b"%d" % i) for i in range(20)])

        assert tansu.proc is not None
        tansu.proc.kill()  # memory-only: every topic and record is gone
        tansu.proc.wait(10)
        tansu.start(tmp_path / "tansu-2.log")

        # the producer still knows the topic and sends at once: nothing may reach the broker before
        # the topic exists again
        sending = [asyncio.create_task(send(b"early-%d" % i, i)) for i in range(12)]
        await asyncio.sleep(0.5)
        assert early == [], f"produced to a topic the broker does not have: {[v for _, v in early]}"
        await create_topic(bootstrap, topic)
        await asyncio.wait_for(asyncio.gather(*sending), 30)  # then they go out

        later: list[Any] = []
        for i in range(20):  # one at a time, each retried as a relay would
            value = b"later-%d" % i
            for attempt in range(5):
                try:
                    later.append((await producer.send_and_wait(topic, value, key=b"%d" % i), value))
                    break
                except KafkaError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.3)
    finally:
        await producer.stop()

    acked = early + later
    records = await read_all(bootstrap, topic, expected=len(acked))
    values = sorted(v for _, _, v in records)
    assert values == sorted(v for _, v in acked), "acknowledged records the broker does not have"
    positions = [(p, o) for p, o, _ in records]
    assert len(set(positions)) == len(positions), "two records at one offset"
    at = {(p, o): v for p, o, v in records}
    for metadata, value in acked:  # each acknowledgement names the record that is there
        assert at.get((metadata.partition, metadata.offset)) == value


async def test_a_member_that_lost_its_group_commits_nothing(tansu: LocalTansu, tmp_path: Path) -> None:
    """`_no_commit_outside_the_group`: after a broker restart a member's heartbeat is answered "unknown
    member"; it has no member id and generation -1 until it has joined again (Tansu holds a join for
    half the session timeout). A handler finishing meanwhile must not commit the positions it had on
    the old broker: the fresh broker, whose group has no members, would take them."""
    topic, group = f"it-guard-{uuid.uuid4().hex[:8]}", f"it-guard-{uuid.uuid4().hex[:8]}"
    bootstrap = tansu.bootstrap_servers
    await create_topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, b"%d" % i, key=b"%d" % i) for i in range(12)])
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
    await consumer.start()
    try:
        read = 0
        while read < 12:
            batches = await consumer.getmany(timeout_ms=1000)
            read += sum(len(records) for records in batches.values())
        positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
        assert sum(positions.values()) == 12

        assert tansu.proc is not None
        tansu.proc.kill()  # memory-only: the topic, its records and the group are gone
        tansu.proc.wait(10)
        tansu.start(tmp_path / "tansu-2.log")
        await create_topic(bootstrap, topic)
        consumer._coordinator.reset_generation()  # what the "unknown member" answer does; it joins again

        with pytest.raises(CommitFailedError):
            await consumer.commit()  # the positions it had on the old broker
    finally:
        await consumer.stop()
    assert await committed_offsets(bootstrap, group, topic) == dict.fromkeys(range(PARTITIONS))


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """What the broker holds as the group's committed offsets (asked by a client that does not join)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        return {p: await reader.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        await reader.stop()
