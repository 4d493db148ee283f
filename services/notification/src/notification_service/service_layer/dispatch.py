"""The dispatchers: each channel's delivery loop (orchestration only; the SQL is in the repositories).

A dispatcher is woken when a consumer's transaction queued deliveries (its listener's NOTIFY), when an
attempt it made finishes, or when the next delivery falls due. Each pass is one transaction: it records
the attempts that finished since the last one (with the policy's verdicts: delivered, retried after a
backoff, or failed — a failed webhook publishes `notification.webhook_delivery_failed` through the outbox)
and leases as many due deliveries as there is room for (`DeliveryPolicy.batch` in flight). Each leased
delivery is attempted at once, in its lane (an order's deliveries to one target go one after another, in
the order they were queued); a pass never waits for an attempt, so a slow endpoint holds only its own.

- Fenced: a lease has a token, and an attempt is recorded only while its token is still the delivery's. A
  dispatcher paused past its lease (another leased and attempted the delivery meanwhile) records nothing.
  A retry of a webhook carries the same `webhook-id` (the event's id), so a receiver drops a duplicate.
- Webhooks are scheduled per endpoint (`adapters.repository.WebhookQueue`): at most `per_endpoint` of an
  endpoint's deliveries in flight, the endpoints taking turns, and a circuit breaker per endpoint
  (`domain.endpoints`) that parks one that keeps failing and probes it with one delivery after a
  cool-down. One dead endpoint costs the others nothing.
- Supervised: the loops (`webhook_dispatcher`, `webhook_listener`, `email_dispatcher`, `email_listener`)
  run under the runtime's Supervisor. A failing database call ends the loop's run; the Supervisor counts
  it and starts it again with backoff, and the dispatcher (kept across runs) records first what finished
  meanwhile: no attempt is lost, none is recorded twice. A dispatcher beats on every pass (stuck detection
  in /ready); a listener on every probe of its connection, and it listens again after a Postgres restart.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, Generic, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import Counter, Histogram
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE

from notification_service.adapters.repository import (
    Attempt,
    DeliveryQueue,
    Listener,
    NotificationTx,
    email_channel,
    webhook_channel,
)
from notification_service.adapters.secret_box import SecretBox
from notification_service.adapters.smtp import SmtpSender
from notification_service.adapters.webhooks import WebhookSender
from notification_service.config import NotificationSettings
from notification_service.domain.delivery import (
    Delivery,
    DeliveryPolicy,
    EmailDelivery,
    Outcome,
    Verdict,
    WebhookDelivery,
    decide,
)
from notification_service.domain.endpoints import BreakerPolicy, EndpointHealth, after_attempts
from v2v_audit import Actor
from v2v_contracts import WebhookDeliveryFailedV1
from v2v_messaging import AbstractUnitOfWork, Heartbeat
from v2v_observability import bind_order, get_logger, meter, names, set_order_attributes
from v2v_servicekit import Runtime

log = get_logger(__name__)

LEASE = timedelta(seconds=60)  # at least: a delivery leased and not recorded by then is attempted again
IDLE_WAIT_S = 5.0  # longest sleep between two looks at the queue
RECORD_COALESCE_S = 0.01  # while attempts are in flight: a moment for more to finish, one pass for all
SHUTDOWN_GRACE_S = 2.0  # at shutdown: how long attempts in flight may still finish and be recorded

_meter = meter(names.METER_NOTIFICATION)
WEBHOOK_OUTCOMES = _meter.create_counter(
    names.WEBHOOK_DELIVERIES, description="Webhook delivery attempts by outcome"
)
WEBHOOK_DURATION = _meter.create_histogram(
    names.WEBHOOK_DURATION, unit="s", description="Webhook HTTP call duration"
)
EMAIL_OUTCOMES = _meter.create_counter(
    names.EMAIL_DELIVERIES, description="E-mail delivery attempts by outcome"
)
EMAIL_DURATION = _meter.create_histogram(names.EMAIL_DURATION, unit="s", description="SMTP send duration")
ENDPOINT_TRANSITIONS = _meter.create_counter(
    "v2v.webhook.endpoint.transitions",
    description="Webhook endpoints' circuit breakers changing state (parked, open), by new state",
)
SUPERSEDED = _meter.create_counter(
    "v2v.notification.attempts.superseded",
    description="Attempts not recorded: their lease had run out and another dispatcher had taken it",
)

D = TypeVar("D", bound=Delivery)
D_contra = TypeVar("D_contra", bound=Delivery, contravariant=True)


def attempt_bound_s(policy: DeliveryPolicy) -> float:
    """The longest one attempt may take (a sender bounds its own attempts more tightly: this is the net)."""
    return policy.timeout_s * 3 + 1.0


def lease_for(policy: DeliveryPolicy, per_target: int = 1) -> timedelta:
    """A lease long enough for the deliveries of one lane leased together (at most `per_target`) to be
    attempted one after another, each within its bound."""
    return max(LEASE, timedelta(seconds=per_target * attempt_bound_s(policy) + 10.0))


class Sender(Protocol[D_contra]):
    """A channel's client: one attempt; expected failures are returned as an Outcome, not raised."""

    async def send(self, delivery: D_contra, /) -> Outcome: ...

    async def aclose(self) -> None: ...


@dataclass
class DispatchStats:
    passes: int = 0  # transactions that recorded and leased
    leased: int = 0
    recorded: int = 0
    superseded: int = 0  # attempts made past their lease, after another dispatcher took it: not recorded


@dataclass(frozen=True)
class _Attempted(Generic[D]):
    """An attempt made, not yet recorded: its verdict and the context of its delivery span."""

    delivery: D
    attempt: Attempt
    context: otel_context.Context = field(default_factory=otel_context.Context)


class Dispatcher(abc.ABC, Generic[D]):
    """Sends one channel's due deliveries; subclasses say which queue and what a dead letter does."""

    kind: ClassVar[str]  # "webhook" | "email": span name, log messages
    status_attribute: ClassVar[str]  # span attribute for Outcome.status_code
    outcomes: ClassVar[Counter]
    duration: ClassVar[Histogram]

    def __init__(
        self,
        uow: AbstractUnitOfWork[NotificationTx],
        sender: Sender[D],
        policy: DeliveryPolicy,
        *,
        per_target: int | None = None,
        lease: timedelta | None = None,
    ) -> None:
        self.uow = uow
        self.sender = sender
        self.policy = policy
        self.per_target = per_target  # a target's deliveries in flight at most (None: no such bound)
        self.lease = lease if lease is not None else lease_for(policy, per_target or 1)
        self.tracer = trace.get_tracer(f"{names.METER_NOTIFICATION}.{self.kind}s")
        self.stats = DispatchStats()
        self._lanes: dict[tuple[object, object], deque[D]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._leased = 0  # leased by this dispatcher and not recorded yet
        self._finished: list[_Attempted[D]] = []  # attempted, not recorded yet
        self._progress = asyncio.Event()  # set when an attempt finishes
        self._filled = False  # the last pass leased all it had room for: more may be due
        self._due_at: float | None = None  # (monotonic) the next due moment, as last looked up

    # ---- what a channel provides ---------------------------------------------------------------

    @abc.abstractmethod
    def queue(self, tx: NotificationTx) -> DeliveryQueue[D]:
        """The channel's deliveries in this transaction."""

    @abc.abstractmethod
    def target(self, delivery: D) -> object:
        """What the delivery goes to (a subscription, a recipient): one lane per order and target."""

    def describe(self, delivery: D, span: trace.Span) -> None:
        """Channel attributes on the delivery span (never an address or a secret)."""

    @property
    def actor(self) -> Actor:
        """Who the audit trail names for this dispatcher's changes (a background loop of the service)."""
        return Actor.system(f"notification.{self.kind}-dispatcher")

    async def on_dead_lettered(self, tx: NotificationTx, delivery: D, attempt: int, outcome: Outcome) -> None:
        """Called in the transaction that marks the delivery failed."""

    async def _record_attempts(self, tx: NotificationTx, attempts: list[Attempt]) -> set[uuid.UUID]:
        """Record the attempts (their verdicts, where the lease is still theirs); the tokens recorded."""
        return await self.queue(tx).record(attempts)

    async def after_recorded(self, tx: NotificationTx, recorded: list[_Attempted[D]]) -> None:
        """Called in the transaction that recorded `recorded` (in the order they finished)."""

    async def aclose(self) -> None:
        await self.sender.aclose()

    # ---- the loop ------------------------------------------------------------------------------

    @property
    def room(self) -> int:
        """How many more deliveries this dispatcher may lease."""
        return self.policy.batch - self._leased

    @property
    def in_flight(self) -> int:
        return self._leased

    async def run(self, wake: asyncio.Event, heartbeat: Heartbeat | None = None) -> None:
        """Dispatch whenever woken, when an attempt finishes or when the next delivery falls due, until
        cancelled. A failing database call raises (the supervisor runs it again, with backoff): the
        attempts in flight go on meanwhile, and the next run records them first."""
        hb = heartbeat or Heartbeat(f"{self.kind}_dispatcher")
        while True:
            wake.clear()
            recorded = bool(self._finished)  # what this pump records
            await self.pump()
            hb.beat()
            if wake.is_set() or (self._filled and self.room > 0):
                continue  # queued meanwhile, or more due than there was room for
            if not self._finished:
                timeout = await self._wait_for_due(recorded) if self.room > 0 else IDLE_WAIT_S
                if not (wake.is_set() or self._finished):
                    await _first_of(wake, self._progress, timeout)
            if self._leased:  # attempts to record: a moment for more to finish (or be queued), one pass
                await asyncio.sleep(RECORD_COALESCE_S)

    async def pump(self, *, lease_more: bool = True) -> int:
        """One transaction: record the attempts that finished; lease due deliveries for the room there is
        and start attempting them. Returns how many were leased. When it fails, nothing was recorded:
        the attempts are kept for the next pump (a commit that failed after all changes nothing then: the
        leases are no longer theirs).

        With nothing to record, the lease is its one statement, atomic on its own: it runs without an
        explicit transaction (no BEGIN and COMMIT round trips for it)."""
        finished, self._finished = self._finished, []
        self._progress.clear()
        due: list[D] = []
        try:
            with suppress_instrumentation():  # bookkeeping; each attempt has its delivery span
                if finished:
                    async with self.uow.begin() as tx:
                        await self._record(tx, finished)
                        due = await self._claim(tx, self.room + len(finished), lease_more)
                elif lease_more and self.room > 0:
                    async with self.uow.read() as tx:
                        due = await self._claim(tx, self.room, lease_more)
                else:
                    self._filled = False
        except BaseException:
            self._finished[:0] = finished
            raise
        self._leased -= len(finished)
        self.stats.passes += 1
        self.stats.leased += len(due)
        for d in due:
            self._start(d)
        return len(due)

    async def _claim(self, tx: NotificationTx, room: int, lease_more: bool) -> list[D]:
        """Lease up to `room` due deliveries (none unless `lease_more`)."""
        due: list[D] = []
        if lease_more and room > 0:
            due = await self.queue(tx).claim_due(room, self.lease, per_target=self.per_target)
        self._filled = lease_more and room > 0 and len(due) == room
        return due

    async def dispatch_due(self) -> int:
        """Lease the due deliveries, attempt each once, record the outcomes; returns how many were leased.
        (One pass, waiting for its attempts: `run` does not wait.)"""
        n = await self.pump()
        await self.drain()
        await self.pump(lease_more=False)
        return n

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the attempts in flight (at most `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._tasks:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            await asyncio.wait(set(self._tasks), timeout=left)

    async def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """At shutdown: let the attempts in flight finish for a moment and record them; the others are
        cancelled (their leases run out and they are attempted again, with the same webhook-id). Closes
        the sender."""
        try:
            await self.drain(grace_s)
            if self._finished:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.pump(lease_more=False), grace_s)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self.aclose()

    async def _wait_for_due(self, recorded: bool) -> float:
        """Seconds to sleep at most (`until_next_due`). Its look is spared while attempts are in flight
        (each one's end wakes the loop, and the pass that records it looks again) and the last pass
        recorded nothing: that pass only leased, which brings no delivery's due moment nearer, so the
        moment last seen still holds (new deliveries wake the loop; another replica's recordings are
        seen within IDLE_WAIT_S, as when idle)."""
        now = time.monotonic()
        if self._leased and not recorded and self._due_at is not None and self._due_at > now:
            return max(0.05, min(IDLE_WAIT_S, self._due_at - now))
        wait = await self.until_next_due()
        self._due_at = now + wait
        return wait

    async def until_next_due(self) -> float:
        """Seconds to sleep: until the next delivery may be leased, within 0.05 .. IDLE_WAIT_S."""
        with suppress_instrumentation():  # polling is not worth a span
            async with self.uow.read() as tx:
                nxt = await self.queue(tx).seconds_until_next_due(per_target=self.per_target)
        if nxt is None:
            return IDLE_WAIT_S
        return max(0.05, min(IDLE_WAIT_S, nxt))

    def _start(self, delivery: D) -> None:
        """Attempt a leased delivery at once, or after those of its lane already in flight."""
        self._leased += 1
        key = (delivery.order_id or delivery.delivery_id, self.target(delivery))
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(delivery)
            return
        lane = self._lanes[key] = deque([delivery])
        task = asyncio.create_task(self._run_lane(key, lane), name=f"{self.kind}-lane")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_lane(self, key: tuple[object, object], lane: deque[D]) -> None:
        try:
            while lane:
                delivery = lane[0]
                try:
                    done = await self._deliver(delivery)
                except Exception as exc:  # a telemetry failure, not the sender's: still an attempt to record
                    log.warning(f"{self.kind} attempt failed unexpectedly", error_type=exc.__class__.__name__)
                    done = self._attempted(delivery, Outcome(None, "internal_error"), 0)
                lane.popleft()
                self._finished.append(done)
                self._progress.set()
        finally:
            if self._lanes.get(key) is lane:
                del self._lanes[key]

    def _attempted(
        self, delivery: D, outcome: Outcome, elapsed_ms: int, context: otel_context.Context | None = None
    ) -> _Attempted[D]:
        attempt = delivery.attempts + 1
        verdict = decide(self.policy, attempt, outcome)
        return _Attempted(
            delivery,
            Attempt(delivery.delivery_id, attempt, outcome, elapsed_ms, verdict, delivery.lease_token),
            context if context is not None else otel_context.Context(),
        )

    async def _deliver(self, delivery: D) -> _Attempted[D]:
        # the delivery span continues the trace of the consumer that queued it
        parent = propagate.extract(delivery.trace_headers, context=otel_context.Context())
        token = otel_context.attach(parent)
        try:
            bind_order(delivery.order_id)
            with self.tracer.start_as_current_span(
                f"{self.kind} deliver", kind=trace.SpanKind.CLIENT
            ) as span:
                set_order_attributes(delivery.order_id, delivery.coi)
                span.set_attribute(names.EVENT_TYPE, delivery.event_type)
                span.set_attribute(names.ATTEMPT, delivery.attempts + 1)
                self.describe(delivery, span)
                started = time.monotonic()
                try:
                    async with asyncio.timeout(attempt_bound_s(self.policy)):
                        outcome = await self.sender.send(delivery)
                except TimeoutError:
                    outcome = Outcome(None, "timeout")
                except Exception as exc:  # a channel bug must not stop the dispatcher: record it
                    # the log keeps the kind of error; the delivery log a category (no exception text)
                    log.warning(f"{self.kind} sender failed", error_type=exc.__class__.__name__)
                    outcome = Outcome(None, "internal_error")
                elapsed_ms = int((time.monotonic() - started) * 1000)
                if outcome.status_code is not None:
                    span.set_attribute(self.status_attribute, outcome.status_code)
                if outcome.error:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error))
                done = self._attempted(delivery, outcome, elapsed_ms, otel_context.get_current())
                self._observe(delivery, done.attempt.attempt, outcome, elapsed_ms, done.attempt.verdict)
                return done
        finally:
            otel_context.detach(token)

    def _observe(
        self, delivery: D, attempt: int, outcome: Outcome, elapsed_ms: int, verdict: Verdict
    ) -> None:
        """Metrics and log lines of one attempt (in the delivery's span and order context)."""
        self.outcomes.add(1, {"event_type": delivery.event_type, "outcome": verdict.label})
        self.duration.record(elapsed_ms / 1000, {"outcome": "ok" if outcome.ok else "error"})
        if verdict.label == "delivered":  # the line an SRE greps for, in the order's trace and context
            log.info(
                f"{self.kind} delivered",
                delivery_id=str(delivery.delivery_id),
                attempt=attempt,
                status_code=outcome.status_code,
                elapsed_ms=elapsed_ms,
            )
        elif verdict.label == "failed":
            log.warning(
                f"{self.kind} dead-lettered",
                delivery_id=str(delivery.delivery_id),
                attempts=attempt,
                permanent=outcome.permanent,
            )
        elif verdict.label == "retry":
            log.info(
                f"{self.kind} attempt failed, will retry",
                attempt=attempt,
                error=outcome.error,
                retry_in_s=round(verdict.retry_in_s or 0.0, 2),
            )

    async def _record(self, tx: NotificationTx, done: list[_Attempted[D]]) -> None:
        """The attempts whose leases are still theirs, and their verdicts (one statement, one now())."""
        if not done:
            return
        accepted = await self._record_attempts(tx, [a.attempt for a in done])
        recorded = [a for a in done if a.attempt.lease_token in accepted]
        superseded = len(done) - len(recorded)
        self.stats.recorded += len(recorded)
        if superseded:
            self.stats.superseded += superseded
            SUPERSEDED.add(superseded, {"channel": self.kind})
            log.warning(
                f"{self.kind} attempts not recorded: their lease had run out and was taken over",
                count=superseded,
            )
        for a in recorded:
            if a.attempt.verdict.label == "failed":
                tx.audit(
                    "delivery.dead_lettered",
                    f"{self.kind}_delivery",
                    a.delivery.delivery_id,
                    old={"status": "pending"},
                    new={
                        "status": "failed",
                        "attempts": a.attempt.attempt,
                        "status_code": a.attempt.outcome.status_code,
                        "event_id": a.delivery.event_id,
                        "event_type": a.delivery.event_type,
                        "order_id": a.delivery.order_id,
                        "treatment_center_id": a.delivery.treatment_center_id,
                    },
                    reason=a.attempt.outcome.error,
                    actor=self.actor,
                )
                # in the delivery's span: what it publishes continues the order's trace
                token = otel_context.attach(a.context)
                try:
                    await self.on_dead_lettered(tx, a.delivery, a.attempt.attempt, a.attempt.outcome)
                finally:
                    otel_context.detach(token)
        await self.after_recorded(tx, recorded)


async def _first_of(a: asyncio.Event, b: asyncio.Event, timeout: float) -> None:
    """Until either event is set, at most `timeout` seconds."""
    waiters = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class WebhookDispatcher(Dispatcher[WebhookDelivery]):
    """Posts the webhook deliveries, signed, per endpoint behind its circuit breaker; publishes
    webhook_delivery_failed for a dead letter."""

    kind = "webhook"
    status_attribute = HTTP_RESPONSE_STATUS_CODE
    outcomes = WEBHOOK_OUTCOMES
    duration = WEBHOOK_DURATION

    def __init__(
        self,
        uow: AbstractUnitOfWork[NotificationTx],
        sender: Sender[WebhookDelivery],
        policy: DeliveryPolicy,
        *,
        breaker: BreakerPolicy | None = None,
        lease: timedelta | None = None,
    ) -> None:
        self.breaker = breaker or BreakerPolicy()
        super().__init__(uow, sender, policy, per_target=self.breaker.per_endpoint, lease=lease)
        # the breakers of the endpoints just recorded, locked by the recording statement (for after_recorded)
        self._locked: tuple[dict[uuid.UUID, EndpointHealth], datetime] | None = None

    def queue(self, tx: NotificationTx) -> DeliveryQueue[WebhookDelivery]:
        return tx.webhooks

    def target(self, delivery: WebhookDelivery) -> object:
        return delivery.subscription_id

    def describe(self, delivery: WebhookDelivery, span: trace.Span) -> None:
        span.set_attribute(names.SUBSCRIPTION_ID, str(delivery.subscription_id))

    async def on_dead_lettered(
        self, tx: NotificationTx, delivery: WebhookDelivery, attempt: int, outcome: Outcome
    ) -> None:
        if delivery.order_id is None:
            return
        await tx.publish(
            WebhookDeliveryFailedV1(
                order_id=delivery.order_id,
                coi=delivery.coi or "",
                treatment_center_id=delivery.treatment_center_id,
                subscription_id=delivery.subscription_id,
                event_id=delivery.event_id,
                event_type=delivery.event_type,
                attempts=attempt,
                last_error=outcome.error or "",
            )
        )

    async def _record_attempts(self, tx: NotificationTx, attempts: list[Attempt]) -> set[uuid.UUID]:
        # one round trip: the attempts recorded and their endpoints' breakers locked
        self._locked = None
        accepted, health, now = await tx.webhooks.record_locking_endpoints(attempts)
        if now is not None:
            self._locked = (health, now)
        return accepted

    async def after_recorded(self, tx: NotificationTx, recorded: list[_Attempted[WebhookDelivery]]) -> None:
        """Each endpoint's breaker after its recorded attempts."""
        locked, self._locked = self._locked, None
        results: dict[uuid.UUID, list[tuple[uuid.UUID, Outcome]]] = {}
        for a in recorded:
            results.setdefault(a.delivery.subscription_id, []).append(
                (a.delivery.delivery_id, a.attempt.outcome)
            )
        if not results:
            return
        # (locked by the recording statement; else, as a fallback, locked now)
        health, now = locked if locked is not None else await tx.webhooks.endpoints_for_update(list(results))
        changed: dict[uuid.UUID, EndpointHealth] = {}
        for subscription_id, attempts in results.items():
            before = health.get(subscription_id, EndpointHealth())
            after = after_attempts(self.breaker, before, attempts, now)
            if after == before:
                continue
            changed[subscription_id] = after
            if after.state != before.state:
                ENDPOINT_TRANSITIONS.add(1, {"state": after.state})
                if after.state == "parked":
                    log.warning(
                        "webhook endpoint parked",
                        subscription_id=str(subscription_id),
                        consecutive_failures=after.consecutive_failures,
                        parks=after.parks,
                        parked_until=after.parked_until.isoformat() if after.parked_until else None,
                    )
                else:
                    log.info("webhook endpoint open again", subscription_id=str(subscription_id))
        await tx.webhooks.save_endpoints(changed)


class EmailDispatcher(Dispatcher[EmailDelivery]):
    """Sends the e-mail deliveries; a failed e-mail publishes nothing (nothing that could loop)."""

    kind = "email"
    status_attribute = names.SMTP_REPLY_CODE
    outcomes = EMAIL_OUTCOMES
    duration = EMAIL_DURATION

    def queue(self, tx: NotificationTx) -> DeliveryQueue[EmailDelivery]:
        return tx.emails

    def target(self, delivery: EmailDelivery) -> object:
        return delivery.recipient_id

    def describe(self, delivery: EmailDelivery, span: trace.Span) -> None:
        span.set_attribute(names.RECIPIENT_ID, str(delivery.recipient_id))


# ---- the background jobs of the service ---------------------------------------------------------------


def _settings(rt: Runtime) -> NotificationSettings:
    if not isinstance(rt.settings, NotificationSettings):
        raise TypeError("the notification service runs with NotificationSettings")
    return rt.settings


def secret_box(rt: Runtime) -> SecretBox:
    """The box sealing the webhook secrets (made once, at start-up: `check_secrets_key`)."""
    box = rt.extras.get("secret_box")
    if not isinstance(box, SecretBox):
        box = rt.extras["secret_box"] = _settings(rt).secret_box()
    return box


async def check_secrets_key(rt: Runtime) -> None:
    """At start-up: the service does not start without the key that seals the webhook secrets."""
    secret_box(rt)


def listener(rt: Runtime, kind: str) -> Listener:
    """The channel's listener (made once; its wake event is the dispatcher's)."""
    key = f"{kind}_listener"
    found = rt.extras.get(key)
    if not isinstance(found, Listener):
        channel = webhook_channel if kind == "webhook" else email_channel
        found = rt.extras[key] = Listener(rt.pool, channel(rt.definition.schema))
    return found


def webhooks(rt: Runtime) -> WebhookDispatcher:
    """The webhook dispatcher (made once, kept across the runs of its loop: what it has in flight too)."""
    found = rt.extras.get("dispatcher")
    if not isinstance(found, WebhookDispatcher):
        settings = _settings(rt)
        policy = settings.webhook_policy
        sender = WebhookSender(policy.timeout_s, secret_box(rt), settings.url_policy)
        found = rt.extras["dispatcher"] = WebhookDispatcher(
            rt.uow, sender, policy, breaker=settings.breaker_policy, lease=settings.webhook_lease
        )
    return found


def emails(rt: Runtime) -> EmailDispatcher:
    found = rt.extras.get("email_dispatcher")
    if not isinstance(found, EmailDispatcher):
        settings = _settings(rt)
        policy = settings.email_policy
        found = rt.extras["email_dispatcher"] = EmailDispatcher(
            rt.uow, SmtpSender(settings.smtp, policy.timeout_s), policy
        )
    return found


async def _dispatch(rt: Runtime, dispatcher: Dispatcher[D], kind: str) -> None:
    try:
        await dispatcher.run(listener(rt, kind).wake, rt.heartbeat())
    except asyncio.CancelledError:  # the service stops
        await dispatcher.shutdown()
        raise


def _probe_every(rt: Runtime) -> float:
    return min(5.0, rt.settings.background_stall_after_s / 4)  # beats well inside the stall limit


async def webhook_dispatcher(rt: Runtime) -> None:
    await _dispatch(rt, webhooks(rt), "webhook")


async def webhook_listener(rt: Runtime) -> None:
    await listener(rt, "webhook").run(rt.heartbeat(), probe_every=_probe_every(rt))


async def email_dispatcher(rt: Runtime) -> None:
    await _dispatch(rt, emails(rt), "email")


async def email_listener(rt: Runtime) -> None:
    await listener(rt, "email").run(rt.heartbeat(), probe_every=_probe_every(rt))
