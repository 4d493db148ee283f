"""Composition root of the logistics service."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from logistics_service import custody, services
from v2v_contracts import (
    CoiMismatchDetectedV1,
    ShipmentCancelledV1,
    ShipmentExcursionV1,
    ShipmentMilestoneV1,
    ShipmentPlannedV1,
)
from v2v_servicekit import ConsumerSpec, Runtime, ServiceDefinition, get_runtime, not_found

router = APIRouter(prefix="/v1")
INTERNAL_COLUMNS = {"origin_trace"}  # trace context for span links: not part of the resource


def _row(row: Any) -> dict[str, Any]:
    """A database row as JSON-ready values: temperatures (numeric) as numbers, not strings."""
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in dict(row).items()}


def _shipment(row: Any) -> dict[str, Any]:
    return {k: v for k, v in _row(row).items() if k not in INTERNAL_COLUMNS}


@router.get("/shipments", tags=["shipments"], summary="Shipments, optionally for one order")
async def shipments(
    rt: Annotated[Runtime, Depends(get_runtime)], order_id: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    rows = await rt.pool.fetch(
        "SELECT * FROM shipments WHERE ($1::uuid IS NULL OR order_id = $1) ORDER BY created_at LIMIT 500",
        order_id,
    )
    return [_shipment(r) for r in rows]


@router.get(
    "/shipments/{shipment_id}",
    tags=["shipments"],
    summary="One shipment: status, lane, temperature range and its status history",
)
async def shipment(shipment_id: uuid.UUID, rt: Annotated[Runtime, Depends(get_runtime)]) -> dict[str, Any]:
    row = await rt.pool.fetchrow("SELECT * FROM shipments WHERE shipment_id = $1", shipment_id)
    if row is None:
        raise not_found("Shipment", shipment_id)
    history = await rt.pool.fetch(
        """SELECT status_before, status_after, reason, changed_at FROM shipment_status_log
           WHERE shipment_id = $1 ORDER BY id""",
        shipment_id,
    )
    return {**_shipment(row), "status_history": [dict(h) for h in history]}


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
    return [_row(r) for r in rows]


class TemperatureIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reading_c: float = Field(ge=-273.15, le=100.0, allow_inf_nan=False, description="Reading in °C")
    measured_at: AwareDatetime
    coi: str | None = Field(
        default=None,
        description="Chain-of-identity id on the logger's shipper, when it reports one; verified",
    )


@router.post(
    "/shipments/{shipment_id}/temperature",
    status_code=201,
    tags=["courier"],
    summary="Courier API: a temperature reading; outside the shipment's range it is an excursion",
)
async def temperature(
    shipment_id: uuid.UUID, body: TemperatureIn, rt: Annotated[Runtime, Depends(get_runtime)]
) -> dict[str, Any]:
    return await custody.record_temperature(rt.uow, shipment_id, **body.model_dump())


@router.get(
    "/shipments/{shipment_id}/temperature",
    tags=["courier"],
    summary="Every temperature reading of a shipment, in measurement order",
)
async def temperature_log(
    shipment_id: uuid.UUID, rt: Annotated[Runtime, Depends(get_runtime)]
) -> list[dict[str, Any]]:
    if not await rt.pool.fetchval("SELECT 1 FROM shipments WHERE shipment_id = $1", shipment_id):
        raise not_found("Shipment", shipment_id)
    rows = await rt.pool.fetch(
        "SELECT * FROM temperature_readings WHERE shipment_id = $1 ORDER BY measured_at, id", shipment_id
    )
    return [_row(r) for r in rows]


DEFINITION = ServiceDefinition(
    name="logistics",
    schema="logistics",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    consumers=[ConsumerSpec("shipments", ["site", "order"], services.handlers)],
    publishes=[
        ShipmentPlannedV1,
        ShipmentMilestoneV1,
        ShipmentExcursionV1,
        ShipmentCancelledV1,
        CoiMismatchDetectedV1,
    ],
    description="Shipments of apheresis material and product: chain of custody, temperature, compensation.",
)
