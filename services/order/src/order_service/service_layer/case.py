"""The order as a case, persisted: load an order with what its rules need, write an outcome of the state
machine (state, timeline, the commands it asks of the other services), and apply facts that were parked
until the order's state admits them. Shared by the event handlers and the hospital actions."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from order_service.adapters.repository import OrderTx
from order_service.domain import order as machine
from order_service.domain.order import OrderStatus, Outcome, Rules, Window
from order_service.domain.records import Centre, OrderRecord, TimelineEntry
from v2v_contracts import (
    EVENT_TYPES,
    CloudEvent,
    EventData,
    LymphodepletionClearedV1,
    MaterialReceivedV1,
    OrderEventData,
    OrderFailedV1,
    ProductReleasedV1,
    RebookRequestedV1,
    RemanufactureRequestedV1,
    ShipmentMilestoneV1,
    SlotReservedV1,
)
from v2v_contracts.errors import CoiMismatch, NotFound
from v2v_contracts.reference import product_catalogue
from v2v_observability import get_logger

log = get_logger(__name__)


def now() -> datetime:
    return datetime.now(UTC)


def today_at(centre: Centre, at: datetime | None = None) -> date:
    """The date at the centre (the calendar the centre's dates are in), now or at `at`."""
    return (at or now()).astimezone(ZoneInfo(centre.timezone)).date()


def rules_for(product_code: str) -> Rules:
    """The product's exception rules, from the shared catalogue."""
    return Rules.of(product_catalogue().get(product_code))


def window_for(product_code: str, indication: str | None) -> Window | None:
    """The LD regimen and infusion window of the product for the indication (None: none known)."""
    return Window.of(product_catalogue().get(product_code), indication)


@dataclass(frozen=True)
class Case:
    """An order locked for change, with its centre and its product's rules."""

    order: OrderRecord
    centre: Centre
    rules: Rules

    def today(self) -> date:
        return today_at(self.centre)

    def day_of(self, at: datetime) -> date:
        """The date of `at` in the centre's calendar (LD and infusion days count there)."""
        return today_at(self.centre, at)

    @property
    def window(self) -> Window | None:
        return window_for(self.order.product_code, self.order.indication)


async def load(tx: OrderTx, order_id: uuid.UUID, *, centre: str | None = None) -> Case:
    """The order, locked; `centre` confines it to that centre's orders (another's is not found)."""
    loaded = await tx.orders.get_with_centre(order_id, centre=centre)  # one read: the order and its centre
    if loaded is None:
        raise NotFound("Order", order_id)
    order, found = loaded
    if found is None:  # the foreign key keeps every order's centre
        raise NotFound("Treatment centre", order.treatment_center_id)
    return Case(order, found, rules_for(order.product_code))


def check_fact_coi(order: OrderRecord, event_type: str, coi: str | None) -> None:
    """A fact about the order must carry the order's chain of identity (else it is not about it)."""
    if coi and coi != order.coi:
        raise CoiMismatch(detail=f"COI mismatch on {event_type}: event {coi} vs order {order.coi}")


def command_events(case: Case, outcome: Outcome) -> list[EventData]:
    """The commands an outcome asks of the other services, as events."""
    order, centre = case.order, case.centre
    out: list[EventData] = []
    for cmd in outcome.commands:
        if isinstance(cmd, machine.Rebook):
            out.append(
                RebookRequestedV1(
                    **order.ref(),
                    kind=cmd.kind,  # type: ignore[arg-type]
                    reason=cmd.reason,
                    product_code=order.product_code,
                    order_type=order.order_type,  # type: ignore[arg-type]
                    regulator=centre.regulator,
                    region=centre.region,
                    apheresis_date=cmd.apheresis_date,
                    exclude_site_id=cmd.exclude_site_id,
                    material_collected=cmd.collected,
                )
            )
        elif isinstance(cmd, machine.Remanufacture):
            out.append(
                RemanufactureRequestedV1(
                    **order.ref(),
                    site_id=cmd.site_id,
                    reason=cmd.reason,
                    run=cmd.run,
                    product_code=order.product_code,
                    order_type=order.order_type,  # type: ignore[arg-type]
                    regulator=centre.regulator,
                    region=centre.region,
                )
            )
        elif isinstance(cmd, machine.Fail):
            out.append(OrderFailedV1(**order.ref(), reason=cmd.reason))
        elif isinstance(cmd, machine.ClearLymphodepletion):  # issue 11: an alert for the centre
            out.append(
                LymphodepletionClearedV1(
                    **order.ref(),
                    reason=cmd.reason,
                    repeat_allowed=outcome.state.status not in machine.TERMINAL,
                )
            )
    return out


def entry(
    order_id: uuid.UUID,
    event: CloudEvent,
    before: str | None,
    after: str | None,
    reason: str,
    note: str | None = None,
) -> TimelineEntry:
    return TimelineEntry(
        order_id=order_id,
        event_id=event.id,
        event_type=event.type,
        source=event.source,
        occurred_at=event.time,
        status_before=before,
        status_after=after,
        reason=reason,
        note=note,
    )


async def apply(
    tx: OrderTx,
    case: Case,
    outcome: Outcome,
    *,
    event: CloudEvent,
    extra_fields: dict[str, Any] | None = None,
    replayed: bool = False,
    note: str | None = None,
    action: str | None = None,
    reason_code: str | None = None,
) -> bool:
    """Persist an outcome: state, timeline entry for `event` (with the staff's `note`, if any), and the
    commands it asks for. The change is audited in the same transaction: `action` (a hospital or QA
    action, `order.<name>`, with its `reason_code`), else `order.fact` with the fact's event type as
    reason; the actor and the cause are the transaction's (the caller, or the consumer and the event).

    Returns whether the order may have parked facts (False: it has none, `replay_parked` has nothing
    to do)."""
    order = case.order
    before = OrderStatus(order.status)
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
            status_before_quarantine=new.status_before_hold.value if new.status_before_hold else None,
            rebook_pending=new.rebook_pending,
            at_risk=new.at_risk.as_dict() if new.at_risk else None,
            expanded_access=new.expanded_access,
            delivery_confirmed=new.delivery_confirmed,
            lymphodepletion_on=new.lymphodepletion_on,
            lymphodepletions=new.lymphodepletions,
            paused_from=new.paused_from.value if new.paused_from else None,
        )
        if not new.lymphodepletion and order.lymphodepletion_at is not None:
            fields["lymphodepletion_at"] = None  # lost after LD: cleared (the audit keeps the value)
        if new.status is not OrderStatus.ON_HOLD:
            fields["hold_reason"] = None
        if new.status in machine.TERMINAL and new.status is not before:
            fields["ended_reason"] = outcome.reason
            if new.status is not OrderStatus.COMPLETED:
                # what physically exists of the patient's material now: its disposition is recorded later
                fields["end_material"] = machine.material_left(order.state())
        for cmd in outcome.commands:  # a new run makes a new lot; a recollection a new collection (DIN)
            if isinstance(cmd, machine.Remanufacture):  # its slot, when scheduling books it, has the date
                fields.update(lot=None, manufacturing_start_date=None)
            elif isinstance(cmd, machine.Rebook) and cmd.kind == "recollection":
                fields.update(lot=None, din=None)
    audit_change(
        tx,
        order,
        fields,
        action=action or "order.fact",
        reason=reason_code if action else event.type,
        outcome=outcome.reason,
        note=note,
        event=event,
    )
    if replayed:  # its timeline entry was written when it arrived
        await tx.orders.update(order.order_id, **fields)
        await tx.timeline.settle(
            order.order_id,
            event.id,
            status_before=before.value,
            status_after=new.status.value,
            reason=outcome.reason,
        )
        parked = True  # the rest of them, if any
    else:  # the state and the timeline entry in one step, which tells whether facts are parked
        parked = await tx.orders.record(
            order.order_id,
            fields,
            entry(order.order_id, event, before.value, new.status.value, outcome.reason, note),
        )
    if new_cycle(outcome):
        await tx.parked.drop_all(order.order_id)
        parked = False
    for cmd in outcome.commands:
        if isinstance(cmd, machine.NotifyAuthority):
            task = await tx.tasks.open_notification(
                order.order_id, regulator=cmd.regulator, cause=cmd.reason, run=new.run
            )
            tx.audit(
                "task.opened",
                "order",
                order.order_id,
                new={"task_id": str(task), "kind": "authority_notification", "regulator": cmd.regulator},
                reason=cmd.reason,
            )
    for data in command_events(case, outcome):
        command = await tx.publish(data)
        await tx.timeline.add(
            entry(
                order.order_id,
                command,
                new.status.value,
                new.status.value,
                str(getattr(data, "reason", outcome.reason)),
            )
        )
    return parked


def audit_change(
    tx: OrderTx,
    order: OrderRecord,
    fields: dict[str, Any],
    *,
    action: str,
    reason: str | None,
    outcome: str,
    note: str | None,
    event: CloudEvent,
) -> None:
    """Audit what changed on the order: the fields that differ, before and after (21 CFR 11.10(e): the
    earlier values are kept, never obscured), with the state machine's words for the outcome, the staff's
    note (both stay in the order service) and the event that carries the change."""
    old = {k: getattr(order, k, None) for k in fields}
    changed = {k: v for k, v in fields.items() if old[k] != v}
    if not changed and action == "order.fact":
        return  # a fact recorded on the timeline that changed nothing (parked, ignored, repeated)
    new: dict[str, Any] = dict(changed)
    new["outcome"] = outcome
    new["event"] = {"id": str(event.id), "type": event.type}
    if note is not None:
        new["note"] = note
    tx.audit(action, "order", order.order_id, old={k: old[k] for k in changed}, new=new, reason=reason)


def new_cycle(outcome: Outcome) -> bool:
    """A new slot or a new run: facts parked for the old cycle will never apply."""
    return any(isinstance(c, machine.Rebook | machine.Remanufacture) for c in outcome.commands)


def fact_extras(fact: OrderEventData, outcome: Outcome) -> dict[str, Any]:
    """The dates a fact reports, kept on the order once the fact applied."""
    if not outcome.changed:
        return {}
    if isinstance(fact, SlotReservedV1):
        return {"manufacturing_start_date": fact.manufacturing_start_date}
    if isinstance(fact, MaterialReceivedV1):
        return {"material_received_at": fact.received_at}
    if isinstance(fact, ProductReleasedV1):
        # the run's lot (site.product_released, issue 10): checked with the COI at receipt and infusion
        lot = getattr(fact, "lot", None)
        return {"released_at": fact.released_at, "lot": str(lot) if lot else None}
    if isinstance(fact, ShipmentMilestoneV1) and fact.milestone == "delivered":
        return {"delivered_at": fact.occurred_at}
    return {}


def may_apply_later(outcome: Outcome) -> bool:
    return not outcome.changed and outcome.reason.startswith(machine.NOT_YET)


def decide(case: Case, event_type: str, fact: OrderEventData) -> Outcome:
    """What the state machine makes of a fact."""
    return machine.on_fact(
        case.order.state(), event_type, fact.model_dump(mode="json"), case.rules, case.today()
    )


def parse_fact(event: CloudEvent) -> OrderEventData:
    model = EVENT_TYPES[event.type]
    fact = model.model_validate(event.data)
    assert isinstance(fact, OrderEventData)
    return fact


async def replay_parked(tx: OrderTx, order_id: uuid.UUID, limit: int = 50) -> int:
    """Apply parked facts that the order's new state now admits, oldest first, until none applies."""
    applied = 0
    while applied < limit:
        for parked_id, event in await tx.parked.of(order_id):
            case = await load(tx, order_id)
            fact = parse_fact(event)
            outcome = decide(case, event.type, fact)
            if outcome.changed or not may_apply_later(outcome):
                await tx.parked.drop(parked_id)
            if outcome.changed:
                await apply(
                    tx, case, outcome, event=event, extra_fields=fact_extras(fact, outcome), replayed=True
                )
                log.info("parked fact applied", event_type=event.type, status=outcome.state.status.value)
                applied += 1
                break
        else:
            return applied
    return applied
