"""The order as a case: its states, what each fact and each hospital action does to it, and the
compensations it asks of the other services. Pure: no I/O (see docs/lifecycle.md).

`on_fact` answers a fact from another service; `on_command` answers a hospital (or QA) action. Both
return an `Outcome`: the new state (possibly unchanged), the reason recorded on the timeline, and the
commands to publish (rebook, remanufacture, fail). A fact that arrives for a state already left is
recorded and ignored; a forbidden action raises a domain error (`NotAllowedNow` for the order's state,
`Invalid` for bad input).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import date, timedelta
from enum import StrEnum
from typing import Any

from order_service.domain import reasons as codes
from v2v_contracts.errors import Invalid, NotAllowedNow
from v2v_contracts.reference.product import Product


class OrderStatus(StrEnum):
    SUBMITTED = "submitted"
    WAITLISTED = "waitlisted"
    SLOT_RESERVED = "slot_reserved"
    BOOKING_CONFIRMED = "booking_confirmed"
    INBOUND_SHIPMENT_PLANNED = "inbound_shipment_planned"
    APHERESIS_COMPLETED = "apheresis_completed"
    MATERIAL_IN_TRANSIT = "material_in_transit"
    MATERIAL_RECEIVED = "material_received"
    MANUFACTURING = "manufacturing"
    QC_PENDING = "qc_pending"
    RELEASED = "released"
    PRODUCT_IN_TRANSIT = "product_in_transit"
    PRODUCT_DELIVERED = "product_delivered"
    PRODUCT_RECEIVED = "product_received"
    RESCHEDULING = "rescheduling"
    QUARANTINED = "quarantined"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


S = OrderStatus
TERMINAL = frozenset({S.COMPLETED, S.CANCELLED, S.FAILED})
BEFORE_APHERESIS = frozenset(
    {
        S.SUBMITTED,
        S.WAITLISTED,
        S.SLOT_RESERVED,
        S.BOOKING_CONFIRMED,
        S.INBOUND_SHIPMENT_PLANNED,
        S.RESCHEDULING,
    }
)
MATERIAL_ON_THE_WAY = frozenset({S.INBOUND_SHIPMENT_PLANNED, S.APHERESIS_COMPLETED, S.MATERIAL_IN_TRANSIT})
IN_MANUFACTURE = frozenset({S.MATERIAL_RECEIVED, S.MANUFACTURING, S.QC_PENDING})
PRODUCT_OUT = frozenset({S.RELEASED, S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED})
AVAILABLE = frozenset({S.RELEASED, S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED, S.PRODUCT_RECEIVED})

# Every transition the machine may make (used by the property tests and the docs).
ALLOWED: dict[OrderStatus, frozenset[OrderStatus]] = {
    S.SUBMITTED: frozenset({S.WAITLISTED, S.SLOT_RESERVED, S.RESCHEDULING, S.CANCELLED}),
    S.WAITLISTED: frozenset({S.SLOT_RESERVED, S.RESCHEDULING, S.CANCELLED}),
    S.SLOT_RESERVED: frozenset({S.BOOKING_CONFIRMED, S.RESCHEDULING, S.CANCELLED}),
    S.BOOKING_CONFIRMED: frozenset({S.INBOUND_SHIPMENT_PLANNED, S.RESCHEDULING, S.CANCELLED}),
    S.INBOUND_SHIPMENT_PLANNED: frozenset(
        {S.APHERESIS_COMPLETED, S.MATERIAL_RECEIVED, S.RESCHEDULING, S.FAILED, S.CANCELLED}
    ),
    S.APHERESIS_COMPLETED: frozenset(
        {S.MATERIAL_IN_TRANSIT, S.MATERIAL_RECEIVED, S.RESCHEDULING, S.FAILED, S.CANCELLED}
    ),
    S.MATERIAL_IN_TRANSIT: frozenset({S.MATERIAL_RECEIVED, S.RESCHEDULING, S.FAILED, S.CANCELLED}),
    S.MATERIAL_RECEIVED: frozenset(
        {
            S.MANUFACTURING,
            S.QC_PENDING,
            S.RELEASED,
            S.MATERIAL_RECEIVED,
            S.RESCHEDULING,
            S.FAILED,
            S.CANCELLED,
        }
    ),
    S.MANUFACTURING: frozenset(
        {S.QC_PENDING, S.RELEASED, S.MATERIAL_RECEIVED, S.RESCHEDULING, S.FAILED, S.CANCELLED}
    ),
    S.QC_PENDING: frozenset({S.RELEASED, S.MATERIAL_RECEIVED, S.RESCHEDULING, S.FAILED, S.CANCELLED}),
    S.RELEASED: frozenset({S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED, S.QUARANTINED, S.CANCELLED}),
    S.PRODUCT_IN_TRANSIT: frozenset({S.PRODUCT_DELIVERED, S.PRODUCT_RECEIVED, S.QUARANTINED, S.CANCELLED}),
    S.PRODUCT_DELIVERED: frozenset({S.PRODUCT_RECEIVED, S.QUARANTINED, S.CANCELLED}),
    S.PRODUCT_RECEIVED: frozenset({S.COMPLETED, S.CANCELLED}),
    S.RESCHEDULING: frozenset({S.SLOT_RESERVED, S.WAITLISTED, S.CANCELLED}),
    S.QUARANTINED: frozenset(
        {
            S.RELEASED,
            S.PRODUCT_IN_TRANSIT,
            S.PRODUCT_DELIVERED,
            S.MATERIAL_RECEIVED,
            S.RESCHEDULING,
            S.FAILED,
            S.CANCELLED,
        }
    ),
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
    S.FAILED: frozenset(),
}


@dataclass(frozen=True)
class Rules:
    """Per product, from the shared product catalogue (`v2v_contracts.reference`)."""

    max_runs: int = 2  # 1 = no remanufacture
    max_recollections: int = 1
    retains_material: bool = True
    recollection_lead_days: int = 7

    @classmethod
    def of(cls, product: Product | None) -> Rules:
        """The rules of a catalogue product (the defaults when the product is not in the catalogue)."""
        if product is None:
            return cls()
        return cls(
            max_runs=product.max_runs,
            max_recollections=product.max_recollections,
            retains_material=product.retains_material,
            recollection_lead_days=product.recollection_lead_days,
        )


@dataclass(frozen=True)
class OrderState:
    status: OrderStatus
    run: int = 1
    recollections: int = 0
    slot_id: str | None = None
    site_id: str | None = None
    apheresis_date: date | None = None
    lymphodepletion: bool = False
    status_before_quarantine: OrderStatus | None = None
    rebook_pending: bool = False  # a rebook was asked for and its slot has not been reserved yet


# The commands carry a reason code (`reasons`), never words: they become events.


@dataclass(frozen=True)
class Rebook:
    kind: str  # reschedule | recollection | site_outage
    reason: str  # a reason code
    apheresis_date: date
    exclude_site_id: str | None = None


@dataclass(frozen=True)
class Remanufacture:
    run: int
    site_id: str
    reason: str  # a reason code


@dataclass(frozen=True)
class Fail:
    reason: str  # a reason code


Command = Rebook | Remanufacture | Fail


@dataclass(frozen=True)
class Outcome:
    state: OrderState
    reason: str  # what happened, in words, for the order's timeline (stays in the order service)
    commands: tuple[Command, ...] = ()
    changed: bool = True


def not_now(reason: str) -> NotAllowedNow:
    """The order's current state does not allow the action (409, problem type `order-state`)."""
    return NotAllowedNow("status", reason)


NOT_YET = "recorded only: not applicable while"  # may apply once earlier facts arrive

# Slot releases scheduling makes on its own, when the site may no longer make the order (its approval
# for the order's market was withdrawn, or the site went inactive): scheduling rebooks the order (or
# waitlists it, told `no_approved_site`) in the same step, so the order follows as it does a rebook.
MOVED_BY_SCHEDULING = frozenset({"approval_withdrawn", "site_inactive"})


def _keep(state: OrderState, reason: str) -> Outcome:
    return Outcome(state, reason, changed=False)


def _to(
    state: OrderState, status: OrderStatus, reason: str, commands: tuple[Command, ...] = (), **kw: Any
) -> Outcome:
    if any(isinstance(c, Rebook) for c in commands):
        kw["rebook_pending"] = True
    return Outcome(dataclasses.replace(state, status=status, **kw), reason, commands)


def recollect(state: OrderState, rules: Rules, cause: str, why: str, today: date) -> Outcome:
    """New apheresis, new slot; or fail when recollections are used up. `cause` is the reason code the
    commands carry, `why` the words on the timeline."""
    if state.recollections >= rules.max_recollections:
        return _to(
            state, S.FAILED, f"{why}; no recollection left", (Fail(f"{cause}:{codes.NO_RECOLLECTION_LEFT}"),)
        )
    when = today + timedelta(days=rules.recollection_lead_days)
    return _to(
        state,
        S.RESCHEDULING,
        f"recollection: {why}",
        (Rebook("recollection", cause, when),),
        recollections=state.recollections + 1,
        run=1,
        apheresis_date=when,
    )


def product_lost(
    state: OrderState, rules: Rules, cause: str, why: str, retained: bool, today: date
) -> Outcome:
    """OOS, failed manufacture or a rejected product: remanufacture, else recollect, else fail."""
    if retained and state.run < rules.max_runs and state.site_id:
        nxt = state.run + 1
        return _to(
            state,
            S.MATERIAL_RECEIVED,
            f"remanufacture (run {nxt}): {why}",
            (Remanufacture(nxt, state.site_id, cause),),
            run=nxt,
            status_before_quarantine=None,
        )
    return recollect(dataclasses.replace(state, status_before_quarantine=None), rules, cause, why, today)


def on_fact(state: OrderState, event_type: str, data: dict[str, Any], rules: Rules, today: date) -> Outcome:
    st = state.status
    reason = str(data.get("reason") or event_type)
    if st in TERMINAL:
        return _keep(state, f"recorded only: order is {st.value}")
    run_matches = int(data.get("run", state.run)) == state.run
    slot_matches = data.get("slot_id") is None or str(data.get("slot_id")) == state.slot_id
    match event_type:
        case "scheduling.slot_unavailable.v1":
            why = f"({reason}) {data.get('detail') or ''}".strip()
            if st in {S.SUBMITTED, S.RESCHEDULING}:
                return _to(state, S.WAITLISTED, f"waitlisted {why}")
            if st == S.WAITLISTED:  # waiting already: the centre is told the new reason
                return _keep(state, f"still waitlisted {why}")
        case "scheduling.slot_released.v1":
            if reason not in MOVED_BY_SCHEDULING or str(data.get("slot_id")) != state.slot_id:
                return _keep(state, reason)  # the release of a slot the order already left
            if st in {S.SLOT_RESERVED, S.BOOKING_CONFIRMED, S.INBOUND_SHIPMENT_PLANNED}:
                return _to(
                    state,
                    S.RESCHEDULING,
                    f"moving to another site: {data.get('site_id')} may no longer make it ({reason})",
                    rebook_pending=True,
                )
            return _keep(state, f"slot released ({reason}) after apheresis: material not moved")
        case "scheduling.slot_reserved.v1":
            if state.rebook_pending and not str(data.get("reason", "")).startswith("rebook:"):
                return _keep(state, "recorded only: a slot for a request the rebook superseded")
            if st in {S.SUBMITTED, S.WAITLISTED, S.RESCHEDULING}:
                return _to(
                    state,
                    S.SLOT_RESERVED,
                    f"slot at {data['site_id']} ({reason})",
                    rebook_pending=False,
                    slot_id=str(data["slot_id"]),
                    site_id=str(data["site_id"]),
                    apheresis_date=date.fromisoformat(str(data["apheresis_date"])),
                )
        case "site.booking_confirmed.v1":
            if st == S.SLOT_RESERVED and slot_matches:
                return _to(state, S.BOOKING_CONFIRMED, "booked into the site's plan")
        case "site.booking_affected.v1":
            if (
                st in {S.SLOT_RESERVED, S.BOOKING_CONFIRMED, S.INBOUND_SHIPMENT_PLANNED}
                and data.get("site_id") == state.site_id
            ):
                when = max(state.apheresis_date or today, today)
                return _to(
                    state,
                    S.RESCHEDULING,
                    f"moving to another site: {reason}",
                    (
                        Rebook(
                            "site_outage",
                            codes.as_code(data.get("reason"), codes.SITE_OUTAGE),
                            when,
                            exclude_site_id=state.site_id,
                        ),
                    ),
                )
        case "logistics.shipment_planned.v1":
            if data.get("leg") == "inbound_apheresis" and st == S.BOOKING_CONFIRMED and slot_matches:
                return _to(state, S.INBOUND_SHIPMENT_PLANNED, "inbound shipment planned")
        case "logistics.shipment_milestone.v1":
            leg, milestone = data.get("leg"), data.get("milestone")
            if (
                leg == "inbound_apheresis"
                and milestone in {"picked_up", "in_transit"}
                and st == S.APHERESIS_COMPLETED
            ):
                return _to(state, S.MATERIAL_IN_TRANSIT, f"material {milestone}")
            if leg == "outbound_product" and milestone in {"picked_up", "in_transit"} and st == S.RELEASED:
                return _to(state, S.PRODUCT_IN_TRANSIT, f"product {milestone}")
            if (
                leg == "outbound_product"
                and milestone == "delivered"
                and st in {S.RELEASED, S.PRODUCT_IN_TRANSIT}
            ):
                return _to(state, S.PRODUCT_DELIVERED, "product delivered to the centre")
        case "logistics.shipment_excursion.v1":
            excursion = f"temperature excursion {data.get('reading_c')} °C on {data.get('leg')}"
            if data.get("leg") == "inbound_apheresis" and st in MATERIAL_ON_THE_WAY:
                return recollect(state, rules, codes.INBOUND_EXCURSION, excursion, today)
            if data.get("leg") == "outbound_product" and st in PRODUCT_OUT:
                return _to(
                    state,
                    S.QUARANTINED,
                    f"product quarantined: {excursion}; decision required",
                    status_before_quarantine=st,
                )
        case "site.material_received.v1":
            if st in MATERIAL_ON_THE_WAY:
                return _to(state, S.MATERIAL_RECEIVED, "material received, chain of identity verified")
        case "site.material_rejected.v1":
            if st in MATERIAL_ON_THE_WAY:
                return recollect(
                    state, rules, codes.MATERIAL_REJECTED, f"material rejected at receipt: {reason}", today
                )
        case "site.manufacturing_step_completed.v1":
            if st in {S.MATERIAL_RECEIVED, S.MANUFACTURING} and run_matches:
                step = data.get("step")
                if step == "cryopreservation":
                    return _to(state, S.QC_PENDING, "cryopreserved; QC pending")
                return _to(state, S.MANUFACTURING, f"manufacturing: {step} done")
        case "site.product_released.v1":
            if st in IN_MANUFACTURE and run_matches:
                return _to(state, S.RELEASED, "QC released the product")
        case "site.product_out_of_specification.v1" | "site.manufacturing_failed.v1":
            if st in IN_MANUFACTURE and run_matches:
                oos = "specification" in event_type
                kind = "out of specification" if oos else "manufacturing failed"
                cause = codes.OUT_OF_SPECIFICATION if oos else codes.MANUFACTURING_FAILED
                return product_lost(
                    state, rules, cause, f"{kind}: {reason}", bool(data.get("retained_material")), today
                )
        case _:
            return _keep(state, reason)
    return _keep(state, f"{NOT_YET} {st.value}")


# ---- hospital and QA actions ----------------------------------------------------------------------


def cancel(state: OrderState, reason_code: str) -> Outcome:
    """The centre cancels, for one of `reasons.CancelReason`."""
    codes.check_cancel(reason_code)
    if state.status in TERMINAL:
        raise not_now(f"order is already {state.status.value}")
    return _to(state, S.CANCELLED, f"cancelled by the centre: {reason_code}")


def reschedule_apheresis(state: OrderState, new_date: date, reason_code: str, today: date) -> Outcome:
    """The centre moves the apheresis date, for one of `reasons.RescheduleReason`."""
    codes.check_reschedule(reason_code)
    if new_date < today:
        raise Invalid("requested_apheresis_date", "is in the past")
    if state.status not in BEFORE_APHERESIS:
        raise not_now(f"apheresis cannot move once the order is {state.status.value}")
    return _to(
        state,
        S.RESCHEDULING,
        f"apheresis moved to {new_date.isoformat()}: {reason_code}",
        (Rebook("reschedule", reason_code, new_date),),
        apheresis_date=new_date,
    )


def confirm_apheresis(state: OrderState) -> Outcome:
    if state.status != S.INBOUND_SHIPMENT_PLANNED:
        raise not_now(
            f"apheresis can be confirmed once the inbound shipment is planned, not while "
            f"{state.status.value}",
        )
    return _to(state, S.APHERESIS_COMPLETED, "apheresis completed at the centre")


def start_lymphodepletion(state: OrderState) -> Outcome:
    if state.status not in AVAILABLE:
        raise not_now(
            f"lymphodepletion may start only after the product is released (order is {state.status.value})",
        )
    if state.lymphodepletion:
        raise not_now("lymphodepletion was already recorded")
    return Outcome(dataclasses.replace(state, lymphodepletion=True), "lymphodepletion started")


def confirm_product_receipt(state: OrderState) -> Outcome:
    if state.status not in {S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED}:
        raise not_now(f"no product on its way to the centre (order is {state.status.value})")
    return _to(state, S.PRODUCT_RECEIVED, "product received at the centre, identity verified")


def confirm_infusion(state: OrderState) -> Outcome:
    if state.status != S.PRODUCT_RECEIVED:
        raise not_now(f"infusion needs the product received (order is {state.status.value})")
    if not state.lymphodepletion:
        raise not_now("infusion needs lymphodepletion recorded first")
    return _to(state, S.COMPLETED, "patient infused")


def decide_quarantine(
    state: OrderState, decision: str, reason_code: str, rules: Rules, today: date
) -> Outcome:
    """QA releases or rejects a quarantined product, for a reason code that fits the decision."""
    codes.check_quarantine(decision, reason_code)
    if state.status != S.QUARANTINED:
        raise not_now(f"no quarantined product (order is {state.status.value})")
    if decision == "release":
        back = state.status_before_quarantine or S.RELEASED
        return _to(state, back, f"quarantine released: {reason_code}", status_before_quarantine=None)
    return product_lost(
        state,
        rules,
        codes.QUARANTINE_REJECTED,
        f"quarantined product rejected: {reason_code}",
        rules.retains_material,
        today,
    )


@dataclass(frozen=True)
class Durations:
    manufacturing_days: int
    qc_days: int
    outbound_transit_days: int = 2
    infusion_after_release_days: int = 2  # lymphodepletion starts at release; infusion 2-14 days later


@dataclass
class Actuals:
    apheresis_date: date | None = None  # planned (slot) date
    manufacturing_start_date: date | None = None
    material_received: date | None = None
    released: date | None = None
    delivered: date | None = None
    extra: dict[str, date] = field(default_factory=dict)


def predict(d: Durations, a: Actuals) -> dict[str, date | None]:
    """Predicted dates of the remaining steps, updated as actual dates arrive."""
    start = a.material_received or a.manufacturing_start_date
    release = a.released or (start + timedelta(days=d.manufacturing_days + d.qc_days) if start else None)
    delivery = a.delivered or (release + timedelta(days=d.outbound_transit_days) if release else None)
    infusion = None
    if release and delivery:
        infusion = max(delivery, release + timedelta(days=d.infusion_after_release_days))
    return {
        "apheresis": a.apheresis_date,
        "manufacturing_start": start,
        "release": release,
        "delivery": delivery,
        "earliest_infusion": infusion,
    }
