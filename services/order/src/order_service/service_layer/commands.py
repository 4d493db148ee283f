"""The use cases behind the order service's HTTP API, each one unit of work: placing an order, the
hospital and QA actions on it, and loading the reference data at start-up."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TypeAlias

from order_service.adapters.repository import OrderTx, read_centres
from order_service.domain import market, reasons
from order_service.domain import order as machine
from order_service.domain.coi import coi_problem, make_coi
from order_service.domain.order import AtRisk, OrderState, OrderStatus, Outcome, SignatureNeeded, Window
from order_service.domain.records import Centre, MaterialDisposition, OrderRecord
from order_service.service_layer import case as cases
from v2v_contracts import (
    ApheresisCompletedV1,
    DispositionDecidedV1,
    EventData,
    LymphodepletionStartedV1,
    MaterialDispositionRecordedV1,
    OrderCancelledV1,
    OrderCoiMismatchDetectedV1,
    OrderCompletedV1,
    OrderPutOnHoldV1,
    OrderResumedV1,
    OrderSubmittedV1,
    PhysicianDecisionRequestedV1,
    ProductReceivedV1,
)
from v2v_contracts.errors import CoiMismatch, Invalid, NotAllowedNow, NotFound
from v2v_contracts.reference import load_products, product_catalogue
from v2v_messaging import AbstractUnitOfWork
from v2v_observability import current_traceparent, get_logger, later_input, set_order_attributes
from v2v_observability import names as tn
from v2v_servicekit.signatures import SignatureUnauthenticated, SignedRecord, Signer

log = get_logger(__name__)

UnitOfWork: TypeAlias = AbstractUnitOfWork[OrderTx]


# ---- reference data ----------------------------------------------------------------------------------


async def load_reference_data(uow: UnitOfWork, centres: list[Centre] | None = None) -> None:
    """Upsert the certified centres (the service's seed) and the orderable products (the shared
    catalogue); safe at every start."""
    centres = read_centres() if centres is None else centres
    async with uow.begin() as tx:
        await tx.catalogue.save_centres(centres)
        await tx.catalogue.save_products((p.code, p.name, p.rules()) for p in load_products())


# ---- intake ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaceOrder:
    treatment_center_id: str  # the caller's centre (from its token, never from the body)
    product_code: str
    order_type: str
    patient_ref: str
    requested_apheresis_date: date
    placed_by: str | None = None  # the client placing it ...
    placement_key: str | None = None  # ... and its Idempotency-Key
    offer_id: uuid.UUID | None = None  # a slot offer the centre holds at scheduling (issue 11)
    # issue 11: clinical data of the order (kept in the order service only): the product's indication, and
    # the patient's weight where the indication's dose is per kg
    indication: str | None = None
    weight_kg: float | None = None


def check_clinical(product_code: str, indication: str | None, weight_kg: float | None) -> None:
    """An indication must be one of the product's (422 naming `indication`, listing the product's codes);
    a weight is required where that indication's dose is per kg of body weight (422 naming `weight_kg`)."""
    product = product_catalogue().get(product_code)
    if indication is None or product is None or product.treatment is None:
        return
    facts = product.indication(indication)
    if facts is None:
        known = ", ".join(product.treatment.codes())
        raise Invalid("indication", f"is not an indication of {product_code} (one of: {known})")
    if facts.weight_required and weight_kg is None:
        raise Invalid(
            "weight_kg", f"is required: the dose of {product_code} for {indication} depends on body weight"
        )


async def _same_placement(tx: OrderTx, order_id: uuid.UUID, cmd: PlaceOrder) -> uuid.UUID:
    order = await tx.orders.get(order_id)
    assert order is not None
    same = (
        order.treatment_center_id,
        order.product_code,
        order.order_type,
        order.patient_ref,
        order.requested_apheresis_date,
        order.indication,
        order.weight_kg,
    ) == (
        cmd.treatment_center_id,
        cmd.product_code,
        cmd.order_type,
        cmd.patient_ref,
        cmd.requested_apheresis_date,
        cmd.indication,
        cmd.weight_kg,
    )
    if not same:
        raise Invalid("Idempotency-Key", "was used for a different request; use a new key")
    return order_id


async def place_order(
    uow: UnitOfWork, cmd: PlaceOrder, facility_id: str, now: datetime | None = None
) -> uuid.UUID:
    """Check the order against the centre, the product, the calendar and the market; then record it
    and publish `order.submitted`, in one transaction. A second open order of the centre for the same
    patient and product is refused (`Conflict`, kind `open-order-exists`). Error texts name the field,
    never the value sent."""
    now = now or cases.now()
    placement = (cmd.placed_by, cmd.placement_key) if cmd.placed_by and cmd.placement_key else None
    async with uow.begin() as tx:
        # one read for every check below (the key, the centre, the product, the network, the market);
        # the COI's sequence number is taken once they all passed, with the order's insert
        intake = await tx.orders.intake(cmd.treatment_center_id, cmd.product_code, cmd.order_type, placement)
        if intake.placed is not None:
            # placed by an earlier attempt under the same key whose answer was never stored: that
            # order is the answer, if this is the same request
            return await _same_placement(tx, intake.placed, cmd)
        centre = intake.centre
        if centre is None:
            raise Invalid("treatment_center_id", "unknown or uncertified treatment centre")
        if not intake.has_product:
            raise Invalid("product_code", "unknown product")
        check_clinical(cmd.product_code, cmd.indication, cmd.weight_kg)
        centre_today = cases.today_at(centre, now)
        if cmd.requested_apheresis_date < centre_today:
            raise Invalid(
                "requested_apheresis_date",
                f"is in the past (today at the centre is {centre_today.isoformat()})",
            )
        if not intake.network_known:
            raise market.network_unknown()
        if not intake.served:  # by an active site approved for the centre's regulator, use and product
            raise market.not_served(cmd.product_code, cmd.order_type, centre.regulator, centre.country)
        order_id = uuid.uuid4()
        # the order is bound to this context (logs, spans) with its COI, which the insert makes: the
        # insert's own statement span, if it gets one, is the request's, as the checks' spans are
        coi = await tx.orders.add(
            order_id=order_id,
            facility_id=facility_id,
            year=now.year,
            treatment_center_id=cmd.treatment_center_id,
            product_code=cmd.product_code,
            order_type=cmd.order_type,
            patient_ref=cmd.patient_ref,
            requested_apheresis_date=cmd.requested_apheresis_date,
            status=OrderStatus.SUBMITTED.value,
            first_trace=current_traceparent(),
            placement=placement,
            indication=cmd.indication,
            weight_kg=cmd.weight_kg,
        )
        set_order_attributes(order_id, coi)
        event = await tx.publish(
            OrderSubmittedV1(
                order_id=order_id,
                coi=coi,
                treatment_center_id=cmd.treatment_center_id,
                product_code=cmd.product_code,
                order_type=cmd.order_type,  # type: ignore[arg-type]
                regulator=centre.regulator,
                country=centre.country,
                region=centre.region,
                requested_apheresis_date=cmd.requested_apheresis_date,
                offer_id=cmd.offer_id,
            )
        )
        # the entry goes with the audit trail's append, right before COMMIT: the COI counter, taken with
        # the order's insert, is held one round trip less
        tx.timeline.write_at_commit()
        await tx.timeline.add(
            cases.entry(
                order_id, event, None, OrderStatus.SUBMITTED.value, "order placed by treatment centre"
            )
        )
        tx.audit(
            "order.placed",
            "order",
            order_id,
            new={
                "coi": coi,
                "treatment_center_id": cmd.treatment_center_id,
                "product_code": cmd.product_code,
                "order_type": cmd.order_type,
                "patient_ref": cmd.patient_ref,
                "requested_apheresis_date": cmd.requested_apheresis_date,
                "indication": cmd.indication,
                "weight_kg": cmd.weight_kg,
                "status": OrderStatus.SUBMITTED.value,
                "event": {"id": str(event.id), "type": event.type},
            },
        )
    log.info("order placed", order_id=str(order_id), product_code=cmd.product_code)
    return order_id


# ---- hospital and QA actions -------------------------------------------------------------------------


# hospital confirmations: action -> (state machine step, event, the event's time field, the order column)
CONFIRMATIONS: dict[str, tuple[Callable[[OrderState], Outcome], type[EventData], str, str]] = {
    "apheresis": (machine.confirm_apheresis, ApheresisCompletedV1, "collected_at", "apheresis_collected_at"),
    "lymphodepletion": (
        machine.start_lymphodepletion,
        LymphodepletionStartedV1,
        "started_at",
        "lymphodepletion_at",
    ),
    "receipt": (machine.confirm_product_receipt, ProductReceivedV1, "received_at", "product_received_at"),
    "infusion": (machine.confirm_infusion, OrderCompletedV1, "infused_at", "infused_at"),
}
SIGNED = frozenset({"disposition", "physician"})  # always signed; a cancellation once manufacture started
# issue 11: the patient's journey on hold and resumed; the disposition of material left when it ended
JOURNEY = frozenset({"hold", "resume", "material"})
ACTIONS = frozenset({"cancel", "reschedule", *SIGNED, *CONFIRMATIONS, *JOURNEY})
LOT_CHECKED = frozenset({"receipt", "infusion"})  # the product's label: COI + lot


@dataclass(frozen=True)
class Action:
    """A hospital or QA action on an order. `reason_code` (cancel, reschedule, disposition, physician)
    goes into the action's event; `note`, the words staff typed with it, only onto the order's timeline.
    `signer`: the individual who signed it (verified by the route's `require_signature`)."""

    # cancel | reschedule | apheresis | lymphodepletion | receipt | infusion | disposition | physician |
    # hold | resume | material
    name: str
    reason_code: str = ""
    note: str | None = None
    coi: str | None = None
    lot: str | None = None
    at: datetime | None = None
    new_date: date | None = None
    outcome: str | None = None  # disposition: release | release_on_physician_request | reject
    document_reference: str | None = None  # disposition: QA's document
    accept: bool | None = None  # physician
    signer: Signer | None = None
    indication: str | None = None  # lymphodepletion: the order's indication, if it names none yet
    weight_kg: float | None = None  # ... and the weight its dose needs
    material: str | None = None  # material: apheresis_material | product (outcome: destroyed | returned)
    by: str | None = None  # the client acting (kept on a material disposition record)


class _CoiRefused(Exception):
    """The centre presented another chain-of-identity id (or lot) than the order's (leaves the
    transaction)."""


class _SignatureMissing(Exception):
    """The action needs a signature in the order's state and came without one (leaves the transaction)."""

    def __init__(self, meaning: str) -> None:
        super().__init__(meaning)
        self.meaning = meaning


async def act(
    uow: UnitOfWork,
    order_id: uuid.UUID,
    action: Action,
    *,
    centre: str | None = None,
    facility_id: str = "V2V00",
) -> None:
    """A later input about the order: its own trace, linked to the order's first one. A chain-of-identity
    (or lot) mismatch refuses the action and raises an alert, recorded in a transaction of its own; so is
    the refusal of an action that needed a signature and came without one (audited).

    `centre` confines the action to that centre's orders (the caller's, when it is a centre): another
    centre's order is not found, exactly as an unknown one. `facility_id` starts the DIN issued at
    apheresis."""
    if action.name not in ACTIONS:
        raise ValueError(action.name)
    if action.name in SIGNED and action.signer is None:
        raise ValueError(f"{action.name} is a signed action")
    async with uow.read() as tx:
        order = await tx.orders.get(order_id, centre=centre)
    if order is None:
        raise NotFound("Order", order_id)
    try:
        with later_input(f"hospital {action.name}", order.first_trace, **{tn.ACTION: action.name}):
            await _act(uow, order_id, action, centre, facility_id)
    except _CoiRefused:
        await _alert_coi_mismatch(uow, order_id, action.name)
        what = "lot" if action.name in LOT_CHECKED and action.lot is not None else "coi"
        raise CoiMismatch(detail=f"{what}: does not match this order's chain of identity") from None
    except _SignatureMissing as missing:
        await _audit_unsigned(uow, order_id, action.name, missing.meaning)
        raise SignatureUnauthenticated(
            "signature-required",
            f"once manufacture started, a {missing.meaning} is signed: send a signing token in "
            "V2V-Signature-Token",
        ) from None


def _check_coi(given: str | None, order: OrderRecord) -> None:
    if given is None:
        return
    problem = coi_problem(given)
    if problem:
        raise Invalid("coi", problem)
    if given != order.coi:
        raise _CoiRefused


def _check_lot(given: str | None, order: OrderRecord) -> None:
    """The lot on the product's label, against the lot of the run the site released. Where the lot is
    known it is required (422 naming `lot`); where it is not (a release before lots), nothing is guessed."""
    if order.lot is None:
        return
    if given is None:
        raise Invalid("lot", "is required: the product's lot is known (see the label)")
    if given != order.lot:
        raise _CoiRefused


async def _alert_coi_mismatch(uow: UnitOfWork, order_id: uuid.UUID, where: str) -> None:
    """Record and publish the refused handoff in its own transaction; the caller refuses the action."""
    log.error("COI mismatch refused at the centre", order_id=str(order_id), where=where)
    async with uow.begin() as tx:
        order = await tx.orders.get(order_id, lock=True)
        assert order is not None
        event = await tx.publish(OrderCoiMismatchDetectedV1(**order.ref(), where=where))
        await tx.timeline.add(
            cases.entry(
                order_id, event, order.status, order.status, f"chain of identity mismatch at {where}: refused"
            )
        )
        tx.audit(
            f"order.{where}.refused",
            "order",
            order_id,
            new={"event": {"id": str(event.id), "type": event.type}},
            reason="coi-mismatch",
        )


async def _audit_unsigned(uow: UnitOfWork, order_id: uuid.UUID, name: str, meaning: str) -> None:
    """An action refused for want of a signature, audited in its own transaction (21 CFR 11.10(e),
    11.300(d))."""
    async with uow.begin() as tx:
        tx.audit(
            f"order.{name}.refused",
            "order",
            order_id,
            new={"meaning": meaning, "status": 401},
            reason="signature-required",
        )


def _signed_record(decision_id: uuid.UUID, fields: dict[str, object]) -> SignedRecord:
    return SignedRecord("decision", str(decision_id), fields)


async def _sign(
    tx: OrderTx, order: OrderRecord, signer: Signer, name: str, fields: dict[str, object]
) -> uuid.UUID:
    """Record the signed decision and its signature in the transaction of the change (21 CFR 11.70)."""
    decision_id = uuid.uuid4()
    signed = {"order_id": str(order.order_id), "coi": order.coi, "action": name, **fields}
    await tx.decisions.add(decision_id, order.order_id, signer.meaning, signed)
    signature = await tx.signatures.record(signer, _signed_record(decision_id, signed))
    tx.audit(
        f"order.{name}.signed",
        "order",
        order.order_id,
        new={
            "decision_id": str(decision_id),
            "signature_id": str(signature.signature_id),
            "meaning": signer.meaning,
            "user_id": signer.user_id,
            "org": f"{signer.org_kind}:{signer.org_id}",
            "record_sha256": signature.record_sha256,
        },
        reason=str(fields.get("reason_code") or signer.meaning),
    )
    return decision_id


def _disposition_event(
    ref: dict[str, object], risk: AtRisk, outcome: str, reason: str, document_reference: str | None
) -> DispositionDecidedV1:
    return DispositionDecidedV1(
        **ref,  # type: ignore[arg-type]
        cause=risk.cause,  # type: ignore[arg-type]
        outcome=outcome,  # type: ignore[arg-type]
        site_id=risk.site_id,
        run=risk.run,
        shipment_id=uuid.UUID(risk.shipment_id) if risk.shipment_id else None,
        leg=risk.leg,  # type: ignore[arg-type]
        reason=reason,
        document_reference=document_reference,
    )


async def _act(
    uow: UnitOfWork, order_id: uuid.UUID, action: Action, centre: str | None, facility_id: str
) -> None:
    async with uow.begin() as tx:
        case = await cases.load(tx, order_id, centre=centre)
        order = case.order
        set_order_attributes(order_id, order.coi)
        _check_coi(action.coi, order)
        if action.name in LOT_CHECKED and machine.OrderStatus(order.status) in {
            OrderStatus.PRODUCT_IN_TRANSIT,
            OrderStatus.PRODUCT_DELIVERED,
            OrderStatus.PRODUCT_RECEIVED,
        }:
            _check_lot(action.lot, order)
        state, today = order.state(), case.today()
        at = action.at or cases.now()
        ref = order.ref()
        extra: dict[str, object] = {}
        data: EventData | None = None  # the action's own event; a reschedule's is its rebook command
        signed: dict[str, object] | None = None  # what the signer signs, for a signed action
        match action.name:
            case "cancel":
                try:
                    outcome = machine.cancel(state, action.reason_code, signed=action.signer is not None)
                except SignatureNeeded as needed:
                    raise _SignatureMissing(needed.meaning) from None
                data = OrderCancelledV1(**ref, reason=action.reason_code, previous_status=state.status.value)
                signed = {"reason_code": action.reason_code, "previous_status": state.status.value}
            case "reschedule":
                assert action.new_date is not None
                outcome = machine.reschedule_apheresis(state, action.new_date, action.reason_code, today)
            case "disposition":
                risk = state.at_risk
                outcome = machine.decide_disposition(
                    state,
                    action.outcome or "",
                    action.reason_code,
                    case.rules,
                    today,
                    action.document_reference,
                )
                assert risk is not None
                signed = {
                    "cause": risk.cause,
                    "finding": risk.reason,
                    "run": risk.run,
                    "leg": risk.leg,
                    "outcome": action.outcome,
                    "reason_code": action.reason_code,
                    "document_reference": action.document_reference,
                }
                if action.outcome == "release_on_physician_request":
                    data = PhysicianDecisionRequestedV1(
                        **ref,
                        site_id=risk.site_id,
                        run=risk.run or state.run,
                        reason=risk.reason,
                        qa_reason=action.reason_code,
                    )
                else:
                    data = _disposition_event(
                        ref, risk, action.outcome or "", action.reason_code, action.document_reference
                    )
            case "physician":
                risk = state.at_risk
                outcome = machine.physician_decision(
                    state,
                    bool(action.accept),
                    action.reason_code or None,
                    case.centre.regulator,
                    case.rules,
                    today,
                )
                assert risk is not None
                signed = {
                    "cause": risk.cause,
                    "finding": risk.reason,
                    "run": risk.run,
                    "accept": bool(action.accept),
                    "reason_code": action.reason_code or None,
                    "qa_reason": risk.requested,
                    "document_reference": risk.document_reference,
                }
                if action.accept:
                    data = _disposition_event(
                        ref,
                        risk,
                        "release_on_physician_request",
                        risk.requested or "other",
                        risk.document_reference,
                    )
                else:
                    data = _disposition_event(
                        ref, risk, "reject", reasons.PHYSICIAN_DECLINED, risk.document_reference
                    )
            case "hold":
                outcome = machine.put_on_hold(state, action.reason_code)
                data = OrderPutOnHoldV1(**ref, reason=action.reason_code, previous_status=state.status.value)
                extra["hold_reason"] = action.reason_code
            case "resume":
                outcome = machine.resume(state, action.reason_code)
                data = OrderResumedV1(**ref, reason=action.reason_code, status=outcome.state.status.value)
            case "material":
                outcome, data = await _material_disposition(tx, case, action, at)
            case name:
                step, event_type, time_field, column = CONFIRMATIONS[name]
                if name == "lymphodepletion":
                    machine.lymphodepletion_gate(state)  # the order's state first, then what LD needs
                    window = _clinical_for_lymphodepletion(case, action, extra)
                    outcome = machine.start_lymphodepletion(state, window, case.day_of(at))
                elif name == "infusion":
                    outcome = machine.confirm_infusion(state, case.window, case.day_of(at))
                else:
                    outcome = step(state)
                extra[column] = at
                if name == "apheresis":
                    din = make_coi(facility_id, at.year, await tx.orders.next_coi_sequence(at.year))
                    await tx.collections.add(order_id, order.collection, din, at)
                    extra["din"] = din
                    data = ApheresisCompletedV1(**ref, collected_at=at, din=din, collection=order.collection)
                else:
                    data = event_type(**ref, **{time_field: at})
                if name == "infusion":
                    for task_id in await tx.tasks.administered(order_id, at):
                        tx.audit(
                            "task.due",
                            "order",
                            order_id,
                            new={"task_id": str(task_id), "administered_at": at},
                            reason="authority_notification",
                        )
        if data is None:  # the action's event is its command (a reschedule's rebook), published here
            data, *_ = cases.command_events(case, outcome)
            if cases.new_cycle(outcome):
                await tx.parked.drop_all(order_id)
            outcome = Outcome(outcome.state, outcome.reason, (), outcome.changed)
        if action.signer is not None and signed is not None:
            await _sign(tx, order, action.signer, action.name, signed)
        event = await tx.publish(data)
        parked = await cases.apply(
            tx,
            case,
            outcome,
            event=event,
            extra_fields=extra,
            note=action.note,
            action=f"order.{action.name}",
            reason_code=action.reason_code or None,
        )
        log.info("hospital action applied", action=action.name, status=outcome.state.status.value)
        if outcome.changed and parked:
            await cases.replay_parked(tx, order_id)


def _clinical_for_lymphodepletion(
    case: cases.Case, action: Action, extra: dict[str, object]
) -> Window | None:
    """The window LD is gated with: the order's indication's. An order placed without one (before issue
    11, or by a caller that left it out) names it with its first LD (kept on the order, with the weight
    its dose needs); a product with treatment facts needs one (422 naming `indication`)."""
    order = case.order
    indication = order.indication
    if action.indication is not None and action.indication != indication:
        if indication is not None:
            raise Invalid("indication", "differs from the order's: the order's indication is kept")
        check_clinical(order.product_code, action.indication, action.weight_kg or order.weight_kg)
        indication = action.indication
        extra["indication"] = indication
        if action.weight_kg is not None and order.weight_kg is None:
            extra["weight_kg"] = action.weight_kg
    product = product_catalogue().get(order.product_code)
    if indication is None and product is not None and product.treatment is not None:
        known = ", ".join(product.treatment.codes())
        raise Invalid(
            "indication",
            f"is required for lymphodepletion: it decides the regimen and the infusion window "
            f"(one of: {known})",
        )
    return cases.window_for(order.product_code, indication)


async def _material_disposition(
    tx: OrderTx, case: cases.Case, action: Action, at: datetime
) -> tuple[Outcome, EventData]:
    """Record what was done with the material or product left when the order ended (once per material)."""
    order, state = case.order, case.order.state()
    recorded = {r.material for r in await tx.materials.of_order(order.order_id)}
    material, fate = action.material or "", action.outcome or ""
    words = machine.record_material_fate(
        state, order.end_material, recorded, material, fate, action.reason_code
    )
    left = order.end_material or {}
    record = MaterialDisposition(
        disposition_id=uuid.uuid4(),
        order_id=order.order_id,
        material=material,
        location=str(left.get("location")),
        outcome=fate,
        reason_code=action.reason_code,
        performed_at=at,
        recorded_by=action.by or "unknown",
        recorded_at=cases.now(),
        document_reference=action.document_reference,
    )
    await tx.materials.add(record)
    tx.audit(
        "order.material_disposition.recorded",
        "order",
        order.order_id,
        new={
            "disposition_id": str(record.disposition_id),
            "material": material,
            "location": record.location,
            "outcome": fate,
            "performed_at": at,
            "document_reference": action.document_reference,
        },
        reason=action.reason_code,
    )
    data = MaterialDispositionRecordedV1(
        **order.ref(),  # type: ignore[arg-type]
        material=material,  # type: ignore[arg-type]
        left_at=record.location,  # type: ignore[arg-type]
        outcome=fate,  # type: ignore[arg-type]
        reason=action.reason_code,
        document_reference=action.document_reference,
    )
    return Outcome(state, words, changed=False), data


# ---- QA's authority-notification tasks -----------------------------------------------------------------


async def complete_task(
    uow: UnitOfWork, task_id: uuid.UUID, *, by: str, reference: str, at: datetime | None = None
) -> uuid.UUID:
    """QA notified the authority: the task is done, with the notification's reference (an opaque id in
    QA's document system). Returns the order id. A task done already is refused (409)."""
    async with uow.begin() as tx:
        task = await tx.tasks.get(task_id, lock=True)
        if task is None:
            raise NotFound("Task", task_id)
        if task.state != "open":
            raise NotAllowedNow("state", "the task is done already")
        when = at or cases.now()
        await tx.tasks.complete(task_id, by=by, reference=reference, at=when)
        tx.audit(
            "task.completed",
            "order",
            task.order_id,
            old={"task_id": str(task_id), "state": task.state},
            new={
                "task_id": str(task_id),
                "state": "done",
                "reference": reference,
                "overdue": task.overdue(when),
            },
            reason="authority_notification",
        )
    return task.order_id


async def audit_signature_refusal(uow: UnitOfWork, object_ref: str, refusal: dict[str, object]) -> None:
    """A refused signature (no token, invalid, expired, replayed, wrong client, organisation or role),
    audited in a transaction of its own (21 CFR 11.10(e), 11.300(d)): the reason code, meaning, method and
    path, the user once the token verified. `object_ref` is `order:<id>`, `task:<id>` or `unknown`; the
    entry's object type is `signature_refusal`, so a centre's view of an order's trail does not list
    attempts made by others on it."""
    async with uow.begin() as tx:
        tx.audit(
            "signature.refused",
            "signature_refusal",
            object_ref,
            new={k: refusal.get(k) for k in ("status", "meaning", "method", "path", "client_id", "user_id")},
            reason=str(refusal.get("reason") or "signature-refused"),
        )
