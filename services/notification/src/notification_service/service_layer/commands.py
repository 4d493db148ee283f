"""The use cases behind the HTTP API: webhook subscriptions, e-mail recipients and the delivery log.
Each one is a unit of work; the rules are in `domain`; errors are `v2v_contracts.errors`.

Tenancy: `tenant` is the treatment centre the caller is confined to (`Principal.tenant("centre")`), None
for a caller that is not. The repositories filter by it: another centre's subscription, recipient or
delivery is not found (404), and lists hold the tenant's rows only. A new subscription or recipient
belongs to the tenant (`owning_centre`); a body naming another centre is refused.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from typing import Any, TypeAlias

from notification_service.adapters.repository import DeliveryFilter, NotificationTx
from notification_service.adapters.secret_box import SecretBox, new_signing_secret
from notification_service.domain import routing
from notification_service.domain.subscriptions import (
    Recipient,
    Subscription,
    validate_email,
    validate_event_types,
    validate_exception_types,
    validate_url,
)
from notification_service.domain.urls import UrlPolicy
from v2v_contracts.errors import Conflict, Invalid, NotFound
from v2v_messaging import AbstractUnitOfWork

Uow: TypeAlias = AbstractUnitOfWork[NotificationTx]


def fingerprint(text: str) -> str:
    """SHA-256 of a URL or address: the audit trail names it without holding it."""
    return hashlib.sha256(text.encode()).hexdigest()


def owning_centre(tenant: str | None, given: str | None) -> str:
    """The centre a new subscription or recipient belongs to: the caller's own (from its token). A body
    may repeat it; naming another is refused. A caller not confined to a centre must name one."""
    if tenant is not None:
        if given is not None and given != tenant:
            raise Invalid("treatment_center_id", "must be the caller's own treatment centre; leave it out")
        return tenant
    if given is None:
        raise Invalid("treatment_center_id", "is required when the caller is not a treatment centre")
    return given


# ---- webhook subscriptions --------------------------------------------------------------------------


async def subscribe(
    uow: Uow,
    box: SecretBox,
    policy: UrlPolicy,
    *,
    treatment_center_id: str,
    url: str,
    event_types: list[str] | None,
) -> tuple[Subscription, str]:
    """A new subscription and its signing secret (generated here, returned this once, stored sealed)."""
    validate_url(url, policy)
    validate_event_types(event_types)
    subscription_id = uuid.uuid4()
    secret = new_signing_secret()
    async with uow.begin() as tx:
        sub = await tx.subscriptions.add(
            subscription_id, treatment_center_id, url, box.seal(secret, subscription_id), event_types
        )
        tx.audit(
            "subscription.created",
            "subscription",
            subscription_id,
            new={
                "treatment_center_id": treatment_center_id,
                "url_sha256": fingerprint(url),  # an opaque reference to the URL, never the URL
                "event_types": event_types,
                "active": sub.active,
            },
        )
    return sub, secret


async def rotate_secret(
    uow: Uow, box: SecretBox, subscription_id: uuid.UUID, *, tenant: str | None, overlap: timedelta
) -> tuple[Subscription, str]:
    """A new signing secret for the subscription (returned this once); the replaced one keeps signing,
    as a second signature, for `overlap`."""
    secret = new_signing_secret()
    async with uow.begin() as tx:
        sub = await tx.subscriptions.rotate_secret(
            subscription_id, tenant, box.seal(secret, subscription_id), overlap
        )
        if sub is None:
            found = await tx.subscriptions.get(subscription_id, tenant)
            if found is None:
                raise NotFound("Subscription", subscription_id)
            raise Conflict("subscription_id", "the subscription is not active", title="Subscription inactive")
        tx.audit(
            "subscription.secret_rotated",
            "subscription",
            subscription_id,
            new={
                "secret_rotated_at": sub.secret_rotated_at,
                "previous_secret_expires_at": sub.previous_secret_expires_at,
            },
        )
    return sub, secret


async def list_subscriptions(
    uow: Uow,
    *,
    tenant: str | None = None,
    treatment_center_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Subscription]:
    async with uow.read() as tx:
        return await tx.subscriptions.search(tenant, treatment_center_id, limit=limit, offset=offset)


async def get_subscription(uow: Uow, subscription_id: uuid.UUID, tenant: str | None = None) -> Subscription:
    async with uow.read() as tx:
        sub = await tx.subscriptions.get(subscription_id, tenant)
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
        if recipient is not None:
            tx.audit(
                "recipient.added",
                "recipient",
                recipient.recipient_id,
                new={
                    "treatment_center_id": treatment_center_id,
                    "email_sha256": fingerprint(email.lower()),  # an opaque reference, never the address
                    "event_types": event_types,
                },
            )
    if recipient is None:
        raise Conflict(
            "email",
            "already a recipient for this treatment centre",
            title="Already a recipient",
            detail="email: this address already receives the alerts of this treatment centre",
        )
    return recipient


async def list_recipients(
    uow: Uow,
    *,
    tenant: str | None = None,
    treatment_center_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Recipient]:
    async with uow.read() as tx:
        return await tx.recipients.search(tenant, treatment_center_id, limit=limit, offset=offset)


async def get_recipient(uow: Uow, recipient_id: uuid.UUID, tenant: str | None = None) -> Recipient:
    async with uow.read() as tx:
        recipient = await tx.recipients.get(recipient_id, tenant)
    if recipient is None:
        raise NotFound("E-mail recipient", recipient_id)
    return recipient


async def remove_recipient(uow: Uow, recipient_id: uuid.UUID, tenant: str | None = None) -> None:
    """Remove a recipient; the alerts it was still to receive are cancelled."""
    async with uow.begin() as tx:
        if not await tx.recipients.remove(recipient_id, tenant):
            raise NotFound("E-mail recipient", recipient_id)
        await tx.emails.cancel_pending(recipient_id)
        tx.audit("recipient.removed", "recipient", recipient_id, old={"active": True}, new={"active": False})


# ---- the delivery log -------------------------------------------------------------------------------


async def list_deliveries(
    uow: Uow,
    *,
    tenant: str | None = None,
    treatment_center_id: str | None = None,
    order_id: uuid.UUID | None = None,
    channel: str | None = None,
    subscription_id: uuid.UUID | None = None,
    recipient_id: uuid.UUID | None = None,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Deliveries of both channels (the tenant's), newest first, with the filters given."""
    where = DeliveryFilter(
        tenant, order_id, channel, subscription_id, recipient_id, status, limit, offset, treatment_center_id
    )
    async with uow.read() as tx:
        return await tx.deliveries.search(where)


async def get_delivery(uow: Uow, delivery_id: uuid.UUID, tenant: str | None = None) -> dict[str, Any]:
    async with uow.read() as tx:
        delivery = await tx.deliveries.get(delivery_id, tenant)
    if delivery is None:
        raise NotFound("Delivery", delivery_id)
    return delivery
