"""Transactional outbox: events are rows written in the business transaction, published by a relay.

The relay takes pending rows in id order under `FOR UPDATE SKIP LOCKED` and a transaction-scoped
advisory lock (one active relay per schema, so several replicas never double-publish and one order's
events keep their order), re-attaches the writer's W3C trace context, waits for the broker's ack
(`acks=all`), then marks the rows published. Published rows are kept for a retention window so they
can be replayed to a broker that lost them (Tansu forgets everything on restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from datetime import timedelta
from typing import Any

import asyncpg
from faststream.kafka import KafkaBroker
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.instrumentation.utils import suppress_instrumentation

from v2v_contracts import CONTENT_TYPE, CloudEvent
from v2v_messaging.kafka import KafkaSettings, topic_is_empty
from v2v_observability import bind_order, current_traceparent, get_logger, meter
from v2v_observability import names as tn

log = get_logger(__name__)
_meter = meter(tn.METER_MESSAGING)
PUBLISHED = _meter.create_counter(tn.OUTBOX_PUBLISHED, description="Outbox rows published to the broker")
PUBLISH_LAG = _meter.create_histogram(
    tn.OUTBOX_PUBLISH_LAG, unit="s", description="From the commit that wrote an event to the broker's ack"
)
_RELAYS: weakref.WeakSet[OutboxRelay] = weakref.WeakSet()


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


class Outbox:
    """Writes events into the outbox on the caller's connection, inside the caller's transaction."""

    def __init__(self, conn: asyncpg.Connection, topic: str, channel: str) -> None:
        self._conn = conn
        self._topic = topic
        self._channel = channel
        self.added: list[CloudEvent] = []

    async def add(self, event: CloudEvent, *, topic: str | None = None) -> None:
        await self._conn.execute(
            """INSERT INTO outbox (event_id, event_type, topic, message_key, payload, headers)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb)""",
            event.id,
            event.type,
            topic or self._topic,
            event.subject,
            event.to_json(),
            current_traceparent(),
        )
        if not self.added:  # delivered to listeners only when the transaction commits
            await self._conn.execute("SELECT pg_notify($1, '')", self._channel)
        self.added.append(event)


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
    ) -> None:
        self.pool = pool
        self.broker = broker
        self.schema = schema
        self.own_topic = own_topic
        self.kafka = kafka
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self._wake = asyncio.Event()
        self._stopping = False
        self._listener: asyncpg.Connection | None = None
        self.published_total = 0
        self.backlog = 0
        self.oldest_pending_s = 0.0
        _RELAYS.add(self)

    def wake(self) -> None:
        self._wake.set()

    async def replay_if_broker_is_fresh(self) -> int:
        """A broker whose topic is empty while we hold published rows has lost them: publish again."""
        if not await topic_is_empty(self.kafka, self.own_topic):
            return 0
        with suppress_instrumentation():
            status = await self.pool.execute(
                """UPDATE outbox SET published_at = NULL
                   WHERE published_at IS NOT NULL AND published_at > now() - $1::interval""",
                self.retention,
            )
        count = int(status.split()[-1])
        if count:
            log.warning(
                "outbox replay: broker has none of our events, republishing retained rows", rows=count
            )
        return count

    async def publish_pending(self) -> int:
        """Publish one batch; returns how many rows were published."""
        with suppress_instrumentation():
            async with self.pool.acquire() as conn, conn.transaction():
                leader = await conn.fetchval(
                    "SELECT pg_try_advisory_xact_lock(hashtext('v2v-outbox-relay:' || current_schema()))"
                )
                if not leader:
                    return 0
                rows = await conn.fetch(
                    """SELECT id, topic, message_key, payload, headers, created_at,
                              extract(epoch FROM clock_timestamp() - created_at) AS age_s FROM outbox
                       WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""",
                    self.batch_size,
                )
                done: list[int] = []
                try:
                    for row in rows:
                        await self._publish(row)
                        done.append(row["id"])
                        PUBLISHED.add(1, {"topic": row["topic"]})
                        PUBLISH_LAG.record(float(row["age_s"]), {"topic": row["topic"]})
                except Exception as exc:
                    failed = rows[len(done)]["id"]
                    await conn.execute(
                        "UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1",
                        failed,
                        repr(exc)[:2000],
                    )
                    log.warning("outbox publish failed, will retry", error=repr(exc), outbox_id=failed)
                if done:
                    await conn.execute(
                        "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", done
                    )
                self.published_total += len(done)
                stats = await conn.fetchrow(
                    """SELECT count(*) AS n, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS age
                       FROM outbox WHERE published_at IS NULL"""
                )
                self.backlog = int(stats["n"]) if stats else 0
                self.oldest_pending_s = float(stats["age"]) if stats and self.backlog > 0 else 0.0
        if len(done) < len(rows):  # raised only after the commit that marks what did go out
            raise RelayBackoff
        return len(done)

    async def _publish(self, row: asyncpg.Record) -> None:
        headers: Any = row["headers"] or {}
        if not isinstance(headers, dict):  # written by an older writer: no usable trace context
            headers = {}
        parent = propagate.extract(headers, context=otel_context.Context())
        token = otel_context.attach(parent)
        coi = None
        if row["message_key"]:
            with contextlib.suppress(ValueError, KeyError):
                coi = json.loads(bytes(row["payload"])).get("coi")
        bind_order(row["message_key"] if coi else None, coi)
        try:
            await self.broker.publish(
                bytes(row["payload"]),
                topic=row["topic"],
                key=row["message_key"].encode() if row["message_key"] else None,
                headers={"content-type": CONTENT_TYPE},
            )
        finally:
            otel_context.detach(token)

    async def purge_expired(self) -> None:
        with suppress_instrumentation():
            await self.pool.execute(
                "DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < now() - $1::interval",
                self.retention,
            )

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        self._listener = await self.pool.acquire()
        await self._listener.add_listener(notify_channel(self.schema), self._on_notify)

    async def run(self) -> None:
        await self.replay_if_broker_is_fresh()
        await self._listen()
        backoff = 0.1
        purge_every = 600.0
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            try:
                n = await self.publish_pending()
                backoff = 0.1
                if loop.time() - last_purge > purge_every:
                    await self.purge_expired()
                    last_purge = loop.time()
                if n >= self.batch_size:
                    continue
            except (RelayBackoff, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if not isinstance(exc, RelayBackoff):
                    log.warning("outbox relay error", error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                # the callback that was added: another one would leave the LISTEN on the pooled connection
                await self._listener.remove_listener(notify_channel(self.schema), self._on_notify)
            with contextlib.suppress(Exception):
                await self.pool.release(self._listener)
            self._listener = None


class RelayBackoff(Exception):
    """Part of a batch failed to publish; back off before the next try."""
