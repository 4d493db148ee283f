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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from enum import StrEnum
from typing import Any

from order_service.domain import reasons as codes
from v2v_contracts.errors import Conflict, Invalid, NotAllowedNow
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
    MATERIAL_AT_RISK = "material_at_risk"  # held for QA: OOS, excursion or refused at receipt
    AWAITING_PHYSICIAN = "awaiting_physician"  # QA released an OOS product on physician request
    ON_HOLD = "on_hold"  # the centre paused the patient's journey (issue 11); the order's steps go on beneath
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
HELD = frozenset({S.MATERIAL_AT_RISK, S.AWAITING_PHYSICIAN})
AVAILABLE = frozenset({S.RELEASED, S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED, S.PRODUCT_RECEIVED})
# the product's delivery date is confirmed once the courier picked it up (or booked its delivery, which
# `OrderState.delivery_confirmed` keeps while the order is still `released`)
DELIVERY_CONFIRMED = frozenset({S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED, S.PRODUCT_RECEIVED})

# Every transition the machine may make (used by the property tests and the docs).
ALLOWED: dict[OrderStatus, frozenset[OrderStatus]] = {
    S.SUBMITTED: frozenset({S.WAITLISTED, S.SLOT_RESERVED, S.RESCHEDULING, S.CANCELLED}),
    S.WAITLISTED: frozenset({S.SLOT_RESERVED, S.RESCHEDULING, S.CANCELLED}),
    S.SLOT_RESERVED: frozenset({S.BOOKING_CONFIRMED, S.RESCHEDULING, S.CANCELLED}),
    S.BOOKING_CONFIRMED: frozenset({S.INBOUND_SHIPMENT_PLANNED, S.RESCHEDULING, S.CANCELLED}),
    S.INBOUND_SHIPMENT_PLANNED: frozenset(
        {S.APHERESIS_COMPLETED, S.MATERIAL_RECEIVED, S.MATERIAL_AT_RISK, S.RESCHEDULING, S.CANCELLED}
    ),
    S.APHERESIS_COMPLETED: frozenset(
        {S.MATERIAL_IN_TRANSIT, S.MATERIAL_RECEIVED, S.MATERIAL_AT_RISK, S.RESCHEDULING, S.CANCELLED}
    ),
    S.MATERIAL_IN_TRANSIT: frozenset({S.MATERIAL_RECEIVED, S.MATERIAL_AT_RISK, S.RESCHEDULING, S.CANCELLED}),
    S.MATERIAL_RECEIVED: frozenset(
        {
            S.MANUFACTURING,
            S.QC_PENDING,
            S.RELEASED,
            S.MATERIAL_RECEIVED,
            S.MATERIAL_AT_RISK,
            S.RESCHEDULING,
            S.FAILED,
            S.CANCELLED,
        }
    ),
    S.MANUFACTURING: frozenset(
        {
            S.QC_PENDING,
            S.RELEASED,
            S.MATERIAL_RECEIVED,
            S.MATERIAL_AT_RISK,
            S.RESCHEDULING,
            S.FAILED,
            S.CANCELLED,
        }
    ),
    S.QC_PENDING: frozenset(
        {S.RELEASED, S.MATERIAL_RECEIVED, S.MATERIAL_AT_RISK, S.RESCHEDULING, S.FAILED, S.CANCELLED}
    ),
    S.RELEASED: frozenset({S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED, S.MATERIAL_AT_RISK, S.CANCELLED}),
    S.PRODUCT_IN_TRANSIT: frozenset(
        {S.PRODUCT_DELIVERED, S.PRODUCT_RECEIVED, S.MATERIAL_AT_RISK, S.CANCELLED}
    ),
    S.PRODUCT_DELIVERED: frozenset({S.PRODUCT_RECEIVED, S.MATERIAL_AT_RISK, S.CANCELLED}),
    S.PRODUCT_RECEIVED: frozenset({S.COMPLETED, S.CANCELLED}),
    S.RESCHEDULING: frozenset({S.SLOT_RESERVED, S.WAITLISTED, S.CANCELLED}),
    # held for QA: release goes back where the order was (the site's or the courier's next fact moves it
    # on), reject goes the way a lost product or material goes (remanufacture, recollection, fail)
    S.MATERIAL_AT_RISK: frozenset(
        {
            S.INBOUND_SHIPMENT_PLANNED,
            S.APHERESIS_COMPLETED,
            S.MATERIAL_IN_TRANSIT,
            S.MANUFACTURING,
            S.QC_PENDING,
            S.RELEASED,
            S.PRODUCT_IN_TRANSIT,
            S.PRODUCT_DELIVERED,
            S.AWAITING_PHYSICIAN,
            S.MATERIAL_RECEIVED,
            S.RESCHEDULING,
            S.FAILED,
            S.CANCELLED,
        }
    ),
    S.AWAITING_PHYSICIAN: frozenset(
        {S.MATERIAL_RECEIVED, S.MANUFACTURING, S.QC_PENDING, S.RESCHEDULING, S.FAILED, S.CANCELLED}
    ),
    # on hold (issue 11): resumed where the order's own steps stand; facts move those steps beneath the
    # hold; a cancellation or a failure ends it
    S.ON_HOLD: frozenset(),  # filled in below
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
    S.FAILED: frozenset(),
}
PAUSABLE = frozenset(set(OrderStatus) - TERMINAL - {S.ON_HOLD})
ALLOWED.update({status: ALLOWED[status] | {S.ON_HOLD} for status in PAUSABLE})
ALLOWED[S.ON_HOLD] = frozenset(PAUSABLE | {S.CANCELLED, S.FAILED})


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
class AtRisk:
    """Material held for QA's disposition, and why (the fact that put it at risk).

    `cause`: `out_of_specification` (QC found the product out of specification), `excursion` (a shipment's
    temperature excursion beyond the product's rule, `leg` inbound or outbound) or `receipt` (the site
    refused the material at receipt and holds it). `reason` is the fact's code (a QcFinding, a
    ReceiptRejection) or `temperature_excursion`. `requested` is QA's code once QA released an OOS product
    on physician request (the order then waits for the physician's signed decision)."""

    cause: str  # out_of_specification | excursion | receipt
    reason: str
    leg: str | None = None  # inbound_apheresis | outbound_product (excursion)
    site_id: str | None = None
    run: int | None = None  # out_of_specification
    shipment_id: str | None = None  # excursion
    retained: bool = False  # out_of_specification: whether the site holds material for a remanufacture
    requested: str | None = None  # QA's reason code of a release on physician request
    document_reference: str | None = None  # QA's document, once QA decided

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def of(cls, value: dict[str, Any] | None) -> AtRisk | None:
        return cls(**value) if value else None


@dataclass(frozen=True)
class OrderState:
    status: OrderStatus
    run: int = 1
    recollections: int = 0
    slot_id: str | None = None
    site_id: str | None = None
    apheresis_date: date | None = None
    lymphodepletion: bool = False
    status_before_hold: OrderStatus | None = None  # where a held order goes back to when QA releases it
    rebook_pending: bool = False  # a rebook was asked for and its slot has not been reserved yet
    at_risk: AtRisk | None = None  # while held (material_at_risk, awaiting_physician)
    expanded_access: bool = False  # an OOS product accepted by the physician where the market needs it
    # issue 11: treatment gates and the patient's journey
    delivery_confirmed: bool = False  # the courier booked (or picked up) the product's delivery
    lymphodepletion_on: date | None = None  # the recorded LD's start, in the centre's calendar
    lymphodepletions: int = 0  # LD regimens recorded in all (a repeat counts)
    paused_from: OrderStatus | None = None  # on hold: where the order's own steps stand


@dataclass(frozen=True)
class Window:
    """An indication's lymphodepleting regimen and the infusion window after it, from the product
    catalogue (`v2v_contracts.reference.treatment`, which explains the day counting): LD completes
    `regimen_days` after its start; infusion is allowed from `min_days` to `max_days` after completion
    (inclusive, the centre's calendar); a repeat LD once the window closed or `repeat_after_days` after
    completion passed, whichever comes first."""

    indication: str
    regimen_days: int
    min_days: int
    max_days: int
    repeat_after_days: int

    @classmethod
    def of(cls, product: Product | None, indication: str | None) -> Window | None:
        facts = product.indication(indication) if product is not None else None
        if facts is None or indication is None:
            return None
        low, high = facts.infusion_window_days
        return cls(indication, facts.ld_regimen_days, low, high, facts.repeat_ld_after_days)

    def completion(self, started: date) -> date:
        return started + timedelta(days=self.regimen_days)

    def infusion_dates(self, started: date) -> tuple[date, date]:
        done = self.completion(started)
        return done + timedelta(days=self.min_days), done + timedelta(days=self.max_days)

    def repeat_from(self, started: date) -> date:
        """The first day a repeat LD may start: the day after the last day the recorded LD allows."""
        return self.completion(started) + timedelta(days=min(self.max_days, self.repeat_after_days) + 1)

    def describe(self, started: date) -> dict[str, Any]:
        """The window of an LD started on `started`, as the API shows it (and a refusal names it)."""
        first, last = self.infusion_dates(started)
        return {
            "indication": self.indication,
            "lymphodepletion_started_on": started.isoformat(),
            "lymphodepletion_completed_on": self.completion(started).isoformat(),
            "min_days_after_completion": self.min_days,
            "max_days_after_completion": self.max_days,
            "earliest_infusion": first.isoformat(),
            "latest_infusion": last.isoformat(),
            "repeat_lymphodepletion_from": self.repeat_from(started).isoformat(),
        }


class OutsideInfusionWindow(NotAllowedNow):
    """Infusion on a day outside the window of the recorded LD (409, problem type `infusion-window`,
    with the window as a `window` member)."""

    kind = "infusion-window"
    title = "Infusion outside the window after lymphodepletion"

    def __init__(self, window: Window, started: date, on: date) -> None:
        first, last = window.infusion_dates(started)
        when = "before" if on < first else "after"
        super().__init__(
            "at",
            f"is {when} the infusion window {first.isoformat()} .. {last.isoformat()} "
            f"({window.min_days}-{window.max_days} days after lymphodepletion completed on "
            f"{window.completion(started).isoformat()}, {window.indication})",
        )
        self.extensions = {"window": window.describe(started)}


def effective_status(state: OrderState) -> OrderStatus:
    """Where the order's own steps stand: beneath a hold, the status it was paused in (moved on by the
    facts that arrived since)."""
    if state.status == S.ON_HOLD and state.paused_from is not None:
        return state.paused_from
    return state.status


def delivery_is_confirmed(state: OrderState) -> bool:
    return state.delivery_confirmed or state.status in DELIVERY_CONFIRMED


# The commands carry a reason code (`reasons`), never words: they become events.


@dataclass(frozen=True)
class Rebook:
    kind: str  # reschedule | recollection | site_outage
    reason: str  # a reason code
    apheresis_date: date
    exclude_site_id: str | None = None
    collected: bool = False  # the material exists (collected, maybe in transit): its date is fixed


@dataclass(frozen=True)
class Remanufacture:
    run: int
    site_id: str
    reason: str  # a reason code


@dataclass(frozen=True)
class Fail:
    reason: str  # a reason code


@dataclass(frozen=True)
class NotifyAuthority:
    """Open the authority-notification task of a non-conforming product administered on physician
    request (EU GMP for ATMPs, Part IV §11.5: the competent authority is notified within 48 hours of
    administration). Not an event: the order service tracks the task itself."""

    regulator: str
    reason: str  # a reason code (out_of_specification)


@dataclass(frozen=True)
class ClearLymphodepletion:
    """The product was lost after the patient's lymphodepletion (a reject, a failure): the LD no longer
    counts and the centre is alerted (`order.lymphodepletion_cleared.v1`); a repeat LD is allowed once a
    product is released again and its delivery confirmed."""

    reason: str  # the loss's cause code
    started_on: date | None = None


Command = Rebook | Remanufacture | Fail | NotifyAuthority | ClearLymphodepletion


@dataclass(frozen=True)
class Outcome:
    state: OrderState
    reason: str  # what happened, in words, for the order's timeline (stays in the order service)
    commands: tuple[Command, ...] = ()
    changed: bool = True


def not_now(reason: str) -> NotAllowedNow:
    """The order's current state does not allow the action (409, problem type `order-state`)."""
    return NotAllowedNow("status", reason)


class SignatureNeeded(Exception):
    """The action needs an electronic signature with this meaning in the order's state (the service
    layer answers 401 `signature-required`)."""

    def __init__(self, meaning: str) -> None:
        super().__init__(meaning)
        self.meaning = meaning


NOT_YET = "recorded only: not applicable while"  # may apply once earlier facts arrive

# Slot releases scheduling makes on its own, when the site may no longer make the order (its approval
# for the order's market was withdrawn, or the site went inactive): scheduling rebooks the order (or
# waitlists it, told `no_approved_site`) in the same step, so the order follows as it does a rebook.
MOVED_BY_SCHEDULING = frozenset({"approval_withdrawn", "site_inactive"})
# issue 11: collected material not yet at its site (waiting for pickup or in transit): a site that can no
# longer make it sends the material elsewhere (a new slot; logistics reroutes the shipment)
COLLECTED_ON_THE_WAY = frozenset({S.APHERESIS_COMPLETED, S.MATERIAL_IN_TRANSIT})


def _keep(state: OrderState, reason: str) -> Outcome:
    return Outcome(state, reason, changed=False)


def _to(
    state: OrderState, status: OrderStatus, reason: str, commands: tuple[Command, ...] = (), **kw: Any
) -> Outcome:
    if any(isinstance(c, Rebook) for c in commands):
        kw["rebook_pending"] = True
    return Outcome(dataclasses.replace(state, status=status, **kw), reason, commands)


def _lost(state: OrderState, cause: str) -> tuple[OrderState, tuple[Command, ...], str]:
    """The product is lost: its delivery no longer stands, and a lymphodepletion recorded for it is
    cleared (with an alert to the centre). The state, the commands and words for the timeline."""
    cleared = dataclasses.replace(state, delivery_confirmed=False)
    if not state.lymphodepletion:
        return cleared, (), ""
    cleared = dataclasses.replace(cleared, lymphodepletion=False, lymphodepletion_on=None)
    return (
        cleared,
        (ClearLymphodepletion(cause, state.lymphodepletion_on),),
        "; the patient's lymphodepletion is cleared (a repeat is allowed with the next product)",
    )


def recollect(state: OrderState, rules: Rules, cause: str, why: str, today: date) -> Outcome:
    """New apheresis, new slot; or fail when recollections are used up. `cause` is the reason code the
    commands carry, `why` the words on the timeline."""
    state, cleared, said = _lost(state, cause)
    if state.recollections >= rules.max_recollections:
        return _to(
            state,
            S.FAILED,
            f"{why}; no recollection left{said}",
            (*cleared, Fail(f"{cause}:{codes.NO_RECOLLECTION_LEFT}")),
        )
    when = today + timedelta(days=rules.recollection_lead_days)
    return _to(
        state,
        S.RESCHEDULING,
        f"recollection: {why}{said}",
        (Rebook("recollection", cause, when), *cleared),
        recollections=state.recollections + 1,
        run=1,
        apheresis_date=when,
    )


def product_lost(
    state: OrderState, rules: Rules, cause: str, why: str, retained: bool, today: date
) -> Outcome:
    """OOS, failed manufacture or a rejected product: remanufacture, else recollect, else fail."""
    site = state.site_id
    if retained and state.run < rules.max_runs and site:
        nxt = state.run + 1
        state, cleared, said = _lost(state, cause)
        return _to(
            state,
            S.MATERIAL_RECEIVED,
            f"remanufacture (run {nxt}): {why}{said}",
            (Remanufacture(nxt, site, cause), *cleared),
            run=nxt,
            status_before_hold=None,
            at_risk=None,
        )
    return recollect(
        dataclasses.replace(state, status_before_hold=None, at_risk=None), rules, cause, why, today
    )


def hold(state: OrderState, risk: AtRisk, why: str) -> Outcome:
    """Material at risk: held for QA's disposition (nothing is remanufactured or recollected yet)."""
    return _to(
        state,
        S.MATERIAL_AT_RISK,
        f"material at risk: {why}; held for QA's disposition",
        status_before_hold=state.status,
        at_risk=risk,
    )


def on_fact(state: OrderState, event_type: str, data: dict[str, Any], rules: Rules, today: date) -> Outcome:
    st = state.status
    reason = str(data.get("reason") or event_type)
    if st in TERMINAL:
        return _keep(state, f"recorded only: order is {st.value}")
    if st == S.ON_HOLD:
        return beneath_hold(state, lambda s: on_fact(s, event_type, data, rules, today))
    run_matches = int(data.get("run") or state.run) == state.run  # a fact without a run: the current one
    slot_matches = data.get("slot_id") is None or str(data.get("slot_id")) == state.slot_id
    match event_type:
        case "scheduling.slot_unavailable.v1":
            why = f"({reason}) {data.get('detail') or ''}".strip()
            if st in {S.SUBMITTED, S.RESCHEDULING}:
                return _to(state, S.WAITLISTED, f"waitlisted {why}")
            if st == S.WAITLISTED:  # waiting already: the centre is told the new reason
                return _keep(state, f"still waitlisted {why}")
            if st in COLLECTED_ON_THE_WAY and state.rebook_pending:
                return _keep(state, f"no site can take the collected material yet {why}: it waits for one")
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
            if st in COLLECTED_ON_THE_WAY:  # scheduling books another site itself: the material follows
                return Outcome(
                    dataclasses.replace(state, rebook_pending=True),
                    f"slot released ({reason}): the collected material goes to another site",
                )
            return _keep(state, f"slot released ({reason}) after apheresis: material not moved")
        case "scheduling.slot_reserved.v1":
            if state.rebook_pending and not str(data.get("reason", "")).startswith("rebook:"):
                return _keep(state, "recorded only: a slot for a request the rebook superseded")
            if data.get("reason") == "remanufacture":
                # issue 10: the slot scheduling booked for a remanufacture at the site holding the material
                if (
                    st in IN_MANUFACTURE
                    and data.get("run") == state.run
                    and data.get("site_id") == state.site_id
                ):
                    return Outcome(
                        dataclasses.replace(state, slot_id=str(data["slot_id"])),
                        f"remanufacture (run {state.run}) booked at {data['site_id']}: manufacturing starts "
                        f"{data['manufacturing_start_date']}",
                    )
                return _keep(state, f"recorded only: a remanufacture slot for run {data.get('run')}")
            if st in COLLECTED_ON_THE_WAY and str(data.get("reason", "")).startswith("rebook:"):
                # issue 11: the collected material's new site; logistics reroutes its shipment there
                return Outcome(
                    dataclasses.replace(
                        state,
                        rebook_pending=False,
                        slot_id=str(data["slot_id"]),
                        site_id=str(data["site_id"]),
                    ),
                    f"material redirected to {data['site_id']} ({reason}): manufacturing starts "
                    f"{data['manufacturing_start_date']}",
                )
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
            if st in COLLECTED_ON_THE_WAY and slot_matches:  # issue 11: the material's new site
                return _keep(state, f"recorded: booked into the plan of {data.get('site_id')}")
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
            if st in COLLECTED_ON_THE_WAY and data.get("site_id") == state.site_id:
                # issue 11: the material exists; a new site takes it, its collection date stays
                return Outcome(
                    dataclasses.replace(state, rebook_pending=True),
                    f"the collected material must go to another site: {reason}",
                    (
                        Rebook(
                            "site_outage",
                            codes.as_code(data.get("reason"), codes.SITE_OUTAGE),
                            # collected by today: on its planned date when that has passed, else earlier
                            min(state.apheresis_date or today, today),
                            exclude_site_id=state.site_id,
                            collected=True,
                        ),
                    ),
                )
            if st in IN_MANUFACTURE and data.get("material_at_site"):
                # issue 11: the material (or a run in progress) is at the site: reported, not moved
                return _keep(
                    state,
                    f"site outage reported ({reason}): the material is at the site, its run waits there",
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
            if leg == "outbound_product" and milestone == "booked" and st == S.RELEASED:
                if state.delivery_confirmed:
                    return _keep(state, "recorded: the product's delivery is booked already")
                return _to(
                    state, S.RELEASED, "product delivery booked by the courier", delivery_confirmed=True
                )
            if leg == "outbound_product" and milestone in {"picked_up", "in_transit"} and st == S.RELEASED:
                return _to(state, S.PRODUCT_IN_TRANSIT, f"product {milestone}")
            if (
                leg == "outbound_product"
                and milestone == "delivered"
                and st in {S.RELEASED, S.PRODUCT_IN_TRANSIT}
            ):
                return _to(state, S.PRODUCT_DELIVERED, "product delivered to the centre")
        case "logistics.shipment_rerouted.v1":  # issue 11: recorded (the slot moved the order already)
            return _keep(
                state,
                f"material rerouted from {data.get('previous_destination')} to {data.get('destination')} "
                f"({data.get('status')})",
            )
        case "logistics.shipment_excursion.v1":
            leg = data.get("leg")
            excursion = f"temperature excursion {data.get('reading_c')} °C on {leg}"
            if data.get("duration_min") is not None:
                excursion += f" for {data.get('duration_min')} min"
            if st in HELD:
                return _keep(state, f"recorded: {excursion}; the material is held for QA already")
            if (leg == "inbound_apheresis" and st in MATERIAL_ON_THE_WAY) or (
                leg == "outbound_product" and st in PRODUCT_OUT
            ):
                risk = AtRisk(
                    "excursion",
                    codes.TEMPERATURE_EXCURSION,
                    leg=str(leg),
                    site_id=state.site_id,
                    shipment_id=str(data["shipment_id"]) if data.get("shipment_id") else None,
                )
                return hold(state, risk, excursion)
        case "site.material_received.v1":
            if st in MATERIAL_ON_THE_WAY:
                return _to(state, S.MATERIAL_RECEIVED, "material received, chain of identity verified")
        case "site.material_rejected.v1":
            if st in HELD:
                return _keep(state, f"recorded: refused at receipt ({reason}); held for QA already")
            if st in MATERIAL_ON_THE_WAY:
                risk = AtRisk(
                    "receipt",
                    codes.as_code(data.get("reason"), codes.MATERIAL_REJECTED),
                    site_id=str(data.get("site_id") or state.site_id or "") or None,
                )
                return hold(state, risk, f"material refused at receipt: {reason}")
        case "site.manufacturing_step_completed.v1":
            if st in {S.MATERIAL_RECEIVED, S.MANUFACTURING} and run_matches:
                step = data.get("step")
                if step == "cryopreservation":
                    return _to(state, S.QC_PENDING, "cryopreserved; QC pending")
                return _to(state, S.MANUFACTURING, f"manufacturing: {step} done")
        case "site.product_released.v1":
            if st in IN_MANUFACTURE and run_matches:
                return _to(state, S.RELEASED, "QC released the product")
        case "site.product_out_of_specification.v1":
            if st in HELD and run_matches:
                return _keep(state, f"recorded: out of specification ({reason}); held for QA already")
            if st in IN_MANUFACTURE and run_matches:
                risk = AtRisk(
                    "out_of_specification",
                    codes.as_code(data.get("reason"), codes.OUT_OF_SPECIFICATION),
                    site_id=str(data.get("site_id") or state.site_id or "") or None,
                    run=state.run,
                    retained=bool(data.get("retained_material")),
                )
                return hold(state, risk, f"out of specification: {reason}")
        case "site.manufacturing_failed.v1":
            # a true failure (nothing releasable) keeps the loss path: remanufacture, recollect or fail
            if st in IN_MANUFACTURE and run_matches:
                return product_lost(
                    state,
                    rules,
                    codes.MANUFACTURING_FAILED,
                    f"manufacturing failed: {reason}",
                    bool(data.get("retained_material")),
                    today,
                )
        case _:
            return _keep(state, reason)
    return _keep(state, f"{NOT_YET} {st.value}")


def beneath_hold(state: OrderState, step: Callable[[OrderState], Outcome]) -> Outcome:
    """Apply `step` to the order's own steps beneath a hold: the order stays on hold (the status it will
    resume in moves on), unless the step ends it (cancelled, failed). Not on hold: `step` as it is."""
    if state.status != S.ON_HOLD or state.paused_from is None:
        return step(state)
    out = step(dataclasses.replace(state, status=state.paused_from, paused_from=None))
    if not out.changed:
        return _keep(state, out.reason)
    if out.state.status in TERMINAL:
        return out
    paused = dataclasses.replace(out.state, status=S.ON_HOLD, paused_from=out.state.status)
    return Outcome(paused, f"{out.reason} (beneath the hold)", out.commands)


# ---- hospital and QA actions ----------------------------------------------------------------------


def put_on_hold(state: OrderState, reason_code: str) -> Outcome:
    """The centre pauses the patient's journey, for one of `reasons.HoldReason`. Sites, couriers and QA
    go on (facts move the order's own steps beneath the hold); the centre's next patient steps
    (apheresis, lymphodepletion, infusion) wait for the resume. A product that arrives is received and
    stored at the centre meanwhile."""
    codes.check_hold(reason_code)
    if state.status in TERMINAL:
        raise not_now(f"order is already {state.status.value}")
    if state.status == S.ON_HOLD:
        raise not_now("the order is on hold already")
    return _to(state, S.ON_HOLD, f"on hold: {reason_code}", paused_from=state.status)


def resume(state: OrderState, reason_code: str) -> Outcome:
    """The centre resumes a held journey, for one of `reasons.ResumeReason`: back where its own steps
    stand now."""
    codes.check_resume(reason_code)
    if state.status != S.ON_HOLD or state.paused_from is None:
        raise not_now(f"the order is not on hold (it is {state.status.value})")
    back = state.paused_from
    return _to(state, back, f"resumed ({back.value}): {reason_code}", paused_from=None)


def _not_on_hold(state: OrderState, what: str) -> None:
    if state.status == S.ON_HOLD:
        raise not_now(f"the order is on hold: resume it before the {what}")


def material_left(state: OrderState) -> dict[str, str] | None:
    """What physically exists of the patient's material when the order ends in `state` (a cancellation
    or a failure): `material` (apheresis_material | product) and where (centre | in_transit | site);
    None before apheresis. Its disposition (destroyed or returned) is recorded afterwards."""
    st = effective_status(state)
    where: tuple[str, str] | None = None
    if st == S.APHERESIS_COMPLETED:
        where = ("apheresis_material", "centre")
    elif st == S.MATERIAL_IN_TRANSIT:
        where = ("apheresis_material", "in_transit")
    elif st == S.MATERIAL_RECEIVED:
        where = ("apheresis_material", "site")
    elif st in {S.MANUFACTURING, S.QC_PENDING, S.AWAITING_PHYSICIAN, S.RELEASED}:
        where = ("product", "site")
    elif st == S.PRODUCT_IN_TRANSIT:
        where = ("product", "in_transit")
    elif st in {S.PRODUCT_DELIVERED, S.PRODUCT_RECEIVED}:
        where = ("product", "centre")
    elif st == S.MATERIAL_AT_RISK and state.at_risk is not None:
        risk = state.at_risk
        if risk.cause == "receipt":
            where = ("apheresis_material", "site")
        elif risk.cause == "out_of_specification":
            where = ("product", "site")
        elif risk.leg == "inbound_apheresis":
            where = ("apheresis_material", "in_transit")
        else:
            where = ("product", "in_transit")
    return None if where is None else {"material": where[0], "location": where[1]}


def record_material_fate(
    state: OrderState, left: dict[str, str] | None, recorded: set[str], material: str, fate: str, code: str
) -> str:
    """A disposition (destroyed or returned) of the material or product that existed when the order
    ended: allowed once per material, after a cancellation or a failure. The words for the timeline."""
    codes.check_material_fate(material, fate, code)
    if state.status not in {S.CANCELLED, S.FAILED}:
        raise not_now(
            f"a disposition of material is recorded once the order is cancelled or failed "
            f"(it is {state.status.value})"
        )
    if left is None:
        raise not_now("no material or product existed when the order ended")
    if material != left["material"]:
        raise Invalid("material", f"the order ended with {left['material']} ({left['location']})")
    if material in recorded:
        raise Conflict("material", "its disposition is recorded already")
    return (
        f"{material.replace('_', ' ')} {fate} ({code}; it was at the {left['location']} when the order ended)"
    )


def cancel(state: OrderState, reason_code: str, *, signed: bool = False) -> Outcome:
    """The centre cancels, for one of `reasons.CancelReason`; once manufacture started only with a
    signature (`signed`: the service layer verified and records it)."""
    codes.check_cancel(reason_code)
    if state.status in TERMINAL:
        raise not_now(f"order is already {state.status.value}")
    if cancellation_is_signed(state) and not signed:
        raise SignatureNeeded("cancellation")
    return _to(
        state,
        S.CANCELLED,
        f"cancelled by the centre{' (signed)' if signed else ''}: {reason_code}",
        status_before_hold=None,
        at_risk=None,
        paused_from=None,
    )


def reschedule_apheresis(state: OrderState, new_date: date, reason_code: str, today: date) -> Outcome:
    """The centre moves the apheresis date, for one of `reasons.RescheduleReason`."""
    codes.check_reschedule(reason_code)
    if new_date < today:
        raise Invalid("requested_apheresis_date", "is in the past")
    if state.status == S.ON_HOLD:  # the patient on hold may be given a new date meanwhile
        return beneath_hold(state, lambda s: reschedule_apheresis(s, new_date, reason_code, today))
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
    _not_on_hold(state, "apheresis")
    if state.status != S.INBOUND_SHIPMENT_PLANNED:
        raise not_now(
            f"apheresis can be confirmed once the inbound shipment is planned, not while "
            f"{state.status.value}",
        )
    return _to(state, S.APHERESIS_COMPLETED, "apheresis completed at the centre")


def lymphodepletion_gate(state: OrderState) -> None:
    """LD may start only once the product is released and its delivery date confirmed (the courier booked
    or picked up the shipment), and not while the order is on hold."""
    _not_on_hold(state, "lymphodepletion")
    if state.status not in AVAILABLE:
        raise not_now(
            f"lymphodepletion may start only after the product is released (order is {state.status.value})",
        )
    if not delivery_is_confirmed(state):
        raise not_now(
            "lymphodepletion may start only once the product's delivery date is confirmed (the courier "
            "booked or picked up the shipment)"
        )


def start_lymphodepletion(
    state: OrderState, window: Window | None = None, started: date | None = None
) -> Outcome:
    """The centre starts the patient's lymphodepleting regimen (`started`: its first day at the centre).
    Only once the product is released and its delivery date confirmed (the courier booked or picked it
    up). Once recorded, a repeat is allowed when the recorded LD can no longer lead to an infusion (its
    window closed, or the label's repeat delay passed: `Window.repeat_from`) or after the product was
    lost (which cleared it). `window`: the order's indication's (None: no treatment facts, no timing)."""
    lymphodepletion_gate(state)
    words = "lymphodepletion started"
    if state.lymphodepletion:
        if window is None or state.lymphodepletion_on is None or started is None:
            raise not_now("lymphodepletion was already recorded")
        allowed = window.repeat_from(state.lymphodepletion_on)
        if started < allowed:
            _, last = window.infusion_dates(state.lymphodepletion_on)
            raise not_now(
                f"lymphodepletion was recorded (started {state.lymphodepletion_on.isoformat()}, infusion "
                f"until {last.isoformat()}): a repeat may start from {allowed.isoformat()}"
            )
        words = "repeat lymphodepletion started (the recorded one can no longer lead to an infusion)"
    elif state.lymphodepletions:
        words = "repeat lymphodepletion started (the earlier one was cleared)"
    if window is not None and started is not None:
        first, last = window.infusion_dates(started)
        words += (
            f" ({window.indication}: {window.regimen_days}-day regimen; infusion "
            f"{first.isoformat()} .. {last.isoformat()})"
        )
    return Outcome(
        dataclasses.replace(
            state,
            lymphodepletion=True,
            lymphodepletion_on=started,
            lymphodepletions=state.lymphodepletions + 1,
        ),
        words,
    )


def confirm_product_receipt(state: OrderState) -> Outcome:
    """The product arrived at the centre (also while the patient is on hold: it is stored there)."""
    if state.status == S.ON_HOLD:
        return beneath_hold(state, confirm_product_receipt)
    if state.status not in {S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED}:
        raise not_now(f"no product on its way to the centre (order is {state.status.value})")
    return _to(state, S.PRODUCT_RECEIVED, "product received at the centre, identity verified")


def confirm_infusion(state: OrderState, window: Window | None = None, on: date | None = None) -> Outcome:
    """The patient was infused (`on`: the day at the centre). Inside the recorded LD's infusion window
    only (`OutsideInfusionWindow`, naming it); nothing else forces the product's use: it may stay stored
    at the centre until the physician clears the patient (a repeat LD opens a new window)."""
    _not_on_hold(state, "infusion")
    if state.status != S.PRODUCT_RECEIVED:
        raise not_now(f"infusion needs the product received (order is {state.status.value})")
    if not state.lymphodepletion:
        raise not_now("infusion needs lymphodepletion recorded first")
    words = "patient infused"
    if window is not None and state.lymphodepletion_on is not None and on is not None:
        first, last = window.infusion_dates(state.lymphodepletion_on)
        if not first <= on <= last:
            raise OutsideInfusionWindow(window, state.lymphodepletion_on, on)
        days = (on - window.completion(state.lymphodepletion_on)).days
        words += f" {days} days after lymphodepletion completed ({window.min_days}-{window.max_days} allowed)"
    return _to(state, S.COMPLETED, words)


# markets where a non-conforming product given on physician request is expanded access: the US (FDA,
# 21 CFR 312 subpart I, individual-patient expanded access, 312.310); elsewhere (EU: EU GMP for ATMPs
# Part IV §11.5) it stays the order's use, with the authority notified
EXPANDED_ACCESS_REGULATORS = frozenset({"FDA"})


def reject_material(state: OrderState, rules: Rules, why: str, today: date) -> Outcome:
    """QA rejected the held material (or the physician declined the OOS product): exactly the path a lost
    product or material took before the disposition workflow."""
    risk = state.at_risk
    assert risk is not None
    cleared = dataclasses.replace(state, status_before_hold=None, at_risk=None)
    if risk.cause == "out_of_specification":
        return product_lost(cleared, rules, codes.OUT_OF_SPECIFICATION, why, risk.retained, today)
    if risk.cause == "receipt":
        return recollect(cleared, rules, codes.MATERIAL_REJECTED, why, today)
    if risk.leg == "inbound_apheresis":
        return recollect(cleared, rules, codes.INBOUND_EXCURSION, why, today)
    return product_lost(cleared, rules, codes.QUARANTINE_REJECTED, why, rules.retains_material, today)


def decide_disposition(
    state: OrderState,
    outcome: str,
    reason_code: str,
    rules: Rules,
    today: date,
    document_reference: str | None = None,
) -> Outcome:
    """QA's signed disposition of held material: `release` (back where the order was: the site's or the
    courier's next fact moves it on), `release_on_physician_request` (OOS only: the centre's physician
    decides next) or `reject` (remanufacture, recollection or fail, as a lost product)."""
    codes.check_disposition(outcome, reason_code)
    if state.status == S.ON_HOLD:
        return beneath_hold(
            state,
            lambda s: decide_disposition(s, outcome, reason_code, rules, today, document_reference),
        )
    risk = state.at_risk
    if state.status != S.MATERIAL_AT_RISK or risk is None:
        raise not_now(f"no material held for a disposition (order is {state.status.value})")
    decided = dataclasses.replace(risk, document_reference=document_reference)
    if outcome == "release":
        back = state.status_before_hold or S.MATERIAL_RECEIVED
        return _to(
            state,
            back,
            f"QA released the material at risk ({risk.cause}): {reason_code}",
            status_before_hold=None,
            at_risk=None,
        )
    if outcome == "release_on_physician_request":
        if risk.cause != "out_of_specification":
            raise Invalid(
                "outcome", "release_on_physician_request applies to an out-of-specification product"
            )
        return _to(
            state,
            S.AWAITING_PHYSICIAN,
            f"QA: out-of-specification product may be released on physician request ({reason_code}); "
            "awaiting the physician's decision",
            at_risk=dataclasses.replace(decided, requested=reason_code),
        )
    return reject_material(
        state, rules, f"QA rejected the material at risk ({risk.cause}): {reason_code}", today
    )


def physician_decision(
    state: OrderState, accept: bool, reason_code: str | None, regulator: str, rules: Rules, today: date
) -> Outcome:
    """The centre's physician accepts (signed) the out-of-specification product for this patient, or
    declines it. Accept: the run is released exceptionally by the site; where the market requires it the
    order becomes expanded access; the authority-notification task opens. Decline: as a reject."""
    if reason_code is not None:
        codes.check_physician(accept, reason_code)
    if state.status == S.ON_HOLD:
        return beneath_hold(
            state, lambda s: physician_decision(s, accept, reason_code, regulator, rules, today)
        )
    risk = state.at_risk
    if state.status != S.AWAITING_PHYSICIAN or risk is None:
        raise not_now(f"no product awaits a physician's decision (order is {state.status.value})")
    if not accept:
        why = f"the physician declined the out-of-specification product: {reason_code or 'declined'}"
        return reject_material(state, rules, why, today)
    expanded = regulator in EXPANDED_ACCESS_REGULATORS
    return _to(
        state,
        state.status_before_hold or S.QC_PENDING,
        "the physician accepted the out-of-specification product"
        + ("; expanded access" if expanded else "")
        + "; the authority is notified within 48 h of administration",
        (NotifyAuthority(regulator, codes.OUT_OF_SPECIFICATION),),
        status_before_hold=None,
        at_risk=None,
        expanded_access=state.expanded_access or expanded,
    )


# once manufacture started (a run's step reported, or the product held or on its way), cancelling
# discards a product made for the patient: a signed decision (21 CFR 11.50, meaning `cancellation`)
MANUFACTURE_STARTED = frozenset(
    {S.MANUFACTURING, S.QC_PENDING, S.AWAITING_PHYSICIAN, *PRODUCT_OUT, S.PRODUCT_RECEIVED}
)


def cancellation_is_signed(state: OrderState) -> bool:
    """Whether cancelling the order now needs a signature (manufacture started)."""
    if state.status == S.ON_HOLD and state.paused_from is not None:
        return cancellation_is_signed(dataclasses.replace(state, status=state.paused_from, paused_from=None))
    if state.status in MANUFACTURE_STARTED:
        return True
    if state.status == S.MATERIAL_AT_RISK and state.at_risk is not None:
        return state.at_risk.cause == "out_of_specification" or state.at_risk.leg == "outbound_product"
    return state.status == S.MATERIAL_RECEIVED and state.run > 1  # a remanufacture: a run was made


@dataclass(frozen=True)
class Durations:
    manufacturing_days: int
    qc_days: int
    outbound_transit_days: int = 2
    infusion_after_release_days: int = 2  # lymphodepletion starts at release; infusion 2-14 days later
    # manufacturing start -> release with QC inside, from the product's published apheresis-to-release
    # median for the region (`PlanningFacts.release_after_start`); None: manufacturing + QC days
    release_after_start_days: int | None = None

    @property
    def start_to_release_days(self) -> int:
        if self.release_after_start_days is not None:
            return self.release_after_start_days
        return self.manufacturing_days + self.qc_days


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
    release = a.released or (start + timedelta(days=d.start_to_release_days) if start else None)
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
