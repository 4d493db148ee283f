"""Versioned event contracts. Additive changes only within a version; a breaking change is a new type.

Every order event carries the order id, the chain-of-identity id (COI) and the treatment centre id:
opaque references only, never patient-identifying data.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from v2v_contracts.envelope import CloudEvent, source_for
from v2v_contracts.fields import Code, ReasonCode

OrderType = Literal["commercial", "clinical"]
Regulator = Literal["FDA", "EMA", "Swissmedic", "PMDA", "NMPA", "TGA", "MHRA", "HealthCanada"]
"""The medicines regulators whose markets the platform serves (a site's approvals name one of them):
issue 11 adds the UK (MHRA) and Canada (Health Canada)."""

# ---- reason codes of the manufacturing network (sites' registry and MES) ------------------------------
# Staff pick a code; no free text leaves a site (the detail is in the site's own quality system, named by
# an opaque `reference` where an MES report carries one). Events carry these codes as `ReasonCode`.

OutageReason = Literal[
    "maintenance",  # planned maintenance or requalification (clean room, equipment)
    "equipment_failure",
    "contamination",  # an environmental excursion in the clean room
    "utilities",  # power, water, HVAC, gases
    "staffing",
    "regulatory_hold",  # an inspection finding, a suspended licence
    "other",
]
"""Why a site declares an outage (`site.booking_affected` says `outage:<code>`)."""

ReceiptRejection = Literal[
    "damaged_container",
    "temperature_excursion",
    "label_mismatch",  # label data inconsistent with the shipping documents (not a COI mismatch)
    "insufficient_volume",
    "documentation_missing",
    "other",
]
"""Why a site refuses the apheresis material at receipt (`site.material_rejected`)."""

StepFailure = Literal[
    "contamination",
    "equipment_failure",
    "insufficient_cell_growth",
    "transduction_failure",
    "process_deviation",
    "utilities",
    "other",
]
"""Why a manufacturing step failed (`site.manufacturing_failed` says `step_failed:<step>:<code>`)."""

QcFinding = Literal[
    "sterility",
    "endotoxin",
    "mycoplasma",
    "viability",
    "potency",
    "dose",
    "identity",
    "purity",
    "vector_copy_number",
    "replication_competent_virus",
    "other",
]
"""The release test a product failed at QC (`site.product_out_of_specification` says the code;
`site.manufacturing_failed` says `qc_failed:<code>`)."""


class EventData(BaseModel):
    """Base of every event payload; TYPE is the CloudEvents `type`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    TYPE: ClassVar[str]
    SERVICE: ClassVar[str]


class OrderEventData(EventData):
    order_id: uuid.UUID
    coi: str
    treatment_center_id: str


class OrderSubmittedV1(OrderEventData):
    """A treatment centre placed an order; scheduling should find it a manufacturing slot."""

    TYPE = "order.submitted.v1"
    SERVICE = "order"
    product_code: str
    order_type: OrderType
    regulator: str  # regulator of the centre's market (FDA, EMA, ...)
    country: str
    region: str
    requested_apheresis_date: date
    # issue 11 [scheduling]: the hold the centre took on one of scheduling's offers (`POST /v1/holds`),
    # passed through unchanged; None: scheduling books the best slot it finds
    offer_id: uuid.UUID | None = None


class SlotReservedV1(OrderEventData):
    """Scheduling holds a manufacturing slot at a site for the order."""

    TYPE = "scheduling.slot_reserved.v1"
    SERVICE = "scheduling"
    slot_id: uuid.UUID
    site_id: str
    product_code: str
    order_type: OrderType
    apheresis_date: date
    manufacturing_start_date: date
    reason: ReasonCode = "initial"  # initial | waitlist | offer | rebook:<kind> | remanufacture
    # issue 10: set for a remanufacture's slot (reason `remanufacture`): the run it books, at the site
    # that holds the retained material; the site starts that run from this slot
    run: int | None = None


class SlotUnavailableV1(OrderEventData):
    """No approved site with free capacity; the order waits on the waitlist."""

    TYPE = "scheduling.slot_unavailable.v1"
    SERVICE = "scheduling"
    reason: ReasonCode  # no_site_known | no_approved_site | no_capacity
    detail: str  # scheduling's own words (from codes and registry data, never from a person)
    waitlisted: bool


class SiteApproval(BaseModel):
    model_config = ConfigDict(frozen=True)
    regulator: Regulator
    use: OrderType
    product_code: str
    # issue 10 [site]: the site whose Qualified Person / quality unit releases for this market (EU GMP
    # Annex 16; 21 CFR 211.22); None = the manufacturing site itself
    batch_release_site_id: str | None = None


class Outage(BaseModel):
    model_config = ConfigDict(frozen=True)
    outage_id: uuid.UUID
    start_date: date
    end_date: date  # inclusive
    reason: ReasonCode  # an OutageReason


class SiteRegisteredV1(EventData):
    """A manufacturing site's registry entry (published on start and on every change)."""

    TYPE = "site.registered.v1"
    SERVICE = "site"
    site_id: str
    name: str
    country: str
    region: str
    timezone: str
    operator: Literal["own", "cmo"]
    active: bool
    approvals: list[SiteApproval]
    # issue 11: the company that runs the site, a vendor-neutral code (`novartis`, `kite`, `janssen`,
    # `fraunhofer-izi` ...); a site is approved only for products of that manufacturer or of which it is a
    # declared contract manufacturer (the product catalogue). None: an event from before issue 11.
    manufacturer: str | None = None
    daily_capacity: dict[str, int]  # product code -> manufacturing starts per day
    outages: list[Outage] = []  # windows in which the site starts no manufacturing


class BookingConfirmedV1(OrderEventData):
    """The site accepted the slot into its manufacturing plan."""

    TYPE = "site.booking_confirmed.v1"
    SERVICE = "site"
    booking_id: uuid.UUID
    slot_id: uuid.UUID
    site_id: str
    product_code: str
    manufacturing_start_date: date
    apheresis_date: date


class ShipmentPlannedV1(OrderEventData):
    """Logistics planned a shipment leg for the order."""

    TYPE = "logistics.shipment_planned.v1"
    SERVICE = "logistics"
    shipment_id: uuid.UUID
    leg: Literal["inbound_apheresis", "outbound_product"]
    origin: str  # treatment centre id or site id
    destination: str
    material_condition: Literal["fresh", "cryopreserved"]
    temperature_range_c: tuple[float, float]
    planned_pickup_date: date
    slot_id: uuid.UUID | None = None  # inbound leg: the manufacturing slot it feeds
    carrier_id: Code | None = None  # the carrier (courier) that carries the leg; None from older producers


Milestone = Literal["booked", "picked_up", "in_transit", "delivered"]


class ShipmentMilestoneV1(OrderEventData):
    """A courier reported a custody handoff or movement of the shipment (chain of custody)."""

    TYPE = "logistics.shipment_milestone.v1"
    SERVICE = "logistics"
    shipment_id: uuid.UUID
    leg: Literal["inbound_apheresis", "outbound_product"]
    milestone: Milestone
    occurred_at: datetime
    location: Code  # opaque reference: site, centre, hub or airport code
    handled_by: Code  # opaque courier/staff reference, never a person's name
    received_from: Code | None = None
    temperature_c: float | None = None


class WebhookDeliveryFailedV1(OrderEventData):
    """A webhook could not be delivered after every attempt; it is dead-lettered."""

    TYPE = "notification.webhook_delivery_failed.v1"
    SERVICE = "notification"
    subscription_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    attempts: int
    last_error: str


# ---- the order lifecycle (issue: the whole vein-to-vein journey) ------------------------------------

Step = Literal["activation", "transduction", "expansion", "harvest", "cryopreservation"]
RebookKind = Literal["reschedule", "recollection", "site_outage"]


class OrderCancelledV1(OrderEventData):
    """The centre cancelled the order; every service releases what it holds for it (compensation)."""

    TYPE = "order.cancelled.v1"
    SERVICE = "order"
    reason: ReasonCode  # patient_deceased, consent_withdrawn, ... (the words stay in the order service)
    previous_status: str


class OrderFailedV1(OrderEventData):
    """The order cannot be completed (no material left, repeated failure); every service releases."""

    TYPE = "order.failed.v1"
    SERVICE = "order"
    reason: ReasonCode  # <cause>:no_recollection_left, e.g. out_of_specification:no_recollection_left


class RebookRequestedV1(OrderEventData):
    """Command to scheduling: release the order's slot and book a new one (reply: slot events)."""

    TYPE = "order.rebook_requested.v1"
    SERVICE = "order"
    kind: RebookKind
    reason: ReasonCode  # reschedule: the centre's code; recollection: the cause; site_outage: the site's
    product_code: str
    order_type: OrderType
    regulator: str
    region: str
    apheresis_date: date
    exclude_site_id: str | None = None
    # issue 11: the material exists (collected, waiting for pickup or in transit): `apheresis_date` is its
    # collection date, kept as it is (a fresh product must still start within its window of it)
    material_collected: bool = False


class RemanufactureRequestedV1(OrderEventData):
    """Command: a new manufacturing run from the material retained at the site. Scheduling books it a slot
    there (`slot_reserved`, reason `remanufacture`) and the site starts the run from that slot."""

    TYPE = "order.remanufacture_requested.v1"
    SERVICE = "order"
    site_id: str
    reason: ReasonCode  # out_of_specification | manufacturing_failed | quarantine_rejected
    run: int  # 2 for the first remanufacture
    # issue 10: scheduling books the run a slot at the site (its capacity, calendar and outages) and the
    # site starts it from that slot; the order's product and market, as a rebook carries them
    product_code: str | None = None
    order_type: OrderType | None = None
    regulator: str | None = None
    region: str | None = None


class ApheresisCompletedV1(OrderEventData):
    """The centre collected the patient's cells; the inbound shipment can be picked up."""

    TYPE = "order.apheresis_completed.v1"
    SERVICE = "order"
    collected_at: datetime
    # ---- issue 10: order ----
    din: str | None = None  # this collection's donation identification number (ISBT 128 shape, coi.py)
    collection: int = 1  # 1, then 2 after a recollection (a new DIN under the same COI)


class ProductReceivedV1(OrderEventData):
    """The centre received the product and verified its identity."""

    TYPE = "order.product_received.v1"
    SERVICE = "order"
    received_at: datetime


class LymphodepletionStartedV1(OrderEventData):
    """The centre started lymphodepleting chemotherapy (only after product release)."""

    TYPE = "order.lymphodepletion_started.v1"
    SERVICE = "order"
    started_at: datetime


class OrderCompletedV1(OrderEventData):
    """The patient was infused: the order is complete."""

    TYPE = "order.completed.v1"
    SERVICE = "order"
    infused_at: datetime


class QuarantineDecidedV1(OrderEventData):
    """The manufacturer's QA decided on a quarantined product after a shipping excursion."""

    TYPE = "order.quarantine_decided.v1"
    SERVICE = "order"
    decision: Literal["release", "reject"]
    reason: ReasonCode  # QA's code (within_stability_data, outside_stability_data, ...)


class SlotReleasedV1(OrderEventData):
    """Scheduling gave the order's slot back (cancel, rebook, failure); capacity is free again."""

    TYPE = "scheduling.slot_released.v1"
    SERVICE = "scheduling"
    slot_id: uuid.UUID
    site_id: str
    reason: ReasonCode  # cancelled | failed | rebook:<kind> | approval_withdrawn | site_inactive


class BookingCancelledV1(OrderEventData):
    """The site removed the booking from its plan."""

    TYPE = "site.booking_cancelled.v1"
    SERVICE = "site"
    booking_id: uuid.UUID
    slot_id: uuid.UUID
    site_id: str
    reason: ReasonCode  # the slot's release reason, or order_cancelled[:<code>] | order_failed[:<code>]


class BookingAffectedV1(OrderEventData):
    """An outage or a capacity cut at the site hits this booking; it must move to another site. Issue 11:
    with `material_at_site`, an outage hits an order whose material is at the site already (received, or
    a run in progress): reported, not moved (the run waits at the site)."""

    TYPE = "site.booking_affected.v1"
    SERVICE = "site"
    booking_id: uuid.UUID
    site_id: str
    reason: ReasonCode  # outage:<OutageReason> | capacity_cut
    material_at_site: bool = False
    run: int | None = None  # with material_at_site: the run at the site
    state: str | None = None  # with material_at_site: the run's manufacturing state


class MaterialReceivedV1(OrderEventData):
    """The site received the apheresis material and verified its chain of identity."""

    TYPE = "site.material_received.v1"
    SERVICE = "site"
    site_id: str
    received_at: datetime
    lot: str | None = None  # issue 10 [site]: the lot of run 1 (a lot per run)
    din: str | None = None  # issue 10 [site]: the DIN verified at receipt (None: not known to the site)


class MaterialRejectedV1(OrderEventData):
    """The site rejected the material at receipt (identity, damage, viability): recollection needed."""

    TYPE = "site.material_rejected.v1"
    SERVICE = "site"
    site_id: str
    reason: ReasonCode  # a ReceiptRejection


class ManufacturingStepCompletedV1(OrderEventData):
    """The site's MES reported a manufacturing step done."""

    TYPE = "site.manufacturing_step_completed.v1"
    SERVICE = "site"
    site_id: str
    step: Step
    run: int
    completed_at: datetime
    lot: str | None = None  # issue 10 [site]


class ProductReleasedV1(OrderEventData):
    """QC released the product: it can ship to the centre."""

    TYPE = "site.product_released.v1"
    SERVICE = "site"
    site_id: str
    run: int
    released_at: datetime
    # ---- issue 10 [site]: a signed release of a lot
    lot: str | None = None
    coa_reference: str | None = None  # the certificate of analysis (an opaque document id)
    certification: Literal["quality_unit_release", "qp_certification"] | None = None
    import_certified: bool = False  # certified at the market's batch-release site (made outside it)
    exceptional: bool = False  # released on the physician's request after an OOS result


class ProductOutOfSpecificationV1(OrderEventData):
    """QC found the product out of specification."""

    TYPE = "site.product_out_of_specification.v1"
    SERVICE = "site"
    site_id: str
    run: int
    reason: ReasonCode  # a QcFinding
    retained_material: bool  # whether the site holds material for a remanufacture
    lot: str | None = None  # issue 10 [site]


class ManufacturingFailedV1(OrderEventData):
    """Manufacturing failed (at a step or at QC)."""

    TYPE = "site.manufacturing_failed.v1"
    SERVICE = "site"
    site_id: str
    run: int
    reason: ReasonCode  # step_failed:<step>:<StepFailure> | qc_failed:<QcFinding>
    retained_material: bool
    lot: str | None = None  # issue 10 [site]


class ManufacturingStoppedV1(OrderEventData):
    """The site stopped manufacturing for a cancelled or failed order."""

    TYPE = "site.manufacturing_stopped.v1"
    SERVICE = "site"
    site_id: str
    reason: ReasonCode  # order_cancelled[:<code>] | order_failed[:<code>]


class ShipmentExcursionV1(OrderEventData):
    """The product's excursion rule is breached: readings outside its temperature limit for longer, in
    all, than its tolerance (`duration_min`); the shipment is compromised and the material waits for QA.
    A shorter time outside the limit is recorded by logistics and published as nothing."""

    TYPE = "logistics.shipment_excursion.v1"
    SERVICE = "logistics"
    shipment_id: uuid.UUID
    leg: Literal["inbound_apheresis", "outbound_product"]
    reading_c: float  # the reading furthest outside the limit
    min_c: float
    max_c: float
    measured_at: datetime  # when the time outside the limit began (its first out-of-range reading)
    duration_min: float | None = None  # minutes outside the limit in all when the rule was breached


class ShipmentCancelledV1(OrderEventData):
    """Logistics cancelled a shipment (order cancelled, failed or rebooked)."""

    TYPE = "logistics.shipment_cancelled.v1"
    SERVICE = "logistics"
    shipment_id: uuid.UUID
    leg: Literal["inbound_apheresis", "outbound_product"]
    reason: ReasonCode  # order_cancelled[:<code>] | order_failed[:<code>] | booking_cancelled[:<code>]


class ShipmentReroutedV1(OrderEventData):
    """Issue 11: collected material on its way (waiting for pickup or in transit) goes to another site:
    the order's booking moved (a site outage, a lost approval); the courier takes it to `destination`."""

    TYPE = "logistics.shipment_rerouted.v1"
    SERVICE = "logistics"
    shipment_id: uuid.UUID
    leg: Literal["inbound_apheresis", "outbound_product"]
    previous_destination: str
    destination: str
    status: str  # the shipment's status when rerouted (ready_for_pickup, booked, picked_up, in_transit)
    slot_id: uuid.UUID | None = None  # the manufacturing slot it feeds now


class OrderCoiMismatchDetectedV1(OrderEventData):
    """A centre presented a chain-of-identity id that is not this order's; the action was refused."""

    TYPE = "order.coi_mismatch_detected.v1"
    SERVICE = "order"
    where: str  # the refused action (apheresis, product-receipt, infusion)


class SiteCoiMismatchDetectedV1(OrderEventData):
    """Material arrived at a site under a chain-of-identity id that is not the order's; refused."""

    TYPE = "site.coi_mismatch_detected.v1"
    SERVICE = "site"
    site_id: str
    where: str  # a fixed word of the site's ("material receipt"), never input
    mismatched: Literal["coi", "din"] = "coi"  # issue 10 [site]: which id of the pair did not match


class CoiMismatchDetectedV1(OrderEventData):
    """A handoff presented a chain-of-identity id that is not this order's: the flow stops, alert."""

    TYPE = "logistics.coi_mismatch_detected.v1"
    SERVICE = "logistics"
    shipment_id: uuid.UUID
    where: Code  # the handoff's location code, or `temperature-reading`
    identifier: Literal["coi", "din", "lot"] = "coi"  # which id of the pair did not match


# ---- issue 10: order ----
DispositionCause = Literal["out_of_specification", "excursion", "receipt"]
DispositionOutcome = Literal["release", "release_on_physician_request", "reject"]
ShipmentLeg = Literal["inbound_apheresis", "outbound_product"]


class DispositionDecidedV1(OrderEventData):
    """The manufacturer's QA decided (signed) on material at risk: an out-of-specification product, a
    shipment's temperature excursion, or material the site refused at receipt and holds.

    `release`: the material goes on. `release_on_physician_request` (OOS only): published once the centre's
    physician accepted the product with a signature; the site releases the run exceptionally. `reject`
    (also a physician's decline, reason `physician_declined`): the order asks for a remanufacture or a
    recollection, or fails, as before."""

    TYPE = "order.disposition_decided.v1"
    SERVICE = "order"
    cause: DispositionCause
    outcome: DispositionOutcome
    site_id: str | None = None
    run: int | None = None  # OOS
    shipment_id: uuid.UUID | None = None  # excursion
    leg: ShipmentLeg | None = None
    reason: ReasonCode  # QA's code (physician_declined for a physician's decline)
    document_reference: str | None = None  # opaque id in QA's document system


class PhysicianDecisionRequestedV1(OrderEventData):
    """QA released an out-of-specification product on physician request: the centre's physician decides
    (signed) whether to accept it for this patient (EU GMP for ATMPs Part IV §11.5)."""

    TYPE = "order.physician_decision_requested.v1"
    SERVICE = "order"
    site_id: str | None = None
    run: int
    reason: ReasonCode  # the OOS finding (a QcFinding)
    qa_reason: ReasonCode  # QA's code for the request


# ---- issue 11: treatment gates and the patient's journey (order) ----
MaterialKind = Literal["apheresis_material", "product"]


class LymphodepletionClearedV1(OrderEventData):
    """The product was lost after the patient's lymphodepletion (QA rejected it, it failed): the recorded
    LD no longer counts. An alert for the centre: a repeat LD is allowed once another product is released
    and its delivery confirmed (`repeat_allowed`; false when the order failed)."""

    TYPE = "order.lymphodepletion_cleared.v1"
    SERVICE = "order"
    reason: ReasonCode  # the loss's cause (quarantine_rejected, out_of_specification, ...)
    repeat_allowed: bool


class OrderPutOnHoldV1(OrderEventData):
    """The centre paused the patient's journey (sites, couriers and QA go on; the centre's apheresis,
    lymphodepletion and infusion wait for the resume)."""

    TYPE = "order.put_on_hold.v1"
    SERVICE = "order"
    reason: ReasonCode  # patient_unwell, disease_progression, payer_denied, ... (words stay in the order)
    previous_status: str


class OrderResumedV1(OrderEventData):
    """The centre resumed a held journey: `status` is where the order's own steps stand."""

    TYPE = "order.resumed.v1"
    SERVICE = "order"
    reason: ReasonCode  # patient_cleared, payer_approved, ...
    status: str


class MaterialDispositionRecordedV1(OrderEventData):
    """What was done with the material or product that existed when the order ended (cancelled or
    failed): destroyed or returned."""

    TYPE = "order.material_disposition_recorded.v1"
    SERVICE = "order"
    material: MaterialKind
    left_at: Literal["centre", "in_transit", "site"]  # where it was when the order ended
    outcome: Literal["destroyed", "returned"]
    reason: ReasonCode
    document_reference: str | None = None  # an opaque id in the recorder's document system


def _all_event_classes() -> list[type[EventData]]:
    found: list[type[EventData]] = []
    pending = list(EventData.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "TYPE" in cls.__dict__:
            found.append(cls)
    return found


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.TYPE: cls for cls in sorted(_all_event_classes(), key=lambda c: c.TYPE)
}

D = TypeVar("D", bound=EventData)


def new_event(data: EventData, *, subject: str | None = None) -> CloudEvent:
    """Wrap a payload in a CloudEvent from its own service; order events get subject and COI set."""
    payload: dict[str, Any] = data.model_dump(mode="json")
    if isinstance(data, OrderEventData):
        subject = subject or str(data.order_id)
        coi: str | None = data.coi
    else:
        coi = None
    return CloudEvent(source=source_for(data.SERVICE), type=data.TYPE, subject=subject, coi=coi, data=payload)


def parse_data(event: CloudEvent, model: type[D]) -> D:
    if event.type != model.TYPE:
        raise ValueError(f"event type {event.type} is not {model.TYPE}")
    return model.model_validate(event.data)
