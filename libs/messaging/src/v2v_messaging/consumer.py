"""Idempotent consumers: inbox in the same transaction as the effects, offsets committed after commit.

Each consumer is a FastStream subscriber (its lifecycle, its consumer-group membership, its consume loop
with the handling of broker errors and of a graceful stop), whose loop polls every record fetched so far
(`EventConsumer._poll`: each partition's buffer drained, merged by timestamp) and hands them to
`EventConsumer._consume` in place of FastStream's per-message dispatch, which takes them `batch_max` at a
time. The records of a batch whose handlers run share ONE transaction: an inbox row per record, each
handler's effects and outbox rows; it commits after the last of them, and the poll's offsets are
committed once after its last batch committed (left to the next commit while a backlog waits behind
them, at most `COMMIT_EVERY` records or `COMMIT_AFTER_S`: `EventConsumer._defer_commit`). Each
record keeps its own consumer span (`<topic> process`, parented on the producer's span as FastStream's
telemetry middleware does it), ended once its effects are committed. A handler that fails in a batch
rolls the transaction back: a record alone in it goes on as its own delivery's first failed attempt, else
the batch's records are processed again one transaction each, so that a poison record is dead-lettered
alone and the others are applied once. A record handed back (infrastructure unavailable) has its
partition sought back to it, and every partition to its first record not processed. Per record:

- the CloudEvent is parsed; a message that is not one goes straight to the dead letters;
- its provenance is checked (`v2v_messaging.provenance`): its source and type are those of the service
  whose topic it was read from, and an order-bound event carries a valid chain-of-identity id. An event
  that fails is poison: dead-lettered at once with the reason, counted (`stats.rejected`), never handled,
  whether or not this consumer has a handler for its type;
- it is routed by type through the service's `HandlerRegistry` (typed models; a payload that does not
  match its contract is poison and dead-lettered at once; a type with no handler is counted and skipped);
- `(consumer, event id)` is inserted into the inbox in the handler's transaction: a duplicate is a no-op;
- failures come in two classes with separate budgets (`v2v_messaging.failures`). The infrastructure's
  (database or broker unavailable, read-only, shutting down, out of disk, timeouts) is retried with
  backoff for as long as it lasts: after `transient_attempts` in one delivery the message is handed back
  (sought back to: not committed, read again), and it is never dead-lettered. Any other error is the
  message's: after `max_attempts` of those it is dead-lettered — recorded in the `dead_letters` table
  and published to the service's dead-letter topic with its error — and the partition goes on.

A broker that forgets (the local Tansu keeps nothing across a restart) gets the relays' replay, numbered
from 0 again; the consumer must not read it from the positions it had on the old broker, or it skips
what lies below them (`v2v_messaging.resync` says how it could). At every assignment, before reading,
and whenever a partition's end falls below its position, it checks the broker against what it read
(cluster id, end of each partition, the last record it took from each): a broker that forgot makes it
start again from the beginning of what the broker holds, and the inbox drops what had been processed.
A record it was handling meanwhile is never handed back at its old offset. A rebalance that begins
while it starts over leaves the new assignment's positions to the group's commits: the next assignment
starts over then. The watch leaves a rebalance under way to the check of the assignment it ends with,
and no offset is committed by a member outside the group's current generation (see
`v2v_messaging.kafka._no_commit_outside_the_group`): the positions read on the old broker never reach
the fresh one's group.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import re
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import AckStatus
from faststream.opentelemetry.consts import ERROR_TYPE, MESSAGING_DESTINATION_PUBLISH_NAME, MessageAction
from faststream.opentelemetry.middleware import TelemetryMiddleware
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.semconv.trace import SpanAttributes
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import ValidationError

from v2v_contracts import EVENT_TYPES, CloudEvent
from v2v_messaging.dead_letters import decode_headers, record_dead_letter
from v2v_messaging.failures import TRANSIENT_TYPES, is_transient
from v2v_messaging.handlers import HandlerRegistry, PoisonMessage
from v2v_messaging.kafka import recreate_topics
from v2v_messaging.provenance import check_event, publisher_of
from v2v_messaging.resync import PartitionCheck, RecordMark, loss_reason, probe_broker
from v2v_messaging.uow import OpenTransaction, Tx, UnitOfWork
from v2v_observability import bind_order, get_logger, meter, set_order_attributes
from v2v_observability import names as tn

log = get_logger(__name__)
_meter = meter(tn.METER_MESSAGING)
EVENTS = _meter.create_counter(tn.CONSUMER_EVENTS, description="Events seen by a consumer, by outcome")
HANDLER_DURATION = _meter.create_histogram(
    tn.CONSUMER_HANDLER_DURATION,
    unit="s",
    description="Time to process one event (handler + inbox + commit)",
)
DEAD_LETTERS = _meter.create_counter(
    tn.CONSUMER_DEAD_LETTERS, description="Messages sent to a dead-letter topic"
)
BROKER_RESETS = _meter.create_counter(
    tn.CONSUMER_BROKER_RESETS,
    description="Brokers found to have forgotten what a consumer read (it starts again from the beginning)",
)
_CONSUMERS: weakref.WeakSet[EventConsumer] = weakref.WeakSet()
# records further than this behind their partition's end are checked against the inbox before a
# transaction is opened for them (see `EventConsumer._catching_up`)
CATCH_UP_LAG = 50
# while a backlog waits, offsets are committed once per this many records or seconds (`_defer_commit`)
COMMIT_EVERY = 100
COMMIT_AFTER_S = 1.0
# at most this many records per transaction (`EventConsumer._consume_records`)
BATCH_MAX = 50


def in_time_order(partitions: Iterable[list[Any]]) -> tuple[Any, ...]:
    """The records of one poll, its partitions' merged into one sequence by timestamp; each partition's
    records keep their offset order whatever their timestamps (a merge only ever takes the head of a
    partition's list).

    Each topic is one service's, and a consumer reading several (the order service reads scheduling,
    site and logistics) gets their partitions in the order the fetcher buffered them: one poll could
    hand it an order's booking confirmation (site) before the slot reservation (scheduling) it follows.
    Handlers cope with any order (a fact that comes early is parked until the one it follows is
    applied), but parking costs writes and reads that applying in order does not. (A poll drains every
    partition's buffer, `EventConsumer._poll`, so that what it holds covers the same span of time in
    every partition.)"""
    lists = [records for records in partitions if records]
    if len(lists) <= 1:
        return tuple(lists[0]) if lists else ()
    return tuple(heapq.merge(*lists, key=_timestamp))


def _timestamp(record: Any) -> int:
    stamp = getattr(record, "timestamp", None)
    return stamp if isinstance(stamp, int) else 0


def _observe_lag(_options: Any) -> list[Any]:
    from opentelemetry.metrics import Observation

    out = []
    for c in list(_CONSUMERS):
        for (topic, partition), lag in c.lag().items():
            out.append(
                Observation(lag, {"consumer_group": c.group_id, "topic": topic, "partition": partition})
            )
    return out


_meter.create_observable_gauge(
    tn.CONSUMER_LAG, callbacks=[_observe_lag], description="Messages behind the partition's high watermark"
)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = TRANSIENT_TYPES  # see v2v_messaging.failures


@dataclass
class ConsumerPolicy:
    max_attempts: int = 3  # failures of the message's own (poison), then it is dead-lettered
    base_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    # infrastructure failures in one delivery; then the message is handed back (nack) and redelivered,
    # for as long as the outage lasts: never dead-lettered
    transient_attempts: int = 8


@dataclass
class ConsumerStats:
    processed: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    ignored: int = 0
    transient_failures: int = 0  # the infrastructure's (retried, never dead-lettered)
    poison_failures: int = 0  # the message's own (dead-lettered after max_attempts)
    rejected: int = 0  # failed the provenance checks: dead-lettered at once, never handled
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)
    broker_resets: int = 0  # brokers found to have forgotten: read again from the beginning


class EventConsumer:
    def __init__(
        self,
        *,
        service: str,
        purpose: str,
        topics: list[str],
        handlers: HandlerRegistry[Any],
        uow: UnitOfWork[Any],
        broker: KafkaBroker,
        dead_letter_topic: str,
        fetch_max_wait_ms: int,
        fetch_min_bytes: int = 1,
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        policy: ConsumerPolicy | None = None,
        namespace: str = "",
        broker_check_interval_s: float = 5.0,
        probe_timeout_s: float = 10.0,
        batch_max: int = BATCH_MAX,
    ) -> None:
        for topic in topics:  # the provenance checks need to know whose topic each one is
            if publisher_of(topic) is None:
                raise ValueError(f"{topic} is not a service's topic ([<namespace>.]v2v.<service>)")
        # `<service>.<purpose>`, under the topic namespace when one is set (tests sharing a broker)
        self.group_id = f"{namespace}.{service}.{purpose}" if namespace else f"{service}.{purpose}"
        self.topics = topics
        self.handlers = handlers
        self.uow = uow
        self.broker = broker
        self.dead_letter_topic = dead_letter_topic
        self.policy = policy or ConsumerPolicy()
        self.stats = ConsumerStats()
        self.subscriber = broker.subscriber(
            *topics,
            group_id=self.group_id,
            ack_policy=AckPolicy.NACK_ON_ERROR,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=fetch_max_wait_ms,
            fetch_min_bytes=fetch_min_bytes,
            max_poll_interval_ms=max_poll_interval_ms,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            title=self.group_id,
            description=f"{service} consumer '{purpose}': " + ", ".join(handlers.types),
            listener=_CheckOnAssignment(self),
        )
        self.subscriber(self._on_message)
        # FastStream's consume loop (its lifecycle, its handling of broker errors and of a stop) polls
        # through `_poll` and hands each poll's records to `_consume`, in place of its per-message
        # dispatch (middlewares, dependency injection, and a worker thread per message to resolve it)
        self.batch_max = max(1, batch_max)
        self._telemetry = _Telemetry(broker)
        self.subscriber.get_msg = self._poll  # type: ignore[method-assign, assignment]
        self.subscriber.consume_one = self._consume  # type: ignore[method-assign, assignment]
        self.broker_check_interval_s = broker_check_interval_s
        self.probe_timeout_s = probe_timeout_s
        # the last record taken from each partition, and the broker's cluster id: what a broker that
        # forgot no longer matches
        self._seen: dict[tuple[str, int], RecordMark] = {}
        # per partition, the offset from which its records are taken to be new to the inbox
        # (`_presumed_new`): set by an inbox insert that found a record new, cleared at every assignment
        self._new_from: dict[tuple[str, int], int] = {}
        self._cluster_id: str | None = None
        self._resets = 0  # bumped when the consumer starts again from the beginning
        self._start_over_pending = False  # a start over a rebalance interrupted: the next assignment's
        self._check_lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        # topic -> (partitions, replication factor) last seen: what a topic the broker lost is created
        # again with (see `_on_metadata`)
        self._topic_shapes: dict[str, tuple[int, int]] = {}
        self._followed_cluster: Any = None
        self._recreating: asyncio.Task[None] | None = None
        self._recreate_after = 0.0
        self._last_offset: dict[tuple[str, int], int] = {}
        self._uncommitted = 0  # processed records whose offsets wait for the next commit
        self._uncommitted_since = 0.0
        # per message (topic, partition, offset): failures so far, kept across redeliveries
        self._poison_attempts: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        self._transient_streak: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        _CONSUMERS.add(self)

    def lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition: high watermark minus the next offset to process (from the last fetch)."""
        consumer = getattr(self.subscriber, "consumer", None)
        if consumer is None:
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            done = self._last_offset.get((tp.topic, tp.partition))
            out[(tp.topic, tp.partition)] = max(0, high - (done + 1 if done is not None else high))
        return out

    # ---- a broker that forgot ---------------------------------------------------------------------------

    async def check_broker(self, trigger: str = "asked") -> str | None:
        """Check the broker against what this consumer read; when it forgot, start again from the
        beginning of every assigned partition. Returns why it did (None: nothing forgotten)."""
        kafka_consumer = self.subscriber.consumer
        if kafka_consumer is None:
            return None
        assigned = sorted(kafka_consumer.assignment())
        if not assigned:
            return None
        kafka_consumer.pause(*assigned)  # nothing is read from a position before it is known good
        try:
            if self._start_over_pending:
                reason = f"{trigger}: a start over a rebalance interrupted"
                async with self._check_lock:
                    await self._start_over(kafka_consumer, assigned, reason)
                return reason
            return await self._check(kafka_consumer, assigned, trigger)
        finally:
            still = kafka_consumer.assignment()
            kafka_consumer.resume(*(tp for tp in assigned if tp in still))

    async def _check(
        self, kafka_consumer: AIOKafkaConsumer, assigned: list[TopicPartition], trigger: str
    ) -> str | None:
        async with self._check_lock:
            positions = {tp: await self._position(kafka_consumer, tp) for tp in assigned}
            seen = {tp: self._seen.get((tp.topic, tp.partition)) for tp in assigned}
            probe = await probe_broker(
                self.subscriber.builder,
                {tp: mark.offset if mark else None for tp, mark in seen.items()},
                timeout=self.probe_timeout_s,
            )
            checks = []
            for tp in assigned:
                state = probe.partitions[tp]
                checks.append(
                    PartitionCheck(
                        tp.topic,
                        tp.partition,
                        position=positions[tp],
                        high_watermark=state.high_watermark,
                        log_start=state.log_start,
                        seen=seen[tp],
                        found=state.found,
                    )
                )
            reason = loss_reason(checks, cluster_id_before=self._cluster_id, cluster_id_now=probe.cluster_id)
            unverified = [tp for tp in probe.undecided() if seen[tp] is not None]
            if reason is None and unverified:
                # it read from these before and cannot tell whether they are still there: reading them
                # again costs duplicates (dropped by the inbox), skipping them would lose events
                reason = "could not check " + ", ".join(f"{tp.topic}[{tp.partition}]" for tp in unverified)
            self._cluster_id = probe.cluster_id or self._cluster_id
            if reason is not None:
                await self._start_over(kafka_consumer, assigned, f"{trigger}: {reason}")
            return reason

    async def _position(self, kafka_consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
        try:
            return int(await asyncio.wait_for(kafka_consumer.position(tp), self.probe_timeout_s))
        except (TimeoutError, KafkaError):
            return None

    async def _start_over(
        self, kafka_consumer: AIOKafkaConsumer, assigned: list[TopicPartition], reason: str
    ) -> None:
        """Read every assigned partition again from the beginning of what the broker holds, and commit
        that (a stale commit would otherwise bring the old positions back at the next re-join)."""
        log.warning(
            "consumer: the broker forgot what it had read, reading again from the beginning",
            consumer_group=self.group_id,
            reason=reason,
        )
        self._resets += 1
        self._new_from.clear()
        self.stats.broker_resets += 1
        BROKER_RESETS.add(1, {"consumer_group": self.group_id})
        for tp in assigned:
            self._seen.pop((tp.topic, tp.partition), None)
            self._last_offset.pop((tp.topic, tp.partition), None)
        # a rebalance that begins meanwhile gives the consumer a new assignment, whose positions come
        # from the group's commits and not from this seek: the next assignment starts over then
        assignment = _current_assignment(kafka_consumer)
        self._start_over_pending = True
        try:
            await kafka_consumer.seek_to_beginning(*assigned)
            offsets = {}
            for tp in assigned:
                position = await self._position(kafka_consumer, tp)
                if position is not None:
                    offsets[tp] = OffsetAndMetadata(position, "")
        except (KafkaError, AssertionError) as exc:  # aiokafka: IllegalStateError, no longer assigned
            log.warning("consumer: a rebalance interrupted the start over", error=repr(exc))
            return
        if assignment is None or _current_assignment(kafka_consumer) is not assignment:
            log.warning("consumer: a rebalance interrupted the start over", consumer_group=self.group_id)
            return
        self._start_over_pending = False
        try:
            await kafka_consumer.commit(offsets)
        except KafkaError as exc:  # the positions hold in memory; the next processed message commits
            log.warning("consumer: could not commit the reset positions", error=repr(exc))

    def _watch(self, kafka_consumer: AIOKafkaConsumer) -> None:
        """Keep one watch running for the current Kafka consumer (see `_watch_loop`), and follow its
        metadata (see `_on_metadata`)."""
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.create_task(self._watch_loop(kafka_consumer))
        cluster = kafka_consumer._client.cluster
        if self._followed_cluster is not cluster:
            cluster.add_listener(self._on_metadata)
            self._followed_cluster = cluster
            self._on_metadata(cluster)

    def _on_metadata(self, cluster: Any) -> None:
        """On every metadata update of the consumer's client: remember each subscribed topic's shape;
        one the broker lost is created again at once, with the shape it had.

        Nothing else would create it before a relay's next check (no client creates a topic by asking
        about it: see `v2v_messaging.kafka`), and meanwhile the group re-joins without it. Tansu then
        keeps handing this member the assignment it got without the topic, empty, at every later join
        (its generation stays 0): the consumer would read nothing until restarted. Created again at
        once, the topic is there before the join completes (Tansu holds a join for half the session
        timeout)."""
        missing: dict[str, tuple[int, int]] = {}
        for topic in self.topics:
            partitions = cluster.partitions_for_topic(topic)
            if partitions:
                metadata = getattr(cluster, "_partitions", {}).get(topic, {})
                replicas = max((len(m.replicas) for m in metadata.values()), default=1)
                self._topic_shapes[topic] = (len(partitions), replicas)
            elif topic in self._topic_shapes:
                missing[topic] = self._topic_shapes[topic]
        if not missing or (self._recreating is not None and not self._recreating.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop.time() < self._recreate_after:
            return
        self._recreate_after = loop.time() + 1.0
        self._recreating = loop.create_task(self._recreate(missing))

    async def _recreate(self, topics: dict[str, tuple[int, int]]) -> None:
        options = dict(getattr(self.subscriber.builder, "keywords", {}))  # bootstrap servers, security
        try:
            created = await recreate_topics(options, topics)
        except (KafkaError, OSError) as exc:
            log.warning("consumer: could not create its lost topics", topics=sorted(topics), error=repr(exc))
            return
        if created:
            log.warning("consumer: created again the topics the broker lost", topics=created)
        kafka_consumer = self.subscriber.consumer
        if kafka_consumer is not None:
            kafka_consumer._client.force_metadata_update()

    async def _watch_loop(self, kafka_consumer: AIOKafkaConsumer) -> None:
        """Between assignments: a subscribed topic the broker lost is looked for again (nothing creates
        it as a side effect: see `v2v_messaging.kafka`, and aiokafka would otherwise look only every
        5 minutes), and a partition whose end fell below the position means the broker forgot."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.broker_check_interval_s
        while self.subscriber.consumer is kafka_consumer:
            await asyncio.sleep(min(0.5, self.broker_check_interval_s))
            if loop.time() < next_check:
                continue
            next_check = loop.time() + self.broker_check_interval_s
            try:
                await self._watch_once(kafka_consumer)
            except Exception as exc:  # the watch goes on; the next assignment checks anyway
                log.warning("consumer: broker check failed", consumer_group=self.group_id, error=repr(exc))

    async def _watch_once(self, kafka_consumer: AIOKafkaConsumer) -> None:
        if any(kafka_consumer.partitions_for_topic(t) is None for t in self.topics):
            kafka_consumer._client.force_metadata_update()  # a topic created again joins the assignment
        if _current_assignment(kafka_consumer) is None:
            return  # a rebalance under way: the assignment it ends with is checked (`_CheckOnAssignment`)
        ahead = []
        for tp in kafka_consumer.assignment():
            high = kafka_consumer.highwater(tp)  # from the last fetch
            if high is None or tp in kafka_consumer.paused():
                continue
            position = await self._position(kafka_consumer, tp)
            if position is not None and position > high:
                ahead.append(f"{tp.topic}[{tp.partition}] ends at {high}, below the position {position}")
        if ahead:
            await self.check_broker("; ".join(ahead))

    # ---- messages ------------------------------------------------------------------------------------------

    async def _poll(self, kafka_consumer: AIOKafkaConsumer) -> tuple[Any, ...]:
        """What faststream's consume loop asks for: every record fetched so far (as soon as any are
        there). Its loop keeps its own handling of broker errors and of a stop.

        The records of several partitions come merged by their timestamps (`in_time_order`), each
        partition's own in offset order. Every partition's buffer is drained, not `batch_max` records
        of the first ones: aiokafka fetches again only the partitions whose buffer is empty, so taking
        part of them lets the partitions drained first be fetched fresh while the others still hold
        older records, and under a backlog the topics' horizons drift apart (an order's later facts
        then come before earlier ones, and are parked). Drained together, every partition is fetched
        in the same request, and a poll covers the same span of time in each. `_consume` takes them
        `batch_max` at a time."""
        batches = await kafka_consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
        return in_time_order(batches.values())

    async def _consume(self, records: tuple[Any, ...]) -> None:
        """What faststream's consume loop hands the records of a poll to (in place of its per-message
        dispatch). Nothing raises out of here: the loop would end."""
        if not records:
            return
        try:
            # held while the poll is processed, as FastStream holds it per message: a graceful stop
            # waits for it (up to the broker's graceful_timeout) before cancelling the loop
            with self.subscriber.lock:
                polled = list(records)
                resets = self._resets
                start = 0
                try:
                    for start in range(0, len(polled), self.batch_max):
                        end = start + self.batch_max
                        # each batch its own transaction; the poll's offsets once its last batch is done
                        if not await self._consume_records(polled[start:end], later=polled[end:]):
                            break  # handed back (sought to) or started over: the rest is read again
                    else:
                        await self._commit_offsets(polled)
                except Exception as exc:  # a bug: the batch and every later one are read again
                    self._hand_back(self.subscriber.consumer, polled, start, set(), resets, exc)
                    raise
        except Exception as exc:  # a bug: what was not processed was handed back (sought to)
            log.error("consumer: a poll's records failed", consumer_group=self.group_id, error=repr(exc))
        finally:
            bind_order(None)

    async def _on_message(self, message: KafkaMessage) -> None:
        """FastStream's own per-message path: the subscriber's loop does not take it (see `_consume`),
        but whatever else hands a message here gets the same processing, offsets committed by it."""
        message.committed = AckStatus.ACKED  # the commit (or the hand-back) is this consumer's
        if await self._consume_records([message.raw_message]):
            await self._commit_offsets([message.raw_message])

    async def _consume_records(self, records: list[Any], *, later: list[Any] | None = None) -> bool:
        """Process the records of one batch of a poll, in order (`later`: the poll's records after this
        batch). Returns whether the poll may go on (False: handed back, or started over); its offsets
        are committed once after its last batch (`_commit_offsets`).

        Records whose handler runs share ONE transaction (`_Batch`: an inbox row per record, each
        handler's effects and outbox rows), committed after the last of them; each record keeps its own
        consumer span, ended once its effects are committed. When a handler fails in a batch, the
        transaction is rolled back: a record alone in it goes on as the first failed attempt of its own
        delivery (`_handle_alone`: retries, dead letters, hand-back); otherwise the batch's records are
        processed again from its first one, each in its own transaction, to the end of the poll: the
        poison record is then dead-lettered alone and the others applied once.

        What is settled outside any transaction (dead letters at once, refused events, ignored types) is
        settled once per poll, even when the batch is processed again. A record handed back
        (infrastructure unavailable) has its partition sought back to it, and every other partition to
        its first record not processed (the poll's later records included: the positions had moved
        past them); then no offset is committed."""
        kafka_consumer = self.subscriber.consumer
        resets = self._resets
        batch: _Batch | None = None
        current: _Item | None = None  # the record being processed, until its span is ended or handed over
        settled: set[int] = set()  # indices settled outside a transaction: never twice
        alone_from = len(records)  # from this index on, one transaction per record (after a failure)
        i = 0
        try:
            while True:
                if self._resets != resets:  # the broker forgot meanwhile: the rest comes from the new one
                    if batch is not None:
                        await self._commit(batch)
                        batch = None
                    break
                if i >= len(records):
                    if batch is None:
                        break
                    start = batch.start
                    failed = await self._commit(batch)
                    batch = None
                    if failed is not None:
                        alone_from, i = start, start
                        continue
                    break
                record = records[i]
                if i in settled or not self._assigned(kafka_consumer, record):
                    i += 1  # settled already, or its partition went to another member
                    continue
                current = item = self._item(record)
                token = otel_context.attach(item.context)
                try:
                    bind_order(None)
                    event = await self._prepare(item)
                    if event is None:  # dead-lettered, refused or ignored: nothing to apply
                        settled.add(i)
                    elif i >= alone_from:
                        assert batch is None  # a batch is never opened again in this poll
                        await self._handle_alone(event, item)
                    else:
                        try:
                            recorded = None
                            if batch is None:
                                # its BEGIN and the first record's inbox row in one round trip
                                inbox_row = self._inbox_row_sql(event, record)
                                batch = _Batch(i, await self.uow.start(first=inbox_row))
                                if inbox_row is not None:
                                    recorded = _inbox_outcome(batch.transaction.first_status)
                                    if recorded == "processed":
                                        self._note_new(record)
                            elif (
                                batch.transaction.begun_together
                                and self._presumed_new(record)
                                and (values := self._inbox_values(event, record)) is not None
                            ):
                                # its inbox row goes with the COMMIT (`_commit`)
                                batch.deferred.append(values)
                                recorded = "processed"
                            item.outcome = await self._apply(
                                batch.transaction.tx, event, record, recorded=recorded
                            )
                            item.event = event
                            batch.items.append(item)
                            current = None  # its span ends when the batch commits
                            i += 1
                            continue
                        except Exception as exc:
                            earlier = batch.items if batch is not None else []
                            start = batch.start if batch is not None else i
                            if batch is not None:
                                await batch.transaction.rollback()
                                batch = None
                            if earlier:
                                # the batch's earlier records lost their effects: from its first record
                                # on, one transaction per record
                                for other in earlier:
                                    self._end_span(other, rolled_back=True)
                                self._end_span(item, error=exc)
                                current = None
                                self._count_failure_in_batch(event, record, exc)
                                log.info(
                                    "consumer: a record failed in a batch, processing it one at a time",
                                    consumer_group=self.group_id,
                                    records=i - start + 1,
                                    error=repr(exc),
                                )
                                alone_from, i = start, start
                                continue
                            # alone in its transaction: the first failed attempt of its own delivery
                            await self._handle_alone(event, item, failure=exc)
                    self._end_span(item)
                    current = None
                    i += 1
                finally:
                    otel_context.detach(token)
        except Exception as exc:
            # handed back (`_handle_alone` gave up for now), or a bug: what was not applied is read again
            if batch is not None:
                await batch.transaction.rollback()
                for other in batch.items:
                    self._end_span(other, rolled_back=True)
                i = min(i, batch.start)
                batch = None
            if current is not None:
                self._end_span(current, error=exc)
            self._hand_back(kafka_consumer, [*records, *(later or ())], i, settled, resets, exc)
            return False
        except BaseException:  # cancelled (a stop): nothing of the open batch is kept, nothing committed
            if batch is not None:
                await batch.transaction.rollback()
                for other in batch.items:
                    self._end_span(other, rolled_back=True)
            if current is not None:
                self._end_span(current)
            raise
        return self._resets == resets

    async def _commit_offsets(self, poll: list[Any]) -> None:
        """After the last batch of `poll` (never before: the positions are past all its records)."""
        kafka_consumer = self.subscriber.consumer
        if kafka_consumer is None or self._defer_commit(kafka_consumer, poll):
            return
        try:
            await kafka_consumer.commit()  # every position: after all the records of this poll
        except Exception as exc:  # a rebalance under way: what it leaves is read again, and dropped
            log.warning("consumer: offset commit failed", consumer_group=self.group_id, error=repr(exc))

    @staticmethod
    def _assigned(kafka_consumer: AIOKafkaConsumer | None, record: Any) -> bool:
        if kafka_consumer is None:
            return True
        return TopicPartition(record.topic, record.partition) in kafka_consumer.assignment()

    def _item(self, record: Any) -> _Item:
        """Start the record's consumer span (as FastStream's telemetry middleware would: the same name,
        kind, attributes and parent, the producer's span from the record's headers)."""
        self._seen[(record.topic, record.partition)] = RecordMark(record.offset, record.timestamp)
        span, ctx = self._telemetry.start(record)
        return _Item(record, span, ctx, time.perf_counter())

    async def _prepare(self, item: _Item) -> CloudEvent | None:
        """Parse and check the record; None when it is settled here (dead-lettered, refused, ignored)."""
        record = item.record
        raw: bytes = record.value or b""
        try:
            event = CloudEvent.from_json(raw)
        except (ValidationError, ValueError) as exc:
            await self._dead_letter(record, f"not a CloudEvent: {exc}", reason="not-a-cloudevent")
            return None
        self._last_offset[(record.topic, record.partition)] = record.offset
        rejection = check_event(event, record.topic, self.handlers.model_of(event.type))
        if rejection is not None:
            log.error(
                "event refused by the provenance checks, dead-lettering",
                reason=rejection.code,
                topic=record.topic,
                event_id=str(event.id),
            )
            await self._dead_letter(record, str(rejection), event=event, reason=rejection.code)
            self.stats.rejected += 1
            self.stats.rejected_by_reason[rejection.code] = (
                self.stats.rejected_by_reason.get(rejection.code, 0) + 1
            )
            return None
        # before anything else: even an event this consumer ignores is about its order, and says so (a
        # refused one is not: what it claims about an order is not to be believed)
        set_order_attributes(event.data.get("order_id"), event.coi)
        if not self.handlers.handles(event.type):
            self.stats.ignored += 1
            EVENTS.add(1, {"consumer_group": self.group_id, "event_type": event.type, "outcome": "ignored"})
            return None
        return event

    async def _handle_alone(self, event: CloudEvent, item: _Item, failure: Exception | None = None) -> None:
        """One record in transactions of its own, with the failure budgets; `failure`: how its first
        attempt (in a transaction of its own already) failed. Raises to hand the record back."""
        record = item.record
        key = (record.topic, record.partition, record.offset)
        transient = 0  # in this delivery
        started = item.started
        while True:
            exc = failure
            failure = None
            if exc is None:
                try:
                    outcome = await self._process(event, record)
                except Exception as caught:
                    exc = caught
                else:
                    self._forget(key)
                    attrs = {"consumer_group": self.group_id, "event_type": event.type}
                    HANDLER_DURATION.record(time.perf_counter() - started, attrs)
                    EVENTS.add(1, {**attrs, "outcome": outcome})
                    return
            if isinstance(exc, PoisonMessage):
                log.error("poison message, dead-lettering", error=str(exc), event_type=event.type)
                attempts = self._poison_attempts.get(key, 0) + 1
                await self._dead_letter(record, str(exc), event=event, attempts=attempts, reason="contract")
                self._forget(key)
                return
            item.span.record_exception(exc)
            if is_transient(exc):
                transient += 1
                self.stats.transient_failures += 1
                streak = _bump(self._transient_streak, key)
                if transient >= self.policy.transient_attempts:
                    log.warning(
                        "infrastructure unavailable, message handed back for redelivery",
                        error=repr(exc),
                        event_type=event.type,
                        event_id=str(event.id),
                        failures=streak,
                    )
                    raise exc
                if transient == 1:
                    log.warning(
                        "infrastructure unavailable, retrying",
                        error=repr(exc),
                        event_type=event.type,
                        event_id=str(event.id),
                    )
                await asyncio.sleep(self._backoff(streak))
                continue
            self.stats.poison_failures += 1
            attempts = _bump(self._poison_attempts, key)
            if attempts >= self.policy.max_attempts:
                log.error(
                    "handler keeps failing, dead-lettering",
                    error=repr(exc),
                    event_type=event.type,
                    event_id=str(event.id),
                    attempts=attempts,
                )
                await self._dead_letter(record, repr(exc), event=event, attempts=attempts)
                self._forget(key)
                return
            log.warning("handler failed, retrying", error=repr(exc), event_type=event.type, attempt=attempts)
            await asyncio.sleep(self._backoff(attempts))

    def _count_failure_in_batch(self, event: CloudEvent, record: Any, exc: Exception) -> None:
        """A handler's failure in a batch counts as an attempt of its record's (its own fault), except
        where it says nothing about the record (the infrastructure's) or settles it at once (contract)."""
        if isinstance(exc, PoisonMessage):
            return
        if is_transient(exc):
            self.stats.transient_failures += 1
            _bump(self._transient_streak, (record.topic, record.partition, record.offset))
            return
        self.stats.poison_failures += 1
        _bump(self._poison_attempts, (record.topic, record.partition, record.offset))
        log.warning("handler failed, retrying", error=repr(exc), event_type=event.type, attempt=1)

    async def _commit(self, batch: _Batch) -> Exception | None:
        """Commit the batch (COMMIT in its last record's span); then every record of it is done. Returns
        the failure when it did not commit (its records are then to be processed again)."""
        last = batch.items[-1]
        token = otel_context.attach(last.context)
        # the COMMIT span is a child of the last record's span, and is about its order: the order bound
        # now is the last *prepared* record's, which may be one settled outside the batch (another
        # order's event of a type this consumer ignores)
        if last.event is not None:
            bind_order(last.event.data.get("order_id"), last.event.coi)
        final = f"{_INBOX_INSERT} VALUES {', '.join(batch.deferred)}" if batch.deferred else None
        try:
            await batch.transaction.commit(final=final)
        except Exception as exc:
            if final is not None and isinstance(exc, asyncpg.UniqueViolationError):
                # a record taken to be new was in the inbox already (see `_presumed_new`)
                for item in batch.items:
                    self._new_from.pop((item.record.topic, item.record.partition), None)
                log.info(
                    "consumer: a record of the batch was processed before, processing it again one at a time",
                    consumer_group=self.group_id,
                    records=len(batch.items),
                )
            else:
                log.warning(
                    "consumer: a batch did not commit, processing it again one at a time",
                    consumer_group=self.group_id,
                    records=len(batch.items),
                    error=repr(exc),
                )
            for item in batch.items:
                self._end_span(item, rolled_back=True)
            return exc
        finally:
            otel_context.detach(token)
        size = len(batch.items)
        for item in batch.items:
            assert item.event is not None and item.outcome is not None
            event = item.event
            if item.outcome == "duplicate":
                self._count_duplicate(event)
            else:
                self.stats.processed += 1
                self.stats.by_type[event.type] = self.stats.by_type.get(event.type, 0) + 1
            record = item.record
            self._forget((record.topic, record.partition, record.offset))
            attrs = {"consumer_group": self.group_id, "event_type": event.type}
            HANDLER_DURATION.record(time.perf_counter() - item.started, attrs)
            EVENTS.add(1, {**attrs, "outcome": item.outcome})
            item.span.set_attribute(tn.CONSUMER_BATCH, size)
            self._end_span(item)
        return None

    def _end_span(
        self, item: _Item, *, error: BaseException | None = None, rolled_back: bool = False
    ) -> None:
        if not item.span.is_recording():
            return
        if rolled_back:
            item.span.add_event(tn.EVENT_BATCH_ROLLED_BACK)
        if error is not None:
            item.span.record_exception(error)
            item.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self._telemetry.end(item, error)

    def _hand_back(
        self,
        kafka_consumer: AIOKafkaConsumer | None,
        records: list[Any],
        start: int,
        settled: set[int],
        resets: int,
        exc: BaseException,
    ) -> None:
        """Seek every partition back to its first record from `start` on not yet settled: the next poll
        reads them again (and nothing after them is committed before)."""
        if self._resets != resets:
            # the broker forgot while this record was handled: handing it back would move the
            # partition to its offset on the old broker; it comes again from the new one instead
            log.warning(
                "consumer: a record read before the broker forgot is not handed back",
                consumer_group=self.group_id,
                error=repr(exc),
            )
            return
        if kafka_consumer is None:
            return
        first: dict[TopicPartition, int] = {}
        for index in range(start, len(records)):
            if index in settled:
                continue
            record = records[index]
            tp = TopicPartition(record.topic, record.partition)
            if tp not in first:
                first[tp] = record.offset
        assigned = kafka_consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                kafka_consumer.seek(tp, offset)

    def _count_duplicate(self, event: CloudEvent) -> None:
        self.stats.duplicates += 1
        log.debug("duplicate event ignored", event_type=event.type, event_id=str(event.id))

    def _forget(self, key: tuple[str, int, int]) -> None:
        self._poison_attempts.pop(key, None)
        self._transient_streak.pop(key, None)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.policy.base_backoff_s * 2 ** (attempt - 1), self.policy.max_backoff_s)
        return delay * (0.5 + random.random() / 2)

    def _defer_commit(self, kafka_consumer: AIOKafkaConsumer, records: list[Any]) -> bool:
        """Whether to leave this poll's offsets to the next commit: while more records of one of its
        partitions are already waiting (a backlog), at most `COMMIT_EVERY` records or `COMMIT_AFTER_S`
        seconds.

        The commit after a poll (`commit()` of every assigned partition's position) covers all the
        records processed before it, since a poll is committed only once all its records are done, and
        a record handed back is sought back to. Committing once per run of polls instead of once per
        poll saves a broker round trip each (4.7 ms at the median, 23 ms at p90 on the embedded broker
        under load): a backlog drains faster. What a crash or a rebalance leaves uncommitted is read
        again and dropped by the inbox. A poll that reaches the end of its partitions is committed at
        once."""
        last: dict[tuple[str, int], int] = {}
        for record in records:
            key = (record.topic, record.partition)
            last[key] = max(last.get(key, -1), record.offset)
        backlog = False
        for (topic, partition), offset in last.items():
            try:
                high = kafka_consumer.highwater(TopicPartition(topic, partition))
            except Exception:
                return False
            if high is not None and high > offset + 1:
                backlog = True
                break
        now = time.monotonic()
        if self._uncommitted == 0:
            self._uncommitted_since = now
        if (
            backlog
            and self._uncommitted + len(records) <= COMMIT_EVERY
            and now - self._uncommitted_since < COMMIT_AFTER_S
        ):
            self._uncommitted += len(records)
            return True
        self._uncommitted = 0
        return False

    def _catching_up(self, record: Any) -> bool:
        """Far behind the partition's end (reading a topic again after a broker that forgot, or a long
        backlog): most records are then ones the inbox already holds."""
        consumer = getattr(self.subscriber, "consumer", None)
        if consumer is None:
            return False
        try:
            high = consumer.highwater(TopicPartition(record.topic, record.partition))
        except Exception:
            return False
        return high is not None and high - record.offset > CATCH_UP_LAG

    async def _in_inbox(self, event: CloudEvent) -> bool:
        """One read instead of a transaction per record already processed (and no offset commit of its
        own): catching up after a broker that forgot goes through the retained history many times
        faster."""
        return bool(
            await self.uow.pool.fetchval(
                "SELECT true FROM inbox WHERE consumer = $1 AND event_id = $2", self.group_id, event.id
            )
        )

    async def _process(self, event: CloudEvent, record: Any) -> str:
        """The record in a transaction of its own."""
        if self._catching_up(record) and await self._in_inbox(event):
            self._count_duplicate(event)
            return "duplicate"
        async with self.uow.begin() as tx:
            outcome = await self._apply(tx, event, record)
        if outcome == "duplicate":
            self._count_duplicate(event)
        else:
            self.stats.processed += 1
            self.stats.by_type[event.type] = self.stats.by_type.get(event.type, 0) + 1
        return outcome

    def _inbox_row_sql(self, event: CloudEvent, record: Any) -> str | None:
        """The record's inbox insert with its values written in (for `UnitOfWork.start(first=...)`), or
        None when a value is not of the plain kind that can be written in without quoting rules (a
        consumer group, topic or event type of letters, digits and `._:-`; a UUID; integers): then the
        insert goes with parameters, as for every other record."""
        values = self._inbox_values(event, record)
        return None if values is None else f"{_INBOX_INSERT} VALUES {values} ON CONFLICT DO NOTHING"

    def _inbox_values(self, event: CloudEvent, record: Any) -> str | None:
        """The record's inbox row as a VALUES tuple with its values written in (see `_inbox_row_sql`)."""
        texts = (self.group_id, event.type, record.topic)
        if not all(isinstance(t, str) and _PLAIN.fullmatch(t) for t in texts):
            return None
        if not isinstance(record.partition, int) or not isinstance(record.offset, int):
            return None
        event_id = str(uuid.UUID(str(event.id)))  # canonical hex and dashes only
        return (
            f"('{self.group_id}', '{event_id}', '{event.type}', '{record.topic}', "
            f"{int(record.partition)}, {int(record.offset)})"
        )

    def _presumed_new(self, record: Any) -> bool:
        """Whether the record can be taken to be new to the inbox without asking: a later record of its
        partition than one that an inbox insert found new, in this assignment.

        The records already in the inbox that a consumer reads are those that the partition's previous
        reader processed without committing their offsets (a crash, a rebalance): a run from the
        committed offset on, ending where that reader stopped. A record found new lies beyond that run,
        and so does every later record of the partition. What else could repeat an event (a relay that
        published a row twice; a previous reader still running after it lost the partition) is rare, and
        caught at the COMMIT: the deferred inbox rows are inserted without ON CONFLICT, so such a
        duplicate fails the batch, which is processed again one record at a time (each inbox row
        before its handler, as always)."""
        start = self._new_from.get((record.topic, record.partition))
        return start is not None and isinstance(record.offset, int) and record.offset >= start

    def _note_new(self, record: Any) -> None:
        if isinstance(record.offset, int):
            self._new_from.setdefault((record.topic, record.partition), record.offset + 1)

    async def _apply(self, tx: Tx, event: CloudEvent, record: Any, recorded: str | None = None) -> str:
        """In `tx`: the record's inbox row, then (unless it was there already) its handler. The inbox
        insert has no statement span of its own: the record's consumer span says what it found.
        `recorded`: the outcome of the record's inbox insert, when it went out with the BEGIN."""
        assert tx.conn is not None
        if recorded is None:
            with suppress_instrumentation():
                fresh = await tx.conn.fetchval(
                    """INSERT INTO inbox (consumer, event_id, event_type, topic, kafka_partition,
                                          kafka_offset)
                       VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING true""",
                    self.group_id,
                    event.id,
                    event.type,
                    record.topic,
                    record.partition,
                    record.offset,
                )
            outcome = "processed" if fresh else "duplicate"
            if fresh:
                self._note_new(record)
        else:
            outcome = recorded
        trace.get_current_span().set_attribute(tn.CONSUMER_OUTCOME, outcome)
        if outcome == "processed":
            await self.handlers.dispatch(tx, event)
        return outcome

    async def _dead_letter(
        self,
        record: Any,
        error: str,
        *,
        event: CloudEvent | None = None,
        attempts: int = 1,
        reason: str = "handler-failed",
    ) -> None:
        """Record the message in `dead_letters`, then publish it to the dead-letter topic. A failure of
        either raises (the message is redelivered, never lost); the table write comes first so that a
        message on the topic is always in the table too."""
        payload: bytes = record.value or b""
        original = decode_headers(record.headers)
        try:
            await record_dead_letter(
                self.uow.pool,
                consumer=self.group_id,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                event_id=event.id if event else None,
                event_type=event.type if event else None,
                key=record.key,
                payload=payload,
                headers=original,
                error=error,
                attempts=attempts,
            )
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error("dead letter not recorded in the database", error=repr(exc))
        headers = dict(original)
        headers.update(
            {
                "x-v2v-dlq-error": error[:4000],
                "x-v2v-dlq-consumer": self.group_id,
                "x-v2v-dlq-topic": record.topic,
                "x-v2v-dlq-partition": str(record.partition),
                "x-v2v-dlq-offset": str(record.offset),
                "x-v2v-dlq-attempts": str(attempts),
            }
        )
        headers.pop("traceparent", None)  # the dead-letter publish gets its own span in this trace
        headers.pop("tracestate", None)
        await self.broker.publish(payload, topic=self.dead_letter_topic, key=record.key, headers=headers)
        self.stats.dead_lettered += 1
        if event is None:
            event_type = "unparsable"
        elif self.handlers.handles(event.type) or event.type in EVENT_TYPES:
            event_type = event.type
        else:  # a type no contract knows: not a metric attribute (unbounded values)
            event_type = "unknown"
        attrs = {"consumer_group": self.group_id, "event_type": event_type, "reason": reason}
        DEAD_LETTERS.add(1, attrs)
        EVENTS.add(1, {**attrs, "outcome": "dead_lettered"})


@dataclass
class _Item:
    """A record of the poll being processed: its consumer span and the context that carries it."""

    record: Any
    span: Span
    context: Context
    started: float
    event: CloudEvent | None = None
    outcome: str | None = None  # "processed" / "duplicate", once applied in a batch


_PLAIN = re.compile(r"[A-Za-z0-9._:\-]{1,249}")
_INBOX_INSERT = "INSERT INTO inbox (consumer, event_id, event_type, topic, kafka_partition, kafka_offset)"


def _inbox_outcome(status: str | None) -> str:
    """What an inbox insert's status says: `INSERT 0 1` a new row, `INSERT 0 0` one there already."""
    if status == "INSERT 0 1":
        return "processed"
    if status == "INSERT 0 0":
        return "duplicate"
    raise RuntimeError(f"unexpected status of the inbox insert: {status!r}")


@dataclass
class _Batch:
    """The transaction the records of a poll share, from `records[start]` on."""

    start: int
    transaction: OpenTransaction[Any]
    items: list[_Item] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # inbox rows (VALUES tuples) sent with the COMMIT


class _Telemetry:
    """A record's consumer span and FastStream's process metrics, as FastStream's Kafka telemetry
    middleware makes them for a message it dispatches (same tracer, meter, names and attributes)."""

    def __init__(self, broker: KafkaBroker) -> None:
        middleware = next((m for m in broker.middlewares if isinstance(m, TelemetryMiddleware)), None)
        self._tracer = middleware._tracer if middleware is not None else trace.get_tracer(__name__)
        self._metrics = middleware._metrics if middleware is not None else None

    def start(self, record: Any) -> tuple[Span, Context]:
        headers = {k: v.decode(errors="replace") for k, v in (record.headers or ())}
        topic = record.topic
        attributes: dict[str, Any] = {
            SpanAttributes.MESSAGING_SYSTEM: "kafka",
            SpanAttributes.MESSAGING_MESSAGE_ID: f"{record.offset}-{record.timestamp}",
            SpanAttributes.MESSAGING_MESSAGE_CONVERSATION_ID: headers.get("correlation_id")
            or str(uuid.uuid4()),
            SpanAttributes.MESSAGING_MESSAGE_PAYLOAD_SIZE_BYTES: len(record.value or b""),
            SpanAttributes.MESSAGING_KAFKA_DESTINATION_PARTITION: record.partition,
            SpanAttributes.MESSAGING_KAFKA_MESSAGE_OFFSET: record.offset,
            MESSAGING_DESTINATION_PUBLISH_NAME: topic,
        }
        if record.key is not None:
            attributes[SpanAttributes.MESSAGING_KAFKA_MESSAGE_KEY] = record.key
        parent = _PROPAGATOR.extract(headers)
        if not len(parent):  # no producer's context: FastStream starts the trace with a "create" span
            create = self._tracer.start_span(
                f"{topic} {MessageAction.CREATE}", kind=SpanKind.CONSUMER, attributes=attributes
            )
            parent = trace.set_span_in_context(create)
            create.end()
        attributes[SpanAttributes.MESSAGING_OPERATION] = MessageAction.PROCESS
        span = self._tracer.start_span(
            f"{topic} {MessageAction.PROCESS}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        return span, trace.set_span_in_context(span, parent)

    def end(self, item: _Item, error: BaseException | None) -> None:
        item.span.end()
        if self._metrics is None:
            return
        attrs: dict[str, Any] = {
            SpanAttributes.MESSAGING_SYSTEM: "kafka",
            MESSAGING_DESTINATION_PUBLISH_NAME: item.record.topic,
        }
        if error is not None:
            attrs[ERROR_TYPE] = type(error).__name__
        self._metrics.observe_consume(attrs, time.perf_counter() - item.started, 1)


_PROPAGATOR = TraceContextTextMapPropagator()
POLL_TIMEOUT_MS = 1000  # a poll returns as soon as records are there; this only bounds an idle wait


class _CheckOnAssignment(ConsumerRebalanceListener):  # type: ignore[misc]
    """Checks the broker at every assignment, before the consumer reads from the positions it got."""

    def __init__(self, consumer: EventConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._consumer._new_from.clear()  # another reader may process them before they come back
        return None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._consumer._new_from.clear()
        kafka_consumer = self._consumer.subscriber.consumer
        if kafka_consumer is None:
            return
        self._consumer._watch(kafka_consumer)
        if assigned:
            await self._consumer.check_broker("assignment")


def _current_assignment(kafka_consumer: AIOKafkaConsumer) -> Any:
    """The assignment the consumer holds (aiokafka makes a new one at every rebalance), None while a
    rebalance is under way. (A client without aiokafka's subscription state, a test's fake, has one
    assignment throughout: itself.)"""
    state = getattr(kafka_consumer, "_subscription", None)
    if state is None:
        return kafka_consumer
    if state.reassignment_in_progress or state.subscription is None:
        return None
    return state.subscription.assignment


_MAX_TRACKED = 10_000


def _bump(counts: OrderedDict[tuple[str, int, int], int], key: tuple[str, int, int]) -> int:
    """Count one more failure of `key` (bounded: the oldest entries go first)."""
    counts[key] = counts.get(key, 0) + 1
    counts.move_to_end(key)
    while len(counts) > _MAX_TRACKED:
        counts.popitem(last=False)
    return counts[key]
