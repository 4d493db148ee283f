"""Service layer: the use cases of the order service, each one unit of work."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from order_service.adapters import repository as repo
from order_service.domain import order as machine
from order_service.domain.coi import make_coi
from order_service.domain.order import OrderState, OrderStatus, Outcome, Refused, Rules
from v2v_contracts import (
    ApheresisCompletedV1,
    CloudEvent,
    EventData,
    LymphodepletionStartedV1,
    OrderCancelledV1,
    OrderCoiMismatchDetectedV1,
    OrderCompletedV1,
    OrderFailedV1,
    OrderSubmittedV1,
    ProductReceivedV1,
    QuarantineDecidedV1,
    RebookRequestedV1,
    RemanufactureRequestedV1,
    new_event,
)
from v2v_contracts.coi import coi_problem
from v2v_messaging import Tx, UnitOfWork
from v2v_observability import bind_order, current_traceparent, get_logger, later_input, set_order_attributes
from v2v_servicekit import Problem, invalid

log = get_logger(__name__)


@dataclass(frozen=True)
class PlaceOrder:
    treatment_center_id: str
    product_code: str
    order_type: str
    patient_ref: str
    requested_apheresis_date: date


async def place_order(
    uow: UnitOfWork, cmd: PlaceOrder, facility_id: str, now: datetime | None = None
) -> uuid.UUID:
    now = now or datetime.now(UTC)
    async with uow.begin() as tx:
        centre = await repo.get_centre(tx.conn, cmd.treatment_center_id)
        if centre is None:
            raise invalid(
                "treatment_center_id", f"unknown or uncertified treatment centre '{cmd.treatment_center_id}'"
            )
        product = await repo.get_product(tx.conn, cmd.product_code)
        if product is None:
            raise invalid("product_code", f"unknown product '{cmd.product_code}'")
        centre_today = now.astimezone(ZoneInfo(centre["timezone"])).date()
        if cmd.requested_apheresis_date < centre_today:
            raise invalid(
                "requested_apheresis_date",
                f"{cmd.requested_apheresis_date.isoformat()} is in the past (today at the centre is "
                f"{centre_today.isoformat()})",
            )
        order_id = uuid.uuid4()
        year = now.year
        coi = make_coi(facility_id, year, await repo.next_coi_sequence(tx.conn, year))
        bind_order(order_id)
        set_order_attributes(order_id, coi)
        await repo.insert_order(
            tx.conn,
            order_id=order_id,
            coi=coi,
            treatment_center_id=cmd.treatment_center_id,
            product_code=cmd.product_code,
            order_type=cmd.order_type,
            patient_ref=cmd.patient_ref,
            requested_apheresis_date=cmd.requested_apheresis_date,
            status=OrderStatus.SUBMITTED.value,
            first_trace=current_traceparent(),
        )
        event = new_event(
            OrderSubmittedV1(
                order_id=order_id,
                coi=coi,
                treatment_center_id=cmd.treatment_center_id,
                product_code=cmd.product_code,
                order_type=cmd.order_type,  # type: ignore[arg-type]
                regulator=centre["regulator"],
                country=centre["country"],
                region=centre["region"],
                requested_apheresis_date=cmd.requested_apheresis_date,
            )
        )
        await tx.outbox.add(event)
        await repo.add_timeline(
            tx.conn,
            order_id=order_id,
            event_id=event.id,
            event_type=event.type,
            source=event.source,
            occurred_at=event.time,
            status_before=None,
            status_after=OrderStatus.SUBMITTED.value,
            reason="order placed by treatment centre",
        )
    log.info("order placed", order_id=str(order_id), product_code=cmd.product_code)
    return order_id


# ---- the case: facts from the other services, actions from the hospital -----------------------------

TIMESTAMP_OF: dict[str, tuple[str, str]] = {  # event type -> (order column, the event's reported time)
    "site.material_received.v1": ("material_received_at", "received_at"),
    "site.product_released.v1": ("released_at", "released_at"),
}


def rules_for(product: Any) -> Rules:
    attrs = product["attributes"] if product is not None else {}
    return Rules(
        max_runs=int(attrs.get("max_runs", 2)),
        max_recollections=int(attrs.get("max_recollections", 1)),
        retains_material=bool(attrs.get("retains_material", True)),
        recollection_lead_days=int(attrs.get("recollection_lead_days", 7)),
    )


def state_of(row: Any) -> OrderState:
    return OrderState(
        status=OrderStatus(row["status"]),
        run=row["run"],
        recollections=row["recollections"],
        slot_id=str(row["slot_id"]) if row["slot_id"] else None,
        site_id=row["site_id"],
        apheresis_date=row["apheresis_date"] or row["requested_apheresis_date"],
        lymphodepletion=row["lymphodepletion_at"] is not None,
        rebook_pending=row["rebook_pending"],
        status_before_quarantine=OrderStatus(row["status_before_quarantine"])
        if row["status_before_quarantine"]
        else None,
    )


def _today(centre_tz: str | None = None) -> date:
    now = datetime.now(UTC)
    return now.astimezone(ZoneInfo(centre_tz)).date() if centre_tz else now.date()


async def _context(tx: Tx, order_id: uuid.UUID) -> tuple[Any, Any, Any]:
    order = await repo.get_order(tx.conn, order_id, lock=True)
    if order is None:
        raise LookupError(order_id)
    product = await repo.get_product(tx.conn, order["product_code"])
    centre = await tx.conn.fetchrow(
        "SELECT * FROM treatment_centers WHERE id = $1", order["treatment_center_id"]
    )
    return order, product, centre


def _ref(order: Any) -> dict[str, Any]:
    return {
        "order_id": order["order_id"],
        "coi": order["coi"],
        "treatment_center_id": order["treatment_center_id"],
    }


def _command_events(order: Any, centre: Any, outcome: Outcome) -> list[EventData]:
    out: list[EventData] = []
    for cmd in outcome.commands:
        if isinstance(cmd, machine.Rebook):
            out.append(
                RebookRequestedV1(
                    **_ref(order),
                    kind=cmd.kind,
                    reason=cmd.reason,
                    product_code=order["product_code"],  # type: ignore[arg-type]
                    order_type=order["order_type"],
                    regulator=centre["regulator"],
                    region=centre["region"],
                    apheresis_date=cmd.apheresis_date,
                    exclude_site_id=cmd.exclude_site_id,
                )
            )
        elif isinstance(cmd, machine.Remanufacture):
            out.append(
                RemanufactureRequestedV1(**_ref(order), site_id=cmd.site_id, reason=cmd.reason, run=cmd.run)
            )
        elif isinstance(cmd, machine.Fail):
            out.append(OrderFailedV1(**_ref(order), reason=cmd.reason))
    return out


async def _apply(
    tx: Tx,
    order: Any,
    centre: Any,
    outcome: Outcome,
    *,
    event: CloudEvent,
    extra_fields: dict[str, Any] | None = None,
    replayed: bool = False,
) -> None:
    """Persist an outcome: state, timeline entry for `event`, and the commands it asks for."""
    before = OrderStatus(order["status"])
    new = outcome.state
    fields: dict[str, Any] = dict(extra_fields or {})
    if outcome.changed:
        fields.update(
            status=new.status.value,
            run=new.run,
            recollections=new.recollections,
            slot_id=uuid.UUID(new.slot_id) if new.slot_id else None,
            site_id=new.site_id,
            apheresis_date=new.apheresis_date,
            status_before_quarantine=new.status_before_quarantine.value
            if new.status_before_quarantine
            else None,
            rebook_pending=new.rebook_pending,
        )
        if new.status in machine.TERMINAL and new.status is not before:
            fields["ended_reason"] = outcome.reason
    if fields:
        await repo.update_order(tx.conn, order["order_id"], **fields)
    if replayed:  # its timeline entry was written when it arrived
        await tx.conn.execute(
            """UPDATE order_timeline SET status_before = $3, status_after = $4, reason = $5
               WHERE order_id = $1 AND event_id = $2""",
            order["order_id"],
            event.id,
            before.value,
            new.status.value,
            outcome.reason,
        )
    else:
        await repo.add_timeline(
            tx.conn,
            order_id=order["order_id"],
            event_id=event.id,
            event_type=event.type,
            source=event.source,
            occurred_at=event.time,
            status_before=before.value,
            status_after=new.status.value,
            reason=outcome.reason,
        )
    if any(isinstance(c, machine.Rebook | machine.Remanufacture) for c in outcome.commands):
        # a new cycle (new slot or new run): facts parked for the old one will never apply
        await tx.conn.execute("DELETE FROM parked_facts WHERE order_id = $1", order["order_id"])
    for data in _command_events(order, centre, outcome):
        command = new_event(data)
        await tx.outbox.add(command)
        await repo.add_timeline(
            tx.conn,
            order_id=order["order_id"],
            event_id=command.id,
            event_type=command.type,
            source=command.source,
            occurred_at=command.time,
            status_before=new.status.value,
            status_after=new.status.value,
            reason=str(getattr(data, "reason", outcome.reason)),
        )


def _fact_extras(event: CloudEvent, outcome: Outcome) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if outcome.changed:
        if event.type == "scheduling.slot_reserved.v1":
            extra["manufacturing_start_date"] = date.fromisoformat(event.data["manufacturing_start_date"])
        if event.type in TIMESTAMP_OF:
            column, reported = TIMESTAMP_OF[event.type]
            extra[column] = _reported(event, reported)
        if event.type == "logistics.shipment_milestone.v1" and event.data.get("milestone") == "delivered":
            extra["delivered_at"] = _reported(event, "occurred_at")
    return extra


def _reported(event: CloudEvent, key: str) -> datetime:
    """The time the reporter gave for what happened, else when the event was published."""
    raw = event.data.get(key)
    try:
        return datetime.fromisoformat(str(raw)) if raw else event.time
    except ValueError:
        return event.time


def _may_apply_later(outcome: Outcome) -> bool:
    return not outcome.changed and outcome.reason.startswith(machine.NOT_YET)


async def apply_fact(tx: Tx, event: CloudEvent) -> None:
    """A fact from scheduling, site or logistics: record it on the timeline, move the state if allowed.

    Topics keep no order between them, so a fact may arrive before the one it follows (a booking
    confirmation before the slot reservation it confirms): such a fact is parked and applied as soon
    as the order reaches a state where it applies."""
    order_id = uuid.UUID(str(event.data["order_id"]))
    order, product, centre = await _context(tx, order_id)
    if event.coi and event.coi != order["coi"]:
        raise ValueError(f"COI mismatch on {event.type}: event {event.coi} vs order {order['coi']}")
    state = state_of(order)
    outcome = machine.on_fact(state, event.type, event.data, rules_for(product), _today(centre["timezone"]))
    if _may_apply_later(outcome):
        await tx.conn.execute(
            """INSERT INTO parked_facts (order_id, event_id, event) VALUES ($1, $2, $3)
               ON CONFLICT (order_id, event_id) DO NOTHING""",
            order_id,
            event.id,
            event.to_json(),
        )
    await _apply(tx, order, centre, outcome, event=event, extra_fields=_fact_extras(event, outcome))
    log.info(
        "order fact applied",
        event_type=event.type,
        status=outcome.state.status.value,
        changed=outcome.changed,
        reason=outcome.reason,
    )
    if outcome.changed:
        await replay_parked(tx, order_id)


async def replay_parked(tx: Tx, order_id: uuid.UUID, limit: int = 50) -> int:
    """Apply parked facts that the order's new state now admits, oldest first, until none applies."""
    applied = 0
    while applied < limit:
        rows = await tx.conn.fetch(
            "SELECT id, event FROM parked_facts WHERE order_id = $1 ORDER BY id", order_id
        )
        for row in rows:
            event = CloudEvent.from_json(bytes(row["event"]))
            order, product, centre = await _context(tx, order_id)
            outcome = machine.on_fact(
                state_of(order), event.type, event.data, rules_for(product), _today(centre["timezone"])
            )
            if outcome.changed or not _may_apply_later(outcome):
                await tx.conn.execute("DELETE FROM parked_facts WHERE id = $1", row["id"])
            if outcome.changed:
                await _apply(
                    tx,
                    order,
                    centre,
                    outcome,
                    event=event,
                    extra_fields=_fact_extras(event, outcome),
                    replayed=True,
                )
                log.info("parked fact applied", event_type=event.type, status=outcome.state.status.value)
                applied += 1
                break
        else:
            return applied
    return applied


def _check_coi(given: str | None, order: Any) -> None:
    if given is None:
        return
    problem = coi_problem(given)
    if problem:
        raise invalid("coi", problem)
    if given != order["coi"]:
        raise CoiMismatch


class CoiMismatch(Exception):
    """The centre presented another chain-of-identity id than the order's."""


async def _alert_coi_mismatch(uow: UnitOfWork, order_id: uuid.UUID, where: str) -> Problem:
    """Record and publish the refused handoff in its own transaction; the caller refuses the action."""
    log.error("COI mismatch refused at the centre", order_id=str(order_id), where=where)
    async with uow.begin() as tx:
        order = await repo.get_order(tx.conn, order_id, lock=True)
        assert order is not None
        event = new_event(OrderCoiMismatchDetectedV1(**_ref(order), where=where))
        await tx.outbox.add(event)
        await repo.add_timeline(
            tx.conn,
            order_id=order_id,
            event_id=event.id,
            event_type=event.type,
            source=event.source,
            occurred_at=event.time,
            status_before=order["status"],
            status_after=order["status"],
            reason=f"chain of identity mismatch at {where}: refused",
        )
    return Problem(
        409,
        "Chain of identity mismatch",
        "coi: does not match this order's chain of identity",
        kind="coi-mismatch",
        errors=[{"field": "coi", "reason": "does not match the order"}],
    )


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


@dataclass(frozen=True)
class Action:
    """A hospital or QA action on an order."""

    name: str  # cancel | reschedule | apheresis | lymphodepletion | receipt | infusion | quarantine
    reason: str = ""
    coi: str | None = None
    at: datetime | None = None
    new_date: date | None = None
    decision: str | None = None


async def act(uow: UnitOfWork, order_id: uuid.UUID, action: Action) -> None:
    first = await uow.pool.fetchval("SELECT first_trace FROM orders WHERE order_id = $1", order_id)
    try:
        with later_input(f"hospital {action.name}", first, **{"v2v.action": action.name}):
            await _act(uow, order_id, action)
    except CoiMismatch:
        raise await _alert_coi_mismatch(uow, order_id, action.name) from None


async def _act(uow: UnitOfWork, order_id: uuid.UUID, action: Action) -> None:
    async with uow.begin() as tx:
        try:
            order, product, centre = await _context(tx, order_id)
        except LookupError:
            raise Problem(404, "Order not found", f"no order with id {order_id}", kind="not-found") from None
        set_order_attributes(order_id, order["coi"])
        _check_coi(action.coi, order)
        state, rules, today = state_of(order), rules_for(product), _today(centre["timezone"])
        at = action.at or datetime.now(UTC)
        ref = _ref(order)
        extra: dict[str, Any] = {}
        data: EventData | None = None  # the action's own event; a reschedule's is its rebook command
        try:
            match action.name:
                case "cancel":
                    outcome = machine.cancel(state, action.reason)
                    data = OrderCancelledV1(**ref, reason=action.reason, previous_status=state.status.value)
                case "reschedule":
                    assert action.new_date is not None
                    outcome = machine.reschedule_apheresis(state, action.new_date, action.reason, today)
                case name if name in CONFIRMATIONS:
                    step, event_type, time_field, column = CONFIRMATIONS[name]
                    outcome = step(state)
                    data = event_type(**ref, **{time_field: at})
                    extra[column] = at
                case "quarantine":
                    outcome = machine.decide_quarantine(
                        state, action.decision or "", action.reason, rules, today
                    )
                    data = QuarantineDecidedV1(**ref, decision=action.decision, reason=action.reason)  # type: ignore[arg-type]
                case _:
                    raise ValueError(action.name)
        except Refused as refused:
            title = "Invalid request" if refused.status == 422 else "Not allowed in the order's current state"
            raise Problem(
                refused.status,
                title,
                f"{refused.field}: {refused.reason}",
                kind="validation" if refused.status == 422 else "order-state",
                errors=[{"field": refused.field, "reason": refused.reason}],
            ) from None
        if data is None:
            data, *_ = _command_events(order, centre, outcome)
            outcome = Outcome(outcome.state, outcome.reason, (), outcome.changed)
        event = new_event(data)
        await tx.outbox.add(event)
        await _apply(tx, order, centre, outcome, event=event, extra_fields=extra)
        log.info("hospital action applied", action=action.name, status=outcome.state.status.value)
        if outcome.changed:
            await replay_parked(tx, order_id)
