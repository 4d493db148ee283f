"""HTTP API: webhook subscriptions and the delivery log."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from notification_service import services
from notification_service.webhooks import record_summary
from v2v_servicekit import Runtime, get_runtime, invalid, not_found

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


@router.get("/deliveries", tags=["webhooks"], summary="The webhook delivery log, newest first")
async def deliveries(
    rt: RuntimeDep,
    order_id: uuid.UUID | None = None,
    subscription_id: uuid.UUID | None = None,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[dict[str, Any]]:
    rows = await rt.pool.fetch(
        """SELECT * FROM deliveries WHERE ($1::uuid IS NULL OR order_id = $1)
             AND ($2::uuid IS NULL OR subscription_id = $2) AND ($3::text IS NULL OR status = $3)
           ORDER BY created_at DESC LIMIT $4""",
        order_id,
        subscription_id,
        status,
        limit,
    )
    return [record_summary(r) for r in rows]
