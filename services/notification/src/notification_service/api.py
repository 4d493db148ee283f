"""HTTP API: webhook subscriptions, e-mail recipients and the delivery log of both channels."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import asyncpg
from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from notification_service import services
from v2v_servicekit import Problem, Runtime, get_runtime, invalid, not_found

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


def _out(row: Any) -> SubscriptionOut:
    return SubscriptionOut(
        subscription_id=row["subscription_id"],
        treatment_center_id=row["treatment_center_id"],
        url=row["url"],
        event_types=row["event_types"],
        active=row["active"],
        created_at=row["created_at"],
    )


@router.post(
    "/subscriptions",
    status_code=201,
    response_model=SubscriptionOut,
    tags=["webhooks"],
    summary="Subscribe a treatment centre's endpoint to order events (Standard Webhooks)",
)
async def subscribe(body: SubscriptionIn, rt: RuntimeDep, response: Response) -> SubscriptionOut:
    parts = urlsplit(body.url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise invalid("url", "must be an absolute http(s) URL")
    services.validate_secret(body.secret)
    services.validate_event_types(body.event_types)
    row = await rt.pool.fetchrow(
        """INSERT INTO subscriptions (subscription_id, treatment_center_id, url, secret, event_types)
           VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        uuid.uuid4(),
        body.treatment_center_id,
        body.url,
        body.secret,
        body.event_types,
    )
    response.headers["Location"] = f"/v1/subscriptions/{row['subscription_id']}"
    return _out(row)


@router.get("/subscriptions", response_model=list[SubscriptionOut], tags=["webhooks"])
async def list_subscriptions(rt: RuntimeDep, treatment_center_id: str | None = None) -> list[SubscriptionOut]:
    rows = await rt.pool.fetch(
        """SELECT * FROM subscriptions WHERE ($1::text IS NULL OR treatment_center_id = $1)
           ORDER BY created_at""",
        treatment_center_id,
    )
    return [_out(r) for r in rows]


@router.get("/subscriptions/{subscription_id}", response_model=SubscriptionOut, tags=["webhooks"])
async def get_subscription(subscription_id: uuid.UUID, rt: RuntimeDep) -> SubscriptionOut:
    row = await rt.pool.fetchrow("SELECT * FROM subscriptions WHERE subscription_id = $1", subscription_id)
    if row is None:
        raise not_found("Subscription", subscription_id)
    return _out(row)


@router.get("/event-types", tags=["webhooks"], summary="Event types a subscription may filter on")
async def event_types() -> list[str]:
    return services.ORDER_EVENT_TYPES


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


def _recipient(row: Any) -> EmailRecipientOut:
    return EmailRecipientOut(
        recipient_id=row["recipient_id"],
        treatment_center_id=row["treatment_center_id"],
        email=row["email"],
        event_types=row["event_types"],
        created_at=row["created_at"],
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
    services.validate_email(body.email)
    services.validate_exception_types(body.event_types)
    try:
        row = await rt.pool.fetchrow(
            """INSERT INTO email_recipients (recipient_id, treatment_center_id, email, event_types)
               VALUES ($1, $2, $3, $4) RETURNING *""",
            uuid.uuid4(),
            body.treatment_center_id,
            body.email,
            body.event_types,
        )
    except asyncpg.UniqueViolationError:
        raise Problem(
            409,
            "Already a recipient",
            f"email: {body.email} already receives the alerts of {body.treatment_center_id}",
            kind="conflict",
            errors=[{"field": "email", "reason": "already a recipient for this treatment centre"}],
        ) from None
    response.headers["Location"] = f"/v1/email-recipients/{row['recipient_id']}"
    return _recipient(row)


@router.get("/email-recipients", response_model=list[EmailRecipientOut], tags=["e-mail"])
async def list_email_recipients(
    rt: RuntimeDep, treatment_center_id: str | None = None
) -> list[EmailRecipientOut]:
    rows = await rt.pool.fetch(
        """SELECT * FROM email_recipients WHERE active AND ($1::text IS NULL OR treatment_center_id = $1)
           ORDER BY created_at""",
        treatment_center_id,
    )
    return [_recipient(r) for r in rows]


@router.get("/email-recipients/{recipient_id}", response_model=EmailRecipientOut, tags=["e-mail"])
async def get_email_recipient(recipient_id: uuid.UUID, rt: RuntimeDep) -> EmailRecipientOut:
    row = await rt.pool.fetchrow(
        "SELECT * FROM email_recipients WHERE recipient_id = $1 AND active", recipient_id
    )
    if row is None:
        raise not_found("E-mail recipient", recipient_id)
    return _recipient(row)


@router.delete(
    "/email-recipients/{recipient_id}",
    status_code=204,
    tags=["e-mail"],
    summary="Remove a recipient; its alerts not yet sent are cancelled",
)
async def remove_email_recipient(recipient_id: uuid.UUID, rt: RuntimeDep) -> Response:
    async with rt.uow.begin() as tx:
        removed = await tx.conn.fetchval(
            """UPDATE email_recipients SET active = false, removed_at = now()
               WHERE recipient_id = $1 AND active RETURNING true""",
            recipient_id,
        )
        if not removed:
            raise not_found("E-mail recipient", recipient_id)
        await tx.conn.execute(
            """UPDATE email_deliveries SET status = 'cancelled', lease_until = NULL,
                      last_error = coalesce(last_error, 'recipient removed')
               WHERE recipient_id = $1 AND status = 'pending'""",
            recipient_id,
        )
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
    rows = await rt.pool.fetch(
        """SELECT * FROM delivery_log WHERE ($1::uuid IS NULL OR order_id = $1)
             AND ($2::text IS NULL OR channel = $2) AND ($3::uuid IS NULL OR subscription_id = $3)
             AND ($4::uuid IS NULL OR recipient_id = $4) AND ($5::text IS NULL OR status = $5)
           ORDER BY created_at DESC LIMIT $6""",
        order_id,
        channel,
        subscription_id,
        recipient_id,
        status,
        limit,
    )
    return [dict(r) for r in rows]


@router.get(
    "/deliveries/{delivery_id}",
    tags=["deliveries"],
    summary="One delivery with every attempt made (time, status code, error, duration)",
)
async def delivery(delivery_id: uuid.UUID, rt: RuntimeDep) -> dict[str, Any]:
    row = await rt.pool.fetchrow("SELECT * FROM delivery_log WHERE delivery_id = $1", delivery_id)
    if row is None:
        raise not_found("Delivery", delivery_id)
    attempts = await rt.pool.fetch(
        """SELECT attempt, attempted_at, status_code, error, duration_ms FROM delivery_attempt_log
           WHERE delivery_id = $1 AND channel = $2 ORDER BY attempt""",
        delivery_id,
        row["channel"],
    )
    return {**dict(row), "attempt_log": [dict(a) for a in attempts]}
