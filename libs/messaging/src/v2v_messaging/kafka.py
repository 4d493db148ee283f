"""Broker construction and topic administration, the same in every service."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
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
    """Create the topics that do not exist yet; returns the ones this call created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
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
