"""HTTP API: webhook subscriptions, e-mail recipients and the delivery log of both channels.

Every route needs the scope `notifications:manage` (GET /v1/event-types too: it serves whoever sets up
subscriptions). A treatment centre's token confines it to its own subscriptions, recipients and
deliveries: another centre's answer 404 and lists hold its own rows only. The centre comes from the
token; a body may leave `treatment_center_id` out (or repeat it; naming another centre is a 422).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from notification_service.config import NotificationSettings
from notification_service.domain.subscriptions import Recipient, Subscription
from notification_service.service_layer import commands
from notification_service.service_layer.dispatch import secret_box
from v2v_contracts.fields import Code
from v2v_servicekit import Runtime, current_runtime
from v2v_servicekit.auth import Principal, require_scope
from v2v_servicekit.idempotency import idempotent

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(current_runtime)]
SCOPE = "notifications:manage"
CENTRE = "centre"

MAX_EVENT_TYPES = 100
EventTypes = Annotated[list[Code], Field(min_length=0, max_length=MAX_EVENT_TYPES)]
Limit = Annotated[int, Query(ge=1, le=200, description="At most 200")]
Offset = Annotated[int, Query(ge=0, le=100_000)]
# an https URL (checked by the URL policy) and an e-mail address (checked by the domain): documented as
# such, they are no free text
Url = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=2000),
    WithJsonSchema({"type": "string", "format": "uri", "minLength": 1, "maxLength": 2000}),
]
Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=3, max_length=254),
    WithJsonSchema({"type": "string", "format": "email", "minLength": 3, "maxLength": 254}),
]


def _settings(rt: Runtime) -> NotificationSettings:
    if not isinstance(rt.settings, NotificationSettings):
        raise TypeError("the notification service runs with NotificationSettings")
    return rt.settings


def _no_store(response: Response) -> None:
    """A response carrying a signing secret is not to be kept by any cache."""
    response.headers["Cache-Control"] = "no-store"


# ---- webhook subscriptions --------------------------------------------------------------------------

EndpointStateOut = Literal["open", "parked", "probing"]


class SubscriptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    treatment_center_id: Code | None = Field(
        default=None, description="Optional: the caller's own centre (from its token); another is refused"
    )
    url: Url = Field(
        description="https, a public host (no user information, no fragment)",
        examples=["https://hospital.example/v2v/webhooks"],
    )
    event_types: EventTypes | None = Field(default=None, description="Leave out to receive every type")


class SubscriptionOut(BaseModel):
    subscription_id: uuid.UUID
    treatment_center_id: str
    url: str
    event_types: list[str] | None
    active: bool
    created_at: datetime
    secret_rotated_at: datetime | None = None
    previous_secret_expires_at: datetime | None = Field(
        default=None, description="Until then deliveries carry a second signature, by the replaced secret"
    )
    endpoint_state: EndpointStateOut = Field(
        default="open",
        description="The endpoint's circuit breaker: `open` (deliveries are sent), `parked` (after "
        "consecutive failed attempts: deliveries wait, none is attempted and none of their attempts is used "
        "up, until `parked_until`), `probing` (one delivery is sent to see whether the endpoint answers "
        "again; a success opens it, a failure parks it again for longer)",
    )
    parked_until: datetime | None = Field(
        default=None, description="Parked: when the endpoint is probed; probing: when the probe gives up"
    )
    consecutive_failures: int = Field(default=0, description="Failed attempts since the last success")

    @classmethod
    def of(cls, sub: Subscription) -> SubscriptionOut:
        return cls(
            subscription_id=sub.subscription_id,
            treatment_center_id=sub.treatment_center_id,
            url=sub.url,
            event_types=sub.event_types,
            active=sub.active,
            created_at=sub.created_at,
            secret_rotated_at=sub.secret_rotated_at,
            previous_secret_expires_at=sub.previous_secret_expires_at,
            endpoint_state=sub.endpoint.state,
            parked_until=sub.endpoint.parked_until,
            consecutive_failures=sub.endpoint.consecutive_failures,
        )


class SubscriptionWithSecret(SubscriptionOut):
    secret: str = Field(
        description="The signing secret (Standard Webhooks, whsec_<base64>): shown this once, never again",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )

    @classmethod
    def with_secret(cls, sub: Subscription, secret: str) -> SubscriptionWithSecret:
        return cls(**SubscriptionOut.of(sub).model_dump(), secret=secret)


@router.post(
    "/subscriptions",
    dependencies=[idempotent()],
    status_code=201,
    response_model=SubscriptionWithSecret,
    tags=["webhooks"],
    summary="Subscribe a treatment centre's endpoint to order events (Standard Webhooks); the signing "
    "secret is in this response only",
)
async def subscribe(
    body: SubscriptionIn,
    rt: RuntimeDep,
    response: Response,
    principal: Principal = require_scope(SCOPE),
) -> SubscriptionWithSecret:
    centre = commands.owning_centre(principal.tenant(CENTRE), body.treatment_center_id)
    sub, secret = await commands.subscribe(
        rt.uow,
        secret_box(rt),
        _settings(rt).url_policy,
        treatment_center_id=centre,
        url=body.url,
        event_types=body.event_types,
    )
    response.headers["Location"] = f"/v1/subscriptions/{sub.subscription_id}"
    _no_store(response)
    return SubscriptionWithSecret.with_secret(sub, secret)


@router.post(
    "/subscriptions/{subscription_id}/rotate-secret",
    dependencies=[idempotent()],
    response_model=SubscriptionWithSecret,
    tags=["webhooks"],
    summary="A new signing secret (in this response only); the replaced one keeps signing for the "
    "overlap window (a second signature in webhook-signature)",
)
async def rotate_secret(
    subscription_id: uuid.UUID,
    rt: RuntimeDep,
    response: Response,
    principal: Principal = require_scope(SCOPE),
) -> SubscriptionWithSecret:
    sub, secret = await commands.rotate_secret(
        rt.uow,
        secret_box(rt),
        subscription_id,
        tenant=principal.tenant(CENTRE),
        overlap=_settings(rt).secret_overlap,
    )
    _no_store(response)
    return SubscriptionWithSecret.with_secret(sub, secret)


@router.get("/subscriptions", response_model=list[SubscriptionOut], tags=["webhooks"])
async def list_subscriptions(
    rt: RuntimeDep,
    treatment_center_id: Code | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
    principal: Principal = require_scope(SCOPE),
) -> list[SubscriptionOut]:
    found = await commands.list_subscriptions(
        rt.uow,
        tenant=principal.tenant(CENTRE),
        treatment_center_id=treatment_center_id,
        limit=limit,
        offset=offset,
    )
    return [SubscriptionOut.of(s) for s in found]


@router.get("/subscriptions/{subscription_id}", response_model=SubscriptionOut, tags=["webhooks"])
async def get_subscription(
    subscription_id: uuid.UUID, rt: RuntimeDep, principal: Principal = require_scope(SCOPE)
) -> SubscriptionOut:
    return SubscriptionOut.of(
        await commands.get_subscription(rt.uow, subscription_id, principal.tenant(CENTRE))
    )


@router.get("/event-types", tags=["webhooks"], summary="Event types a subscription may filter on")
async def event_types(principal: Principal = require_scope(SCOPE)) -> list[str]:
    return commands.event_types()


# ---- e-mail recipients ------------------------------------------------------------------------------


class EmailRecipientIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    treatment_center_id: Code | None = Field(
        default=None, description="Optional: the caller's own centre (from its token); another is refused"
    )
    email: Email = Field(examples=["cart-coordination@hospital.example"])
    event_types: EventTypes | None = Field(
        default=None, description="Exception event types to be told of; leave out for every one"
    )


class EmailRecipientOut(BaseModel):
    recipient_id: uuid.UUID
    treatment_center_id: str
    email: str
    event_types: list[str] | None
    created_at: datetime

    @classmethod
    def of(cls, recipient: Recipient) -> EmailRecipientOut:
        return cls(
            recipient_id=recipient.recipient_id,
            treatment_center_id=recipient.treatment_center_id,
            email=recipient.email,
            event_types=recipient.event_types,
            created_at=recipient.created_at,
        )


@router.post(
    "/email-recipients",
    dependencies=[idempotent()],
    status_code=201,
    response_model=EmailRecipientOut,
    tags=["e-mail"],
    summary="Add an address that a treatment centre's exception alerts are e-mailed to",
)
async def add_email_recipient(
    body: EmailRecipientIn,
    rt: RuntimeDep,
    response: Response,
    principal: Principal = require_scope(SCOPE),
) -> EmailRecipientOut:
    centre = commands.owning_centre(principal.tenant(CENTRE), body.treatment_center_id)
    recipient = await commands.add_recipient(
        rt.uow, treatment_center_id=centre, email=body.email, event_types=body.event_types
    )
    response.headers["Location"] = f"/v1/email-recipients/{recipient.recipient_id}"
    return EmailRecipientOut.of(recipient)


@router.get("/email-recipients", response_model=list[EmailRecipientOut], tags=["e-mail"])
async def list_email_recipients(
    rt: RuntimeDep,
    treatment_center_id: Code | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
    principal: Principal = require_scope(SCOPE),
) -> list[EmailRecipientOut]:
    found = await commands.list_recipients(
        rt.uow,
        tenant=principal.tenant(CENTRE),
        treatment_center_id=treatment_center_id,
        limit=limit,
        offset=offset,
    )
    return [EmailRecipientOut.of(r) for r in found]


@router.get("/email-recipients/{recipient_id}", response_model=EmailRecipientOut, tags=["e-mail"])
async def get_email_recipient(
    recipient_id: uuid.UUID, rt: RuntimeDep, principal: Principal = require_scope(SCOPE)
) -> EmailRecipientOut:
    return EmailRecipientOut.of(await commands.get_recipient(rt.uow, recipient_id, principal.tenant(CENTRE)))


@router.delete(
    "/email-recipients/{recipient_id}",
    status_code=204,
    tags=["e-mail"],
    summary="Remove a recipient; its alerts not yet sent are cancelled",
)
async def remove_email_recipient(
    recipient_id: uuid.UUID, rt: RuntimeDep, principal: Principal = require_scope(SCOPE)
) -> Response:
    await commands.remove_recipient(rt.uow, recipient_id, principal.tenant(CENTRE))
    return Response(status_code=204)


# ---- the delivery log -------------------------------------------------------------------------------

Channel = Literal["webhook", "email"]
DeliveryStatus = Literal["pending", "delivered", "failed", "cancelled"]


class DeliveryOut(BaseModel):
    """A delivery. `last_outcome`: `delivered`, or the category of the last failed attempt (http_4xx,
    http_5xx, timeout, connection_refused, tls_error, dns_error, blocked_address, ...); never an error's
    text."""

    channel: Channel
    delivery_id: uuid.UUID
    subscription_id: uuid.UUID | None
    recipient_id: uuid.UUID | None
    event_id: uuid.UUID
    event_type: str
    order_id: uuid.UUID | None
    coi: str | None
    treatment_center_id: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_outcome: str | None
    created_at: datetime
    delivered_at: datetime | None
    next_attempt_at: datetime
    endpoint_state: EndpointStateOut | None = Field(
        default=None,
        description="A webhook's endpoint: open, parked (its deliveries wait until `parked_until`) or "
        "probing; null for an e-mail",
    )
    parked_until: datetime | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> DeliveryOut:
        return cls(**cls.fields_of(row))

    @staticmethod
    def fields_of(row: dict[str, Any]) -> dict[str, Any]:
        names = set(DeliveryOut.model_fields) - {"last_outcome"}
        outcome = "delivered" if row["status"] == "delivered" else row["last_error"]
        return {**{k: row.get(k) for k in names}, "last_outcome": outcome}


class AttemptOut(BaseModel):
    attempt: int
    attempted_at: datetime
    status_code: int | None
    outcome: str = Field(description="delivered, or the failure's category")
    duration_ms: int


class DeliveryDetailOut(DeliveryOut):
    attempt_log: list[AttemptOut]

    @classmethod
    def detail(cls, row: dict[str, Any]) -> DeliveryDetailOut:
        attempts = [
            AttemptOut(
                attempt=a["attempt"],
                attempted_at=a["attempted_at"],
                status_code=a["status_code"],
                outcome=a["error"] or "delivered",
                duration_ms=a["duration_ms"],
            )
            for a in row["attempt_log"]
        ]
        return cls(**DeliveryOut.fields_of(row), attempt_log=attempts)


@router.get(
    "/deliveries",
    response_model=list[DeliveryOut],
    tags=["deliveries"],
    summary="The delivery log of both channels (webhook, e-mail), newest first",
)
async def deliveries(
    rt: RuntimeDep,
    treatment_center_id: Code | None = None,
    order_id: uuid.UUID | None = None,
    channel: Channel | None = None,
    subscription_id: uuid.UUID | None = None,
    recipient_id: uuid.UUID | None = None,
    status: DeliveryStatus | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
    principal: Principal = require_scope(SCOPE),
) -> list[DeliveryOut]:
    found = await commands.list_deliveries(
        rt.uow,
        tenant=principal.tenant(CENTRE),
        treatment_center_id=treatment_center_id,
        order_id=order_id,
        channel=channel,
        subscription_id=subscription_id,
        recipient_id=recipient_id,
        status=status,
        limit=limit,
        offset=offset,
    )
    return [DeliveryOut.of(row) for row in found]


@router.get(
    "/deliveries/{delivery_id}",
    response_model=DeliveryDetailOut,
    tags=["deliveries"],
    summary="One delivery with every attempt made (time, status code, outcome, duration)",
)
async def delivery(
    delivery_id: uuid.UUID, rt: RuntimeDep, principal: Principal = require_scope(SCOPE)
) -> DeliveryDetailOut:
    return DeliveryDetailOut.detail(
        await commands.get_delivery(rt.uow, delivery_id, principal.tenant(CENTRE))
    )
