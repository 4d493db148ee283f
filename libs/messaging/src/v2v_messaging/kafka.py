"""Broker construction and topic administration, the same in every service."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.offset import OffsetRequest
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    enable_idempotence: bool = True  # Apache Kafka: on; Tansu rejects InitProducerId: off
    fetch_max_wait_ms: int = 100
    max_poll_interval_ms: int = 300_000
    partitions: int = 6
    replication_factor: int = 1
    namespace: str = ""


def make_broker(
    settings: KafkaSettings,
    client_id: str,
    tracer_provider: TracerProvider | None,
    meter_provider: MeterProvider | None = None,
) -> KafkaBroker:
    return KafkaBroker(
        settings.bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        middlewares=[
            KafkaTelemetryMiddleware(tracer_provider=tracer_provider, meter_provider=meter_provider)
        ],
        logger=None,
    )


async def ensure_topics(settings: KafkaSettings, topics: list[str]) -> list[str]:
    """Create the topics that do not exist yet; returns the ones this call created.

    A topic with fewer partitions than configured (one a client auto-created on a broker that had lost
    it: Tansu creates unknown topics with 4 partitions) is grown where the broker can add partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    created: list[str] = []
    try:
        # a metadata request that names no topic never auto-creates one
        metadata = (await admin._send_request(MetadataRequest(None))).to_object()
        existing = {t["topic"]: len(t["partitions"]) for t in metadata["topics"] if t["error_code"] == 0}
        missing = [t for t in topics if t not in existing]
        short = {t: n for t, n in existing.items() if t in topics and 0 < n < settings.partitions}
        if short:
            with contextlib.suppress(KafkaError):  # Tansu cannot add partitions: the topic stays as it is
                await admin.create_partitions({t: NewPartitions(settings.partitions) for t in short})
        for topic in missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            topic,
                            num_partitions=settings.partitions,
                            replication_factor=settings.replication_factor,
                        )
                    ]
                )
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
    return created


async def topic_is_empty(settings: KafkaSettings, topic: str) -> bool:
    """True when no partition of `topic` has ever held a record (a fresh broker, or a new topic)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return True
        ends = await consumer.end_offsets(tps)
        return all(offset == 0 for offset in ends.values())
    finally:
        await consumer.stop()


@dataclass
class BrokerState:
    """What the broker says about some topics: its cluster id, each topic's partition count (absent:
    the topic does not exist) and each partition's high watermark (the offset the next record gets)."""

    cluster_id: str | None
    partitions: dict[str, int] = field(default_factory=dict)
    high_watermarks: dict[tuple[str, int], int] = field(default_factory=dict)


async def describe_broker(settings: KafkaSettings, topics: list[str], timeout: float = 10.0) -> BrokerState:
    """Cluster id, partitions and high watermarks of `topics`, without creating any of them.

    A fresh client each time (cheap, and nothing cached from a broker that has since restarted); the
    metadata request says `allow_auto_topic_creation=False`, so asking never creates a missing topic."""
    client = AIOKafkaClient(
        bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=int(timeout * 1000)
    )
    try:
        async with asyncio.timeout(timeout):
            await client.bootstrap()
            node = client.get_random_node()
            response = await client.send(
                node if node is not None else "bootstrap",
                MetadataRequest(list(topics), allow_auto_topic_creation=False),
            )
            meta = response.to_object()
            state = BrokerState(meta.get("cluster_id"))
            by_leader: dict[int, dict[str, list[tuple[int, int]]]] = {}
            for topic in meta["topics"]:
                if topic["error_code"] != 0 or not topic["partitions"]:
                    continue
                state.partitions[topic["topic"]] = len(topic["partitions"])
                for p in topic["partitions"]:
                    by_leader.setdefault(p["leader"], {}).setdefault(topic["topic"], []).append(
                        (p["partition"], -1)  # -1: the latest offset, i.e. the high watermark
                    )
            client.cluster.update_metadata(response)  # so that the leaders are known nodes
            for leader, topic_data in by_leader.items():
                answer = await client.send(leader, OffsetRequest(-1, 0, list(topic_data.items())))
                for topic_name, part_data in answer.topics:
                    for part, error_code, *info in part_data:
                        if error_code != 0:
                            continue
                        # v0 answers a list of offsets, later versions (timestamp, offset)
                        offset = (info[0][0] if info[0] else -1) if answer.API_VERSION == 0 else info[-1]
                        state.high_watermarks[(topic_name, part)] = int(offset)
            return state
    finally:
        await client.close()
