"""Webhook delivery per the Standard Webhooks specification, with retries, backoff and jitter.

Deliveries are rows written by the consumer in the same transaction as its inbox entry. The
dispatcher leases due rows (`FOR UPDATE SKIP LOCKED`, so replicas never send one delivery at once),
posts them signed (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`),
records every attempt, and after the last failed attempt marks the delivery failed and publishes
`notification.webhook_delivery_failed` through the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from standardwebhooks.webhooks import Webhook

from v2v_contracts import WebhookDeliveryFailedV1, new_event
from v2v_messaging import UnitOfWork
from v2v_observability import bind_order, get_logger, meter, set_order_attributes

log = get_logger(__name__)
tracer = trace.get_tracer("v2v.notification.webhooks")
_meter = meter("v2v.notification")
OUTCOMES = _meter.create_counter("v2v.webhook.deliveries", description="Webhook delivery attempts by outcome")
DURATION = _meter.create_histogram("v2v.webhook.duration", unit="s", description="Webhook HTTP call duration")


@dataclass(frozen=True)
class DeliveryPolicy:
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 5.0
    batch: int = 50

    @classmethod
    def from_env(cls) -> DeliveryPolicy:
        env = os.environ.get
        return cls(
            max_attempts=int(env("V2V_WEBHOOK_MAX_ATTEMPTS", "8")),
            backoff_base_s=float(env("V2V_WEBHOOK_BACKOFF_BASE_S", "1.0")),
            backoff_max_s=float(env("V2V_WEBHOOK_BACKOFF_MAX_S", "300")),
            timeout_s=float(env("V2V_WEBHOOK_TIMEOUT_S", "5")),
        )

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with equal jitter: between half and all of base * 2^(attempt-1), capped."""
        # float power with a bounded exponent: 2 ** n for n >= 1024 cannot be converted to float
        ceiling = min(self.backoff_base_s * 2.0 ** min(attempt - 1, 1000), self.backoff_max_s)
        return ceiling / 2 + random.random() * ceiling / 2


def channel(schema: str) -> str:
    return f"v2v_webhooks_{schema}"


def sign(secret: str, msg_id: str, ts: datetime, body: str) -> dict[str, str]:
    # the library signs ts.replace(tzinfo=UTC), i.e. it reads the wall clock as UTC: convert first so the
    # signed timestamp and the webhook-timestamp header are the same instant
    ts = ts.astimezone(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(ts.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, ts, body),
        "content-type": "application/json",
    }


class Dispatcher:
    def __init__(self, pool: asyncpg.Pool, uow: UnitOfWork, schema: str, policy: DeliveryPolicy) -> None:
        self.pool = pool
        self.uow = uow
        self.schema = schema
        self.policy = policy
        self._wake = asyncio.Event()
        self.client = httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False)

    async def run(self) -> None:
        listener = await self.pool.acquire()
        await listener.add_listener(channel(self.schema), lambda *_: self._wake.set())
        try:
            while True:
                self._wake.clear()
                try:
                    n = await self.dispatch_due()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("webhook dispatcher error", error=repr(exc))
                    await asyncio.sleep(1.0)
                    continue
                if n >= self.policy.batch:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=await self._until_next_due())
        finally:
            await self.client.aclose()
            with contextlib.suppress(Exception):
                await self.pool.release(listener)

    async def _until_next_due(self) -> float:
        with suppress_instrumentation():
            nxt = await self.pool.fetchval(
                "SELECT min(next_attempt_at) - now() FROM deliveries WHERE status = 'pending'"
            )
        if nxt is None:
            return 5.0
        return max(0.05, min(5.0, nxt.total_seconds()))

    async def dispatch_due(self) -> int:
        with suppress_instrumentation():
            rows = await self.pool.fetch(
                """UPDATE deliveries d SET lease_until = now() + interval '60 seconds'
                   FROM subscriptions s
                   WHERE d.subscription_id = s.subscription_id AND d.delivery_id IN (
                       SELECT delivery_id FROM deliveries
                       WHERE status = 'pending' AND next_attempt_at <= now()
                         AND (lease_until IS NULL OR lease_until < now())
                       ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                   RETURNING d.*, s.url, s.secret""",
                self.policy.batch,
            )
        await asyncio.gather(*(self._deliver(r) for r in rows))
        return len(rows)

    async def _deliver(self, row: asyncpg.Record) -> None:
        parent = propagate.extract(row["trace_headers"] or {}, context=otel_context.Context())
        token = otel_context.attach(parent)
        try:
            bind_order(row["order_id"])
            with tracer.start_as_current_span("webhook deliver", kind=trace.SpanKind.CLIENT) as span:
                set_order_attributes(row["order_id"], row["coi"])
                span.set_attribute("v2v.event_type", row["event_type"])
                span.set_attribute("v2v.subscription_id", str(row["subscription_id"]))
                attempt = row["attempts"] + 1
                span.set_attribute("v2v.attempt", attempt)
                body = bytes(row["payload"]).decode()
                headers = sign(row["secret"], f"msg_{row['event_id']}", datetime.now(UTC), body)
                started = time.monotonic()
                status: int | None = None
                error: str | None = None
                try:
                    resp = await self.client.post(row["url"], content=body, headers=headers)
                    status = resp.status_code
                    if not 200 <= status < 300:
                        error = f"HTTP {status}"
                except httpx.HTTPError as exc:
                    error = f"{exc.__class__.__name__}: {exc}"[:500]
                elapsed = int((time.monotonic() - started) * 1000)
                if status is not None:
                    span.set_attribute("http.response.status_code", status)
                if error:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, error))
                await self._record(row, attempt, status, error, elapsed)
        finally:
            otel_context.detach(token)

    async def _record(
        self, row: asyncpg.Record, attempt: int, status: int | None, error: str | None, elapsed_ms: int
    ) -> None:
        outcome = (
            "delivered" if error is None else ("failed" if attempt >= self.policy.max_attempts else "retry")
        )
        OUTCOMES.add(1, {"event_type": row["event_type"], "outcome": outcome})
        DURATION.record(elapsed_ms / 1000, {"outcome": "ok" if error is None else "error"})
        async with self.uow.begin() as tx:
            await tx.conn.execute(
                """INSERT INTO delivery_attempts (delivery_id, attempt, status_code, error, duration_ms)
                   VALUES ($1, $2, $3, $4, $5)""",
                row["delivery_id"],
                attempt,
                status,
                error,
                elapsed_ms,
            )
            if error is None:
                await tx.conn.execute(
                    """UPDATE deliveries SET status = 'delivered', attempts = $2, delivered_at = now(),
                              last_status_code = $3, last_error = NULL, lease_until = NULL
                       WHERE delivery_id = $1""",
                    row["delivery_id"],
                    attempt,
                    status,
                )
                return
            if attempt >= self.policy.max_attempts:
                await tx.conn.execute(
                    """UPDATE deliveries SET status = 'failed', attempts = $2, last_status_code = $3,
                              last_error = $4, lease_until = NULL WHERE delivery_id = $1""",
                    row["delivery_id"],
                    attempt,
                    status,
                    error,
                )
                if row["order_id"] is not None:
                    await tx.outbox.add(
                        new_event(
                            WebhookDeliveryFailedV1(
                                order_id=row["order_id"],
                                coi=row["coi"] or "",
                                treatment_center_id=row["treatment_center_id"],
                                subscription_id=row["subscription_id"],
                                event_id=row["event_id"],
                                event_type=row["event_type"],
                                attempts=attempt,
                                last_error=error,
                            )
                        )
                    )
                log.warning("webhook dead-lettered", delivery_id=str(row["delivery_id"]), attempts=attempt)
                return
            delay = self.policy.backoff(attempt)
            await tx.conn.execute(
                """UPDATE deliveries SET attempts = $2, last_status_code = $3, last_error = $4,
                          lease_until = NULL, next_attempt_at = now() + $5::interval
                   WHERE delivery_id = $1""",
                row["delivery_id"],
                attempt,
                status,
                error,
                timedelta(seconds=delay),
            )
            log.info(
                "webhook attempt failed, will retry", attempt=attempt, error=error, retry_in_s=round(delay, 2)
            )


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def record_summary(row: Any) -> dict[str, Any]:
    return {
        k: row[k]
        for k in (
            "delivery_id",
            "subscription_id",
            "event_id",
            "event_type",
            "order_id",
            "coi",
            "status",
            "attempts",
            "last_status_code",
            "last_error",
            "created_at",
            "delivered_at",
            "next_attempt_at",
        )
    }
