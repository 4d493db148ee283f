"""Order events become deliveries: a webhook to each of the centre's matching subscriptions (every order
event but this service's own) and, for an exception, an e-mail to each of its matching recipients. The
deliveries are queued in the consumer's transaction (with its inbox entry) and the dispatchers are woken
on commit."""

from __future__ import annotations

from notification_service.adapters.repository import NotificationTx
from notification_service.domain import alerts, payloads, routing
from notification_service.domain.delivery import EventRef
from v2v_audit import AuditedHandlers
from v2v_contracts import EVENT_TYPES, OrderEventData
from v2v_messaging import EventMeta
from v2v_observability import current_traceparent

# entries written by these handlers name the consumer (`notification.webhooks`) as actor, the event as cause
handlers = AuditedHandlers[NotificationTx]("notification.webhooks")


async def queue_deliveries(tx: NotificationTx, event: OrderEventData, meta: EventMeta) -> None:
    """Queue the event's webhooks and, for an exception, its e-mails; wake the dispatchers on commit."""
    centre = event.treatment_center_id
    if not centre:
        return
    ref = EventRef(
        event_id=meta.id,
        event_type=meta.type,
        order_id=event.order_id,
        coi=meta.coi,
        treatment_center_id=centre,
        trace_headers=current_traceparent(),  # the delivery spans continue this (the consumer's) trace
    )
    if routing.sent_as_webhook(meta.type):
        # the payload carries the allow-listed fields only (domain.payloads): stored and sent so
        await tx.webhooks.enqueue_matching(tx.subscriptions, ref, payloads.webhook_payload(meta.envelope))
    if routing.is_exception(meta.type, meta.envelope.data):
        recipients = await tx.recipients.matching(centre, meta.type)
        if recipients:
            await tx.emails.enqueue(recipients, ref, alerts.render(meta.envelope))
            await tx.emails.wake()


# one registration per handled event model: every order event (webhooks) and every exception (e-mail)
for _type in routing.HANDLED_EVENT_TYPES:
    handlers.add(EVENT_TYPES[_type], queue_deliveries)
