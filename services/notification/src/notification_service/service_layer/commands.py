"""The use cases behind the HTTP API: webhook subscriptions, e-mail recipients and the delivery log.
Each one is a unit of work; the rules are in `domain`; errors are `v2v_contracts.errors`."""

from __future__ import annotations

import uuid
from typing import Any, TypeAlias

from notification_service.adapters.repository import DeliveryFilter, NotificationTx
from notification_service.domain import routing
from notification_service.domain.subscriptions import (
    Recipient,
    Subscription,
    validate_email,
    validate_event_types,
    validate_exception_types,
    validate_secret,
    validate_url,
)
from v2v_contracts.errors import Conflict, NotFound
from v2v_messaging import AbstractUnitOfWork

Uow: TypeAlias = AbstractUnitOfWork[NotificationTx]


# ---- webhook subscriptions --------------------------------------------------------------------------


async def subscribe(
    uow: Uow, *, treatment_center_id: str, url: str, secret: str, event_types: list[str] | None
) -> Subscription:
    validate_url(url)
    validate_secret(secret)
    validate_event_types(event_types)
    async with uow.begin() as tx:
        return await tx.subscriptions.add(uuid.uuid4(), treatment_center_id, url, secret, event_types)


async def list_subscriptions(uow: Uow, treatment_center_id: str | None = None) -> list[Subscription]:
    async with uow.read() as tx:
        return await tx.subscriptions.for_centre(treatment_center_id)


async def get_subscription(uow: Uow, subscription_id: uuid.UUID) -> Subscription:
    async with uow.read() as tx:
        sub = await tx.subscriptions.get(subscription_id)
    if sub is None:
        raise NotFound("Subscription", subscription_id)
    return sub


def event_types() -> list[str]:
    """The event types a subscription may filter on."""
    return list(routing.ORDER_EVENT_TYPES)


# ---- e-mail recipients ------------------------------------------------------------------------------


async def add_recipient(
    uow: Uow, *, treatment_center_id: str, email: str, event_types: list[str] | None
) -> Recipient:
    validate_email(email)
    validate_exception_types(event_types)
    async with uow.begin() as tx:
        recipient = await tx.recipients.add(uuid.uuid4(), treatment_center_id, email, event_types)
    if recipient is None:
        raise Conflict(
            "email",
            "already a recipient for this treatment centre",
            title="Already a recipient",
            detail=f"email: {email} already receives the alerts of {treatment_center_id}",
        )
    return recipient


async def list_recipients(uow: Uow, treatment_center_id: str | None = None) -> list[Recipient]:
    async with uow.read() as tx:
        return await tx.recipients.for_centre(treatment_center_id)


async def get_recipient(uow: Uow, recipient_id: uuid.UUID) -> Recipient:
    async with uow.read() as tx:
        recipient = await tx.recipients.get(recipient_id)
    if recipient is None:
        raise NotFound("E-mail recipient", recipient_id)
    return recipient


async def remove_recipient(uow: Uow, recipient_id: uuid.UUID) -> None:
    """Remove a recipient; the alerts it was still to receive are cancelled."""
    async with uow.begin() as tx:
        if not await tx.recipients.remove(recipient_id):
            raise NotFound("E-mail recipient", recipient_id)
        await tx.emails.cancel_pending(recipient_id)


# ---- the delivery log -------------------------------------------------------------------------------


async def list_deliveries(
    uow: Uow,
    *,
    order_id: uuid.UUID | None = None,
    channel: str | None = None,
    subscription_id: uuid.UUID | None = None,
    recipient_id: uuid.UUID | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Deliveries of both channels, newest first, with the filters given."""
    where = DeliveryFilter(order_id, channel, subscription_id, recipient_id, status, limit)
    async with uow.read() as tx:
        return await tx.deliveries.search(where)


async def get_delivery(uow: Uow, delivery_id: uuid.UUID) -> dict[str, Any]:
    async with uow.read() as tx:
        delivery = await tx.deliveries.get(delivery_id)
    if delivery is None:
        raise NotFound("Delivery", delivery_id)
    return delivery
