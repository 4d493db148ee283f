"""Read-only HTTP view of scheduling: slots (filtered) and the waitlist with what each order waits for."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

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
    rows = await rt.pool.fetch(
        """SELECT * FROM slots
           WHERE ($1::uuid IS NULL OR order_id = $1)
             AND ($2::text[] IS NULL OR status = ANY($2::text[]))
             AND ($3::text IS NULL OR product_code = $3)
             AND ($4::text IS NULL OR site_id = $4)
           ORDER BY created_at, slot_id LIMIT $5""",
        order_id,
        status,
        product_code,
        site_id,
        limit,
    )
    return [dict(r) for r in rows]


@router.get("/waitlist", tags=["slots"], summary="Orders waiting for capacity, in booking order")
async def waitlist(rt: RuntimeDep) -> list[dict[str, Any]]:
    rows = await rt.pool.fetch(
        """SELECT order_id, product_code,
                  COALESCE(request ->> 'apheresis_date', request ->> 'requested_apheresis_date')::date
                      AS apheresis_date,
                  reason, request_type, exclude_site_id, rebook_kind, enqueued_at
           FROM waitlist ORDER BY enqueued_at, order_id"""
    )
    return [dict(r) for r in rows]
