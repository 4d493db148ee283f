"""HTTP API for treatment centres (hospital systems) and the manufacturer's QA.

Every route declares its scope (`orders:read`, `orders:write`, `quarantine:decide`). Decisions are
signed by an individual (21 CFR 11.50, 11.100, 11.200; EU GMP Annex 11 §14; `v2v_servicekit.signatures`):
QA's disposition of material at risk (meaning `disposition`), the centre's physician's decision on an
out-of-specification product (`physician-acceptance`), and a cancellation once manufacture started
(`cancellation`). Every refused signature is audited (`on_refusal`). The tenant comes
from the token, never from the body: a treatment centre sees and acts on its own orders only (another
centre's order answers 404, exactly as an unknown one: the repositories filter by the centre); the
manufacturer's QA and ops see every centre's orders. Other kinds of principal (courier, site, registry
admin) have no business with orders and are refused (403) even when a scope was granted to them.

Free text staff type (`note`) stays in the order service's tables; events, logs and spans carry the
action's `reason_code` only.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from order_service.config import OrderSettings
from order_service.domain.order import DELIVERY_CONFIRMED, effective_status
from order_service.domain.reasons import (
    CancelReason,
    DispositionOutcome,
    DispositionReason,
    HoldReason,
    MaterialFate,
    MaterialFateReason,
    MaterialKind,
    PhysicianReason,
    QuarantineReason,
    RescheduleReason,
    ResumeReason,
)
from order_service.domain.records import AuthorityTask, MaterialDisposition, OrderRecord, TimelineEntry
from order_service.service_layer import commands, queries
from v2v_audit import Record
from v2v_contracts.errors import Forbidden, Invalid
from v2v_contracts.fields import LOT_PATTERN, BookingDate, Code, ReportedAt, Text64, Text500
from v2v_observability import get_logger
from v2v_servicekit import Runtime, current_runtime
from v2v_servicekit.auth import Principal, require_scope
from v2v_servicekit.idempotency import idempotent
from v2v_servicekit.pagination import PageLimit, PageOffset
from v2v_servicekit.signatures import (
    HEADER as SIGNATURE_HEADER,
)
from v2v_servicekit.signatures import (
    SIGNATURE_ATTR,
    SignatureRefusal,
    Signer,
    on_refusal,
    require_signature,
)

log = get_logger(__name__)


async def audit_refusals(request: Request) -> None:
    """Router dependency: the first request registers the app's signature-refusal hook, which audits every
    refused signature (reason, meaning, path, the user once the token verified) in a transaction of its
    own (21 CFR 11.10(e), 11.300(d): attempted unauthorised use recorded)."""
    app = request.app
    if getattr(app.state, "order_refusals_audited", False):
        return
    app.state.order_refusals_audited = True

    async def audit(refusal: SignatureRefusal) -> None:
        rt = getattr(app.state, "runtime", None)
        if rt is None:
            return
        await commands.audit_signature_refusal(rt.uow, _object_of(refusal.path), refusal.as_dict())

    on_refusal(app, audit)


_PATH_ID = re.compile(r"/v1/(orders|tasks)/([0-9a-fA-F-]{36})(?:/|$)")


def _object_of(path: str) -> str:
    """The order (or task) a refused request was about, from its path: an id, never other input."""
    found = _PATH_ID.search(path)
    return f"{found[1][:-1]}:{found[2].lower()}" if found else "unknown"


router = APIRouter(prefix="/v1", dependencies=[Depends(audit_refusals)])
RuntimeDep = Annotated[Runtime, Depends(current_runtime)]

READ = "orders:read"
WRITE = "orders:write"
DECIDE_QUARANTINE = "quarantine:decide"
CROSS_CENTRE_KINDS = frozenset({"qa", "ops"})  # the manufacturer's QA and ops: every centre's orders
MAX_OFFSET = 1_000_000

ReadPrincipal = Annotated[Principal, require_scope(READ)]
WritePrincipal = Annotated[Principal, require_scope(WRITE)]
QaPrincipal = Annotated[Principal, require_scope(DECIDE_QUARANTINE)]


class NotPermitted(Forbidden):
    """The caller holds the scope, but its kind of principal may not do this (403)."""

    def __init__(self, scope: str, detail: str) -> None:
        super().__init__(scope)
        self.detail = detail
        self.args = (detail,)


def centre_of(principal: Principal, scope: str) -> str | None:
    """The centre the caller is confined to (a treatment centre's own id), or None for QA and ops."""
    if principal.kind == "centre":
        return principal.tenant("centre")
    if principal.kind in CROSS_CENTRE_KINDS:
        return None
    raise NotPermitted(scope, "orders are for treatment centres and the manufacturer's QA and ops")


def own_centre(principal: Principal) -> str:
    """The caller's centre, for what only a treatment centre does (place an order, hospital actions)."""
    centre = principal.tenant("centre")
    if centre is None:
        raise NotPermitted(WRITE, "only a treatment centre places orders and reports hospital actions")
    return centre


# ---- request bodies: every field bounded, every string printable, enumerations for codes ------------

# a chain-of-identity id as read from a label: bounded ASCII letters, digits and the ISO 7064 `*` (its
# shape and check character are checked by the service layer, which names the field, never the value)
CoiIn = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=20, pattern=r"^[A-Za-z0-9*][A-Za-z0-9*_.:\-]*$"
    ),
]


# issue 11: an indication code of the product's (`GET /v1/products`: `treatment.indications`), and a
# body weight in kg. Clinical data of the order: kept in the order service, never in an event.
IndicationIn = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z][a-z0-9_]{0,31}$")]
WeightKg = Annotated[float, Field(gt=0, le=400, allow_inf_nan=False)]


def _note() -> Any:
    return Field(
        default=None,
        description="Free text for the order's timeline (1-500 printable characters). It stays in the "
        "order service: events, e-mails and webhooks carry the reason code only.",
    )


class OrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    treatment_center_id: Code | None = Field(
        default=None,
        max_length=64,
        examples=["TC-DE-BE-001"],
        description="Optional: the order is the calling centre's (from its token); when given, it must "
        "be that centre's id.",
    )
    product_code: Code = Field(max_length=32, examples=["TISA-CEL"])
    order_type: Literal["commercial", "clinical"]
    patient_ref: Text64 = Field(
        description="The centre's own pseudonymous patient reference (1-64 printable characters). "
        "Stays in the order service.",
    )
    requested_apheresis_date: BookingDate = Field(description="Tomorrow .. today + 180 days")
    offer_id: uuid.UUID | None = Field(
        default=None,
        description="Optional: a slot offer the centre holds (scheduling: GET /v1/availability, then POST "
        "/v1/holds); the order gets that slot while the hold lasts, else one as usual",
    )
    indication: IndicationIn | None = Field(
        default=None,
        examples=["b_all"],
        description="The product's indication for this patient (GET /v1/products: "
        "`treatment.indications`): it decides the lymphodepleting regimen and the infusion window. "
        "Optional here (else named with the first lymphodepletion); another product's code: 422.",
    )
    weight_kg: WeightKg | None = Field(
        default=None,
        description="The patient's body weight in kg (0-400], required where the indication's dose is per "
        "kg (`weight_required`). Stays in the order service.",
    )


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reason_code: CancelReason
    note: Text500 | None = _note()


class RescheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    requested_apheresis_date: BookingDate = Field(description="Tomorrow .. today + 180 days")
    reason_code: RescheduleReason
    note: Text500 | None = _note()


class IdentityCheckedIn(BaseModel):
    """A step where the centre checks the chain of identity on the label (ISO 7064 check character)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    coi: CoiIn
    at: ReportedAt | None = Field(
        default=None, description="When it happened (default: now); within the last 30 days"
    )


# a lot number as printed on the product's label (the site's shape, v2v_contracts.fields' LOT_RE)
LotIn = Annotated[str, StringConstraints(strip_whitespace=True, pattern=LOT_PATTERN)]


class ProductCheckedIn(IdentityCheckedIn):
    """Receipt and infusion: the label's COI and the lot of the run. Once the order knows the lot (from the
    site's release) it is required and must match, else the step is refused and alerted as a COI
    mismatch."""

    lot: LotIn | None = Field(
        default=None, description="The lot on the product's label (required once the order knows it)"
    )


class DispositionIn(BaseModel):
    """QA's signed disposition of material at risk (an OOS product, an excursion, material held at
    receipt)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    outcome: DispositionOutcome = Field(
        description="release | release_on_physician_request (OOS only) | reject"
    )
    reason_code: DispositionReason = Field(
        description="release: within_stability_data, excursion_not_confirmed, assessed_acceptable, "
        "oos_invalidated, receipt_deviation_acceptable, other; release_on_physician_request: "
        "no_alternative_treatment, risk_assessed_for_patient, other; reject: outside_stability_data, "
        "integrity_compromised, insufficient_data, confirmed_out_of_specification, patient_safety_risk, "
        "other"
    )
    document_reference: Code = Field(
        max_length=64, description="QA's assessment in its document system (an opaque id)"
    )
    note: Text500 | None = _note()


class PhysicianDecisionIn(BaseModel):
    """The centre's physician on an out-of-specification product QA released on physician request."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    accept: bool
    reason_code: PhysicianReason | None = Field(
        default=None,
        description="accept: benefit_outweighs_risk, no_alternative_treatment, other; decline: "
        "risk_not_acceptable, patient_condition_changed, alternative_treatment, other",
    )
    note: Text500 | None = _note()


class TaskDoneIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reference: Code = Field(
        max_length=64, description="The notification in QA's document system (an opaque id)"
    )


class LymphodepletionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: ReportedAt | None = Field(
        default=None,
        description="When it started (default: now); within the last 30 days. Its day at the centre "
        "starts the regimen; the infusion window counts from the regimen's completion.",
    )
    indication: IndicationIn | None = Field(
        default=None, description="The order's indication, if the order names none yet"
    )
    weight_kg: WeightKg | None = Field(default=None, description="The weight the indication's dose needs")


class HoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reason_code: HoldReason
    note: Text500 | None = _note()


class ResumeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reason_code: ResumeReason
    note: Text500 | None = _note()


class MaterialDispositionIn(BaseModel):
    """What was done with the material or product left when the order ended (cancelled or failed)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    material: MaterialKind = Field(description="apheresis_material | product (the order's `end_material`)")
    outcome: MaterialFate = Field(description="destroyed | returned")
    reason_code: MaterialFateReason
    document_reference: Code | None = Field(
        default=None, max_length=64, description="The record in the centre's or site's system (opaque id)"
    )
    at: ReportedAt | None = Field(default=None, description="When it was done (default: now)")
    note: Text500 | None = _note()


class QuarantineDecisionIn(BaseModel):
    """The former quarantine decision: the same signed disposition (release | reject)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    decision: Literal["release", "reject"]
    reason_code: QuarantineReason = Field(
        description="For a release: within_stability_data, excursion_not_confirmed, assessed_acceptable "
        "or other; for a reject: outside_stability_data, integrity_compromised, insufficient_data or "
        "other"
    )
    note: Text500 | None = _note()


# ---- responses -----------------------------------------------------------------------------------------


class TimelineOut(BaseModel):
    event_id: uuid.UUID
    type: str
    source: str
    time: datetime
    status: str | None
    reason: str
    note: str | None = None  # what staff typed with the action


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


class AtRiskOut(BaseModel):
    """Why the order is held for QA (material_at_risk, awaiting_physician)."""

    cause: str  # out_of_specification | excursion | receipt
    reason: str  # the finding's code
    leg: str | None = None
    site_id: str | None = None
    run: int | None = None
    shipment_id: str | None = None
    requested: str | None = None  # QA's code of a release on physician request
    document_reference: str | None = None


class TaskOut(BaseModel):
    """QA's task to notify the competent authority within 48 h of administering a non-conforming product
    (EU GMP for ATMPs Part IV §11.5): due once the infusion is recorded; `overdue` while open past due."""

    task_id: uuid.UUID
    order_id: uuid.UUID
    kind: str
    regulator: str
    cause: str
    run: int
    state: str  # open | done
    created_at: datetime
    administered_at: datetime | None
    due_at: datetime | None
    overdue: bool
    completed_at: datetime | None
    reference: str | None

    @classmethod
    def of(cls, t: AuthorityTask, now: datetime) -> TaskOut:
        return cls(
            task_id=t.task_id,
            order_id=t.order_id,
            kind=t.kind,
            regulator=t.regulator,
            cause=t.cause,
            run=t.run,
            state=t.state,
            created_at=t.created_at,
            administered_at=t.administered_at,
            due_at=t.due_at,
            overdue=t.overdue(now),
            completed_at=t.completed_at,
            reference=t.reference,
        )


class TaskPage(BaseModel):
    items: list[TaskOut]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class CollectionOut(BaseModel):
    collection: int
    din: str
    collected_at: datetime


class DecisionOut(BaseModel):
    """A signed decision: what was signed, the signatures (printed name, UTC time, meaning), and whether
    the stored decision still matches them (a changed record shows unsigned, 21 CFR 11.70)."""

    decision_id: uuid.UUID
    meaning: str
    decided_at: datetime
    fields: dict[str, Any]
    signed: bool
    signatures: list[str]


class InfusionWindowOut(BaseModel):
    """The infusion window of the recorded lymphodepletion (days in the centre's calendar)."""

    indication: str
    lymphodepletion_started_on: date
    lymphodepletion_completed_on: date
    min_days_after_completion: int
    max_days_after_completion: int
    earliest_infusion: date
    latest_infusion: date
    repeat_lymphodepletion_from: date


class TreatmentOut(BaseModel):
    """Issue 11: the treatment gates at the centre."""

    indication: str | None
    weight_kg: float | None
    delivery_confirmed: bool = Field(description="The product's delivery date is confirmed (LD may start)")
    lymphodepletion_started_on: date | None
    lymphodepletions: int = Field(description="LD regimens recorded in all (a repeat counts)")
    infusion_window: InfusionWindowOut | None


class HoldOut(BaseModel):
    reason_code: str | None
    resumes_in: str = Field(description="Where the order's own steps stand beneath the hold")


class EndMaterialOut(BaseModel):
    material: str  # apheresis_material | product
    location: str  # centre | in_transit | site (when the order ended)
    disposition_recorded: bool | None = Field(
        default=None,
        description="Whether its disposition is recorded (the order's own view says; a list not)",
    )


class MaterialDispositionOut(BaseModel):
    disposition_id: uuid.UUID
    material: str
    location: str
    outcome: str
    reason_code: str
    document_reference: str | None
    performed_at: datetime
    recorded_by: str
    recorded_at: datetime

    @classmethod
    def of(cls, r: MaterialDisposition) -> MaterialDispositionOut:
        return cls(**{k: getattr(r, k) for k in cls.model_fields})


class OrderOut(BaseModel):
    order_id: uuid.UUID
    coi: str
    status: str
    treatment_center_id: str
    product_code: str
    order_type: str = Field(
        description="commercial | clinical; expanded_access once the physician accepted an OOS product in "
        "a market that treats it so (FDA)"
    )
    use: str | None = Field(default=None, description="The approval the order was placed under")
    din: str | None = Field(
        default=None, description="The current collection's donation identification number (label the bag)"
    )
    collection: int = 1
    lot: str | None = Field(default=None, description="The released run's lot (check it at receipt)")
    at_risk: AtRiskOut | None = None
    collections: list[CollectionOut] | None = None
    tasks: list[TaskOut] | None = None
    decisions: list[DecisionOut] | None = None
    patient_ref: str
    requested_apheresis_date: date
    site_id: str | None
    slot: Slot | None
    run: int = 1
    recollections: int = 0
    lymphodepletion_at: datetime | None = None
    treatment: TreatmentOut | None = None
    on_hold: HoldOut | None = None
    ended_reason: str | None = None
    end_material: EndMaterialOut | None = Field(
        default=None, description="What existed of the patient's material when the order ended"
    )
    material_dispositions: list[MaterialDispositionOut] | None = None
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


class AuditActorOut(BaseModel):
    client_id: str
    user_id: str | None
    kind: str
    entity_id: str | None


class AuditEntryOut(BaseModel):
    """One entry of the order's audit trail, as stored and hash-chained (`make audit-verify`)."""

    seq: int
    entry_id: uuid.UUID
    recorded_at: datetime
    actor: AuditActorOut
    action: str
    object_type: str
    object_id: str
    old: Any
    new: Any
    reason: str | None
    cause: str | None
    prev_hash: str
    entry_hash: str

    @classmethod
    def of(cls, r: Record) -> AuditEntryOut:
        return cls(
            seq=r.seq,
            entry_id=r.entry_id,
            recorded_at=r.recorded_at,
            actor=AuditActorOut(**dataclasses.asdict(r.actor)),
            action=r.action,
            object_type=r.object_type,
            object_id=r.object_id,
            old=r.old,
            new=r.new,
            reason=r.reason,
            cause=r.cause,
            prev_hash=r.prev_hash.hex(),
            entry_hash=r.entry_hash.hex(),
        )


class AuditPage(BaseModel):
    items: list[AuditEntryOut]
    total: int
    limit: int
    offset: int
    next_offset: int | None


def _order_out(
    row: OrderRecord,
    timeline: list[TimelineEntry] | None = None,
    predicted: dict[str, date | None] | None = None,
    view: queries.OrderView | None = None,
) -> OrderOut:
    slot = None
    if row.slot_id is not None:
        slot = Slot(
            slot_id=row.slot_id,
            site_id=row.site_id,
            apheresis_date=row.apheresis_date,
            manufacturing_start_date=row.manufacturing_start_date,
        )
    recorded = {r.material for r in view.materials} if view is not None else set()
    return OrderOut(
        order_id=row.order_id,
        coi=row.coi,
        status=row.status,
        treatment_center_id=row.treatment_center_id,
        product_code=row.product_code,
        order_type=row.shown_order_type,
        use=row.order_type,
        din=row.din,
        collection=row.collection,
        lot=row.lot,
        at_risk=AtRiskOut(**row.at_risk) if row.at_risk else None,
        collections=None if view is None else [CollectionOut(**c) for c in view.collections],
        tasks=None if view is None else [TaskOut.of(t, datetime.now(UTC)) for t in view.tasks],
        decisions=None
        if view is None
        else [
            DecisionOut(
                decision_id=d.decision_id,
                meaning=d.meaning,
                decided_at=d.decided_at,
                fields=d.fields,
                signed=d.signed,
                signatures=d.signatures,
            )
            for d in view.decisions
        ],
        patient_ref=row.patient_ref,
        requested_apheresis_date=row.requested_apheresis_date,
        site_id=row.site_id,
        slot=slot,
        run=row.run,
        recollections=row.recollections,
        lymphodepletion_at=row.lymphodepletion_at,
        treatment=_treatment_out(row),
        on_hold=HoldOut(reason_code=row.hold_reason, resumes_in=row.paused_from) if row.paused_from else None,
        ended_reason=row.ended_reason,
        end_material=EndMaterialOut(
            material=row.end_material["material"],
            location=row.end_material["location"],
            disposition_recorded=None if view is None else row.end_material["material"] in recorded,
        )
        if row.end_material
        else None,
        material_dispositions=None
        if view is None
        else [MaterialDispositionOut.of(r) for r in view.materials],
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
                note=t.note,
            )
            for t in timeline
        ],
    )


def _treatment_out(row: OrderRecord) -> TreatmentOut:
    window = queries.infusion_window(row)
    return TreatmentOut(
        indication=row.indication,
        weight_kg=row.weight_kg,
        delivery_confirmed=row.delivery_confirmed or effective_status(row.state()) in DELIVERY_CONFIRMED,
        lymphodepletion_started_on=row.lymphodepletion_on,
        lymphodepletions=row.lymphodepletions,
        infusion_window=InfusionWindowOut(**window) if window else None,
    )


async def _view(rt: Runtime, order_id: uuid.UUID, centre: str | None) -> OrderOut:
    view = await queries.order_view(rt.uow, order_id, centre=centre)
    return _order_out(view.order, view.timeline, view.predicted, view)


def _settings(rt: Runtime) -> OrderSettings:
    settings = rt.settings
    assert isinstance(settings, OrderSettings), "the order service runs with OrderSettings"
    return settings


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid bearer token"},
    403: {"description": "The token lacks the route's scope, or the caller's kind may not do this"},
}


# ---- orders and the catalogue --------------------------------------------------------------------------


@router.post(
    "/orders",
    dependencies=[idempotent(required=True)],
    status_code=201,
    response_model=OrderOut,
    tags=["orders"],
    summary="Place an order for a patient",
    description="The order is the calling treatment centre's. One open order per centre, patient and "
    "product: a second one is refused (409, problem type `open-order-exists`).",
    responses={
        **AUTH_RESPONSES,
        409: {"description": "The centre has an open order for this patient and product already"},
        422: {
            "description": "Invalid request (problem+json naming the field, never echoing the value), "
            "or no manufacturing site is approved to make the product for the order's use in the "
            "centre's market"
        },
        503: {"description": "The network of manufacturing sites is not known yet: retry shortly"},
    },
)
async def create_order(
    body: OrderIn, rt: RuntimeDep, request: Request, response: Response, principal: WritePrincipal
) -> OrderOut:
    centre = own_centre(principal)
    if body.treatment_center_id is not None and body.treatment_center_id != centre:
        raise Invalid("treatment_center_id", "must be the calling centre's own id, or left out")
    facility = _settings(rt).coi_facility_id
    cmd = commands.PlaceOrder(
        **{**body.model_dump(), "treatment_center_id": centre},
        placed_by=principal.client_id,
        placement_key=request.headers.get("Idempotency-Key"),
    )
    order_id = await commands.place_order(rt.uow, cmd, facility)
    response.headers["Location"] = f"/v1/orders/{order_id}"
    return await _view(rt, order_id, centre)


@router.get(
    "/orders/{order_id}",
    response_model=OrderOut,
    tags=["orders"],
    summary="One order with its status, slot and timeline",
    responses={**AUTH_RESPONSES, 404: {"description": "No such order (of the calling centre)"}},
)
async def get_order(order_id: uuid.UUID, rt: RuntimeDep, principal: ReadPrincipal) -> OrderOut:
    return await _view(rt, order_id, centre_of(principal, READ))


@router.get(
    "/orders",
    response_model=OrderPage,
    tags=["orders"],
    summary="List orders (paginated)",
    description="A treatment centre lists its own orders only: `treatment_center_id` may narrow the "
    "list, never widen it (another centre's id gives an empty page). QA and ops list every centre's "
    "orders, or one centre's with `treatment_center_id`.",
    responses=AUTH_RESPONSES,
)
async def list_orders(
    rt: RuntimeDep,
    principal: ReadPrincipal,
    treatment_center_id: Annotated[Code | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> OrderPage:
    rows, total = await queries.list_orders(
        rt.uow, tenant=centre_of(principal, READ), centre=treatment_center_id, limit=limit, offset=offset
    )
    nxt = offset + len(rows)
    return OrderPage(
        items=[_order_out(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=nxt if nxt < total else None,
    )


@router.get(
    "/orders/{order_id}/audit",
    response_model=AuditPage,
    tags=["orders"],
    summary="The order's audit trail (paginated, oldest first)",
    description="Who did what to the order, when (the server's clock) and why: actor (client, user, kind, "
    "organisation), action, old and new values, reason code and cause, each entry hash-chained "
    "(21 CFR 11.10(e)). A treatment centre sees its own orders' trail (another centre's order is 404); "
    "QA and ops see every order's.",
    responses={**AUTH_RESPONSES, 404: {"description": "No such order (of the calling centre)"}},
)
async def order_audit(
    order_id: uuid.UUID,
    rt: RuntimeDep,
    principal: ReadPrincipal,
    limit: PageLimit = 50,
    offset: PageOffset = 0,
) -> AuditPage:
    rows, total = await queries.order_audit(
        rt.uow, order_id, centre=centre_of(principal, READ), limit=limit, offset=offset
    )
    nxt = offset + len(rows)
    return AuditPage(
        items=[AuditEntryOut.of(r) for r in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=nxt if nxt < total else None,
    )


@router.get(
    "/treatment-centers",
    tags=["catalogue"],
    summary="Certified treatment centres",
    responses=AUTH_RESPONSES,
)
async def treatment_centers(rt: RuntimeDep, principal: ReadPrincipal) -> list[dict[str, Any]]:
    return [dataclasses.asdict(c) for c in await queries.treatment_centres(rt.uow)]


@router.get("/products", tags=["catalogue"], summary="Products that may be ordered", responses=AUTH_RESPONSES)
async def products(rt: RuntimeDep, principal: ReadPrincipal) -> list[dict[str, Any]]:
    return await queries.products(rt.uow)


# ---- hospital and QA actions (docs/lifecycle.md) -----------------------------------------------------


ACTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    404: {"description": "No such order (of the calling centre)"},
    409: {"description": "Not allowed in the order's current state, or chain-of-identity mismatch"},
    422: {"description": "Invalid request (problem+json naming the field, never echoing the value)"},
}


async def _hospital_action(
    rt: Runtime, principal: Principal, order_id: uuid.UUID, action: commands.Action
) -> OrderOut:
    centre = own_centre(principal)
    await commands.act(rt.uow, order_id, action, centre=centre, facility_id=_settings(rt).coi_facility_id)
    return await _view(rt, order_id, centre)


_CANCELLATION = require_signature("cancellation", roles=("physician",))


async def cancellation_signer(
    request: Request,
    principal: WritePrincipal,
    signing_token: Annotated[
        str | None,
        Header(
            alias=SIGNATURE_HEADER,
            max_length=8192,
            description="Once manufacture started: a signing token of the centre's physician (meaning "
            "`cancellation`); before, none is needed",
        ),
    ] = None,
) -> Signer | None:
    """The physician's signature of a cancellation, when one is sent (verified and refused exactly as
    `require_signature`'s); whether the order's state needs one is the service layer's to say."""
    if not signing_token or not signing_token.strip():
        return None
    signer: Signer = await _CANCELLATION.dependency(
        request=request, signing_token=signing_token, principal=principal
    )
    return signer


setattr(cancellation_signer, SIGNATURE_ATTR, ("cancellation", ("physician",)))


@router.post(
    "/orders/{order_id}/cancel",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Cancel the order at any step before it ends (signed by the physician once manufacture started)",
    description="Once manufacture started (a run's step reported, the product held, released or on its "
    "way) the cancellation discards a product made for the patient: it needs the signature of the "
    "centre's physician (meaning `cancellation`, header `V2V-Signature-Token`), else 401 "
    "`signature-required` (audited).",
    responses=ACTION_RESPONSES,
)
async def cancel_order(
    order_id: uuid.UUID,
    body: CancelIn,
    rt: RuntimeDep,
    principal: WritePrincipal,
    signer: Annotated[Signer | None, Depends(cancellation_signer)],
) -> OrderOut:
    action = commands.Action("cancel", reason_code=body.reason_code, note=body.note, signer=signer)
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/apheresis-date",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Move the apheresis date: releases the slot and books a new one",
    responses=ACTION_RESPONSES,
)
async def move_apheresis(
    order_id: uuid.UUID, body: RescheduleIn, rt: RuntimeDep, principal: WritePrincipal
) -> OrderOut:
    action = commands.Action(
        "reschedule", reason_code=body.reason_code, note=body.note, new_date=body.requested_apheresis_date
    )
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/apheresis",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Apheresis done: the cells are ready for pickup",
    responses=ACTION_RESPONSES,
)
async def apheresis_done(
    order_id: uuid.UUID, body: IdentityCheckedIn, rt: RuntimeDep, principal: WritePrincipal
) -> OrderOut:
    action = commands.Action("apheresis", coi=body.coi, at=body.at)
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/lymphodepletion",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Lymphodepleting chemotherapy started (once the product is released and its delivery confirmed)",
    description="Issue 11: refused (409) before the product is released and its delivery date confirmed "
    "(the courier booked or picked up the shipment), and while the order is on hold. Its day at the centre "
    "starts the regimen of the order's indication; the infusion window counts from its completion. A "
    "second LD only once the first can no longer lead to an infusion (its window closed or the label's "
    "repeat delay passed) or after the product was lost (which cleared it).",
    responses=ACTION_RESPONSES,
)
async def lymphodepletion(
    order_id: uuid.UUID, body: LymphodepletionIn, rt: RuntimeDep, principal: WritePrincipal
) -> OrderOut:
    action = commands.Action(
        "lymphodepletion", at=body.at, indication=body.indication, weight_kg=body.weight_kg
    )
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/product-receipt",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="The product arrived at the centre; identity checked",
    responses=ACTION_RESPONSES,
)
async def product_receipt(
    order_id: uuid.UUID, body: ProductCheckedIn, rt: RuntimeDep, principal: WritePrincipal
) -> OrderOut:
    action = commands.Action("receipt", coi=body.coi, lot=body.lot, at=body.at)
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/infusion",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="The patient was infused (bedside identity check): the order completes",
    description="Issue 11: only on a day inside the infusion window of the recorded lymphodepletion "
    "(409, problem type `infusion-window`, naming the window in `errors` and as a `window` member).",
    responses=ACTION_RESPONSES,
)
async def infusion(
    order_id: uuid.UUID, body: ProductCheckedIn, rt: RuntimeDep, principal: WritePrincipal
) -> OrderOut:
    action = commands.Action("infusion", coi=body.coi, lot=body.lot, at=body.at)
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/hold",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Put the patient's journey on hold (a reason code; the note stays here)",
    description="Issue 11: the order goes `on_hold`; sites, couriers and QA go on beneath the hold (a "
    "product that arrives is received and stored at the centre); apheresis, lymphodepletion and infusion "
    "wait for the resume. Death is not a hold: cancel with `patient_deceased`.",
    responses=ACTION_RESPONSES,
)
async def hold(order_id: uuid.UUID, body: HoldIn, rt: RuntimeDep, principal: WritePrincipal) -> OrderOut:
    action = commands.Action("hold", reason_code=body.reason_code, note=body.note)
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/resume",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Resume a held journey where the order's own steps stand",
    responses=ACTION_RESPONSES,
)
async def resume(order_id: uuid.UUID, body: ResumeIn, rt: RuntimeDep, principal: WritePrincipal) -> OrderOut:
    action = commands.Action("resume", reason_code=body.reason_code, note=body.note)
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/material-disposition",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="Record what was done with the material or product left when the order ended",
    description="Issue 11: after a cancellation or a failure, the order shows `end_material` (apheresis "
    "material or product, and where it was); the centre records that it was destroyed or returned, once "
    "per material. On the order's timeline and audit trail; `order.material_disposition_recorded.v1`.",
    responses=ACTION_RESPONSES,
)
async def material_disposition(
    order_id: uuid.UUID, body: MaterialDispositionIn, rt: RuntimeDep, principal: WritePrincipal
) -> OrderOut:
    action = commands.Action(
        "material",
        material=body.material,
        outcome=body.outcome,
        reason_code=body.reason_code,
        document_reference=body.document_reference,
        at=body.at,
        note=body.note,
        by=principal.client_id,
    )
    return await _hospital_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/site-material-disposition",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["QA actions"],
    summary="The manufacturer's QA records what its site did with the material or product left",
    description="Issue 11: as `/material-disposition`, for material or product the order left at a site "
    "or in transit, recorded by the manufacturer's QA for the site (the centre records what it holds).",
    responses=ACTION_RESPONSES,
)
async def site_material_disposition(
    order_id: uuid.UUID, body: MaterialDispositionIn, rt: RuntimeDep, principal: QaPrincipal
) -> OrderOut:
    action = commands.Action(
        "material",
        material=body.material,
        outcome=body.outcome,
        reason_code=body.reason_code,
        document_reference=body.document_reference,
        at=body.at,
        note=body.note,
        by=principal.client_id,
    )
    return await _qa_action(rt, principal, order_id, action)


DISPOSITION_ROLES = ("qa_reviewer", "quality_unit", "qualified_person")
DispositionSigner = Annotated[Signer, require_signature("disposition", roles=DISPOSITION_ROLES)]
PhysicianSigner = Annotated[Signer, require_signature("physician-acceptance", roles=("physician",))]


async def _qa_action(
    rt: Runtime, principal: Principal, order_id: uuid.UUID, action: commands.Action
) -> OrderOut:
    centre = centre_of(principal, DECIDE_QUARANTINE)
    await commands.act(rt.uow, order_id, action, centre=centre)
    return await _view(rt, order_id, centre)


@router.post(
    "/orders/{order_id}/disposition",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["QA actions"],
    summary="QA's signed disposition of material at risk (OOS, excursion, held at receipt)",
    description="Signed (meaning `disposition`, roles qa_reviewer, quality_unit or qualified_person; "
    "21 CFR 11.50, EU GMP Annex 11 §14). `release`: the material goes on; `release_on_physician_request` "
    "(an out-of-specification product only): the centre's physician decides next; `reject`: remanufacture, "
    "recollection or fail. Publishes `order.disposition_decided.v1` (a physician request: "
    "`order.physician_decision_requested.v1`, the decision once the physician signed).",
    responses={
        **ACTION_RESPONSES,
        401: {"description": "No valid bearer token, or no valid signing token (`reason`)"},
        403: {"description": "Scope, kind, or the signer's organisation or role (`reason`)"},
    },
)
async def disposition(
    order_id: uuid.UUID,
    body: DispositionIn,
    rt: RuntimeDep,
    principal: QaPrincipal,
    signer: DispositionSigner,
) -> OrderOut:
    action = commands.Action(
        "disposition",
        outcome=body.outcome,
        reason_code=body.reason_code,
        document_reference=body.document_reference,
        note=body.note,
        signer=signer,
    )
    return await _qa_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/quarantine-decision",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["QA actions"],
    summary="Former quarantine decision: the same signed disposition (release | reject)",
    description="Kept for callers of the quarantine decision: a signed disposition (as "
    "`/disposition`) of material at risk with outcome `decision` and no document reference.",
    responses=ACTION_RESPONSES,
    deprecated=True,
)
async def quarantine_decision(
    order_id: uuid.UUID,
    body: QuarantineDecisionIn,
    rt: RuntimeDep,
    principal: QaPrincipal,
    signer: DispositionSigner,
) -> OrderOut:
    action = commands.Action(
        "disposition", outcome=body.decision, reason_code=body.reason_code, note=body.note, signer=signer
    )
    return await _qa_action(rt, principal, order_id, action)


@router.post(
    "/orders/{order_id}/physician-decision",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["hospital actions"],
    summary="The centre's physician accepts or declines an out-of-specification product (signed)",
    description="Signed by the centre's own physician (meaning `physician-acceptance`; EU GMP for ATMPs "
    "Part IV §11.5). Accept: the site releases the run exceptionally; in the US the order becomes expanded "
    "access (21 CFR 312.310); QA's task to notify the authority within 48 h of administration opens. "
    "Decline: as QA's reject (remanufacture, recollection or fail).",
    responses=ACTION_RESPONSES,
)
async def physician_decision(
    order_id: uuid.UUID,
    body: PhysicianDecisionIn,
    rt: RuntimeDep,
    principal: WritePrincipal,
    signer: PhysicianSigner,
) -> OrderOut:
    action = commands.Action(
        "physician", accept=body.accept, reason_code=body.reason_code or "", note=body.note, signer=signer
    )
    return await _hospital_action(rt, principal, order_id, action)


# ---- QA's authority-notification tasks ------------------------------------------------------------------


@router.get(
    "/tasks",
    response_model=TaskPage,
    tags=["QA actions"],
    summary="QA's authority-notification tasks (earliest due first)",
    description="Each non-conforming product administered on physician request must be notified to the "
    "competent authority within 48 h of administration: due once the infusion is recorded, `overdue` "
    "while open past due. `state` and `overdue` narrow the list.",
    responses=AUTH_RESPONSES,
)
async def list_tasks(
    rt: RuntimeDep,
    principal: QaPrincipal,
    state: Annotated[Literal["open", "done"] | None, Query()] = None,
    overdue: Annotated[bool, Query()] = False,
    limit: PageLimit = 50,
    offset: PageOffset = 0,
) -> TaskPage:
    if centre_of(principal, DECIDE_QUARANTINE) is not None:
        raise NotPermitted(DECIDE_QUARANTINE, "tasks are the manufacturer's QA's")
    now = datetime.now(UTC)
    rows, total = await queries.tasks_page(
        rt.uow, state=state, overdue_at=now if overdue else None, limit=limit, offset=offset
    )
    nxt = offset + len(rows)
    return TaskPage(
        items=[TaskOut.of(t, now) for t in rows],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=nxt if nxt < total else None,
    )


@router.post(
    "/tasks/{task_id}/done",
    dependencies=[idempotent()],
    response_model=OrderOut,
    tags=["QA actions"],
    summary="QA notified the authority: the task is done (with the notification's reference)",
    responses={**ACTION_RESPONSES, 404: {"description": "No such task"}},
)
async def task_done(task_id: uuid.UUID, body: TaskDoneIn, rt: RuntimeDep, principal: QaPrincipal) -> OrderOut:
    if centre_of(principal, DECIDE_QUARANTINE) is not None:
        raise NotPermitted(DECIDE_QUARANTINE, "tasks are the manufacturer's QA's")
    order_id = await commands.complete_task(rt.uow, task_id, by=principal.client_id, reference=body.reference)
    return await _view(rt, order_id, None)
