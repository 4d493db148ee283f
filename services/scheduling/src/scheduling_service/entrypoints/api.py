"""Read-only HTTP view of scheduling: slots (filtered) and the waitlist with what each order waits for."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from scheduling_service.service_layer import commands
from v2v_servicekit import Runtime, get_runtime

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SlotStatus = Literal["held", "confirmed", "released", "consumed"]


@router.get("/slots", tags=["slots"], summary="Slots, optionally filtered (order, status, product, site)")
async def slots(
    rt: RuntimeDep,
    order_id: uuid.UUID | None = None,
    status: Annotated[list[SlotStatus] | None, Query()] = None,
    product_code: str | None = None,
    site_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> list[dict[str, Any]]:
    return await commands.list_slots(
        rt.uow,
        order_id=order_id,
        statuses=list(status) if status is not None else None,
        product_code=product_code,
        site_id=site_id,
        limit=limit,
    )


@router.get("/waitlist", tags=["slots"], summary="Orders waiting for capacity, in booking order")
async def waitlist(rt: RuntimeDep) -> list[dict[str, Any]]:
    return await commands.list_waitlist(rt.uow)
