"""HTTP API: webhook subscriptions, e-mail recipients and the delivery log of both channels."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from notification_service.domain.subscriptions import Recipient, Subscription
from notification_service.service_layer import commands
from v2v_servicekit import Runtime, get_runtime

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class SubscriptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    treatment_center_id: str = Field(min_length=1, max_length=64)
    url: str = Field(min_length=1, max_length=2000, examples=["https://hospital.example/v2v/webhooks"])
    secret: str = Field(description="whsec_<base64>, 24..64 bytes once decoded", examples=["whsec_..."])
    event_types: list[str] | None = Field(default=None, description="Leave out to receive every type")


class SubscriptionOut(BaseModel):
    subscription_id: uuid.UUID
    treatment_center_id: str
    url: str
    event_types: list[str] | None
    active: bool
    created_at: datetime

    @classmethod
    def of(cls, sub: Subscription) -> SubscriptionOut:
        return cls(
            subscription_id=sub.subscription_id,
            treatment_center_id=sub.treatment_center_id,
            url=sub.url,
            event_types=sub.event_types,
            active=sub.active,
            created_at=sub.created_at,
        )


@router.post(
    "/subscriptions",
    status_code=201,
    response_model=SubscriptionOut,
    tags=["webhooks"],
    summary="Subscribe a treatment centre's endpoint to order events (Standard Webhooks)",
)
async def subscribe(body: SubscriptionIn, rt: RuntimeDep, response: Response) -> SubscriptionOut:
    sub = await commands.subscribe(
        rt.uow,
        treatment_center_id=body.treatment_center_id,
        url=body.url,
        secret=body.secret,
        event_types=body.event_types,
    )
    response.headers["Location"] = f"/v1/subscriptions/{sub.subscription_id}"
    return SubscriptionOut.of(sub)


@router.get("/subscriptions", response_model=list[SubscriptionOut], tags=["webhooks"])
async def list_subscriptions(rt: RuntimeDep, treatment_center_id: str | None = None) -> list[SubscriptionOut]:
    return [SubscriptionOut.of(s) for s in await commands.list_subscriptions(rt.uow, treatment_center_id)]


@router.get("/subscriptions/{subscription_id}", response_model=SubscriptionOut, tags=["webhooks"])
async def get_subscription(subscription_id: uuid.UUID, rt: RuntimeDep) -> SubscriptionOut:
    return SubscriptionOut.of(await commands.get_subscription(rt.uow, subscription_id))


@router.get("/event-types", tags=["webhooks"], summary="Event types a subscription may filter on")
async def event_types() -> list[str]:
    return commands.event_types()


# ---- e-mail recipients ------------------------------------------------------------------------------


class EmailRecipientIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    treatment_center_id: str = Field(min_length=1, max_length=64)
    email: str = Field(min_length=1, max_length=254, examples=["cart-coordination@hospital.example"])
    event_types: list[str] | None = Field(
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
    status_code=201,
    response_model=EmailRecipientOut,
    tags=["e-mail"],
    summary="Add an address that a treatment centre's exception alerts are e-mailed to",
)
async def add_email_recipient(
    body: EmailRecipientIn, rt: RuntimeDep, response: Response
) -> EmailRecipientOut:
    recipient = await commands.add_recipient(
        rt.uow, treatment_center_id=body.treatment_center_id, email=body.email, event_types=body.event_types
    )
    response.headers["Location"] = f"/v1/email-recipients/{recipient.recipient_id}"
    return EmailRecipientOut.of(recipient)


@router.get("/email-recipients", response_model=list[EmailRecipientOut], tags=["e-mail"])
async def list_email_recipients(
    rt: RuntimeDep, treatment_center_id: str | None = None
) -> list[EmailRecipientOut]:
    return [EmailRecipientOut.of(r) for r in await commands.list_recipients(rt.uow, treatment_center_id)]


@router.get("/email-recipients/{recipient_id}", response_model=EmailRecipientOut, tags=["e-mail"])
async def get_email_recipient(recipient_id: uuid.UUID, rt: RuntimeDep) -> EmailRecipientOut:
    return EmailRecipientOut.of(await commands.get_recipient(rt.uow, recipient_id))


@router.delete(
    "/email-recipients/{recipient_id}",
    status_code=204,
    tags=["e-mail"],
    summary="Remove a recipient; its alerts not yet sent are cancelled",
)
async def remove_email_recipient(recipient_id: uuid.UUID, rt: RuntimeDep) -> Response:
    await commands.remove_recipient(rt.uow, recipient_id)
    return Response(status_code=204)


# ---- the delivery log -------------------------------------------------------------------------------

Channel = Literal["webhook", "email"]
DeliveryStatus = Literal["pending", "delivered", "failed", "cancelled"]


@router.get(
    "/deliveries",
    tags=["deliveries"],
    summary="The delivery log of both channels (webhook, e-mail), newest first",
)
async def deliveries(
    rt: RuntimeDep,
    order_id: uuid.UUID | None = None,
    channel: Channel | None = None,
    subscription_id: uuid.UUID | None = None,
    recipient_id: uuid.UUID | None = None,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[dict[str, Any]]:
    return await commands.list_deliveries(
        rt.uow,
        order_id=order_id,
        channel=channel,
        subscription_id=subscription_id,
        recipient_id=recipient_id,
        status=status,
        limit=limit,
    )


@router.get(
    "/deliveries/{delivery_id}",
    tags=["deliveries"],
    summary="One delivery with every attempt made (time, status code, error, duration)",
)
async def delivery(delivery_id: uuid.UUID, rt: RuntimeDep) -> dict[str, Any]:
    return await commands.get_delivery(rt.uow, delivery_id)
