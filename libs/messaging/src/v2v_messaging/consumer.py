"""Idempotent consumers: inbox in the same transaction as the effects, offsets committed after commit.

Each consumer is a FastStream subscriber with an explicit ack policy (NACK_ON_ERROR: the offset is
committed only after the handler returned, which is after our database commit; an exception seeks
back so the message is redelivered). Around the handler:

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
  (nack: not committed, redelivered), and it is never dead-lettered. Any other error is the message's:
  after `max_attempts` of those it is dead-lettered — recorded in the `dead_letters` table and published
  to the service's dead-letter topic with its error — and the partition goes on.
"""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from v2v_contracts import EVENT_TYPES, CloudEvent
from v2v_messaging.dead_letters import decode_headers, record_dead_letter
from v2v_messaging.failures import TRANSIENT_TYPES, is_transient
from v2v_messaging.handlers import HandlerRegistry, PoisonMessage
from v2v_messaging.provenance import check_event, publisher_of
from v2v_messaging.uow import UnitOfWork
from v2v_observability import get_logger, meter, set_order_attributes
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
_CONSUMERS: weakref.WeakSet[EventConsumer] = weakref.WeakSet()


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
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        policy: ConsumerPolicy | None = None,
        namespace: str = "",
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
            max_poll_interval_ms=max_poll_interval_ms,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            title=self.group_id,
            description=f"{service} consumer '{purpose}': " + ", ".join(handlers.types),
        )
        self.subscriber(self._on_message)
        self._last_offset: dict[tuple[str, int], int] = {}
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

    async def _on_message(self, message: KafkaMessage) -> None:
        record: Any = message.raw_message  # aiokafka ConsumerRecord (one message, not a batch)
        raw: bytes = message.body
        try:
            event = CloudEvent.from_json(raw)
        except (ValidationError, ValueError) as exc:
            await self._dead_letter(message, f"not a CloudEvent: {exc}", reason="not-a-cloudevent")
            return
        self._last_offset[(record.topic, record.partition)] = record.offset
        rejection = check_event(event, record.topic, self.handlers.model_of(event.type))
        if rejection is not None:
            log.error(
                "event refused by the provenance checks, dead-lettering",
                reason=rejection.code,
                topic=record.topic,
                event_id=str(event.id),
            )
            await self._dead_letter(message, str(rejection), event=event, reason=rejection.code)
            self.stats.rejected += 1
            self.stats.rejected_by_reason[rejection.code] = (
                self.stats.rejected_by_reason.get(rejection.code, 0) + 1
            )
            return
        # before anything else: even an event this consumer ignores is about its order, and says so (a
        # refused one is not: what it claims about an order is not to be believed)
        set_order_attributes(event.data.get("order_id"), event.coi)
        if not self.handlers.handles(event.type):
            self.stats.ignored += 1
            EVENTS.add(1, {"consumer_group": self.group_id, "event_type": event.type, "outcome": "ignored"})
            return
        key = (record.topic, record.partition, record.offset)
        transient = 0  # in this delivery
        started = time.perf_counter()
        while True:
            try:
                outcome = await self._process(event, record)
            except PoisonMessage as exc:
                log.error("poison message, dead-lettering", error=str(exc), event_type=event.type)
                attempts = self._poison_attempts.get(key, 0) + 1
                await self._dead_letter(message, str(exc), event=event, attempts=attempts, reason="contract")
                self._forget(key)
                return
            except Exception as exc:
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
                        raise
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
                    await self._dead_letter(message, repr(exc), event=event, attempts=attempts)
                    self._forget(key)
                    return
                log.warning(
                    "handler failed, retrying", error=repr(exc), event_type=event.type, attempt=attempts
                )
                await asyncio.sleep(self._backoff(attempts))
                continue
            self._forget(key)
            attrs = {"consumer_group": self.group_id, "event_type": event.type}
            HANDLER_DURATION.record(time.perf_counter() - started, attrs)
            EVENTS.add(1, {**attrs, "outcome": outcome})
            return

    def _forget(self, key: tuple[str, int, int]) -> None:
        self._poison_attempts.pop(key, None)
        self._transient_streak.pop(key, None)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.policy.base_backoff_s * 2 ** (attempt - 1), self.policy.max_backoff_s)
        return delay * (0.5 + random.random() / 2)

    async def _process(self, event: CloudEvent, record: Any) -> str:
        async with self.uow.begin() as tx:
            assert tx.conn is not None
            fresh = await tx.conn.fetchval(
                """INSERT INTO inbox (consumer, event_id, event_type, topic, kafka_partition, kafka_offset)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING true""",
                self.group_id,
                event.id,
                event.type,
                record.topic,
                record.partition,
                record.offset,
            )
            if not fresh:
                self.stats.duplicates += 1
                log.info("duplicate event ignored", event_type=event.type, event_id=str(event.id))
                return "duplicate"
            await self.handlers.dispatch(tx, event)
        self.stats.processed += 1
        self.stats.by_type[event.type] = self.stats.by_type.get(event.type, 0) + 1
        return "processed"

    async def _dead_letter(
        self,
        message: Any,
        error: str,
        *,
        event: CloudEvent | None = None,
        attempts: int = 1,
        reason: str = "handler-failed",
    ) -> None:
        """Record the message in `dead_letters`, then publish it to the dead-letter topic. A failure of
        either raises (the message is redelivered, never lost); the table write comes first so that a
        message on the topic is always in the table too."""
        record = message.raw_message
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
                payload=message.body,
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
        await self.broker.publish(message.body, topic=self.dead_letter_topic, key=record.key, headers=headers)
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


_MAX_TRACKED = 10_000


def _bump(counts: OrderedDict[tuple[str, int, int], int], key: tuple[str, int, int]) -> int:
    """Count one more failure of `key` (bounded: the oldest entries go first)."""
    counts[key] = counts.get(key, 0) + 1
    counts.move_to_end(key)
    while len(counts) > _MAX_TRACKED:
        counts.popitem(last=False)
    return counts[key]
