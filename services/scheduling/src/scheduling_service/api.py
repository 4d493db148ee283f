"""Read-only HTTP view of scheduling: slots per order and capacity in use."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from v2v_servicekit import Runtime, get_runtime

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.get("/slots", tags=["slots"], summary="Slots, optionally for one order")
async def slots(rt: RuntimeDep, order_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
    rows = await rt.pool.fetch(
        "SELECT * FROM slots WHERE ($1::uuid IS NULL OR order_id = $1) ORDER BY created_at LIMIT 500",
        order_id,
    )
    return [dict(r) for r in rows]


@router.get("/waitlist", tags=["slots"], summary="Orders waiting for capacity, in booking order")
async def waitlist(rt: RuntimeDep) -> list[dict[str, Any]]:
    rows = await rt.pool.fetch(
        "SELECT order_id, reason, enqueued_at FROM waitlist ORDER BY enqueued_at, order_id"
    )
    return [dict(r) for r in rows]
