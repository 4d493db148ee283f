"""Offers, holds and waitlist priority over HTTP (issue 11).

- `GET /v1/availability` (`orders:read`): offers for a product, market (use, regulator) and region in an
  apheresis window: per approved site its earliest predicted delivery and alternatives, each with the
  planned apheresis date (derived from the manufacturing day for fresh material) and the predicted
  release and delivery (median and p90). A centre sees them within its own quota.
- `POST /v1/holds` (`orders:write`, a treatment centre): hold one offer; answered with its `offer_id`
  and `expires_at` (`V2V_SCHEDULING_HOLD_TTL_S`). The centre passes the `offer_id` with its order
  (`order.submitted.v1`'s `offer_id`); the order then gets exactly that slot. A hold no order claims
  expires (the sweeper, every `V2V_SCHEDULING_HOLD_SWEEP_INTERVAL_S`): the day returns to the pool and
  the waitlist is served. `GET /v1/holds/{offer_id}` (`orders:read`) and
  `POST /v1/holds/{offer_id}/release` (`orders:write`): the centre's own holds only (another's: 404).
- `POST /v1/waitlist/{order_id}/priority` (`ops:write`): an explicit priority 0..9 (highest first).

POSTs carry an `Idempotency-Key` (the edge's middleware replays the stored answer).
"""

from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from scheduling_service.config import SchedulingSettings
from scheduling_service.domain.slots import Planning
from scheduling_service.service_layer import commands
from scheduling_service.service_layer.commands import Market
from v2v_contracts.errors import Invalid
from v2v_contracts.events import OrderType, Regulator
from v2v_contracts.fields import CODE_PATTERN
from v2v_servicekit import Runtime, current_runtime
from v2v_servicekit.auth import Principal, require_scope

offers_router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(current_runtime)]
Code = Annotated[str, Query(min_length=1, max_length=64, pattern=CODE_PATTERN)]
PLANNING = "planning"  # the runtime's extras key: the planning read at start-up


def planning_of(rt: Runtime) -> Planning:
    return cast(Planning, rt.extras[PLANNING])


def centre_of(principal: Principal) -> str | None:
    return principal.tenant("centre")


def own_centre(principal: Principal) -> str:
    centre = centre_of(principal)
    if centre is None:
        raise Invalid("treatment_center_id", "only a treatment centre holds offers")
    return centre


def confined(principal: Principal) -> str | None:
    """Whose holds a caller reads: a centre its own; ops and QA any (not tenant-bound)."""
    return centre_of(principal) if principal.kind == "centre" else None


@offers_router.get(
    "/availability", tags=["offers"], summary="Offers: earliest predicted delivery per site, and alternatives"
)
async def availability(
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("orders:read")],
    product_code: Code,
    order_type: Annotated[OrderType, Query()],
    regulator: Annotated[Regulator, Query()],
    region: Code,
    apheresis_from: Annotated[date, Query(ge=date(2000, 1, 1), le=date(2100, 1, 1))],
    apheresis_to: Annotated[date | None, Query(ge=date(2000, 1, 1), le=date(2100, 1, 1))] = None,
    per_site: Annotated[int, Query(ge=1, le=10)] = 3,
) -> list[dict[str, Any]]:
    return await commands.availability(
        rt.uow,
        planning_of(rt),
        Market(product_code, order_type, regulator, region),
        apheresis_from=apheresis_from,
        apheresis_to=apheresis_to,
        per_site=per_site,
        centre=centre_of(principal),
    )


class HoldIn(BaseModel):
    """One offer as availability gave it."""

    model_config = ConfigDict(extra="forbid")

    product_code: str = Field(min_length=1, max_length=64, pattern=CODE_PATTERN)
    order_type: OrderType
    regulator: Regulator
    region: str = Field(min_length=1, max_length=64, pattern=CODE_PATTERN)
    site_id: str = Field(min_length=1, max_length=64, pattern=CODE_PATTERN)
    manufacturing_start_date: date = Field(ge=date(2000, 1, 1), le=date(2100, 1, 1))
    apheresis_date: date = Field(ge=date(2000, 1, 1), le=date(2100, 1, 1))


@offers_router.post(
    "/holds", tags=["offers"], summary="Hold one offer until an order claims it", status_code=201
)
async def hold(
    rt: RuntimeDep, principal: Annotated[Principal, require_scope("orders:write")], body: HoldIn
) -> dict[str, Any]:
    settings = cast(SchedulingSettings, rt.settings)
    return await commands.hold_offer(
        rt.uow,
        planning_of(rt),
        Market(body.product_code, body.order_type, body.regulator, body.region),
        centre=own_centre(principal),
        site_id=body.site_id,
        manufacturing_start_date=body.manufacturing_start_date,
        apheresis_date=body.apheresis_date,
        ttl_s=settings.scheduling_hold_ttl_s,
    )


@offers_router.get("/holds/{offer_id}", tags=["offers"], summary="One hold (a centre: its own)")
async def get_hold(
    rt: RuntimeDep, principal: Annotated[Principal, require_scope("orders:read")], offer_id: uuid.UUID
) -> dict[str, Any]:
    return await commands.get_hold(rt.uow, offer_id, centre=confined(principal))


@offers_router.post("/holds/{offer_id}/release", tags=["offers"], summary="Give a held offer back")
async def release_hold(
    rt: RuntimeDep, principal: Annotated[Principal, require_scope("orders:write")], offer_id: uuid.UUID
) -> dict[str, Any]:
    return await commands.release_hold(rt.uow, planning_of(rt), offer_id, centre=own_centre(principal))


class PriorityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(ge=0, le=9)


@offers_router.post(
    "/waitlist/{order_id}/priority", tags=["slots"], summary="Set a waiting order's priority (highest first)"
)
async def set_priority(
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("ops:write")],
    order_id: uuid.UUID,
    body: PriorityIn,
) -> dict[str, Any]:
    return await commands.set_priority(rt.uow, planning_of(rt), order_id, body.priority)
