"""The site service's HTTP API: the registry (sites, capacity, approvals, outages) and the MES (receipt,
steps, QC). Routes and request models only; the use cases are in `service_layer`.

Who may call what (one scope per route, `v2v_servicekit.auth.require_scope`):

- GET /v1/sites, GET /v1/sites/{id}, GET /v1/sites/{id}/manufacturing/{order}: `sites:read` (QA, ops,
  admin; a site's MES: its own site only)
- PATCH /v1/sites/{id}, POST /v1/sites/{id}/outages: `registry:admin` (the registry admin)
- POST /v1/sites/{id}/receipts, POST /v1/sites/{id}/manufacturing/{order}/steps: `mes:report` (the
  site's MES, for its own site only)
- POST /v1/sites/{id}/manufacturing/{order}/qc: `qc:release` (manufacturer QA, any site): passed (with
  its results summary and certificate-of-analysis reference), out_of_specification or failed; `released`
  is refused (422 on `disposition`): release is a signed step
- POST /v1/sites/{id}/manufacturing/{order}/release: `qc:release` + an electronic signature
  (`V2V-Signature-Token`): the quality unit's `release` (US and other non-QP markets; 21 CFR 211.22) or a
  Qualified Person's `qp-certification` (EU/EEA, Switzerland; EU GMP Annex 16) by a signer of the
  batch-release site the approval names
- POST /v1/sites/{batch_release_site}/manufacturing/{order}/import-certification: `qc:release` + signature
  `import-certification` by a QP (quality unit outside QP markets) of the market's batch-release site, for
  a lot made outside the market (Annex 16 §1.7). The lot is released (`site.product_released`) once every
  signature its market needs is there.

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

from fastapi import APIRouter, Depends, Header, Path, Request
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    model_validator,
)

from site_service.domain.manufacturing import RELEASE_IS_SIGNED
from site_service.domain.registry import MAX_DAILY_CAPACITY
from site_service.service_layer import commands, queries
from v2v_contracts import SiteApproval, Step
from v2v_contracts.events import OrderType, OutageReason, QcFinding, ReceiptRejection, Regulator, StepFailure
from v2v_contracts.fields import CODE_PATTERN, Code, Finite, ReportedAt
from v2v_contracts.scopes import TENANT_KINDS
from v2v_contracts.signing import SIGNATURE_HEADER
from v2v_observability import get_logger, later_input, names
from v2v_servicekit import Runtime, current_runtime
from v2v_servicekit.auth import Principal, require_scope
from v2v_servicekit.idempotency import idempotent
from v2v_servicekit.pagination import MAX_PAGE_LIMIT, PageLimit, PageOffset
from v2v_servicekit.signatures import (
    SignatureForbidden,
    SignatureUnauthenticated,
    Signer,
    signature_verifier,
)

log = get_logger(__name__)

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(current_runtime)]

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
    """One approval of the site: by a regulator, for a use, of a product, with the site that releases
    for that market (its batch-release site; none: this site itself)."""

    model_config = ConfigDict(extra="forbid")
    regulator: Regulator
    use: OrderType
    product_code: Code
    batch_release_site_id: Code | None = Field(
        default=None,
        description="The site whose QP / quality unit releases for this market (a registry site); "
        "none: this site",
        examples=["DE-LEIPZIG-IZI"],
    )

    def approval(self) -> SiteApproval:
        return SiteApproval(
            regulator=self.regulator,
            use=self.use,
            product_code=self.product_code,
            batch_release_site_id=self.batch_release_site_id,
        )


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


@router.get(
    "/sites",
    tags=["sites"],
    summary="The manufacturing network: each site's manufacturer, approvals and capacity",
)
async def sites(
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("sites:read")],
    limit: PageLimit = MAX_PAGE_LIMIT,
    offset: PageOffset = 0,
) -> list[dict[str, Any]]:
    return await queries.list_sites(rt.uow, tenant=tenant_of(principal), limit=limit, offset=offset)


@router.get(
    "/sites/{site_id}", tags=["sites"], summary="One site: manufacturer, approvals, capacity, outages"
)
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
    summary="Registry: declare an outage; bookings in it move elsewhere, material at the site is reported",
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
    din: Coi | None = Field(
        default=None,
        description="The bag's donation identification number (ISBT 128 DIN with its check character); "
        "required once the order service has issued one for the collection",
    )
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


def _not_released(value: Any) -> Any:
    if value == "released":
        raise ValueError(RELEASE_IS_SIGNED)
    return value


Pct = Annotated[Finite, Field(ge=0, le=100)]
TestResult = Literal["negative", "positive"]


class QcResultsIn(BaseModel):
    """The QC results summary of a run: numbers and codes only (the full record stays in the site's
    LIMS, named by the certificate of analysis). The specification limits are the product's and the
    site's; the platform refuses only a positive microbiological test on a passed QC."""

    model_config = ConfigDict(extra="forbid")
    viability_pct: Pct | None = Field(default=None, description="Viable cells, % (0..100)")
    car_positive_pct: Pct | None = Field(default=None, description="CAR-expressing viable T cells, %")
    vcn_per_cell: Annotated[Finite, Field(ge=0, le=100)] | None = Field(
        default=None, description="Vector copy number per transduced cell"
    )
    viable_car_t_cells: Annotated[int, Field(strict=True, ge=0, le=10**12)] | None = Field(
        default=None, description="The dose: viable CAR-positive T cells in the product"
    )
    sterility: TestResult | None = None
    mycoplasma: TestResult | None = None
    endotoxin_eu_ml: Annotated[Finite, Field(ge=0, le=10_000)] | None = Field(
        default=None, description="Endotoxin, EU/mL"
    )

    @model_validator(mode="after")
    def _some(self) -> QcResultsIn:
        if not self.model_dump(exclude_none=True):
            raise ValueError("name at least one result")
        return self


class QcIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disposition: Annotated[
        Literal["passed", "out_of_specification", "failed"], BeforeValidator(_not_released)
    ] = Field(description="passed | out_of_specification | failed (release is a separate, signed step)")
    reason: QcFinding | None = Field(default=None, description="Required unless passed (and only then)")
    results: QcResultsIn | None = Field(default=None, description="Required when passed")
    coa_reference: Code | None = Field(
        default=None,
        description="The certificate of analysis (an opaque document id); required when passed",
        examples=["COA-2031-0042"],
    )
    decided_at: ReportedAt | None = Field(default=None, description="Within the last 30 days; default now")
    reference: Reference | None = None

    def args(self) -> dict[str, Any]:
        values = self.model_dump(exclude={"results"})
        values["results"] = self.results.model_dump(exclude_none=True) if self.results else None
        return values


class SignedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: Reference | None = Field(
        default=None, description="The signer's own record (batch certificate, release record): an opaque id"
    )


SigningToken = Annotated[
    str | None,
    Header(
        alias=SIGNATURE_HEADER,
        max_length=8192,
        description="A signing token from the identity provider (the signer's user id and password "
        "re-entered for this signature, by the client whose bearer token comes with it)",
    ),
]


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
        return await commands.record_qc(rt.uow, site_id, order_id, **body.args(), tenant=tenant_of(principal))


async def _verify(
    request: Request, token: str | None, principal: Principal, meaning: str, role: str, seen: dict[str, Any]
) -> Signer:
    """The signing token verified for `meaning` by a user with `role` (`v2v_servicekit.signatures`; the
    meaning and role depend on the order's market, known only once the lot is read)."""
    if not token or not token.strip():
        raise SignatureUnauthenticated(
            "signature-required", f"this action is signed: send a signing token in {SIGNATURE_HEADER}"
        )
    return await signature_verifier(request.app).verify(token.strip(), principal, meaning, (role,), seen=seen)


async def _signed(
    request: Request,
    rt: Runtime,
    principal: Principal,
    token: str | None,
    site_id: str,
    order_id: uuid.UUID,
    body: SignedIn | None,
    *,
    import_at: bool,
) -> dict[str, Any]:
    """Verify the signature the route needs now, then record it; every refusal is audited (its own
    transaction) and logged, never the token (21 CFR 11.300(d))."""
    tenant = tenant_of(principal)
    meaning, role = await commands.required_signature(
        rt.uow, site_id, order_id, import_at=import_at, tenant=tenant
    )
    seen: dict[str, Any] = {}
    try:
        signer = await _verify(request, token, principal, meaning, role, seen)
        return await commands.sign_release(
            rt.uow,
            site_id,
            order_id,
            signer,
            import_at=import_at,
            reference=body.reference if body else None,
            tenant=tenant,
        )
    except (SignatureUnauthenticated, SignatureForbidden) as exc:
        log.warning(
            "signature refused",
            reason=exc.reason,
            meaning=meaning,
            path=request.url.path,
            client_id=principal.client_id,
            user_id=seen.get("user_id"),
        )
        await commands.audit_signature_refusal(
            rt.uow,
            site_id,
            order_id,
            reason=exc.reason,
            meaning=meaning,
            principal=principal,
            user_id=seen.get("user_id"),
        )
        raise


@router.post(
    "/sites/{site_id}/manufacturing/{order_id}/release",
    tags=["qc"],
    summary="Signed: the lot's release (quality unit, US) or QP certification (EU) of the current run",
    dependencies=[idempotent()],
)
async def post_release(
    site_id: SiteId,
    order_id: uuid.UUID,
    request: Request,
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("qc:release")],
    signing_token: SigningToken = None,
    body: SignedIn | None = None,
) -> dict[str, Any]:
    origin = await queries.origin_trace(rt.uow, order_id)
    with later_input("lot release", origin, **{names.SITE_ID: site_id}):
        return await _signed(request, rt, principal, signing_token, site_id, order_id, body, import_at=False)


@router.post(
    "/sites/{site_id}/manufacturing/{order_id}/import-certification",
    tags=["qc"],
    summary="Signed: import certification of a lot made outside the market, at its batch-release site",
    dependencies=[idempotent()],
)
async def post_import_certification(
    site_id: SiteId,
    order_id: uuid.UUID,
    request: Request,
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("qc:release")],
    signing_token: SigningToken = None,
    body: SignedIn | None = None,
) -> dict[str, Any]:
    origin = await queries.origin_trace(rt.uow, order_id)
    with later_input("lot import certification", origin, **{names.SITE_ID: site_id}):
        return await _signed(request, rt, principal, signing_token, site_id, order_id, body, import_at=True)


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
