"""The use cases behind the order service's HTTP API, each one unit of work: placing an order, the
hospital and QA actions on it, and loading the reference data at start-up."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TypeAlias

from order_service.adapters.repository import OrderTx, read_centres
from order_service.domain import market
from order_service.domain import order as machine
from order_service.domain.coi import coi_problem, make_coi
from order_service.domain.market import Approval
from order_service.domain.order import OrderState, OrderStatus, Outcome
from order_service.domain.records import Centre, OrderRecord
from order_service.service_layer import case as cases
from v2v_contracts import (
    ApheresisCompletedV1,
    EventData,
    LymphodepletionStartedV1,
    OrderCancelledV1,
    OrderCoiMismatchDetectedV1,
    OrderCompletedV1,
    OrderSubmittedV1,
    ProductReceivedV1,
    QuarantineDecidedV1,
)
from v2v_contracts.errors import CoiMismatch, Invalid, NotFound
from v2v_contracts.reference import load_products
from v2v_messaging import AbstractUnitOfWork
from v2v_observability import bind_order, current_traceparent, get_logger, later_input, set_order_attributes
from v2v_observability import names as tn

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


async def _same_placement(tx: OrderTx, order_id: uuid.UUID, cmd: PlaceOrder) -> uuid.UUID:
    order = await tx.orders.get(order_id)
    assert order is not None
    same = (
        order.treatment_center_id,
        order.product_code,
        order.order_type,
        order.patient_ref,
        order.requested_apheresis_date,
    ) == (
        cmd.treatment_center_id,
        cmd.product_code,
        cmd.order_type,
        cmd.patient_ref,
        cmd.requested_apheresis_date,
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
        if placement is not None:
            placed = await tx.orders.by_placement(*placement)
            if placed is not None:
                # placed by an earlier attempt under the same key whose answer was never stored: that
                # order is the answer, if this is the same request
                return await _same_placement(tx, placed, cmd)
        centre = await tx.catalogue.centre(cmd.treatment_center_id)
        if centre is None:
            raise Invalid("treatment_center_id", "unknown or uncertified treatment centre")
        if not await tx.catalogue.has_product(cmd.product_code):
            raise Invalid("product_code", "unknown product")
        centre_today = cases.today_at(centre, now)
        if cmd.requested_apheresis_date < centre_today:
            raise Invalid(
                "requested_apheresis_date",
                f"is in the past (today at the centre is {centre_today.isoformat()})",
            )
        if not await tx.network.known():
            raise market.network_unknown()
        if not await tx.network.serves(Approval(centre.regulator, cmd.order_type, cmd.product_code)):
            raise market.not_served(cmd.product_code, cmd.order_type, centre.regulator, centre.country)
        order_id = uuid.uuid4()
        coi = make_coi(facility_id, now.year, await tx.orders.next_coi_sequence(now.year))
        bind_order(order_id)
        set_order_attributes(order_id, coi)
        await tx.orders.add(
            order_id=order_id,
            coi=coi,
            treatment_center_id=cmd.treatment_center_id,
            product_code=cmd.product_code,
            order_type=cmd.order_type,
            patient_ref=cmd.patient_ref,
            requested_apheresis_date=cmd.requested_apheresis_date,
            status=OrderStatus.SUBMITTED.value,
            first_trace=current_traceparent(),
            placement=placement,
        )
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
            )
        )
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
ACTIONS = frozenset({"cancel", "reschedule", "quarantine", *CONFIRMATIONS})


@dataclass(frozen=True)
class Action:
    """A hospital or QA action on an order. `reason_code` (cancel, reschedule, quarantine) goes into the
    action's event; `note`, the words staff typed with it, only onto the order's timeline."""

    name: str  # cancel | reschedule | apheresis | lymphodepletion | receipt | infusion | quarantine
    reason_code: str = ""
    note: str | None = None
    coi: str | None = None
    at: datetime | None = None
    new_date: date | None = None
    decision: str | None = None


class _CoiRefused(Exception):
    """The centre presented another chain-of-identity id than the order's (leaves the transaction)."""


async def act(uow: UnitOfWork, order_id: uuid.UUID, action: Action, *, centre: str | None = None) -> None:
    """A later input about the order: its own trace, linked to the order's first one. A chain-of-identity
    mismatch refuses the action and raises an alert, recorded in a transaction of its own.

    `centre` confines the action to that centre's orders (the caller's, when it is a centre): another
    centre's order is not found, exactly as an unknown one."""
    if action.name not in ACTIONS:
        raise ValueError(action.name)
    async with uow.read() as tx:
        order = await tx.orders.get(order_id, centre=centre)
    if order is None:
        raise NotFound("Order", order_id)
    try:
        with later_input(f"hospital {action.name}", order.first_trace, **{tn.ACTION: action.name}):
            await _act(uow, order_id, action, centre)
    except _CoiRefused:
        await _alert_coi_mismatch(uow, order_id, action.name)
        raise CoiMismatch(detail="coi: does not match this order's chain of identity") from None


def _check_coi(given: str | None, order: OrderRecord) -> None:
    if given is None:
        return
    problem = coi_problem(given)
    if problem:
        raise Invalid("coi", problem)
    if given != order.coi:
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


async def _act(uow: UnitOfWork, order_id: uuid.UUID, action: Action, centre: str | None) -> None:
    async with uow.begin() as tx:
        case = await cases.load(tx, order_id, centre=centre)
        order = case.order
        set_order_attributes(order_id, order.coi)
        _check_coi(action.coi, order)
        state, today = order.state(), case.today()
        at = action.at or cases.now()
        ref = order.ref()
        extra: dict[str, object] = {}
        data: EventData | None = None  # the action's own event; a reschedule's is its rebook command
        match action.name:
            case "cancel":
                outcome = machine.cancel(state, action.reason_code)
                data = OrderCancelledV1(**ref, reason=action.reason_code, previous_status=state.status.value)
            case "reschedule":
                assert action.new_date is not None
                outcome = machine.reschedule_apheresis(state, action.new_date, action.reason_code, today)
            case "quarantine":
                outcome = machine.decide_quarantine(
                    state, action.decision or "", action.reason_code, case.rules, today
                )
                data = QuarantineDecidedV1(**ref, decision=action.decision, reason=action.reason_code)  # type: ignore[arg-type]
            case name:
                step, event_type, time_field, column = CONFIRMATIONS[name]
                outcome = step(state)
                data = event_type(**ref, **{time_field: at})
                extra[column] = at
        if data is None:  # the action's event is its command (a reschedule's rebook), published here
            data, *_ = cases.command_events(case, outcome)
            if cases.new_cycle(outcome):
                await tx.parked.drop_all(order_id)
            outcome = Outcome(outcome.state, outcome.reason, (), outcome.changed)
        event = await tx.publish(data)
        await cases.apply(
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
        if outcome.changed:
            await cases.replay_parked(tx, order_id)
