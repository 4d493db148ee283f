"""Webhook delivery per the Standard Webhooks specification, with retries, backoff and jitter.

Deliveries are rows written by the consumer in the same transaction as its inbox entry. The
dispatcher (the shared machinery in `delivery`) leases due rows, posts them signed (`webhook-id`,
`webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`), records every attempt, and after
the last failed attempt marks the delivery failed and publishes `notification.webhook_delivery_failed`
through the outbox.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import httpx
from opentelemetry import trace
from standardwebhooks.webhooks import Webhook

from notification_service.delivery import DeliveryPolicy, Outcome
from notification_service.delivery import Dispatcher as _Dispatcher
from v2v_contracts import WebhookDeliveryFailedV1, new_event
from v2v_messaging import Tx, UnitOfWork
from v2v_observability import meter

__all__ = ["DeliveryPolicy", "Dispatcher", "channel", "sign"]

_meter = meter("v2v.notification")
OUTCOMES = _meter.create_counter("v2v.webhook.deliveries", description="Webhook delivery attempts by outcome")
DURATION = _meter.create_histogram("v2v.webhook.duration", unit="s", description="Webhook HTTP call duration")


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


class Dispatcher(_Dispatcher):
    """Posts `deliveries` to their subscription's URL, signed with its secret."""

    kind = "webhook"
    table = "deliveries"
    attempts_table = "delivery_attempts"
    target_table = "subscriptions"
    target_key = "subscription_id"
    target_columns = ("url", "secret")
    status_attribute = "http.response.status_code"
    outcomes = OUTCOMES
    duration = DURATION

    def __init__(self, pool: asyncpg.Pool, uow: UnitOfWork, schema: str, policy: DeliveryPolicy) -> None:
        super().__init__(pool, uow, schema, policy)
        self.client = httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False)

    @staticmethod
    def channel(schema: str) -> str:
        return channel(schema)

    def describe(self, row: asyncpg.Record, span: trace.Span) -> None:
        span.set_attribute("v2v.subscription_id", str(row["subscription_id"]))

    async def send(self, row: asyncpg.Record) -> Outcome:
        body = bytes(row["payload"]).decode()
        headers = sign(row["secret"], f"msg_{row['event_id']}", datetime.now(UTC), body)
        try:
            resp = await self.client.post(row["url"], content=body, headers=headers)
        except httpx.HTTPError as exc:
            return Outcome(None, f"{exc.__class__.__name__}: {exc}"[:500])
        status = resp.status_code
        return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}")

    async def on_dead_lettered(self, tx: Tx, row: asyncpg.Record, attempt: int, outcome: Outcome) -> None:
        if row["order_id"] is None:
            return
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
                    last_error=outcome.error or "",
                )
            )
        )

    async def aclose(self) -> None:
        await self.client.aclose()
