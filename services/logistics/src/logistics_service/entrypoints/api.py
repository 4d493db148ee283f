"""The logistics HTTP API: shipments, and the courier API (milestones, temperature readings).

Every route declares its scope: reads `shipments:read`, courier reports `shipments:report`. The tenant
comes from the token, never from the body: a carrier sees and reports on the shipments it carries (another
carrier's answers 404, like one that does not exist); a centre or a site holding a shipments scope sees
the legs that start or end there; QA and ops see every shipment.

Requests carry no free text: where, who and from whom are opaque references (`Code`), times are reported
times ([now - 30 days, now + 5 min]), temperatures finite and within physical bounds, lists are pages.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from logistics_service.domain.carriers import Tenant
from logistics_service.domain.shipment import Shipment
from logistics_service.service_layer import commands, queries
from v2v_contracts.errors import Forbidden
from v2v_contracts.fields import LOT_PATTERN, Code, CoiRef, Finite, ReportedAt
from v2v_contracts.scopes import KINDS, TENANT_KINDS
from v2v_servicekit import Runtime, current_runtime
from v2v_servicekit.auth import Principal, require_scope
from v2v_servicekit.idempotency import idempotent

router = APIRouter(prefix="/v1")

READ = "shipments:read"
REPORT = "shipments:report"

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
    "carrier_id",
    "product_code",
    "excursion_tolerance_min",
    "picked_up_at",
    "delivered_at",
    "excursion_minutes",
    "din",
    "lot",
)

# physical bounds of a reported temperature (°C): absolute zero .. well above any shipper's range
MIN_READING_C = -273.15
MAX_READING_C = 100.0


def _shipment(ship: Shipment) -> dict[str, Any]:
    return {name: getattr(ship, name) for name in SHIPMENT_FIELDS}


def tenant_of(principal: Principal, scope: str) -> Tenant | None:
    """Whose shipments the caller may see: its own (carrier), its legs (centre, site), or all (QA, ops,
    admin). A kind the platform does not know is refused."""
    if principal.kind == "carrier":
        return Tenant(carrier_id=principal.tenant("carrier"))
    if principal.kind in TENANT_KINDS:
        return Tenant(location_id=principal.tenant(principal.kind))
    if principal.kind in KINDS:
        return None
    raise Forbidden(scope)


Rt = Annotated[Runtime, Depends(current_runtime)]
Limit = Annotated[int, Query(ge=1, le=queries.MAX_PAGE, description="Page size (at most 200)")]
Offset = Annotated[int, Query(ge=0, le=queries.MAX_OFFSET, description="Rows to skip (at most 10000)")]


@router.get(
    "/shipments", tags=["shipments"], summary="Shipments the caller may see, optionally for one order"
)
async def shipments(
    rt: Rt,
    order_id: uuid.UUID | None = None,
    limit: Limit = queries.DEFAULT_PAGE,
    offset: Offset = 0,
    principal: Principal = require_scope(READ),
) -> list[dict[str, Any]]:
    found = await queries.shipments(
        rt.uow, order_id, tenant=tenant_of(principal, READ), limit=limit, offset=offset
    )
    return [_shipment(s) for s in found]


@router.get(
    "/shipments/{shipment_id}",
    tags=["shipments"],
    summary="One shipment: status, lane, temperature range, carrier and its status history",
)
async def shipment(
    shipment_id: uuid.UUID, rt: Rt, principal: Principal = require_scope(READ)
) -> dict[str, Any]:
    ship, history = await queries.shipment(rt.uow, shipment_id, tenant=tenant_of(principal, READ))
    return {**_shipment(ship), "status_history": [dataclasses.asdict(h) for h in history]}


OptionalReading = Annotated[Finite, Field(ge=MIN_READING_C, le=MAX_READING_C)]
# a run's lot as the site labels it: `v2v_contracts.fields.LOT_RE`, the site's shape
LotRef = Annotated[str, StringConstraints(pattern=LOT_PATTERN)]


class MilestoneIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    milestone: Literal["booked", "picked_up", "in_transit", "delivered"]
    occurred_at: ReportedAt = Field(description="When it happened: within the last 30 days, not ahead")
    location: Code = Field(description="Where: site, centre, hub or airport code (opaque reference)")
    handled_by: Code = Field(description="Opaque courier or staff reference, never a name")
    received_from: Code | None = Field(default=None, description="Opaque reference of the previous holder")
    coi: CoiRef = Field(description="Chain-of-identity id read from the shipper's label; verified")
    din: CoiRef | None = Field(
        default=None,
        description="Inbound leg: the collection's DIN read from the bag's label; required (and verified) "
        "once the shipment's DIN is known",
    )
    lot: LotRef | None = Field(
        default=None,
        description="Outbound leg: the run's lot read from the label; required (and verified) once the "
        "shipment's lot is known",
    )
    temperature_c: OptionalReading | None = Field(
        default=None, description="Logger reading in °C, if any (not with `booked`: before pickup)"
    )


@router.post(
    "/shipments/{shipment_id}/milestones",
    dependencies=[idempotent()],
    status_code=201,
    tags=["courier"],
    summary="Courier API: a custody milestone (booked, picked up, in transit, delivered)",
)
async def milestone(
    shipment_id: uuid.UUID, body: MilestoneIn, rt: Rt, principal: Principal = require_scope(REPORT)
) -> dict[str, Any]:
    return dict(
        await commands.record_milestone(
            rt.uow, shipment_id, tenant=tenant_of(principal, REPORT), **body.model_dump()
        )
    )


@router.get("/shipments/{shipment_id}/custody", tags=["courier"], summary="Chain of custody of a shipment")
async def custody_log(
    shipment_id: uuid.UUID,
    rt: Rt,
    limit: Limit = queries.MAX_PAGE,
    offset: Offset = 0,
    principal: Principal = require_scope(READ),
) -> list[dict[str, Any]]:
    found = await queries.custody_log(
        rt.uow, shipment_id, tenant=tenant_of(principal, READ), limit=limit, offset=offset
    )
    return [dataclasses.asdict(e) for e in found]


class TemperatureIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reading_c: Finite = Field(ge=MIN_READING_C, le=MAX_READING_C, description="Reading in °C")
    measured_at: ReportedAt = Field(description="When it was measured: within the last 30 days, not ahead")
    coi: CoiRef | None = Field(
        default=None,
        description="Chain-of-identity id on the logger's shipper, when it reports one; verified",
    )
    logger_download: bool = Field(
        default=False,
        description="false: a live reading, accepted in transit (after pickup, before delivery); true: "
        "the logger's data read after delivery, measured between pickup and delivery",
    )


@router.post(
    "/shipments/{shipment_id}/temperature",
    dependencies=[idempotent()],
    status_code=201,
    tags=["courier"],
    summary="Courier API: a temperature reading; the product's excursion rule (limit and time outside "
    "it) decides whether it is an excursion",
)
async def temperature(
    shipment_id: uuid.UUID, body: TemperatureIn, rt: Rt, principal: Principal = require_scope(REPORT)
) -> dict[str, Any]:
    reading = body.model_dump(exclude={"logger_download"})
    return dict(
        await commands.record_temperature(
            rt.uow,
            shipment_id,
            tenant=tenant_of(principal, REPORT),
            source="logger_download" if body.logger_download else "courier",
            **reading,
        )
    )


@router.get(
    "/shipments/{shipment_id}/temperature",
    tags=["courier"],
    summary="The temperature readings of a shipment, in measurement order",
)
async def temperature_log(
    shipment_id: uuid.UUID,
    rt: Rt,
    limit: Limit = queries.MAX_PAGE,
    offset: Offset = 0,
    principal: Principal = require_scope(READ),
) -> list[dict[str, Any]]:
    found = await queries.temperature_log(
        rt.uow, shipment_id, tenant=tenant_of(principal, READ), limit=limit, offset=offset
    )
    return [dataclasses.asdict(r) for r in found]
