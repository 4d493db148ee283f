"""Notification use cases: subscriptions, and turning order events into webhook deliveries."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any

from notification_service.webhooks import channel
from v2v_contracts import EVENT_TYPES, CloudEvent
from v2v_messaging import Tx
from v2v_observability import current_traceparent
from v2v_servicekit import invalid

# events about an order that a treatment centre may subscribe to
ORDER_EVENT_TYPES = sorted(t for t, model in EVENT_TYPES.items() if "order_id" in model.model_fields)


def validate_secret(secret: str) -> None:
    if not secret.startswith("whsec_"):
        raise invalid("secret", "must be 'whsec_' followed by base64 (Standard Webhooks)")
    try:
        raw = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise invalid("secret", "the part after 'whsec_' is not valid base64") from None
    if not 24 <= len(raw) <= 64:
        raise invalid("secret", "must decode to 24..64 bytes")


def validate_event_types(types: list[str] | None) -> None:
    if types is None:
        return
    if not types:
        raise invalid("event_types", "must not be empty; leave it out to receive every type")
    unknown = [t for t in types if t not in ORDER_EVENT_TYPES]
    if unknown:
        raise invalid("event_types", f"unknown event types {unknown}; known: {ORDER_EVENT_TYPES}")


async def on_order_event(tx: Tx, event: CloudEvent) -> None:
    """Queue one delivery per matching active subscription of the event's treatment centre."""
    centre = event.data.get("treatment_center_id")
    if not centre:
        return
    subs = await tx.conn.fetch(
        """SELECT subscription_id FROM subscriptions
           WHERE treatment_center_id = $1 AND active AND (event_types IS NULL OR $2 = ANY(event_types))""",
        centre,
        event.type,
    )
    if not subs:
        return
    order_id = event.data.get("order_id")
    for sub in subs:
        await tx.conn.execute(
            """INSERT INTO deliveries (delivery_id, subscription_id, event_id, event_type, order_id, coi,
                                       treatment_center_id, payload, trace_headers, status)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, 'pending')
               ON CONFLICT (subscription_id, event_id) DO NOTHING""",
            uuid.uuid4(),
            sub["subscription_id"],
            event.id,
            event.type,
            uuid.UUID(str(order_id)) if order_id else None,
            event.coi,
            centre,
            event.to_json(),
            current_traceparent(),
        )
    await tx.conn.execute(
        "SELECT pg_notify($1, '')", channel(await tx.conn.fetchval("SELECT current_schema()"))
    )


def handlers(_rt: Any) -> dict[str, Any]:
    return {t: on_order_event for t in ORDER_EVENT_TYPES if not t.startswith("notification.")}
