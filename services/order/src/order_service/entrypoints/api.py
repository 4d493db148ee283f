"""HTTP API for treatment centres (hospital systems)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from order_service.config import OrderSettings
from order_service.domain.records import OrderRecord, TimelineEntry
from order_service.service_layer import commands, queries
from v2v_servicekit import Runtime, get_runtime

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


class OrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    treatment_center_id: str = Field(min_length=1, max_length=64, examples=["TC-DE-BE-001"])
    product_code: str = Field(min_length=1, max_length=32, examples=["TISA-CEL"])
    order_type: Literal["commercial", "clinical"]
    patient_ref: str = Field(
        min_length=1,
        max_length=64,
        description="The centre's own pseudonymous patient reference. Stays in the order service.",
    )
    requested_apheresis_date: date


class TimelineOut(BaseModel):
    event_id: uuid.UUID
    type: str
    source: str
    time: datetime
    status: str | None
    reason: str


class Slot(BaseModel):
    slot_id: uuid.UUID | None
    site_id: str | None
    apheresis_date: date | None
    manufacturing_start_date: date | None


class Predicted(BaseModel):
    apheresis: date | None
    manufacturing_start: date | None
    release: date | None
    delivery: date | None
    earliest_infusion: date | None


class OrderOut(BaseModel):
    order_id: uuid.UUID
    coi: str
    status: str
    treatment_center_id: str
    product_code: str
    order_type: str
    patient_ref: str
    requested_apheresis_date: date
    site_id: str | None
    slot: Slot | None
    run: int = 1
    recollections: int = 0
    lymphodepletion_at: datetime | None = None
    ended_reason: str | None = None
    predicted: Predicted | None = None
    created_at: datetime
    updated_at: datetime
    timeline: list[TimelineOut] | None = None


class OrderPage(BaseModel):
    items: list[OrderOut]
    total: int
    limit: int
    offset: int
    next_offset: int | None


def _order_out(
    row: OrderRecord,
    timeline: list[TimelineEntry] | None = None,
    predicted: dict[str, date | None] | None = None,
) -> OrderOut:
    slot = None
    if row.slot_id is not None:
        slot = Slot(
            slot_id=row.slot_id,
            site_id=row.site_id,
            apheresis_date=row.apheresis_date,
            manufacturing_start_date=row.manufacturing_start_date,
        )
    return OrderOut(
        order_id=row.order_id,
        coi=row.coi,
        status=row.status,
        treatment_center_id=row.treatment_center_id,
        product_code=row.product_code,
        order_type=row.order_type,
        patient_ref=row.patient_ref,
        requested_apheresis_date=row.requested_apheresis_date,
        site_id=row.site_id,
        slot=slot,
        run=row.run,
        recollections=row.recollections,
        lymphodepletion_at=row.lymphodepletion_at,
        ended_reason=row.ended_reason,
        predicted=Predicted(**predicted) if predicted is not None else None,
        created_at=row.created_at,
        updated_at=row.updated_at,
        timeline=None
        if timeline is None
        else [
            TimelineOut(
                event_id=t.event_id,
                type=t.event_type,
                source=t.source,
                time=t.occurred_at,
                status=t.status_after,
                reason=t.reason,
            )
            for t in timeline
        ],
    )


async def _view(rt: Runtime, order_id: uuid.UUID) -> OrderOut:
    view = await queries.order_view(rt.uow, order_id)
    return _order_out(view.order, view.timeline, view.predicted)


def _settings(rt: Runtime) -> OrderSettings:
    settings = rt.settings
    assert isinstance(settings, OrderSettings), "the order service runs with OrderSettings"
    return settings


@router.post(
    "/orders",
    status_code=201,
    response_model=OrderOut,
    tags=["orders"],
    summary="Place an order for a patient",
    responses={
        422: {
            "description": "Invalid request (problem+json naming the field), or no manufacturing site is "
            "approved to make the product for the order's use in the centre's market"
        },
        503: {"description": "The network of manufacturing sites is not known yet: retry shortly"},
    },
)
async def create_order(body: OrderIn, rt: RuntimeDep, response: Response) -> OrderOut:
    facility = _settings(rt).coi_facility_id
    order_id = await commands.place_order(rt.uow, commands.PlaceOrder(**body.model_dump()), facility)
    response.headers["Location"] = f"/v1/orders/{order_id}"
    return await _view(rt, order_id)


@router.get(
    "/orders/{order_id}",
    response_model=OrderOut,
    tags=["orders"],
    summary="One order with its status, slot and timeline",
)
async def get_order(order_id: uuid.UUID, rt: RuntimeDep) -> OrderOut:
    return await _view(rt, order_id)


@router.get("/orders", response_model=OrderPage, tags=["orders"], summary="List orders (paginated)")
async def list_orders(
    rt: RuntimeDep,
    treatment_center_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> OrderPage:
    rows, total = await queries.list_orders(rt.uow, centre=treatment_center_id, limit=limit, offset=offset)
    nxt = offset + len(rows)
    return OrderPage(
        items=[_order_out(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=nxt if nxt < total else None,
    )


@router.get("/treatment-centers", tags=["catalogue"], summary="Certified treatment centres")
async def treatment_centers(rt: RuntimeDep) -> list[dict[str, Any]]:
    return [dataclasses.asdict(c) for c in await queries.treatment_centres(rt.uow)]


@router.get("/products", tags=["catalogue"], summary="Products that may be ordered")
async def products(rt: RuntimeDep) -> list[dict[str, Any]]:
    return await queries.products(rt.uow)


# ---- hospital and QA actions (docs/lifecycle.md) -----------------------------------------------------


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reason: str = Field(min_length=1, max_length=500)


class RescheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    requested_apheresis_date: date
    reason: str = Field(min_length=1, max_length=500)


class IdentityCheckedIn(BaseModel):
    """A step where the centre checks the chain of identity on the label (ISO 7064 check character)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    coi: str = Field(min_length=1, max_length=20)
    at: AwareDatetime | None = Field(default=None, description="When it happened (default: now)")


class LymphodepletionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: AwareDatetime | None = None


class QuarantineDecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    decision: Literal["release", "reject"]
    reason: str = Field(min_length=1, max_length=500)


ACTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown order"},
    409: {"description": "Not allowed in the order's current state, or chain-of-identity mismatch"},
    422: {"description": "Invalid request (problem+json naming the field)"},
}


@router.post(
    "/orders/{order_id}/cancel",
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Cancel the order at any step before it ends",
    responses=ACTION_RESPONSES,
)
async def cancel_order(order_id: uuid.UUID, body: CancelIn, rt: RuntimeDep) -> OrderOut:
    await commands.act(rt.uow, order_id, commands.Action("cancel", reason=body.reason))
    return await _view(rt, order_id)


@router.post(
    "/orders/{order_id}/apheresis-date",
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Move the apheresis date: releases the slot and books a new one",
    responses=ACTION_RESPONSES,
)
async def move_apheresis(order_id: uuid.UUID, body: RescheduleIn, rt: RuntimeDep) -> OrderOut:
    await commands.act(
        rt.uow,
        order_id,
        commands.Action("reschedule", reason=body.reason, new_date=body.requested_apheresis_date),
    )
    return await _view(rt, order_id)


@router.post(
    "/orders/{order_id}/apheresis",
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Apheresis done: the cells are ready for pickup",
    responses=ACTION_RESPONSES,
)
async def apheresis_done(order_id: uuid.UUID, body: IdentityCheckedIn, rt: RuntimeDep) -> OrderOut:
    await commands.act(rt.uow, order_id, commands.Action("apheresis", coi=body.coi, at=body.at))
    return await _view(rt, order_id)


@router.post(
    "/orders/{order_id}/lymphodepletion",
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Lymphodepleting chemotherapy started (only after product release)",
    responses=ACTION_RESPONSES,
)
async def lymphodepletion(order_id: uuid.UUID, body: LymphodepletionIn, rt: RuntimeDep) -> OrderOut:
    await commands.act(rt.uow, order_id, commands.Action("lymphodepletion", at=body.at))
    return await _view(rt, order_id)


@router.post(
    "/orders/{order_id}/product-receipt",
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="The product arrived at the centre; identity checked",
    responses=ACTION_RESPONSES,
)
async def product_receipt(order_id: uuid.UUID, body: IdentityCheckedIn, rt: RuntimeDep) -> OrderOut:
    await commands.act(rt.uow, order_id, commands.Action("receipt", coi=body.coi, at=body.at))
    return await _view(rt, order_id)


@router.post(
    "/orders/{order_id}/infusion",
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="The patient was infused (bedside identity check): the order completes",
    responses=ACTION_RESPONSES,
)
async def infusion(order_id: uuid.UUID, body: IdentityCheckedIn, rt: RuntimeDep) -> OrderOut:
    await commands.act(rt.uow, order_id, commands.Action("infusion", coi=body.coi, at=body.at))
    return await _view(rt, order_id)


@router.post(
    "/orders/{order_id}/quarantine-decision",
    response_model=OrderOut,
    tags=["QA actions"],
    summary="Release or reject a product quarantined after a shipping excursion",
    responses=ACTION_RESPONSES,
)
async def quarantine_decision(order_id: uuid.UUID, body: QuarantineDecisionIn, rt: RuntimeDep) -> OrderOut:
    await commands.act(
        rt.uow, order_id, commands.Action("quarantine", decision=body.decision, reason=body.reason)
    )
    return await _view(rt, order_id)
