"""Transactional outbox: events are rows written in the business transaction, published by a relay.

A transaction with an audit trail writes its events' rows with its last writes (`Outbox.write_last`):
one multi-row INSERT in the audit append's statement, right before COMMIT, instead of one round trip
per event; otherwise (and for the first event when another replica's relay must be woken by NOTIFY)
each row is inserted as the event is added. Either way the rows commit or roll back with the change.

The relay never holds a transaction (nor a lock) while it waits for the broker. Each pass:

1. leadership: one relay per schema publishes. It holds a *lease* (a row in `outbox_relay`: holder,
   epoch, expiry), renewed on every pass and while idle; another replica takes over once it expires
   (a paused or dead leader holds nothing Postgres must wait for), and every write that follows a
   publish is fenced by the epoch: a resumed ex-leader's marks are refused.
2. claim: the pending rows in id order, in one short statement;
3. publish outside any transaction, as a batch: every row is handed to the producer, then the acks
   (`acks=all`) are awaited together, with the writer's W3C trace context re-attached per row;
4. mark: in one short transaction (fenced by the epoch), the acked rows are marked published, rows the
   broker refuses (too large, invalid) are moved to `dead_letters` (so the relay goes on), and the
   first row that failed for want of a broker is counted and retried after a backoff.

Published rows are kept for a retention window so that they can be replayed to a broker that lost them.
The leader notices such a broker at run time, not only at start: every few seconds (and after publish
errors) it compares the broker with what it knows — the cluster id, that its topics exist, and that no
partition's high watermark is below what it had seen or been acked (`broker_marks`, kept in the lease
row). (The marks are lower bounds that hold on Tansu too, whose "latest offset" lags behind batched records.)
A broker that forgot gets its topics created again and the retained rows replayed, in bounded
batches interleaved with new rows (new rows first on every pass, except those of a key -- an order --
with older rows still to replay, which wait for them: per order, events keep the order they were written
in), from a cursor kept in the lease row so that a restarted or new leader carries on. Consumers' inboxes
drop what they had already processed. After a second without publishing, the broker is checked before the
next rows go out (a broker that restarted while the relay was idle is noticed before it gets anything).

A commit wakes the relay: in-process when the committing process's relay leads (`UnitOfWork.attach_relay`;
no NOTIFY then: one wakes every backend listening in the database), else through its LISTEN connection
(`listen()`, a loop of its own: when Postgres restarts it fails, is restarted by the supervisor with
backoff, and the relay polls meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import asyncpg
from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker
from faststream.opentelemetry.consts import ERROR_TYPE, MessageAction
from faststream.opentelemetry.middleware import TelemetryMiddleware
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.semconv.trace import SpanAttributes
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from v2v_contracts import CONTENT_TYPE, CloudEvent
from v2v_contracts.errors import Invalid
from v2v_messaging.dead_letters import RELAY_CONSUMER
from v2v_messaging.failures import is_transient, refused_by_broker
from v2v_messaging.kafka import KafkaSettings, describe_broker, ensure_topics
from v2v_messaging.supervisor import Heartbeat
from v2v_observability import bind_order, current_traceparent, get_logger, meter
from v2v_observability import names as tn

log = get_logger(__name__)
_meter = meter(tn.METER_MESSAGING)
PUBLISHED = _meter.create_counter(tn.OUTBOX_PUBLISHED, description="Outbox rows published to the broker")
PUBLISH_LAG = _meter.create_histogram(
    tn.OUTBOX_PUBLISH_LAG, unit="s", description="From the commit that wrote an event to the broker's ack"
)
MOVED_ASIDE = _meter.create_counter(
    tn.OUTBOX_DEAD_LETTERS, description="Outbox rows the broker refused, moved to dead_letters"
)
REPLAYED = _meter.create_counter(
    tn.OUTBOX_REPLAYED, description="Retained outbox rows published again to a broker that had lost them"
)
BROKER_RESETS = _meter.create_counter(
    tn.OUTBOX_BROKER_RESETS, description="Brokers found to have lost topics or records (replay started)"
)
_RELAYS: weakref.WeakSet[OutboxRelay] = weakref.WeakSet()

DEFAULT_MAX_EVENT_BYTES = 256 * 1024  # far below the broker's 1 MiB default
LEASE_NAME = "relay"
FALLBACK_POLL_S = 1.0  # how often the relay polls while its LISTEN connection is down


def _observe_backlog(_options: Any) -> list[Any]:
    from opentelemetry.metrics import Observation

    return [Observation(r.backlog, {"topic": r.own_topic}) for r in list(_RELAYS)]


def _observe_oldest(_options: Any) -> list[Any]:
    from opentelemetry.metrics import Observation

    return [Observation(r.oldest_pending_s, {"topic": r.own_topic}) for r in list(_RELAYS)]


_meter.create_observable_gauge(
    tn.OUTBOX_BACKLOG, callbacks=[_observe_backlog], description="Outbox rows not yet published"
)
_meter.create_observable_gauge(
    tn.OUTBOX_OLDEST_PENDING_AGE,
    unit="s",
    callbacks=[_observe_oldest],
    description="Age of the oldest unpublished outbox row",
)


def notify_channel(schema: str) -> str:
    return f"v2v_outbox_{schema}"


class EventTooLarge(Invalid):
    """An event larger than the outbox accepts (it would never get through the broker)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            "event", "too large", detail=f"event: too large ({size} bytes, the limit is {limit})"
        )
        self.size = size
        self.limit = limit


_INSERT = """INSERT INTO outbox (event_id, event_type, topic, message_key, payload, headers)
             VALUES ($1, $2, $3, $4, $5, $6::jsonb)"""
_INSERT_AND_NOTIFY = f"""WITH added AS ({_INSERT} RETURNING 1) SELECT pg_notify($7, '') FROM added"""
# the rows of a transaction written at once, in the order they were added (ids follow that order)
_INSERT_ROWS = """INSERT INTO outbox (event_id, event_type, topic, message_key, payload, headers)
    SELECT r.event_id, r.event_type, r.topic, r.message_key, r.payload, r.headers::jsonb
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[])
         WITH ORDINALITY AS r(event_id, event_type, topic, message_key, payload, headers, n)
    ORDER BY r.n"""


class LastWrites(Protocol):
    """Where a transaction's last writes can go, to be run in one statement right before its COMMIT
    (`v2v_audit.PgAuditTrail`: with the audit append, in its round trip)."""

    @property
    def accepts_writes(self) -> bool:
        """False once the writes have been run (or are being run): a write given then would be lost."""

    def write_with_append(self, sql: str, *args: Any) -> None: ...


class Outbox:
    """Writes events into the outbox on the caller's connection, inside the caller's transaction."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        topic: str,
        channel: str,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        needs_notify: Callable[[], bool] | None = None,
    ) -> None:
        self._conn = conn
        self._topic = topic
        self._channel = channel
        self._max_event_bytes = max_event_bytes
        # None: every transaction that adds events NOTIFYs the relay's channel at commit; otherwise asked
        # at the first event (`UnitOfWork.attach_relay`: not when this process's relay leads, which the
        # unit of work wakes itself after the commit)
        self._needs_notify = needs_notify
        self.added: list[CloudEvent] = []
        self.notified = False
        self._last: LastWrites | None = None
        self._rows: tuple[list[Any], ...] | None = None  # the columns of the rows given to `_last`

    def write_last(self, last: LastWrites) -> None:
        """Write the rows of events added from now on with the transaction's last writes (`last`, while it
        accepts them) instead of one round trip per event: the rows are still written in the
        transaction, before its COMMIT, in the order the events were added."""
        self._last = last

    async def add(self, event: CloudEvent, *, topic: str | None = None) -> None:
        payload = event.to_json()
        if len(payload) > self._max_event_bytes:
            raise EventTooLarge(len(payload), self._max_event_bytes)
        args = (event.id, event.type, topic or self._topic, event.subject, payload, current_traceparent())
        if self.added or not (self._needs_notify is None or self._needs_notify()):
            if self._last is not None and self._last.accepts_writes:
                self._write_last(args)
            else:
                await self._conn.execute(_INSERT, *args)
        else:  # the first of the transaction also wakes the relay, when the transaction commits: one trip
            await self._conn.execute(_INSERT_AND_NOTIFY, *args, self._channel)
            self.notified = True
        self.added.append(event)

    def _write_last(self, args: tuple[Any, ...]) -> None:
        """One multi-row INSERT for the transaction, given to `_last` with its first row; later rows are
        appended to its (shared) column lists until `_last` runs it."""
        if self._rows is None:
            self._rows = ([], [], [], [], [], [])
            assert self._last is not None
            self._last.write_with_append(_INSERT_ROWS, *self._rows)
        event_id, event_type, topic, key, payload, headers = args
        for column, value in zip(
            self._rows,
            (event_id, event_type, topic, key, payload, json.dumps(headers, separators=(",", ":"))),
            strict=True,
        ):
            column.append(value)


class RelayBackoff(Exception):
    """Part of a batch failed to publish; back off before the next try."""


class FencedOut(Exception):
    """Another relay took the lease over: this one's writes are refused."""


def _kafka_producer(broker: KafkaBroker) -> AIOKafkaProducer | None:
    """The connected broker's aiokafka producer; None while it has none (not connected, or a test
    broker of FastStream's)."""
    try:
        producer = broker.config.producer._producer.producer  # type: ignore[attr-defined]
    except Exception:  # not connected: FastStream's empty producer state refuses
        return None
    return producer if isinstance(producer, AIOKafkaProducer) else None


_PROPAGATOR = TraceContextTextMapPropagator()


class _PublishTelemetry:
    """What FastStream's Kafka telemetry middleware makes for a message published through it (same
    tracer, meter, names and attributes): the message's "create" span (PRODUCER, a child of the span
    the outbox row was written in; its context goes in the record's headers, the consumer's span is its
    child) and the publish metrics (`messaging.publish.duration`, `messaging.publish.messages`). Not its
    "publish" span: sent with `no_confirm`, that span ended once the record was handed to the producer,
    before any broker answered, and told nothing the "create" span does not; nor FastStream's publish
    pipeline around it. A record cost its process 208-227 µs of CPU through FastStream's publish, and
    132-133 µs this way (optimisation round 14 in docs/BENCHMARKS.md)."""

    def __init__(self, broker: KafkaBroker) -> None:
        middlewares = getattr(broker, "middlewares", ())  # a stand-in with `publish` only has none
        middleware = next((m for m in middlewares if isinstance(m, TelemetryMiddleware)), None)
        self._tracer = middleware._tracer if middleware is not None else trace.get_tracer(__name__)
        self._metrics = middleware._metrics if middleware is not None else None

    async def send(
        self, producer: AIOKafkaProducer, topic: str, key: bytes | None, value: bytes
    ) -> asyncio.Future[Any]:
        correlation_id = str(uuid.uuid4())  # as FastStream's publish sets one
        attributes: dict[str, Any] = {
            SpanAttributes.MESSAGING_SYSTEM: "kafka",
            SpanAttributes.MESSAGING_DESTINATION_NAME: topic,
            SpanAttributes.MESSAGING_MESSAGE_CONVERSATION_ID: correlation_id,
        }
        if key is not None:
            attributes[SpanAttributes.MESSAGING_KAFKA_MESSAGE_KEY] = key
        create = self._tracer.start_span(
            f"{topic} {MessageAction.CREATE}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        headers = {"content-type": CONTENT_TYPE, "correlation_id": correlation_id}
        _PROPAGATOR.inject(headers, context=trace.set_span_in_context(create))
        create.end()
        measured: dict[str, Any] = {
            SpanAttributes.MESSAGING_SYSTEM: "kafka",
            SpanAttributes.MESSAGING_DESTINATION_NAME: topic,
        }
        started = time.perf_counter()
        try:
            future: asyncio.Future[Any] = await producer.send(
                topic, value=value, key=key, headers=[(k, v.encode()) for k, v in headers.items()]
            )
            return future
        except Exception as exc:
            measured[ERROR_TYPE] = type(exc).__name__
            raise
        finally:
            if self._metrics is not None:
                self._metrics.observe_publish(measured, time.perf_counter() - started, 1)


@dataclass
class _Outcome:
    ok: list[tuple[asyncpg.Record, Any]] = field(default_factory=list)  # (row, RecordMetadata)
    refused: list[tuple[asyncpg.Record, BaseException]] = field(default_factory=list)
    failed: list[tuple[asyncpg.Record, BaseException]] = field(default_factory=list)


_ROW_COLUMNS = """id, event_id, event_type, topic, message_key, payload, headers, attempts, created_at,
                  extract(epoch FROM clock_timestamp() - created_at) AS age_s"""


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        broker: KafkaBroker,
        schema: str,
        own_topic: str,
        kafka: KafkaSettings,
        *,
        batch_size: int = 200,
        poll_interval: float = 2.0,
        retention: timedelta = timedelta(days=7),
        replay_batch_size: int = 500,
        broker_check_interval: float = 5.0,
        idle_check_after: float = 1.0,
        lease_ttl: float = 10.0,
        publish_timeout: float = 15.0,
        topics: list[str] | None = None,
        holder: str | None = None,
    ) -> None:
        self.pool = pool
        self.broker = broker
        self.schema = schema
        self.own_topic = own_topic
        self.kafka = kafka
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self.replay_batch_size = replay_batch_size
        self.broker_check_interval = broker_check_interval
        # after this long without publishing, the broker is checked before the next rows go out: a broker
        # that restarted (and forgot) while the relay was idle is noticed before anything is published to
        # it, so that an order's new events never reach it ahead of its older ones still to be replayed
        self.idle_check_after = idle_check_after
        self.lease_ttl = lease_ttl
        self.publish_timeout = publish_timeout
        self._telemetry = _PublishTelemetry(broker)
        # every topic of the namespace (dead-letter topics too): created again on a broker that lost them
        self.topics = list(dict.fromkeys([own_topic, *(topics or [])]))
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._stopping = False
        self._heartbeat = Heartbeat("outbox-relay")
        # leadership
        self.epoch: int | None = None
        self._lease_touched = 0.0  # monotonic time of the last successful acquire/renew
        self._touch_tried = 0.0  # ... and of the last try
        self._stats_at = 0.0
        # what the broker had: (topic, partition) -> the highest high watermark seen or acked
        self._marks: dict[tuple[str, int], int] = {}
        self._cluster_id: str | None = None
        self._loss_suspected: str | None = None
        self._check_due = True
        self._last_check = 0.0
        self._last_published = 0.0  # monotonic time of the last pass that published new rows
        self._producer_conns: dict[Any, int] | None = None  # the producer's connections at the last pass
        self._replay: tuple[int, int] | None = None  # (next id, last id) of a replay under way
        self._more = False
        self._backoff_requested = False
        # what tests and operators look at
        self.listening = False
        self.published_total = 0
        self.replayed_total = 0
        self.moved_aside_total = 0
        self.fenced_out_total = 0
        self.broker_resets = 0
        self.backlog = 0
        self.oldest_pending_s = 0.0
        _RELAYS.add(self)

    # ---- public ------------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    @property
    def is_leader(self) -> bool:
        return self.epoch is not None

    def leads(self) -> bool:
        """Leads with a lease renewed within half its time: this process's commits may wake this relay
        in-process instead of by NOTIFY (`UnitOfWork.attach_relay`). Should it have lost the lease
        unawares, the new leader finds the rows at its next poll (`poll_interval`) or wake-up."""
        return (
            self.epoch is not None
            and not self._stopping
            and time.monotonic() - self._lease_touched < self.lease_ttl / 2
        )

    @property
    def replaying(self) -> bool:
        return self._replay is not None

    async def replay_remaining(self) -> int:
        """Rows the replay under way has still to publish (0 when none is under way)."""
        if self._replay is None:
            return 0
        return await self._count_retained(*self._replay)

    async def replay_if_broker_is_fresh(self) -> int:
        """Check the broker now; when it lost our events, start a replay. Returns the rows to replay."""
        if not await self._acquire():
            return 0
        return await self.check_broker()

    async def publish_pending(self) -> int:
        """One pass: new rows first, then a bounded slice of a replay. Returns the rows published."""
        self._more = False
        self._backoff_requested = False
        if not await self._acquire():
            return 0
        try:
            if (
                self._check_due
                or time.monotonic() - self._last_check >= self.broker_check_interval
                or self._producer_reconnected()
            ):
                await self._check_broker_quietly()
            rows = await self._claim()
            now = time.monotonic()
            if (
                rows
                and now - self._last_published >= self.idle_check_after
                and now - self._last_check >= self.idle_check_after
            ):
                await self._check_broker_quietly()
                if self._replay is not None:  # it forgot: the rows of orders being replayed wait
                    rows = await self._claim()
            published = await self._publish_and_mark(rows, replay=False) if rows else 0
            if published:
                self._last_published = time.monotonic()
            self._heartbeat.beat()
            replayed = 0
            if self._replay is not None and not self._backoff_requested:
                replayed = await self._replay_slice()
                self._heartbeat.beat()
            await self._refresh_stats()
        except FencedOut:
            self._lost_lease("its writes were refused", fenced=True)
            return 0
        self._more = len(rows) >= self.batch_size or self._replay is not None
        if self._backoff_requested:  # raised only after the commit that marks what did go out
            raise RelayBackoff
        return published + replayed

    def _producer_reconnected(self) -> bool:
        """Whether the producer lost a broker connection (or made a new one) since the last pass: a broker
        that restarted. Checked before anything is published to it, so that a broker that forgot gets the
        replay of an order's older events before that order's new ones."""
        state = getattr(self.broker.config.producer, "_producer", None)  # faststream's producer state
        client = getattr(getattr(state, "producer", None), "client", None)  # aiokafka's client
        conns: dict[Any, Any] | None = getattr(client, "_conns", None)
        if conns is None:  # not started, or another client library layout: the acks still tell
            return False
        current = {key: id(conn) for key, conn in conns.items()}
        dropped = any(not conn.connected() for conn in conns.values())
        changed = self._producer_conns is not None and current != self._producer_conns
        self._producer_conns = current
        return dropped or changed

    async def check_broker(self) -> int:
        """Compare the broker with what this schema's relays had seen; on loss, recreate the topics and
        start a replay. Returns the rows scheduled for replay (0: nothing lost)."""
        watch = {self.own_topic} | {t for t, _ in self._marks}
        state = await describe_broker(self.kafka, sorted(set(self.topics) | watch))
        reasons: list[str] = []
        if self._cluster_id and state.cluster_id and state.cluster_id != self._cluster_id:
            reasons.append(f"cluster id {self._cluster_id} is now {state.cluster_id}")
        if self._loss_suspected:
            reasons.append(self._loss_suspected)
        missing = [t for t in self.topics if t not in state.partitions]
        gone = sorted(t for t in watch if t not in state.partitions and any(m[0] == t for m in self._marks))
        if gone:
            reasons.append("topics gone: " + ", ".join(gone))
        for (topic, partition), mark in sorted(self._marks.items()):
            if topic not in state.partitions:
                continue
            high = state.high_watermarks.get((topic, partition))
            if high is None or high < mark:
                reasons.append(f"{topic}[{partition}] ends at {high}, had reached {mark}")
                break
        if not reasons and not any(t == self.own_topic for t, _ in self._marks):
            # nothing known about our topic (first run, or a fresh broker met at start): an empty or
            # missing topic while we hold published rows means the broker does not have them
            own_highs = [h for (t, _), h in state.high_watermarks.items() if t == self.own_topic]
            if not any(own_highs) and await self._count_retained() > 0:
                reasons.append(f"{self.own_topic} is {'empty' if own_highs else 'missing'}")
        if missing:
            created = await ensure_topics(self.kafka, self.topics)
            if created:
                log.warning("outbox relay: created missing topics", topics=created)
        scheduled = 0
        if reasons:
            self._marks = {}
            self._loss_suspected = None
            self.broker_resets += 1
            BROKER_RESETS.add(1, {"topic": self.own_topic})
            scheduled = await self._start_replay("; ".join(reasons))
        for (topic, partition), high in state.high_watermarks.items():
            if topic in watch or topic == self.own_topic:
                key = (topic, partition)
                self._marks[key] = max(self._marks.get(key, 0), high)
        self._cluster_id = state.cluster_id or self._cluster_id
        await self._save_broker_view()
        self._last_check = time.monotonic()
        self._check_due = False
        return scheduled

    async def purge_expired(self, batch: int = 5000, max_batches: int = 20) -> int:
        """Delete published rows older than the retention window, in bounded batches."""
        total = 0
        with suppress_instrumentation():
            for _ in range(max_batches):
                status = await self.pool.execute(
                    """DELETE FROM outbox WHERE id IN (
                           SELECT id FROM outbox
                           WHERE published_at IS NOT NULL AND published_at < now() - $1::interval
                           ORDER BY id LIMIT $2)""",
                    self.retention,
                    batch,
                )
                n = int(status.split()[-1])
                total += n
                if n < batch:
                    break
        return total

    async def run(self, heartbeat: Heartbeat | None = None) -> None:
        """Publish until stopped: on every NOTIFY (see `listen`), poll and lease renewal."""
        if heartbeat is not None:
            self._heartbeat = heartbeat
        hb = self._heartbeat
        backoff = 0.1
        purge_every = 600.0
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            hb.beat()
            self._wake.clear()
            try:
                await self.publish_pending()
                backoff = 0.1
                if self.is_leader and loop.time() - last_purge > purge_every:
                    await self.purge_expired()
                    last_purge = loop.time()
                if self._more:
                    await asyncio.sleep(0)
                    continue
            except RelayBackoff:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception as exc:
                if not (is_transient(exc) or isinstance(exc, asyncpg.PostgresError)):
                    raise  # a bug: the supervisor logs it and starts the loop again
                log.warning("outbox relay error", error=repr(exc))
                self._check_due = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            await self._idle(hb)

    async def listen(self, heartbeat: Heartbeat | None = None, probe_every: float = 5.0) -> None:
        """Hold a LISTEN connection that wakes the relay on commit. Returns only when stopped; raises
        when the connection is lost (the supervisor starts it again, with backoff)."""
        hb = heartbeat or Heartbeat("outbox-listener")
        channel = notify_channel(self.schema)
        conn: asyncpg.Connection = await self.pool.acquire()
        lost = asyncio.Event()

        def on_lost(_conn: object) -> None:
            lost.set()

        try:
            conn.add_termination_listener(on_lost)
            await conn.add_listener(channel, self._on_notify)
            self.listening = True
            self.wake()  # whatever was committed while nobody listened
            log.info("outbox relay listening", channel=channel)
            while not self._stopping:
                hb.beat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), timeout=probe_every)
                if lost.is_set() or _closed(conn):
                    raise ConnectionError("the LISTEN connection was closed")
                await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=probe_every)
        finally:
            self.listening = False
            if not _closed(conn):
                with contextlib.suppress(Exception):
                    conn.remove_termination_listener(on_lost)
                with contextlib.suppress(Exception):
                    # the callback that was added: another one would leave the LISTEN on the pooled conn
                    await asyncio.wait_for(conn.remove_listener(channel, self._on_notify), 2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.release(conn), 2.0)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def release(self) -> None:
        """Give the lease up (at shutdown), so that another replica takes over at once."""
        if self.epoch is None:
            return
        with contextlib.suppress(Exception), suppress_instrumentation():
            await asyncio.wait_for(
                self.pool.execute(
                    """UPDATE outbox_relay SET expires_at = clock_timestamp() - interval '1 second'
                       WHERE name = $1 AND holder = $2 AND epoch = $3""",
                    LEASE_NAME,
                    self.holder,
                    self.epoch,
                ),
                2.0,
            )
        self.epoch = None

    # ---- leadership ----------------------------------------------------------------------------------

    async def _acquire(self) -> bool:
        """Take or renew the lease; True while this relay leads. A lease renewed moments ago (every
        fenced write renews it too) is not renewed again: under load that saves a round trip per pass,
        and a relay that lost it meanwhile finds out when its marks are refused."""
        if self.epoch is not None and time.monotonic() - self._lease_touched < self.lease_ttl / 4:
            return True
        self._touch_tried = time.monotonic()
        with suppress_instrumentation():
            row = await self.pool.fetchrow(
                """INSERT INTO outbox_relay AS l (name, holder, epoch, expires_at)
                   VALUES ($1, $2, 1, clock_timestamp() + $3::interval)
                   ON CONFLICT (name) DO UPDATE SET
                       holder = EXCLUDED.holder,
                       epoch = CASE WHEN l.holder = EXCLUDED.holder THEN l.epoch ELSE l.epoch + 1 END,
                       expires_at = EXCLUDED.expires_at
                   WHERE l.holder = EXCLUDED.holder OR l.holder IS NULL OR l.expires_at < clock_timestamp()
                   RETURNING epoch, cluster_id, broker_marks::text AS marks, replay_next_id, replay_end_id""",
                LEASE_NAME,
                self.holder,
                timedelta(seconds=self.lease_ttl),
            )
        if row is None:
            if self.epoch is not None:
                self._lost_lease("another relay holds the lease")
            return False
        self._lease_touched = time.monotonic()
        if row["epoch"] != self.epoch:  # a new term: take over what the previous leader knew
            self.epoch = int(row["epoch"])
            self._cluster_id = row["cluster_id"]
            self._marks = {
                (topic, int(p)): int(h)
                for topic, parts in json.loads(row["marks"]).items()
                for p, h in parts.items()
            }
            nxt, end = row["replay_next_id"], row["replay_end_id"]
            self._replay = (int(nxt), int(end)) if nxt is not None and end is not None else None
            self._check_due = True
            log.info("outbox relay leads", holder=self.holder, epoch=self.epoch, replaying=self.replaying)
        return True

    def _lost_lease(self, why: str, *, fenced: bool = False) -> None:
        log.warning("outbox relay no longer leads", holder=self.holder, epoch=self.epoch, reason=why)
        self.epoch = None
        self._replay = None
        if fenced:
            self.fenced_out_total += 1

    async def _fence(self, conn: asyncpg.Connection) -> None:
        """In the caller's transaction: renew the lease if it is still ours, else FencedOut."""
        epoch = await conn.fetchval(
            """UPDATE outbox_relay SET expires_at = clock_timestamp() + $4::interval
               WHERE name = $1 AND holder = $2 AND epoch = $3 RETURNING epoch""",
            LEASE_NAME,
            self.holder,
            self.epoch,
            timedelta(seconds=self.lease_ttl),
        )
        if epoch is None:
            raise FencedOut
        self._lease_touched = time.monotonic()

    async def _fence_and_mark_published(self, outcome: _Outcome) -> None:
        """`_fence` and `_mark` of a pass where every row was acked, as one statement (its own
        transaction): the published rows are marked only if the lease is still ours, as in the
        transaction of the other passes, in one round trip instead of four (BEGIN, fence, mark, COMMIT)."""
        leads = await self.pool.fetchval(
            """WITH lease AS (
                   UPDATE outbox_relay SET expires_at = clock_timestamp() + $4::interval
                   WHERE name = $1 AND holder = $2 AND epoch = $3 RETURNING epoch),
               marked AS (
                   UPDATE outbox SET published_at = now()
                   WHERE id = ANY($5::bigint[]) AND published_at IS NULL AND EXISTS (SELECT 1 FROM lease)
                   RETURNING 1)  -- run to completion whether or not it is read (as every WITH that writes)
               SELECT EXISTS (SELECT 1 FROM lease)""",
            LEASE_NAME,
            self.holder,
            self.epoch,
            timedelta(seconds=self.lease_ttl),
            [row["id"] for row, _ in outcome.ok],
        )
        if not leads:
            raise FencedOut
        self._lease_touched = time.monotonic()

    # ---- claim, publish, mark -------------------------------------------------------------------------

    async def _claim(self) -> list[asyncpg.Record]:
        if self._replay is not None:
            # new rows first, but never ahead of an older row of the same key (the same order) that the
            # replay has still to publish: a consumer reads each order's events in the order written
            first, last = self._replay
            with suppress_instrumentation():
                return list(
                    await self.pool.fetch(
                        f"""WITH held AS (
                                SELECT DISTINCT message_key FROM outbox
                                WHERE id >= $2 AND id <= $3 AND published_at IS NOT NULL
                                  AND message_key IS NOT NULL)
                            SELECT {_ROW_COLUMNS} FROM outbox
                            WHERE published_at IS NULL
                              AND NOT EXISTS (SELECT 1 FROM held WHERE held.message_key = outbox.message_key)
                            ORDER BY id LIMIT $1""",
                        self.batch_size,
                        first,
                        last,
                    )
                )
        with suppress_instrumentation():
            return list(
                await self.pool.fetch(
                    f"SELECT {_ROW_COLUMNS} FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
                    self.batch_size,
                )
            )

    async def _publish_and_mark(self, rows: list[asyncpg.Record], *, replay: bool) -> int:
        outcome = await self._publish(rows)
        self._note_acks(outcome)
        with suppress_instrumentation():
            if not replay and not outcome.refused and not outcome.failed:
                await self._fence_and_mark_published(outcome)  # the usual pass: one round trip
            else:
                async with self.pool.acquire() as conn, conn.transaction():
                    await self._fence(conn)
                    if replay:
                        await self._advance_replay(conn, rows, outcome)
                    else:
                        await self._mark(conn, outcome)
        for row, exc in outcome.refused:
            self._log_refused(row, exc, replay=replay)
        if outcome.failed:
            row, exc = outcome.failed[0]
            log.warning(
                "outbox publish failed, will retry",
                error=repr(exc),
                outbox_id=row["id"],
                replay=replay,
                failed=len(outcome.failed),
            )
            self._backoff_requested = True
            self._check_due = True  # a broker that fails may be one that forgot
        n = len(outcome.ok)
        if replay:
            self.replayed_total += n
            if n:
                REPLAYED.add(n, {"topic": self.own_topic})
        else:
            self.published_total += n
            for row, _ in outcome.ok:
                PUBLISHED.add(1, {"topic": row["topic"]})
                PUBLISH_LAG.record(float(row["age_s"]), {"topic": row["topic"]})
        return n

    async def _publish(self, rows: list[asyncpg.Record]) -> _Outcome:
        """Hand every row to the producer, then await the acks together (bounded by publish_timeout).

        The rows are handed over without giving the event loop a turn between them (one deadline for
        them all, not a task per row): the producer's sender then finds them together and sends the
        pass's rows of each partition as one record batch. With a task per row the sender ran between
        rows and sent each row in a batch, and a request, of its own. Tansu's memory engine keeps every
        batch as an object and lists all of a partition's objects whenever a fetch finds new data there:
        its CPU grew with every batch ever published (docs/BENCHMARKS.md, optimisation round 14)."""
        outcome = _Outcome()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        sent: list[tuple[asyncpg.Record, asyncio.Future[Any]]] = []
        handing: asyncpg.Record | None = None  # the row being handed over when the deadline passes
        try:
            async with asyncio.timeout_at(deadline):
                for row in rows:
                    handing = row
                    try:
                        future = await self._send(row)
                    except Exception as exc:
                        if refused_by_broker(exc):
                            outcome.refused.append((row, exc))
                            continue
                        outcome.failed.append((row, exc))
                        break  # the broker is in trouble: the rest waits for the next pass, in order
                    sent.append((row, future))
                handing = None
        except TimeoutError as exc:
            if handing is not None:
                outcome.failed.append((handing, exc))  # the rest waits for the next pass, in order
        if sent:
            await asyncio.wait([f for _, f in sent], timeout=max(0.05, deadline - loop.time()))
        for row, future in sent:
            if not future.done():
                future.add_done_callback(_swallow)
                outcome.failed.append((row, TimeoutError("no ack from the broker in time")))
            elif future.cancelled():
                outcome.failed.append((row, asyncio.CancelledError("publish cancelled")))
            elif (error := future.exception()) is not None:
                (outcome.refused if refused_by_broker(error) else outcome.failed).append((row, error))
            else:
                outcome.ok.append((row, future.result()))
        outcome.failed.sort(key=lambda pair: pair[0]["id"])
        return outcome

    async def _send(self, row: asyncpg.Record) -> asyncio.Future[Any]:
        headers: Any = row["headers"] or {}
        if isinstance(headers, str):
            with contextlib.suppress(ValueError):
                headers = json.loads(headers)
        if not isinstance(headers, dict):  # written by an older writer: no usable trace context
            headers = {}
        parent = propagate.extract(headers, context=otel_context.Context())
        token = otel_context.attach(parent)
        coi = None
        if row["message_key"]:
            with contextlib.suppress(ValueError, KeyError, AttributeError):
                coi = json.loads(bytes(row["payload"])).get("coi")
        bind_order(row["message_key"] if coi else None, coi)
        key = row["message_key"].encode() if row["message_key"] else None
        try:
            producer = _kafka_producer(self.broker)
            if producer is None:  # a broker without an aiokafka producer (FastStream's test broker)
                future: Any = await self.broker.publish(
                    bytes(row["payload"]),
                    topic=row["topic"],
                    key=key,
                    headers={"content-type": CONTENT_TYPE},
                    no_confirm=True,
                )
                return future  # type: ignore[no-any-return]
            return await self._telemetry.send(producer, row["topic"], key, bytes(row["payload"]))
        finally:
            otel_context.detach(token)

    def _note_acks(self, outcome: _Outcome) -> None:
        """An ack below what a partition had reached means the broker's log started again.

        What a batch of acks tells about a partition's high watermark is kept conservatively: its
        *lowest* offset + 1. Tansu answers ListOffsets(latest) with the last record batch's base offset
        + 1, not the log end; a mark from the highest ack would then always look "lost"."""
        lowest: dict[tuple[str, int], int] = {}
        for _row, metadata in outcome.ok:
            key = (metadata.topic, metadata.partition)
            mark = self._marks.get(key, 0)
            if metadata.offset < mark:
                if self._loss_suspected is None:
                    self._loss_suspected = (
                        f"{key[0]}[{key[1]}] acked offset {metadata.offset}, had reached {mark}"
                    )
                self._check_due = True
            lowest[key] = min(metadata.offset, lowest.get(key, metadata.offset))
        if self._loss_suspected is None:
            for key, offset in lowest.items():
                self._marks[key] = max(self._marks.get(key, 0), offset + 1)

    async def _mark(self, conn: asyncpg.Connection, outcome: _Outcome) -> None:
        if outcome.ok:
            await conn.execute(
                """UPDATE outbox SET published_at = now()
                   WHERE id = ANY($1::bigint[]) AND published_at IS NULL""",
                [row["id"] for row, _ in outcome.ok],
            )
        for row, exc in outcome.refused:
            await conn.execute(
                """INSERT INTO dead_letters (consumer, topic, event_id, event_type, message_key, payload,
                                            headers, error, attempts)
                   SELECT $2, topic, event_id, event_type, convert_to(message_key, 'UTF8'), payload,
                          headers || jsonb_build_object('content-type', $4::text), $3, attempts + 1
                   FROM outbox WHERE id = $1
                   ON CONFLICT (consumer, event_id) WHERE event_id IS NOT NULL DO UPDATE SET
                       payload = EXCLUDED.payload, error = EXCLUDED.error, attempts = EXCLUDED.attempts,
                       occurrences = dead_letters.occurrences + 1, dead_lettered_at = now(),
                       replayed_at = NULL""",
                row["id"],
                RELAY_CONSUMER,
                f"refused by the broker: {exc!r}"[:8000],
                CONTENT_TYPE,
            )
            await conn.execute("DELETE FROM outbox WHERE id = $1", row["id"])
        if outcome.failed:
            row, exc = outcome.failed[0]
            await conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1",
                row["id"],
                repr(exc)[:2000],
            )

    def _log_refused(self, row: asyncpg.Record, exc: BaseException, *, replay: bool) -> None:
        if replay:  # it went out once: the broker now refusing it is odd, but the replay goes on
            log.error(
                "replayed outbox row refused by the broker, skipped", outbox_id=row["id"], error=repr(exc)
            )
            return
        self.moved_aside_total += 1
        MOVED_ASIDE.add(1, {"topic": row["topic"]})
        log.error(
            "outbox row refused by the broker, moved to dead_letters",
            outbox_id=row["id"],
            event_id=str(row["event_id"]),
            event_type=row["event_type"],
            topic=row["topic"],
            size=len(bytes(row["payload"])),
            error=repr(exc),
        )

    # ---- replay ---------------------------------------------------------------------------------------

    async def _count_retained(self, first: int | None = None, last: int | None = None) -> int:
        with suppress_instrumentation():
            return int(
                await self.pool.fetchval(
                    """SELECT count(*) FROM outbox
                       WHERE published_at IS NOT NULL AND published_at > now() - $1::interval
                         AND ($2::bigint IS NULL OR id >= $2) AND ($3::bigint IS NULL OR id <= $3)""",
                    self.retention,
                    first,
                    last,
                )
            )

    async def _start_replay(self, reason: str) -> int:
        with suppress_instrumentation():
            async with self.pool.acquire() as conn, conn.transaction():
                await self._fence(conn)
                row = await conn.fetchrow(
                    """UPDATE outbox_relay SET
                           replay_next_id = (SELECT min(id) FROM outbox WHERE published_at IS NOT NULL
                                                AND published_at > now() - $2::interval),
                           replay_end_id = (SELECT max(id) FROM outbox WHERE published_at IS NOT NULL),
                           replay_started_at = now(), replay_reason = $3
                       WHERE name = $1 RETURNING replay_next_id, replay_end_id""",
                    LEASE_NAME,
                    self.retention,
                    reason[:2000],
                )
        assert row is not None
        if row["replay_next_id"] is None:
            self._replay = None
            log.warning("outbox relay: the broker lost our events; none retained to replay", reason=reason)
            return 0
        self._replay = (int(row["replay_next_id"]), int(row["replay_end_id"]))
        count = await self._count_retained(*self._replay)
        log.warning(
            "outbox relay: the broker lost our events, replaying the retained rows",
            reason=reason,
            rows=count,
            first_id=self._replay[0],
            last_id=self._replay[1],
        )
        return count

    async def _replay_slice(self) -> int:
        assert self._replay is not None
        first, last = self._replay
        with suppress_instrumentation():
            rows = list(
                await self.pool.fetch(
                    f"""SELECT {_ROW_COLUMNS} FROM outbox
                        WHERE id >= $1 AND id <= $2 AND published_at IS NOT NULL
                          AND published_at > now() - $3::interval
                        ORDER BY id LIMIT $4""",
                    first,
                    last,
                    self.retention,
                    self.replay_batch_size,
                )
            )
        if not rows:
            with suppress_instrumentation():
                async with self.pool.acquire() as conn, conn.transaction():
                    await self._fence(conn)
                    await conn.execute(
                        """UPDATE outbox_relay SET replay_next_id = NULL, replay_end_id = NULL
                           WHERE name = $1""",
                        LEASE_NAME,
                    )
            self._replay = None
            log.info("outbox relay: replay complete", replayed=self.replayed_total)
            return 0
        return await self._publish_and_mark(rows, replay=True)

    async def _advance_replay(
        self, conn: asyncpg.Connection, rows: list[asyncpg.Record], outcome: _Outcome
    ) -> None:
        assert self._replay is not None
        nxt = outcome.failed[0][0]["id"] if outcome.failed else rows[-1]["id"] + 1
        await conn.execute("UPDATE outbox_relay SET replay_next_id = $2 WHERE name = $1", LEASE_NAME, nxt)
        self._replay = (int(nxt), self._replay[1])

    # ---- broker view ----------------------------------------------------------------------------------

    async def _check_broker_quietly(self) -> None:
        try:
            await self.check_broker()
        except FencedOut:
            raise
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, asyncpg.PostgresError)):
                raise
            log.warning("outbox relay: broker check failed", error=repr(exc))
            self._last_check = time.monotonic()  # again after the interval, not on every pass
            self._check_due = False

    async def _save_broker_view(self) -> None:
        marks: dict[str, dict[str, int]] = {}
        for (topic, partition), high in self._marks.items():
            marks.setdefault(topic, {})[str(partition)] = high
        with suppress_instrumentation():
            async with self.pool.acquire() as conn, conn.transaction():
                await self._fence(conn)
                await conn.execute(
                    "UPDATE outbox_relay SET cluster_id = $2, broker_marks = $3::text::jsonb WHERE name = $1",
                    LEASE_NAME,
                    self._cluster_id,
                    json.dumps(marks),
                )

    async def _refresh_stats(self) -> None:
        if time.monotonic() - self._stats_at < 0.5:
            return  # a gauge: twice a second is plenty, whatever the pass rate
        self._stats_at = time.monotonic()
        with suppress_instrumentation():
            stats = await self.pool.fetchrow(
                """SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age
                   FROM outbox WHERE published_at IS NULL"""
            )
        self.backlog = int(stats["n"]) if stats else 0
        self.oldest_pending_s = float(stats["age"]) if stats and self.backlog > 0 else 0.0

    # ---- waiting ----------------------------------------------------------------------------------------

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _idle(self, hb: Heartbeat) -> None:
        """Wait for a NOTIFY or the poll interval; meanwhile beat, keep (or take) the lease, and check
        the broker when that is due."""
        loop = asyncio.get_running_loop()
        poll = self.poll_interval if self.listening else min(self.poll_interval, FALLBACK_POLL_S)
        deadline = loop.time() + poll
        touch_every = max(0.2, self.lease_ttl / 3)
        while not self._stopping:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(remaining, touch_every, 1.0))
                return
            except TimeoutError:
                pass
            hb.beat()
            if not self.listening and poll > FALLBACK_POLL_S:
                deadline = min(deadline, loop.time() + FALLBACK_POLL_S)
            try:
                if time.monotonic() - max(self._lease_touched, self._touch_tried) >= touch_every:
                    was_leader = self.is_leader
                    if await self._acquire() and not was_leader:
                        return  # just took over: there may be rows waiting
                if self.is_leader and time.monotonic() - self._last_check >= self.broker_check_interval:
                    await self._check_broker_quietly()
                    if self._replay is not None:
                        return
            except FencedOut:
                self._lost_lease("its writes were refused", fenced=True)
            except Exception as exc:
                if not (is_transient(exc) or isinstance(exc, asyncpg.PostgresError)):
                    raise
                log.warning("outbox relay: idle upkeep failed", error=repr(exc))


def _closed(conn: asyncpg.Connection) -> bool:
    """Whether a (pooled) connection is gone; the pool releases a pooled one as it closes."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


def _swallow(future: asyncio.Future[Any]) -> None:
    """Retrieve a late publish result so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()
