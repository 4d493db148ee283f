"""Composition root of the logistics service."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from logistics_service import custody, services
from v2v_contracts import ShipmentMilestoneV1, ShipmentPlannedV1
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


class MilestoneIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    milestone: Literal["booked", "picked_up", "in_transit", "delivered"]
    occurred_at: AwareDatetime
    location: str = Field(min_length=1, max_length=200, description="Where: site, hub or airport code")
    handled_by: str = Field(min_length=1, max_length=100, description="Opaque courier or staff reference")
    received_from: str | None = Field(default=None, max_length=100)
    coi: str = Field(description="Chain-of-identity id read from the shipper's label; verified")
    temperature_c: float | None = None


@router.post(
    "/shipments/{shipment_id}/milestones",
    status_code=201,
    tags=["courier"],
    summary="Courier API: a custody milestone (booked, picked up, in transit, delivered)",
)
async def milestone(
    shipment_id: uuid.UUID, body: MilestoneIn, rt: Annotated[Runtime, Depends(get_runtime)]
) -> dict[str, Any]:
    return await custody.record_milestone(rt.uow, shipment_id, **body.model_dump())


@router.get("/shipments/{shipment_id}/custody", tags=["courier"], summary="Chain of custody of a shipment")
async def custody_log(
    shipment_id: uuid.UUID, rt: Annotated[Runtime, Depends(get_runtime)]
) -> list[dict[str, Any]]:
    rows = await rt.pool.fetch(
        "SELECT * FROM custody_events WHERE shipment_id = $1 ORDER BY occurred_at, id", shipment_id
    )
    return [dict(r) for r in rows]


DEFINITION = ServiceDefinition(
    name="logistics",
    schema="logistics",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    consumers=[ConsumerSpec("shipments", ["site"], services.handlers)],
    publishes=[ShipmentPlannedV1, ShipmentMilestoneV1],
    description="Shipments of apheresis material and product, chain of custody.",
)
