"""The site service's HTTP API: the registry (sites, capacity, approvals, outages) and the MES (receipt,
steps, QC). Routes and request models only; the use cases are in `service_layer`."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from site_service.service_layer import commands, queries
from v2v_contracts import SiteApproval, Step
from v2v_observability import later_input, names
from v2v_servicekit import Runtime, get_runtime

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.get("/sites", tags=["sites"], summary="The manufacturing network: approvals and capacity")
async def sites(rt: RuntimeDep) -> list[dict[str, Any]]:
    return await queries.list_sites(rt.uow)


# ---- registry ---------------------------------------------------------------------------------------


class SitePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    daily_capacity: dict[str, int] | None = Field(
        default=None,
        description="Manufacturing starts per day, per product code (only the products given change)",
        examples=[{"TISA-CEL": 2}],
    )
    active: bool | None = None
    approvals: list[SiteApproval] | None = Field(
        default=None,
        description="The site's whole approval list (replaces it): regulator, use and product per entry",
        examples=[[{"regulator": "EMA", "use": "commercial", "product_code": "TISA-CEL"}]],
    )


class OutageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    start_date: date
    end_date: date = Field(description="Inclusive")
    reason: str = Field(min_length=1, max_length=200, examples=["cleanroom requalification"])


@router.get("/sites/{site_id}", tags=["sites"], summary="One site: approvals, capacity, outages")
async def site(site_id: str, rt: RuntimeDep) -> dict[str, Any]:
    return await queries.get_site(rt.uow, site_id)


@router.patch(
    "/sites/{site_id}",
    tags=["registry"],
    summary="Registry: change daily capacity per product, whether the site is active, and its approvals",
)
async def patch_site(site_id: str, body: SitePatch, rt: RuntimeDep) -> dict[str, Any]:
    return await commands.update_site(
        rt.uow, site_id, daily_capacity=body.daily_capacity, active=body.active, approvals=body.approvals
    )


@router.post(
    "/sites/{site_id}/outages",
    status_code=201,
    tags=["registry"],
    summary="Registry: declare an outage window; bookings in it must move to another site",
)
async def post_outage(site_id: str, body: OutageIn, rt: RuntimeDep) -> dict[str, Any]:
    return await commands.add_outage(rt.uow, site_id, **body.model_dump())


# ---- MES ------------------------------------------------------------------------------------------------


class ReceiptIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    order_id: uuid.UUID
    coi: str = Field(description="Chain-of-identity id read from the material's label; verified")
    accepted: bool
    reason: str | None = Field(default=None, max_length=500, description="Required when not accepted")
    received_at: AwareDatetime | None = None


class StepIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    step: Step
    completed_at: AwareDatetime | None = None
    failed: bool = False
    reason: str | None = Field(default=None, max_length=500, description="Required when failed")


class QcIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    disposition: Literal["released", "out_of_specification", "failed"]
    reason: str | None = Field(default=None, max_length=500, description="Required unless released")
    decided_at: AwareDatetime | None = None


# MES reports are later inputs: each starts its own trace, linked to the order's first trace


@router.post(
    "/sites/{site_id}/receipts",
    tags=["mes"],
    summary="MES: the order's apheresis material received (accepted) or refused at the site",
)
async def post_receipt(site_id: str, body: ReceiptIn, rt: RuntimeDep) -> dict[str, Any]:
    origin = await queries.origin_trace(rt.uow, body.order_id)
    with later_input("mes receipt", origin, **{names.SITE_ID: site_id}):
        return await commands.record_receipt(rt.uow, site_id, **body.model_dump())


@router.post(
    "/sites/{site_id}/manufacturing/{order_id}/steps",
    tags=["mes"],
    summary="MES: a manufacturing step completed (or failed) in the current run",
)
async def post_step(site_id: str, order_id: uuid.UUID, body: StepIn, rt: RuntimeDep) -> dict[str, Any]:
    origin = await queries.origin_trace(rt.uow, order_id)
    with later_input("mes step", origin, **{names.STEP: body.step}):
        return await commands.record_step(rt.uow, site_id, order_id, **body.model_dump())


@router.post(
    "/sites/{site_id}/manufacturing/{order_id}/qc",
    tags=["mes"],
    summary="MES: QC disposition of the current run (released, out of specification, failed)",
)
async def post_qc(site_id: str, order_id: uuid.UUID, body: QcIn, rt: RuntimeDep) -> dict[str, Any]:
    origin = await queries.origin_trace(rt.uow, order_id)
    with later_input("mes qc", origin, **{names.DISPOSITION: body.disposition}):
        return await commands.record_qc(rt.uow, site_id, order_id, **body.model_dump())


@router.get(
    "/sites/{site_id}/manufacturing/{order_id}",
    tags=["mes"],
    summary="The order's manufacture at the site: state, run, step history",
)
async def manufacturing(site_id: str, order_id: uuid.UUID, rt: RuntimeDep) -> dict[str, Any]:
    return await queries.get_manufacturing(rt.uow, site_id, order_id)
