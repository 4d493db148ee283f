"""The dispatchers: each channel's delivery loop (orchestration only; the SQL is in the repositories).

A dispatcher is woken when a consumer's transaction queued deliveries (or when the next retry falls due),
leases the due deliveries, attempts each once through its channel's sender (concurrently, with a bound,
keeping each order's deliveries to one target in event order), and records the batch's attempts and the
policy's verdicts in one transaction: delivered, retried after a backoff, or failed — a failed webhook
publishes `notification.webhook_delivery_failed` through the outbox.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar, Generic, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import Counter, Histogram
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE

from notification_service.adapters.repository import (
    Attempt,
    DeliveryQueue,
    NotificationTx,
    email_channel,
    wakeups,
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
from v2v_contracts import WebhookDeliveryFailedV1
from v2v_messaging import AbstractUnitOfWork
from v2v_observability import bind_order, get_logger, meter, names, set_order_attributes
from v2v_servicekit import Runtime

log = get_logger(__name__)

LEASE = timedelta(seconds=60)  # a delivery leased and not recorded by then is attempted again
IDLE_WAIT_S = 5.0  # longest sleep between two looks at the queue
CONCURRENCY = 16  # lanes (an order's deliveries to one target) attempted at once
RESTART_S = (1.0, 30.0)  # backoff of a dispatcher restarted after an error: first, longest

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

D = TypeVar("D", bound=Delivery)
D_contra = TypeVar("D_contra", bound=Delivery, contravariant=True)


class Sender(Protocol[D_contra]):
    """A channel's client: one attempt; expected failures are returned as an Outcome, not raised."""

    async def send(self, delivery: D_contra, /) -> Outcome: ...

    async def aclose(self) -> None: ...


class Dispatcher(abc.ABC, Generic[D]):
    """Sends one channel's due deliveries; subclasses say which queue and what a dead letter does."""

    kind: ClassVar[str]  # "webhook" | "email": span name, log messages
    status_attribute: ClassVar[str]  # span attribute for Outcome.status_code
    outcomes: ClassVar[Counter]
    duration: ClassVar[Histogram]

    def __init__(
        self, uow: AbstractUnitOfWork[NotificationTx], sender: Sender[D], policy: DeliveryPolicy
    ) -> None:
        self.uow = uow
        self.sender = sender
        self.policy = policy
        self.tracer = trace.get_tracer(f"{names.METER_NOTIFICATION}.{self.kind}s")

    # ---- what a channel provides ---------------------------------------------------------------

    @abc.abstractmethod
    def queue(self, tx: NotificationTx) -> DeliveryQueue[D]:
        """The channel's deliveries in this transaction."""

    @abc.abstractmethod
    def target(self, delivery: D) -> object:
        """What the delivery goes to (a subscription, a recipient): one lane per order and target."""

    def describe(self, delivery: D, span: trace.Span) -> None:
        """Channel attributes on the delivery span (never an address or a secret)."""

    async def on_dead_lettered(self, tx: NotificationTx, delivery: D, attempt: int, outcome: Outcome) -> None:
        """Called in the transaction that marks the delivery failed."""

    async def aclose(self) -> None:
        await self.sender.aclose()

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self, wake: asyncio.Event) -> None:
        """Dispatch whenever woken or when the next delivery falls due, until cancelled."""
        while True:
            wake.clear()
            try:
                n = await self.dispatch_due()
            except Exception as exc:  # database down, a bug: keep the loop, try again shortly
                log.warning(f"{self.kind} dispatcher error", error=repr(exc))
                await asyncio.sleep(RESTART_S[0])
                continue
            if n >= self.policy.batch or wake.is_set():  # more due, or queued meanwhile: no need to look
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=await self.until_next_due())

    async def until_next_due(self) -> float:
        """Seconds to sleep: until the next delivery falls due, within 0.05 .. IDLE_WAIT_S."""
        with suppress_instrumentation():  # polling is not worth a span
            async with self.uow.read() as tx:
                nxt = await self.queue(tx).seconds_until_next_due()
        if nxt is None:
            return IDLE_WAIT_S
        return max(0.05, min(IDLE_WAIT_S, nxt))

    async def dispatch_due(self) -> int:
        """Lease the due deliveries, attempt each once, record the outcomes; returns how many were leased.

        The deliveries of one order to one target (a lane) are attempted one after another in the order
        they were leased (the order of their events); lanes run concurrently, at most CONCURRENCY at once.
        The attempts of the batch and their verdicts are recorded in one transaction."""
        with suppress_instrumentation():
            async with self.uow.begin() as tx:
                due = await self.queue(tx).claim_due(self.policy.batch, LEASE)
        if not due:
            return 0
        lanes: dict[tuple[object, object], list[D]] = {}
        for d in due:
            lanes.setdefault((d.order_id or d.delivery_id, self.target(d)), []).append(d)
        done: list[_Attempted[D]] = []
        slots = asyncio.Semaphore(CONCURRENCY)

        async def run_lane(lane: list[D]) -> None:
            async with slots:
                for d in lane:
                    done.append(await self._deliver(d))

        await asyncio.gather(*(run_lane(lane) for lane in lanes.values()))
        await self._record(done)
        return len(due)

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
                attempt = delivery.attempts + 1
                span.set_attribute(names.ATTEMPT, attempt)
                self.describe(delivery, span)
                started = time.monotonic()
                try:
                    outcome = await self.sender.send(delivery)
                except Exception as exc:  # a channel bug must not stop the dispatcher: record it
                    # the log keeps the kind of error; the delivery log a category (no exception text)
                    log.warning(f"{self.kind} sender failed", error_type=exc.__class__.__name__)
                    outcome = Outcome(None, "internal_error")
                elapsed_ms = int((time.monotonic() - started) * 1000)
                if outcome.status_code is not None:
                    span.set_attribute(self.status_attribute, outcome.status_code)
                if outcome.error:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error))
                verdict = decide(self.policy, attempt, outcome)
                self._observe(delivery, attempt, outcome, elapsed_ms, verdict)
                return _Attempted(
                    delivery,
                    Attempt(delivery.delivery_id, attempt, outcome, elapsed_ms),
                    verdict,
                    otel_context.get_current(),
                )
        finally:
            otel_context.detach(token)

    def _observe(
        self, delivery: D, attempt: int, outcome: Outcome, elapsed_ms: int, verdict: Verdict
    ) -> None:
        """Metrics and log lines of one attempt (in the delivery's span and order context)."""
        self.outcomes.add(1, {"event_type": delivery.event_type, "outcome": verdict.label})
        self.duration.record(elapsed_ms / 1000, {"outcome": "ok" if outcome.ok else "error"})
        if verdict.label == "failed":
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

    async def _record(self, done: list[_Attempted[D]]) -> None:
        """The attempts and their verdicts: one transaction for the batch (one now())."""
        with suppress_instrumentation():  # bookkeeping; each attempt has its delivery span
            async with self.uow.begin() as tx:
                queue = self.queue(tx)
                await queue.record_delivered([a.attempt for a in done if a.verdict.label == "delivered"])
                for a in done:
                    n, outcome = a.attempt.attempt, a.attempt.outcome
                    if a.verdict.label == "failed":
                        await queue.record_attempt(a.delivery.delivery_id, n, outcome, a.attempt.duration_ms)
                        await queue.mark_failed(a.delivery.delivery_id, n, outcome)
                        # in the delivery's span: what it publishes continues the order's trace
                        token = otel_context.attach(a.context)
                        try:
                            await self.on_dead_lettered(tx, a.delivery, n, outcome)
                        finally:
                            otel_context.detach(token)
                    elif a.verdict.label == "retry":
                        await queue.record_attempt(a.delivery.delivery_id, n, outcome, a.attempt.duration_ms)
                        await queue.schedule_retry(
                            a.delivery.delivery_id, n, outcome, a.verdict.retry_in_s or 0.0
                        )


@dataclass(frozen=True)
class _Attempted(Generic[D]):
    """An attempt made, not yet recorded: its verdict and the context of its delivery span."""

    delivery: D
    attempt: Attempt
    verdict: Verdict
    context: otel_context.Context


class WebhookDispatcher(Dispatcher[WebhookDelivery]):
    """Posts the webhook deliveries, signed; publishes webhook_delivery_failed for a dead letter."""

    kind = "webhook"
    status_attribute = HTTP_RESPONSE_STATUS_CODE
    outcomes = WEBHOOK_OUTCOMES
    duration = WEBHOOK_DURATION

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


async def _supervise(rt: Runtime, dispatcher: Dispatcher[D], channel: str) -> None:
    """Run `dispatcher` woken on `channel`; restart it with backoff when its listener fails."""
    delay = RESTART_S[0]
    try:
        while True:
            try:
                async with wakeups(rt.pool, channel) as wake:
                    delay = RESTART_S[0]
                    await dispatcher.run(wake)
            except Exception as exc:
                log.warning(f"{dispatcher.kind} dispatcher stopped, restarting", error=repr(exc), in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_S[1])
    finally:
        await dispatcher.aclose()


def secret_box(rt: Runtime) -> SecretBox:
    """The box sealing the webhook secrets (made once, at start-up: `check_secrets_key`)."""
    box = rt.extras.get("secret_box")
    if not isinstance(box, SecretBox):
        box = rt.extras["secret_box"] = _settings(rt).secret_box()
    return box


async def check_secrets_key(rt: Runtime) -> None:
    """At start-up: the service does not start without the key that seals the webhook secrets."""
    secret_box(rt)


async def webhook_dispatcher(rt: Runtime) -> None:
    settings = _settings(rt)
    policy = settings.webhook_policy
    sender = WebhookSender(policy.timeout_s, secret_box(rt), settings.url_policy)
    dispatcher = WebhookDispatcher(rt.uow, sender, policy)
    rt.extras["dispatcher"] = dispatcher
    await _supervise(rt, dispatcher, webhook_channel(rt.definition.schema))


async def email_dispatcher(rt: Runtime) -> None:
    settings = _settings(rt)
    policy = settings.email_policy
    dispatcher = EmailDispatcher(rt.uow, SmtpSender(settings.smtp, policy.timeout_s), policy)
    rt.extras["email_dispatcher"] = dispatcher
    await _supervise(rt, dispatcher, email_channel(rt.definition.schema))
