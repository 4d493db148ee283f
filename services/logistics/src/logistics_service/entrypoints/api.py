"""The logistics HTTP API: shipments, and the courier API (milestones, temperature readings)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from logistics_service.domain.shipment import Shipment
from logistics_service.service_layer import commands, queries
from v2v_servicekit import Runtime, get_runtime

router = APIRouter(prefix="/v1")

# the resource fields of a shipment, in the table's column order (origin_trace, the trace context kept
# for span links, is not part of the resource)
SHIPMENT_FIELDS = (
    "shipment_id",
    "order_id",
    "coi",
    "leg",
    "origin",
    "destination",
    "material_condition",
    "min_temp_c",
    "max_temp_c",
    "planned_pickup_date",
    "status",
    "created_at",
    "booking_id",
    "run",
    "ready_for_pickup_at",
    "excursion_at",
    "held_from_status",
    "quarantine_decision",
    "status_reason",
    "updated_at",
)


def _shipment(ship: Shipment) -> dict[str, Any]:
    return {name: getattr(ship, name) for name in SHIPMENT_FIELDS}


Rt = Annotated[Runtime, Depends(get_runtime)]


@router.get("/shipments", tags=["shipments"], summary="Shipments, optionally for one order")
async def shipments(rt: Rt, order_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
    return [_shipment(s) for s in await queries.shipments(rt.uow, order_id)]


@router.get(
    "/shipments/{shipment_id}",
    tags=["shipments"],
    summary="One shipment: status, lane, temperature range and its status history",
)
async def shipment(shipment_id: uuid.UUID, rt: Rt) -> dict[str, Any]:
    ship, history = await queries.shipment(rt.uow, shipment_id)
    return {**_shipment(ship), "status_history": [dataclasses.asdict(h) for h in history]}


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
async def milestone(shipment_id: uuid.UUID, body: MilestoneIn, rt: Rt) -> dict[str, Any]:
    return dict(await commands.record_milestone(rt.uow, shipment_id, **body.model_dump()))


@router.get("/shipments/{shipment_id}/custody", tags=["courier"], summary="Chain of custody of a shipment")
async def custody_log(shipment_id: uuid.UUID, rt: Rt) -> list[dict[str, Any]]:
    return [dataclasses.asdict(e) for e in await queries.custody_log(rt.uow, shipment_id)]


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
async def temperature(shipment_id: uuid.UUID, body: TemperatureIn, rt: Rt) -> dict[str, Any]:
    return dict(await commands.record_temperature(rt.uow, shipment_id, **body.model_dump()))


@router.get(
    "/shipments/{shipment_id}/temperature",
    tags=["courier"],
    summary="Every temperature reading of a shipment, in measurement order",
)
async def temperature_log(shipment_id: uuid.UUID, rt: Rt) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) for r in await queries.temperature_log(rt.uow, shipment_id)]
