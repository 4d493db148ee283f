"""The site service's HTTP API: the registry (sites, capacity, approvals, outages) and the MES (receipt,
steps, QC). Routes and request models only; the use cases are in `service_layer`.

Who may call what (one scope per route, `v2v_servicekit.auth.require_scope`):

- GET /v1/sites, GET /v1/sites/{id}, GET /v1/sites/{id}/manufacturing/{order}: `sites:read` (QA, ops,
  admin; a site's MES: its own site only)
- PATCH /v1/sites/{id}, POST /v1/sites/{id}/outages: `registry:admin` (the registry admin)
- POST /v1/sites/{id}/receipts, POST /v1/sites/{id}/manufacturing/{order}/steps: `mes:report` (the
  site's MES, for its own site only)
- POST /v1/sites/{id}/manufacturing/{order}/qc: `qc:release` (manufacturer QA, any site)

Tenancy: a principal of kind `site` is confined to its own site (the token's entity) on every route: its
list holds only its site, and another site's id answers 404 as if it did not exist. QA, admin and ops
are not confined. Another tenant-bound principal (a centre, a carrier) that holds one of these scopes all
the same is confined to no site at all: the site service holds nothing of theirs.

Writes take an optional `Idempotency-Key` (a retried MES report or registry change gets the first answer
back; `v2v_servicekit.idempotency`). Lists are paged: `limit` 1..200, `offset` 0..10 000.

Requests carry no free text: reasons are codes (`v2v_contracts.events`: OutageReason, ReceiptRejection,
StepFailure, QcFinding), the site's own documents are named by an opaque `reference`.
"""

from __future__ import annotations

import re
import uuid
from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints

from site_service.domain.registry import MAX_DAILY_CAPACITY
from site_service.service_layer import commands, queries
from v2v_contracts import SiteApproval, Step
from v2v_contracts.events import OrderType, OutageReason, QcFinding, ReceiptRejection, Regulator, StepFailure
from v2v_contracts.fields import CODE_PATTERN, Code, ReportedAt
from v2v_contracts.scopes import TENANT_KINDS
from v2v_observability import later_input, names
from v2v_servicekit import Runtime, get_runtime
from v2v_servicekit.auth import Principal, require_scope
from v2v_servicekit.idempotency import idempotent
from v2v_servicekit.pagination import MAX_PAGE_LIMIT, PageLimit, PageOffset

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

MAX_PRODUCTS = 50  # products in one capacity change
MAX_APPROVALS = 200  # entries in a site's approval list (regulators x uses x products)

SiteId = Annotated[
    str,
    Path(
        min_length=1, max_length=64, pattern=CODE_PATTERN, description="The site's id", examples=["CH-STEIN"]
    ),
]
Coi = Annotated[
    str,
    StringConstraints(min_length=1, max_length=32, pattern=r"^[0-9A-Z*]+$"),
    Field(description="Chain-of-identity id read from the material's label; verified"),
]
Reference = Annotated[
    Code,
    Field(
        description="The site's own document for this report (deviation, batch record): an opaque id, "
        "never free text",
        examples=["DEV-2031-0042"],
    ),
]
Capacity = Annotated[int, Field(strict=True, ge=0, le=MAX_DAILY_CAPACITY)]

_CODE = re.compile(CODE_PATTERN)


NO_SITE = ""  # the tenant of a centre or a carrier here: no site id is empty, so nothing is found


def tenant_of(principal: Principal) -> str | None:
    """The site a caller is confined to: its own when it is a site (its MES); none at all for another
    tenant-bound principal; None (any site) for QA, admin and ops."""
    if principal.kind == "site":
        return principal.tenant("site")
    if principal.kind in TENANT_KINDS:
        return NO_SITE
    return None


# ---- the registry ------------------------------------------------------------------------------------


def _product_codes(value: Any) -> Any:
    """The capacity map's keys are product codes (checked before any key is named in an error)."""
    if isinstance(value, dict):
        if len(value) > MAX_PRODUCTS:
            raise ValueError(f"at most {MAX_PRODUCTS} products")
        if not all(isinstance(k, str) and _CODE.fullmatch(k) for k in value):
            raise ValueError("keys must be product codes")
    return value


class ApprovalIn(BaseModel):
    """One approval of the site: by a regulator, for a use, of a product."""

    model_config = ConfigDict(extra="forbid")
    regulator: Regulator
    use: OrderType
    product_code: Code

    def approval(self) -> SiteApproval:
        return SiteApproval(regulator=self.regulator, use=self.use, product_code=self.product_code)


class SitePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    daily_capacity: Annotated[dict[str, Capacity], BeforeValidator(_product_codes)] | None = Field(
        default=None,
        description=f"Manufacturing starts per day, per product code, 0..{MAX_DAILY_CAPACITY} (only the "
        "products given change)",
        examples=[{"TISA-CEL": 2}],
    )
    active: StrictBool | None = None
    approvals: list[ApprovalIn] | None = Field(
        default=None,
        max_length=MAX_APPROVALS,
        description="The site's whole approval list (replaces it): regulator, use and product per entry",
        examples=[[{"regulator": "EMA", "use": "commercial", "product_code": "TISA-CEL"}]],
    )


class OutageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start_date: date = Field(description="From today - 30 days on")
    end_date: date = Field(
        description="Inclusive; within 2 years from today, at most 366 days after the start"
    )
    reason: OutageReason = Field(examples=["maintenance"])


@router.get("/sites", tags=["sites"], summary="The manufacturing network: approvals and capacity")
async def sites(
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("sites:read")],
    limit: PageLimit = MAX_PAGE_LIMIT,
    offset: PageOffset = 0,
) -> list[dict[str, Any]]:
    return await queries.list_sites(rt.uow, tenant=tenant_of(principal), limit=limit, offset=offset)


@router.get("/sites/{site_id}", tags=["sites"], summary="One site: approvals, capacity, outages")
async def site(
    site_id: SiteId, rt: RuntimeDep, principal: Annotated[Principal, require_scope("sites:read")]
) -> dict[str, Any]:
    return await queries.get_site(rt.uow, site_id, tenant=tenant_of(principal))


@router.patch(
    "/sites/{site_id}",
    tags=["registry"],
    summary="Registry: change daily capacity per product, whether the site is active, and its approvals",
    dependencies=[idempotent()],
)
async def patch_site(
    site_id: SiteId,
    body: SitePatch,
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("registry:admin")],
) -> dict[str, Any]:
    return await commands.update_site(
        rt.uow,
        site_id,
        daily_capacity=body.daily_capacity,
        active=body.active,
        approvals=None if body.approvals is None else [a.approval() for a in body.approvals],
        tenant=tenant_of(principal),
    )


@router.post(
    "/sites/{site_id}/outages",
    status_code=201,
    tags=["registry"],
    summary="Registry: declare an outage window; bookings in it must move to another site",
    dependencies=[idempotent()],
)
async def post_outage(
    site_id: SiteId,
    body: OutageIn,
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("registry:admin")],
) -> dict[str, Any]:
    return await commands.add_outage(rt.uow, site_id, **body.model_dump(), tenant=tenant_of(principal))


# ---- MES ------------------------------------------------------------------------------------------------


class ReceiptIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order_id: uuid.UUID
    coi: Coi
    accepted: StrictBool
    reason: ReceiptRejection | None = Field(default=None, description="Required when (and only when) refused")
    received_at: ReportedAt | None = Field(default=None, description="Within the last 30 days; default now")
    reference: Reference | None = None


class StepIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: Step
    completed_at: ReportedAt | None = Field(default=None, description="Within the last 30 days; default now")
    failed: StrictBool = False
    reason: StepFailure | None = Field(default=None, description="Required when (and only when) failed")
    reference: Reference | None = None


class QcIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disposition: Literal["released", "out_of_specification", "failed"]
    reason: QcFinding | None = Field(default=None, description="Required unless released (and only then)")
    decided_at: ReportedAt | None = Field(default=None, description="Within the last 30 days; default now")
    reference: Reference | None = None


# MES reports are later inputs: each starts its own trace, linked to the order's first trace


@router.post(
    "/sites/{site_id}/receipts",
    tags=["mes"],
    summary="MES: the order's apheresis material received (accepted) or refused at the site",
    dependencies=[idempotent()],
)
async def post_receipt(
    site_id: SiteId,
    body: ReceiptIn,
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("mes:report")],
) -> dict[str, Any]:
    origin = await queries.origin_trace(rt.uow, body.order_id)
    with later_input("mes receipt", origin, **{names.SITE_ID: site_id}):
        return await commands.record_receipt(
            rt.uow, site_id, **body.model_dump(), tenant=tenant_of(principal)
        )


@router.post(
    "/sites/{site_id}/manufacturing/{order_id}/steps",
    tags=["mes"],
    summary="MES: a manufacturing step completed (or failed) in the current run",
    dependencies=[idempotent()],
)
async def post_step(
    site_id: SiteId,
    order_id: uuid.UUID,
    body: StepIn,
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("mes:report")],
) -> dict[str, Any]:
    origin = await queries.origin_trace(rt.uow, order_id)
    with later_input("mes step", origin, **{names.STEP: body.step}):
        return await commands.record_step(
            rt.uow, site_id, order_id, **body.model_dump(), tenant=tenant_of(principal)
        )


@router.post(
    "/sites/{site_id}/manufacturing/{order_id}/qc",
    tags=["qc"],
    summary="QA: QC disposition of the current run (released, out of specification, failed)",
    dependencies=[idempotent()],
)
async def post_qc(
    site_id: SiteId,
    order_id: uuid.UUID,
    body: QcIn,
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("qc:release")],
) -> dict[str, Any]:
    origin = await queries.origin_trace(rt.uow, order_id)
    with later_input("mes qc", origin, **{names.DISPOSITION: body.disposition}):
        return await commands.record_qc(
            rt.uow, site_id, order_id, **body.model_dump(), tenant=tenant_of(principal)
        )


@router.get(
    "/sites/{site_id}/manufacturing/{order_id}",
    tags=["mes"],
    summary="The order's manufacture at the site: state, run, step history",
)
async def manufacturing(
    site_id: SiteId,
    order_id: uuid.UUID,
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("sites:read")],
) -> dict[str, Any]:
    return await queries.get_manufacturing(rt.uow, site_id, order_id, tenant=tenant_of(principal))
