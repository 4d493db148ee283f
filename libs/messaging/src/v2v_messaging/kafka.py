"""Broker construction and topic administration, the same in every service.

Every client the platform opens (the FastStream broker, the admin client, the watermark and metadata
probes) connects with the same security settings: plaintext by default (the embedded Tansu of `make run`
and the tests), or SASL (SCRAM-SHA-512 in docker-compose, where broker ACLs let each service's principal
write only its own topic and dead-letter topic), optionally over TLS.

Topics are created explicitly, with the configured partition count (`ensure_topics`: at start, and by
relays that meet a broker which lost them), never as a side effect: no client of this process asks the
broker to create a topic it asks about (see `_no_topic_auto_creation`), and FastStream does not create
the topics a subscriber names (it would with 1 partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, TopicAuthorizationFailedError
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.offset import OffsetRequest
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL")
SASL_MECHANISMS: Final = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
_SASL_SECURITY: Final[dict[str, Callable[..., BaseSecurity]]] = {
    "SCRAM-SHA-512": SASLScram512,
    "SCRAM-SHA-256": SASLScram256,
    "PLAIN": SASLPlaintext,
}
TOPIC_ALREADY_EXISTS: Final = 36  # CreateTopics error codes
TOPIC_AUTHORIZATION_FAILED: Final = 29


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    enable_idempotence: bool = True  # Apache Kafka: on; Tansu rejects InitProducerId: off
    fetch_max_wait_ms: int = 100
    max_poll_interval_ms: int = 300_000
    partitions: int = 6
    replication_factor: int = 1
    namespace: str = ""
    # how every client authenticates: PLAINTEXT (no authentication: Tansu), SASL_PLAINTEXT or SASL_SSL
    # with a SASL mechanism and this service's own principal, or SSL; TLS trusts the system's CAs
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"Kafka security protocol must be one of {', '.join(SECURITY_PROTOCOLS)}")
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(
                    f"{self.security_protocol} needs a SASL mechanism: {', '.join(SASL_MECHANISMS)}"
                )
            if not self.sasl_username or not self.sasl_password:
                raise ValueError(f"{self.security_protocol} needs a SASL username and password")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def _ssl_context(self) -> ssl.SSLContext | None:
        return create_ssl_context() if self.uses_tls else None

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (admin, consumer, low-level client)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.uses_tls:
            options["ssl_context"] = self._ssl_context()
        if self.uses_sasl:
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return options

    def broker_security(self) -> BaseSecurity | None:
        """The same, as FastStream's `security=` object for `KafkaBroker`."""
        if self.security_protocol == "PLAINTEXT":
            return None
        if not self.uses_sasl:
            return BaseSecurity(ssl_context=self._ssl_context(), use_ssl=True)
        assert self.sasl_mechanism and self.sasl_username and self.sasl_password  # __post_init__
        return _SASL_SECURITY[self.sasl_mechanism](
            self.sasl_username, self.sasl_password, ssl_context=self._ssl_context(), use_ssl=self.uses_tls
        )


def _no_topic_auto_creation() -> None:
    """Make every aiokafka client of this process ask for metadata without `allow_auto_topic_creation`.

    aiokafka's clients (consumers, producers) ask for the metadata of the topics they use with that
    flag set, and have no setting for it: a broker that allows it (Tansu always; Apache Kafka unless
    `auto.create.topics.enable=false`) then creates a missing topic with *its* default partition count.
    After a broker restart, a consumer polling a topic got it created with Tansu's 4 partitions before a
    relay could create it with the configured 6 (a topic cannot shrink back, and Tansu cannot grow one),
    so keys landed on other partitions than before. A missing topic now stays missing until
    `ensure_topics` creates it; clients wait for it meanwhile."""
    import aiokafka.client as aiokafka_client

    current = aiokafka_client.MetadataRequest
    if getattr(current, "v2v_no_auto_create", False):
        return

    class MetadataRequestNoAutoCreate(current):  # type: ignore[misc, valid-type]
        v2v_no_auto_create = True

        def __init__(self, topics: list[str] | None = None, allow_auto_topic_creation: bool = False):
            super().__init__(topics, allow_auto_topic_creation)

    aiokafka_client.MetadataRequest = MetadataRequestNoAutoCreate  # type: ignore[misc]


_no_topic_auto_creation()


def _no_produce_to_missing_topics() -> None:
    """Make every aiokafka client of this process check, on each new connection, that the topics of its
    first produce request exist on that broker before it sends one.

    Tansu takes a produce to a topic it does not have (a memory-only Tansu that restarted, met by a
    producer whose metadata still lists the topic): the records are acknowledged and readable, the
    topic is still unknown to its metadata. When the topic is then created, the partitions are broken:
    the first write to each partition is refused, and a write retried after that is acknowledged but
    never readable, or gets an offset a record already holds (tests/integration/test_kafka_guards.py
    shows both). A relay that publishes to a broker that has just restarted, before its check notices,
    does exactly that, and its replay cannot bring back what the broken partitions drop. Apache Kafka
    refuses such a produce (`auto.create.topics` off); the check costs it one metadata request per new
    connection.

    A produce for a topic the broker does not know fails with `UnknownTopicOrPartitionError` before
    anything is sent: the producer refreshes its metadata and waits for the topic (a relay's publish
    fails, it checks the broker, creates the topics and replays). A connection is checked once; a broker
    that restarts closes it, and the next one is checked again."""
    import weakref

    from aiokafka.conn import AIOKafkaConnection
    from aiokafka.errors import UnknownTopicOrPartitionError
    from aiokafka.protocol.produce import ProduceRequest

    current = AIOKafkaClient.send
    if getattr(current, "v2v_produce_guard", False):
        return
    checked: weakref.WeakSet[AIOKafkaConnection] = weakref.WeakSet()

    async def send(self: AIOKafkaClient, node_id: Any, request: Any, **kwargs: Any) -> Any:
        if isinstance(request, ProduceRequest):
            conn = await self._get_conn(node_id, **kwargs)
            if conn is not None and conn not in checked:
                topics = sorted({topic for topic, _partitions in request._topics})
                answer = await current(
                    self, node_id, MetadataRequest(topics, allow_auto_topic_creation=False), **kwargs
                )
                known = {  # a topic it may not describe is the produce's own error to report
                    t["topic"]
                    for t in answer.to_object()["topics"]
                    if (t["error_code"] == 0 and t["partitions"])
                    or t["error_code"] == TOPIC_AUTHORIZATION_FAILED
                }
                missing = [t for t in topics if t not in known]
                if missing:
                    self.force_metadata_update()
                    raise UnknownTopicOrPartitionError(
                        f"the broker does not have {', '.join(missing)}: nothing produced to it"
                    )
                checked.add(conn)
        return await current(self, node_id, request, **kwargs)

    send.v2v_produce_guard = True  # type: ignore[attr-defined]
    AIOKafkaClient.send = send  # type: ignore[method-assign]


_no_produce_to_missing_topics()


def _no_commit_outside_the_group() -> None:
    """Make every group member of this process commit offsets only as a member of the group's current
    generation, for the assignment that generation gave it.

    aiokafka sends a commit whatever its state: a member whose heartbeat was answered "unknown member"
    (a broker that restarted and forgot the group) resets to no member id and generation -1, and a
    handler that finishes while it joins again commits the positions it had on the old broker with
    them. A broker takes such a commit when the group has no members (Tansu and Apache Kafka alike):
    the group on the fresh broker then starts from the old broker's positions, past the records the
    relays put there since, and the consumer skips them (seen once in
    tests/integration/test_faults_broker.py, a consumer paused in a handler across a restart). A commit
    refused here fails as one during a rebalance does (`CommitFailedError`): what it leaves uncommitted
    is read again, and the inbox drops it. Consumers with partitions assigned by hand (no group
    membership) commit as before."""
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from aiokafka.errors import RebalanceInProgressError
    from aiokafka.protocol.commit import OffsetCommitRequest
    from aiokafka.protocol.group import JoinGroupRequest

    current = GroupCoordinator._do_commit_offsets
    if getattr(current, "v2v_member_guard", False):
        return

    async def commit(self: GroupCoordinator, assignment: Any, offsets: Any) -> Any:
        state = self._subscription
        if offsets and state.partitions_auto_assigned():
            outside = (
                self.member_id == JoinGroupRequest.UNKNOWN_MEMBER_ID
                or self.generation == OffsetCommitRequest.DEFAULT_GENERATION_ID
                or state.reassignment_in_progress
                or (assignment is not None and not assignment.active)
            )
            if outside:
                raise RebalanceInProgressError(
                    "not a member of the group's current generation: offsets not committed"
                )
        # the request is built with this generation and member id before anything is awaited
        return await current(self, assignment, offsets)

    commit.v2v_member_guard = True  # type: ignore[attr-defined]
    GroupCoordinator._do_commit_offsets = commit  # type: ignore[method-assign]


_no_commit_outside_the_group()


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
        security=settings.broker_security(),
        middlewares=[
            KafkaTelemetryMiddleware(tracer_provider=tracer_provider, meter_provider=meter_provider)
        ],
        logger=None,
        allow_auto_create_topics=False,  # topics are created by `ensure_topics`, with their partitions
    )


async def ensure_topics(settings: KafkaSettings, topics: list[str]) -> list[str]:
    """Create the topics that do not exist yet; returns the ones this call created.

    A topic with fewer partitions than configured (one a client auto-created on a broker that had lost
    it: Tansu creates unknown topics with 4 partitions) is grown where the broker can add partitions.

    Where broker ACLs let a service create only its own topics, the others' are left to their owners
    (or to the deployment's topic job) instead of failing the start: the broker answers such a creation
    with an authorization error, and that topic is not counted as created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **settings.client_options())
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
            if await _create_topic(admin, topic, settings.partitions, settings.replication_factor):
                created.append(topic)
    finally:
        await admin.close()
    return created


async def _create_topic(
    admin: AIOKafkaAdminClient, topic: str, partitions: int, replication_factor: int
) -> bool:
    """Create one topic; False when it exists already or this principal may not create it."""
    try:
        response = await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)]
        )
    except (TopicAlreadyExistsError, TopicAuthorizationFailedError):
        return False
    codes = {t[0]: t[1] for t in getattr(response, "topic_errors", ())}
    code = codes.get(topic, 0)
    if code in (TOPIC_ALREADY_EXISTS, TOPIC_AUTHORIZATION_FAILED):
        return False
    if code != 0:
        raise KafkaError(f"the broker refused to create topic {topic} (error code {code})")
    return True


_ADMIN_OPTIONS: Final = frozenset(inspect.signature(AIOKafkaAdminClient.__init__).parameters) - {
    "self",
    "loop",
}


async def recreate_topics(client_options: dict[str, Any], topics: dict[str, tuple[int, int]]) -> list[str]:
    """Create `topics` again, each with the (partitions, replication factor) it had, where the broker
    lost them; returns those created. `client_options` are an aiokafka client's connection options
    (a consumer's: bootstrap servers and security); what an admin client does not take is left out."""
    admin = AIOKafkaAdminClient(**{k: v for k, v in client_options.items() if k in _ADMIN_OPTIONS})
    await admin.start()
    created: list[str] = []
    try:
        for topic, (partitions, replication_factor) in topics.items():
            if await _create_topic(admin, topic, partitions, replication_factor):
                created.append(topic)
    finally:
        await admin.close()
    return created


async def topic_is_empty(settings: KafkaSettings, topic: str) -> bool:
    """True when no partition of `topic` has ever held a record (a fresh broker, or a new topic)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False, **settings.client_options()
    )
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
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=int(timeout * 1000),
        **settings.client_options(),
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
