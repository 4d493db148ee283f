"""Composition root of the site service."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from site_service import mes, registry, services
from v2v_contracts import (
    BookingAffectedV1,
    BookingCancelledV1,
    BookingConfirmedV1,
    ManufacturingFailedV1,
    ManufacturingStepCompletedV1,
    ManufacturingStoppedV1,
    MaterialReceivedV1,
    MaterialRejectedV1,
    ProductOutOfSpecificationV1,
    ProductReleasedV1,
    SiteApproval,
    SiteRegisteredV1,
    Step,
)
from v2v_observability import later_input
from v2v_servicekit import ConsumerSpec, Runtime, ServiceDefinition, get_runtime

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@router.get("/sites", tags=["sites"], summary="The manufacturing network: approvals and capacity")
async def sites(rt: RuntimeDep) -> list[dict[str, Any]]:
    return await services.list_sites(rt.pool)


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
    return await registry.get_site(rt.pool, site_id)


@router.patch(
    "/sites/{site_id}",
    tags=["registry"],
    summary="Registry: change daily capacity per product, whether the site is active, and its approvals",
)
async def patch_site(site_id: str, body: SitePatch, rt: RuntimeDep) -> dict[str, Any]:
    return await registry.update_site(
        rt.uow, site_id, daily_capacity=body.daily_capacity, active=body.active, approvals=body.approvals
    )


@router.post(
    "/sites/{site_id}/outages",
    status_code=201,
    tags=["registry"],
    summary="Registry: declare an outage window; bookings in it must move to another site",
)
async def post_outage(site_id: str, body: OutageIn, rt: RuntimeDep) -> dict[str, Any]:
    return await registry.add_outage(rt.uow, site_id, **body.model_dump())


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


async def _origin(rt: Runtime, order_id: uuid.UUID) -> Any:
    """The order's first trace, as remembered with its latest booking (MES reports link to it)."""
    return await rt.pool.fetchval(
        "SELECT origin_trace FROM bookings WHERE order_id = $1 ORDER BY created_at DESC LIMIT 1", order_id
    )


@router.post(
    "/sites/{site_id}/receipts",
    tags=["mes"],
    summary="MES: the order's apheresis material received (accepted) or refused at the site",
)
async def post_receipt(site_id: str, body: ReceiptIn, rt: RuntimeDep) -> dict[str, Any]:
    with later_input("mes receipt", await _origin(rt, body.order_id), **{"v2v.site_id": site_id}):
        return await mes.record_receipt(rt.uow, site_id, **body.model_dump())


@router.post(
    "/sites/{site_id}/manufacturing/{order_id}/steps",
    tags=["mes"],
    summary="MES: a manufacturing step completed (or failed) in the current run",
)
async def post_step(site_id: str, order_id: uuid.UUID, body: StepIn, rt: RuntimeDep) -> dict[str, Any]:
    with later_input("mes step", await _origin(rt, order_id), **{"v2v.step": body.step}):
        return await mes.record_step(rt.uow, site_id, order_id, **body.model_dump())


@router.post(
    "/sites/{site_id}/manufacturing/{order_id}/qc",
    tags=["mes"],
    summary="MES: QC disposition of the current run (released, out of specification, failed)",
)
async def post_qc(site_id: str, order_id: uuid.UUID, body: QcIn, rt: RuntimeDep) -> dict[str, Any]:
    with later_input("mes qc", await _origin(rt, order_id), **{"v2v.disposition": body.disposition}):
        return await mes.record_qc(rt.uow, site_id, order_id, **body.model_dump())


@router.get(
    "/sites/{site_id}/manufacturing/{order_id}",
    tags=["mes"],
    summary="The order's manufacture at the site: state, run, step history",
)
async def manufacturing(site_id: str, order_id: uuid.UUID, rt: RuntimeDep) -> dict[str, Any]:
    return await mes.get_manufacturing(rt.pool, site_id, order_id)


async def _seed(rt: Runtime) -> None:
    await services.load_seed(rt.uow)


DEFINITION = ServiceDefinition(
    name="site",
    schema="site",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    consumers=[ConsumerSpec("bookings", ["scheduling", "order"], services.handlers)],
    publishes=[
        SiteRegisteredV1,
        BookingConfirmedV1,
        BookingCancelledV1,
        BookingAffectedV1,
        MaterialReceivedV1,
        MaterialRejectedV1,
        ManufacturingStepCompletedV1,
        ProductReleasedV1,
        ProductOutOfSpecificationV1,
        ManufacturingFailedV1,
        ManufacturingStoppedV1,
    ],
    on_startup=[_seed],
    description="Manufacturing sites: registry, approvals, capacity, outages, the manufacturing plan "
    "(bookings) and the MES API (receipt, steps, QC).",
)
