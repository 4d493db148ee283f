"""Composition root of the logistics service."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from logistics_service import services
from v2v_contracts import ShipmentPlannedV1
from v2v_servicekit import ConsumerSpec, Runtime, ServiceDefinition, get_runtime

router = APIRouter(prefix="/v1")


@router.get("/shipments", tags=["shipments"], summary="Shipments, optionally for one order")
async def shipments(
    rt: Annotated[Runtime, Depends(get_runtime)], order_id: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    rows = await rt.pool.fetch(
        "SELECT * FROM shipments WHERE ($1::uuid IS NULL OR order_id = $1) ORDER BY created_at LIMIT 500",
        order_id,
    )
    return [dict(r) for r in rows]


DEFINITION = ServiceDefinition(
    name="logistics",
    schema="logistics",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    consumers=[ConsumerSpec("shipments", ["site"], services.handlers)],
    publishes=[ShipmentPlannedV1],
    description="Shipments of apheresis material and product, chain of custody.",
)
