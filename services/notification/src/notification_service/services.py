"""Notification use cases: webhook subscriptions, e-mail recipients, and turning order events into
deliveries (webhooks for every order event, e-mail for the exceptions)."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable
from typing import Any

from notification_service import emails, webhooks
from notification_service.delivery import notify
from notification_service.emails import EXCEPTION_EVENT_TYPES
from v2v_contracts import EVENT_TYPES, PUBLISHERS, CloudEvent
from v2v_messaging import Tx
from v2v_observability import current_traceparent
from v2v_servicekit import invalid

# events about an order that a treatment centre may subscribe to
ORDER_EVENT_TYPES = sorted(t for t, model in EVENT_TYPES.items() if "order_id" in model.model_fields)
# webhooks go out for every order event but this service's own: a failed webhook about a failed webhook
# could fail again, and so on
WEBHOOK_EVENT_TYPES = frozenset(t for t in ORDER_EVENT_TYPES if not t.startswith("notification."))
HANDLED_EVENT_TYPES = sorted(WEBHOOK_EVENT_TYPES | set(EXCEPTION_EVENT_TYPES))
# whose topics the consumer reads: every service that publishes one of the handled types
SOURCE_SERVICES = [s for s in PUBLISHERS if s in {EVENT_TYPES[t].SERVICE for t in HANDLED_EVENT_TYPES}]


def validate_secret(secret: str) -> None:
    if not secret.startswith("whsec_"):
        raise invalid("secret", "must be 'whsec_' followed by base64 (Standard Webhooks)")
    try:
        raw = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        raise invalid("secret", "the part after 'whsec_' is not valid base64") from None
    if not 24 <= len(raw) <= 64:
        raise invalid("secret", "must decode to 24..64 bytes")


def _validate_types(types: list[str] | None, known: Iterable[str], what: str) -> None:
    if types is None:
        return
    if not types:
        raise invalid("event_types", f"must not be empty; leave it out to receive every {what}")
    known = list(known)
    unknown = [t for t in types if t not in known]
    if unknown:
        raise invalid("event_types", f"unknown event types {unknown}; known: {known}")


def validate_event_types(types: list[str] | None) -> None:
    _validate_types(types, ORDER_EVENT_TYPES, "type")


def validate_exception_types(types: list[str] | None) -> None:
    _validate_types(types, EXCEPTION_EVENT_TYPES, "exception type")


def validate_email(address: str) -> None:
    reason = emails.address_problem(address)
    if reason:
        raise invalid("email", reason)


def _order_id(event: CloudEvent) -> uuid.UUID | None:
    order_id = event.data.get("order_id")
    return uuid.UUID(str(order_id)) if order_id else None


async def queue_webhooks(tx: Tx, event: CloudEvent, centre: str) -> bool:
    """One delivery per matching active subscription of the centre; True if any was queued."""
    subs = await tx.conn.fetch(
        """SELECT subscription_id FROM subscriptions
           WHERE treatment_center_id = $1 AND active AND (event_types IS NULL OR $2 = ANY(event_types))""",
        centre,
        event.type,
    )
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
            _order_id(event),
            event.coi,
            centre,
            event.to_json(),
            current_traceparent(),
        )
    return bool(subs)


async def queue_emails(tx: Tx, event: CloudEvent, centre: str) -> bool:
    """One e-mail per matching active recipient of the centre; True if any was queued."""
    recipients = await tx.conn.fetch(
        """SELECT recipient_id FROM email_recipients
           WHERE treatment_center_id = $1 AND active AND (event_types IS NULL OR $2 = ANY(event_types))""",
        centre,
        event.type,
    )
    if not recipients:
        return False
    message = emails.render(event)
    for recipient in recipients:
        await tx.conn.execute(
            """INSERT INTO email_deliveries (delivery_id, recipient_id, event_id, event_type, order_id, coi,
                                             treatment_center_id, subject, body, trace_headers, status)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, 'pending')
               ON CONFLICT (recipient_id, event_id) DO NOTHING""",
            uuid.uuid4(),
            recipient["recipient_id"],
            event.id,
            event.type,
            _order_id(event),
            event.coi,
            centre,
            message.subject,
            message.body,
            current_traceparent(),
        )
    return True


async def on_order_event(tx: Tx, event: CloudEvent) -> None:
    """Queue the event's webhooks and, for an exception, its e-mails; wake the dispatchers on commit."""
    centre = event.data.get("treatment_center_id")
    if not centre:
        return
    if event.type in WEBHOOK_EVENT_TYPES and await queue_webhooks(tx, event, centre):
        await notify(tx, webhooks.channel)
    if event.type in EXCEPTION_EVENT_TYPES and await queue_emails(tx, event, centre):
        await notify(tx, emails.channel)


def handlers(_rt: Any) -> dict[str, Any]:
    return dict.fromkeys(HANDLED_EVENT_TYPES, on_order_event)
