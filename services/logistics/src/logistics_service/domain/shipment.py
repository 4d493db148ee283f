"""Pure rules of a shipment: its statuses and their transitions, the temperature range check, and the
shipment itself (one leg of an order) with the moves those rules allow.

No I/O here; the service layer (service_layer/commands.py, service_layer/handlers.py) loads a shipment,
asks it to move, saves it and publishes what happened. Refused inputs are domain errors
(`v2v_contracts.errors`): `Invalid` (422) and `Conflict` of kind `shipment-state` (409).

Statuses of a shipment (one leg: inbound apheresis material or outbound product):

    planned ─▶ ready_for_pickup ─▶ booked ─▶ picked_up ─▶ in_transit ─▶ delivered
       (any status before delivered) ─▶ cancelled            (order cancelled/failed, booking cancelled)
       (any live status, delivered)  ─▶ compromised          (excursion rule breached; QA release resumes)
       (any live status)             ─▶ stopped              (COI mismatch at a handoff; stays stopped)

Courier milestones may skip steps (a pickup scan without a `booked` scan) but never go back.

Temperature (issue 10). Each shipment carries its product's limit and excursion tolerance (domain/lanes.py,
from the catalogue's `shipping` limits with their label sources). Every reading is recorded with whether it
was inside the limit; a reading outside it holds nothing by itself. The rule is CUMULATIVE time outside the
limit: a reading outside counts from its time until the next reading of the shipment (in measurement
order: a logger download fills in between live readings; the last one counts once a later reading, such
as the one the delivery scan carries, shows how long it lasted), every such stretch adds up, and only
when the sum exceeds the tolerance is the excursion published (once per shipment) and the shipment
compromised for QA. Cumulative rather than continuous, because several short warm spells cost the product
as much as one long one (EU GDP guidelines 2013/C 343/01 chapter 9; USP <1079>: excursions are assessed
against the product's stability data, which budget the total time out of range).

Readings are accepted while the shipment is in transit (after its pickup, before its delivery), or after
delivery as a logger download (`source = logger_download`) measured between pickup and delivery. A reading
before pickup is refused: the shipment's ends are custody milestones, not the logger's clock.

Every reason a shipment records (status history, cancellations, ended orders) is a reason code
(`v2v_contracts.fields.ReasonCode`), never free text: an upstream event's reason is carried only when it
is a code itself (`reason_code`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final, Literal

from logistics_service.domain.lanes import Lane
from v2v_contracts.errors import Conflict, DomainError, Invalid
from v2v_contracts.fields import REASON_CODE_PATTERN

Leg = Literal["inbound_apheresis", "outbound_product"]

PLANNED: Final = "planned"
READY_FOR_PICKUP: Final = "ready_for_pickup"
BOOKED: Final = "booked"
PICKED_UP: Final = "picked_up"
IN_TRANSIT: Final = "in_transit"
DELIVERED: Final = "delivered"
CANCELLED: Final = "cancelled"
COMPROMISED: Final = "compromised"
STOPPED: Final = "stopped"

MILESTONES: Final = (BOOKED, PICKED_UP, IN_TRANSIT, DELIVERED)  # the courier's forward order
# the forward order of the statuses a shipment moves through while nothing goes wrong
PROGRESS: Final = (PLANNED, READY_FOR_PICKUP, BOOKED, PICKED_UP, IN_TRANSIT, DELIVERED)
STATUSES: Final = frozenset((*PROGRESS, CANCELLED, COMPROMISED, STOPPED))

PRE_PICKUP: Final = frozenset({PLANNED, READY_FOR_PICKUP, BOOKED})  # the material has not left yet
LIVE: Final = PRE_PICKUP | {PICKED_UP, IN_TRANSIT}  # on its way, or about to be
HALTED: Final = frozenset({COMPROMISED, STOPPED})  # no further milestones
# A shipment in one of these statuses no longer holds its (order, leg) lane: a new shipment of the
# same leg may be planned (recollection after rejected or compromised material, remanufactured
# product after a quarantine reject). Mirrors the partial unique index of migration 0003.
LANE_FREED: Final = frozenset({CANCELLED, COMPROMISED, DELIVERED})
READINGS_REFUSED: Final = frozenset({CANCELLED, DELIVERED})  # live readings; a logger download: see below
REROUTED: Final = "rerouted"  # status reason: the order's booking moved to another site
PICKUP_MILESTONES: Final = frozenset({PICKED_UP, IN_TRANSIT, DELIVERED})  # the material has left
ReadingSource = Literal["courier", "milestone", "logger_download"]
LOGGER_DOWNLOAD: Final = "logger_download"

TRANSITIONS: Final[dict[str, frozenset[str]]] = {
    PLANNED: frozenset({READY_FOR_PICKUP, *MILESTONES, CANCELLED, COMPROMISED, STOPPED}),
    READY_FOR_PICKUP: frozenset({*MILESTONES, CANCELLED, COMPROMISED, STOPPED}),
    BOOKED: frozenset({PICKED_UP, IN_TRANSIT, DELIVERED, CANCELLED, COMPROMISED, STOPPED}),
    PICKED_UP: frozenset({IN_TRANSIT, DELIVERED, CANCELLED, COMPROMISED, STOPPED}),
    IN_TRANSIT: frozenset({DELIVERED, CANCELLED, COMPROMISED, STOPPED}),
    DELIVERED: frozenset({COMPROMISED}),  # an out-of-range reading reported with the delivery scan
    COMPROMISED: frozenset({*LIVE, DELIVERED, CANCELLED}),  # QA release resumes; compensation cancels
    STOPPED: frozenset({CANCELLED}),
    CANCELLED: frozenset(),
}


def reason_code(prefix: str, detail: str | None = None) -> str:
    """A reason code: `prefix`, or `prefix:detail` when that is a reason code too. `detail` is an upstream
    event's reason: carried when it is a code, dropped (never rewritten into one) when it is free text."""
    if not re.fullmatch(REASON_CODE_PATTERN, prefix):
        raise ValueError(f"not a reason code: {prefix!r}")
    if detail:
        combined = f"{prefix}:{detail}"
        if len(combined) <= 120 and re.fullmatch(REASON_CODE_PATTERN, combined):
            return combined
    return prefix


def can_transition(current: str, new: str) -> bool:
    """Whether a shipment may move from `current` to `new` (staying put is always allowed)."""
    return current == new or new in TRANSITIONS.get(current, frozenset())


TEMPERATURE_EXCURSION: Final = "temperature_excursion"  # reason of the move an excursion makes
COI_MISMATCH: Final = "coi_mismatch"  # reason of the stop a COI mismatch makes

SHIPMENT_STATE_TITLE: Final = "Shipment cannot take this input"
SHIPMENT_STATE_KIND: Final = "shipment-state"


def shipment_state_conflict(field: str, reason: str) -> Conflict:
    """The shipment's current status refuses the input (409, problem type `shipment-state`)."""
    return Conflict(field, reason, title=SHIPMENT_STATE_TITLE, kind=SHIPMENT_STATE_KIND)


# ---- temperature -----------------------------------------------------------------------------------


def in_range(reading_c: float, min_c: float, max_c: float) -> bool:
    """A reading is acceptable when min_c <= reading <= max_c (both bounds inclusive)."""
    if min_c > max_c:
        raise ValueError(f"temperature range is empty: [{min_c}, {max_c}]")
    return min_c <= reading_c <= max_c


def reading_refusal(status: str) -> Conflict | None:
    """Readings are refused once the shipment is over (cancelled or delivered)."""
    if status in READINGS_REFUSED:
        return shipment_state_conflict(
            "shipment_id", f"shipment is {status}: no further temperature readings"
        )
    return None


def reading_window_refusal(
    status: str,
    *,
    source: ReadingSource,
    measured_at: datetime,
    picked_up_at: datetime | None,
    delivered_at: datetime | None,
) -> DomainError | None:
    """Whether a reading may be taken now (None) or why not.

    - live readings (`courier`): refused once the shipment is cancelled or delivered (409, `shipment_id`),
      before its pickup (409, `measured_at`: not picked up yet), or when measured before the pickup (422,
      `measured_at`);
    - a logger download: only after delivery (409, `source`), measured between pickup and delivery (422,
      `measured_at`); refused too on a cancelled shipment.
    """
    if status == CANCELLED:
        return reading_refusal(status)
    if source == LOGGER_DOWNLOAD:
        if delivered_at is None:
            return shipment_state_conflict(
                "source", f"shipment is {status}: a logger download is accepted only after delivery"
            )
        if picked_up_at is not None and measured_at < picked_up_at:
            return Invalid("measured_at", "measured before the shipment was picked up")
        if measured_at > delivered_at:
            return Invalid("measured_at", "measured after the shipment was delivered")
        return None
    if delivered_at is not None or status == DELIVERED:
        return reading_refusal(DELIVERED)
    if picked_up_at is None:
        return shipment_state_conflict(
            "measured_at",
            f"shipment is {status}, not picked up yet: readings are accepted in transit (after pickup) "
            "or as a logger download after delivery",
        )
    if measured_at < picked_up_at:
        return Invalid("measured_at", "measured before the shipment was picked up")
    return None


@dataclass(frozen=True)
class Sample:
    """One reading as the excursion rule sees it: when, what, and whether inside the limit."""

    measured_at: datetime
    reading_c: float
    in_range: bool


def minutes_outside(samples: Sequence[Sample], until: datetime | None = None) -> float:
    """Cumulative minutes outside the limit: each reading outside counts from its time until the next
    reading (measurement order); the last one until `until` when given (a cut-off), else not yet."""
    ordered = sorted(samples, key=lambda r: r.measured_at)
    total = 0.0
    nexts: list[Sample | None] = [*ordered[1:], None]
    for here, after in zip(ordered, nexts[: len(ordered)], strict=True):
        if here.in_range:
            continue
        end = after.measured_at if after is not None else until
        if end is not None and end > here.measured_at:
            total += (end - here.measured_at).total_seconds() / 60
    return total


def excursion_breached(minutes: float, tolerance_min: float) -> bool:
    """The excursion rule: breached when the time outside the limit EXCEEDS the tolerance."""
    return minutes > tolerance_min


def worst_reading(samples: Sequence[Sample], min_c: float, max_c: float) -> Sample | None:
    """The reading furthest outside the limit (the magnitude QA assesses), if any is outside."""
    outside = [r for r in samples if not r.in_range]
    if not outside:
        return None
    return max(outside, key=lambda r: max(min_c - r.reading_c, r.reading_c - max_c))


def first_outside(samples: Sequence[Sample]) -> Sample | None:
    outside = sorted((r for r in samples if not r.in_range), key=lambda r: r.measured_at)
    return outside[0] if outside else None


@dataclass(frozen=True)
class ReadingOutcome:
    in_range: bool
    new_status: str
    publish_excursion: bool  # at most once per shipment
    minutes_outside: float = 0.0


def after_reading(
    status: str,
    *,
    in_range: bool,
    minutes: float,
    tolerance_min: float,
    excursion_reported: bool,
) -> ReadingOutcome:
    """What a recorded reading does to the shipment, given the cumulative `minutes` outside the limit.

    Within the tolerance: recorded, nothing else (a short excursion holds nothing). Beyond it, the first
    time for this shipment: the excursion is published, and a live (or just delivered) shipment becomes
    `compromised`; a `stopped` shipment stays stopped (identity doubt outranks the excursion) but the
    excursion is still reported. Once reported, later readings are only recorded.
    """
    if excursion_reported or not excursion_breached(minutes, tolerance_min):
        return ReadingOutcome(in_range, status, False, minutes)
    if status in LIVE or status == DELIVERED:
        return ReadingOutcome(in_range, COMPROMISED, True, minutes)
    return ReadingOutcome(in_range, status, status in HALTED, minutes)


# ---- identity at a handoff -------------------------------------------------------------------------

PairCheck = Literal["verified", "unverified", "missing", "mismatch"]


def pair_field(leg: str) -> Literal["din", "lot"]:
    """What a leg's label carries beside the COI: the collection's DIN (inbound) or the run's lot."""
    return "din" if leg == "inbound_apheresis" else "lot"


def check_pair(expected: str | None, presented: str | None) -> PairCheck:
    """The second id of a handoff's pair (DIN or lot) against the one logistics learnt for the shipment.

    Known and presented: `verified` or `mismatch`; known and not presented: `missing` (refused, 422);
    not known: `unverified` (never guessed: a presented value is recorded, not checked)."""
    if expected is None:
        return "unverified"
    if presented is None:
        return "missing"
    return "verified" if presented == expected else "mismatch"


# ---- milestones ------------------------------------------------------------------------------------


def milestone_refusal(status: str, milestone: str) -> DomainError | None:
    """A courier milestone is refused on a halted or cancelled shipment (Conflict, 409) or when it goes
    back (Invalid, 422)."""
    if milestone not in MILESTONES:
        return Invalid("milestone", f"unknown milestone {milestone}")
    if status in HALTED or status == CANCELLED:
        return shipment_state_conflict("milestone", f"shipment is {status}: no further milestones")
    if status in MILESTONES and MILESTONES.index(milestone) < MILESTONES.index(status):
        return Invalid("milestone", f"shipment is already {status}; cannot go back to {milestone}")
    return None


def status_after_milestone(status: str, milestone: str) -> str:
    """The status a milestone moves the shipment to (after `milestone_refusal` found nothing).

    A repeated milestone (several `in_transit` scans, a second `delivered` scan) keeps the status.
    """
    refusal = milestone_refusal(status, milestone)
    if refusal:
        raise ValueError(refusal.detail)
    return milestone


def status_after_coi_mismatch(status: str) -> str:
    """A COI mismatch at a handoff stops a live shipment; it stays stopped (no automatic resume)."""
    return STOPPED if status in LIVE else status


# ---- compensation and order facts ------------------------------------------------------------------


def cancellable_on_order_end(status: str) -> bool:
    """Order cancelled or failed: every shipment not yet delivered (nor already cancelled) is cancelled."""
    return status not in (DELIVERED, CANCELLED)


def cancellable_on_booking_cancelled(leg: str, status: str) -> bool:
    """Booking cancelled: the inbound shipment is cancelled only while the material has not been picked up."""
    return leg == "inbound_apheresis" and status in PRE_PICKUP


def status_after_apheresis(status: str) -> str:
    """Apheresis done: a planned inbound shipment is ready for pickup (a later status stays as it is)."""
    return READY_FOR_PICKUP if status == PLANNED else status


def status_after_quarantine_release(status: str, held_from: str | None) -> str:
    """QA released a quarantined product: its compromised shipment resumes where it was halted."""
    if status != COMPROMISED:
        return status
    if held_from in LIVE or held_from == DELIVERED:
        return held_from
    return PLANNED


def holds_lane(status: str) -> bool:
    """Whether a shipment still blocks planning another shipment of the same (order, leg)."""
    return status not in LANE_FREED


def treatment_center_of(leg: str, origin: str, destination: str) -> str:
    """The treatment centre end of a leg: where the material comes from, or where the product goes."""
    return origin if leg == "inbound_apheresis" else destination


def lane_holder(shipments: Iterable[Shipment]) -> Shipment | None:
    """The shipment that holds the lane among one (order, leg)'s shipments (at most one), if any."""
    return next((s for s in shipments if holds_lane(s.status)), None)


# ---- the shipment ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusChange:
    """One line of a shipment's status history (append-only)."""

    status_before: str | None
    status_after: str
    reason: str
    changed_at: datetime | None = None  # set by the store when it is written


@dataclass(kw_only=True)
class Shipment:
    """One leg of an order. Fields follow the `shipments` table; `pending` and `dirty` are what the
    repository still has to write (status changes to log, columns to update)."""

    shipment_id: uuid.UUID
    order_id: uuid.UUID
    coi: str
    leg: Leg
    origin: str
    destination: str
    material_condition: str
    min_temp_c: float
    max_temp_c: float
    planned_pickup_date: date
    status: str = PLANNED
    created_at: datetime | None = None
    carrier_id: str | None = None  # the carrier that carries it (None: planned before carriers existed)
    origin_trace: dict[str, str] = field(default_factory=dict)  # W3C context of the order's first trace
    booking_id: uuid.UUID | None = None  # inbound: the site booking it serves
    run: int | None = None  # outbound: the manufacturing run whose product it carries
    ready_for_pickup_at: datetime | None = None
    excursion_at: datetime | None = None  # first out-of-range reading (excursion published once)
    held_from_status: str | None = None  # the status it had when compromised or stopped
    quarantine_decision: str | None = None  # QA's last decision (quarantine or excursion disposition)
    status_reason: str | None = None
    updated_at: datetime | None = None
    product_code: str | None = None  # whose limits it travels by (None: the seed's defaults)
    excursion_tolerance_min: float = 0.0  # minutes in all outside the limit before QA
    picked_up_at: datetime | None = None  # the first milestone that shows the material left
    delivered_at: datetime | None = None
    excursion_minutes: float | None = None  # minutes outside the limit when the rule was breached
    din: str | None = None  # inbound: the collection's DIN (order.apheresis_completed)
    lot: str | None = None  # outbound: the run's lot (site.product_released)
    pending: list[StatusChange] = field(default_factory=list, repr=False, compare=False)
    dirty: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def plan(
        cls,
        *,
        order_id: uuid.UUID,
        coi: str,
        leg: Leg,
        origin: str,
        destination: str,
        lane: Lane,
        pickup: date,
        carrier_id: str,
        reason: str,
        origin_trace: dict[str, str] | None = None,
        booking_id: uuid.UUID | None = None,
        run: int | None = None,
        product_code: str | None = None,
        lot: str | None = None,
    ) -> Shipment:
        return cls(
            shipment_id=uuid.uuid4(),
            order_id=order_id,
            coi=coi,
            leg=leg,
            origin=origin,
            destination=destination,
            material_condition=lane.condition,
            min_temp_c=lane.min_c,
            max_temp_c=lane.max_c,
            planned_pickup_date=pickup,
            status=PLANNED,
            carrier_id=carrier_id,
            origin_trace=dict(origin_trace or {}),
            booking_id=booking_id,
            run=run,
            status_reason=reason,
            product_code=product_code,
            excursion_tolerance_min=lane.tolerance_min,
            lot=lot,
            pending=[StatusChange(None, PLANNED, reason)],
        )

    @property
    def treatment_center_id(self) -> str:
        return treatment_center_of(self.leg, self.origin, self.destination)

    def refs(self) -> dict[str, Any]:
        """The opaque references every shipment event carries (order id, COI, treatment centre id)."""
        return {"order_id": self.order_id, "coi": self.coi, "treatment_center_id": self.treatment_center_id}

    def move_to(self, new_status: str, reason: str, **extra: Any) -> None:
        """Move to `new_status` (checked against TRANSITIONS), with its reason in the history.

        `extra` sets further fields in the same change. When the status stays, so does the reason it got
        it for: only the extra fields change (and nothing at all without them).
        """
        before = self.status
        if not can_transition(before, new_status):
            raise ValueError(f"shipment {self.shipment_id}: {before} -> {new_status} is not allowed")
        if before == new_status and not extra:
            return
        if before != new_status:
            self.status = new_status
            self.status_reason = reason
            self.pending.append(StatusChange(before, new_status, reason))
        for name, value in extra.items():
            if name not in _EXTRA_FIELDS:
                raise ValueError(f"not a field a status change sets: {name}")
            setattr(self, name, value)
        self.dirty = True

    def take_milestone(self, milestone: str, occurred_at: datetime | None = None) -> None:
        """A courier milestone: refused (domain error) or the new status (where it happened is custody).

        The first milestone that shows the material left (picked up, in transit, delivered) is its
        pickup time; the first delivery its delivery time: the window of its readings."""
        refusal = milestone_refusal(self.status, milestone)
        if refusal:
            raise refusal
        extra: dict[str, Any] = {}
        if occurred_at is not None:
            if milestone in PICKUP_MILESTONES and self.picked_up_at is None:
                extra["picked_up_at"] = occurred_at
            if milestone == DELIVERED and self.delivered_at is None:
                extra["delivered_at"] = occurred_at
        self.move_to(
            status_after_milestone(self.status, milestone), reason_code("milestone", milestone), **extra
        )

    def check_reading_allowed(
        self, source: ReadingSource = "courier", measured_at: datetime | None = None
    ) -> None:
        """Refuse a reading outside the shipment's window (see `reading_window_refusal`)."""
        if measured_at is None:
            refusal: DomainError | None = reading_refusal(self.status)
        else:
            refusal = reading_window_refusal(
                self.status,
                source=source,
                measured_at=measured_at,
                picked_up_at=self.picked_up_at,
                delivered_at=self.delivered_at,
            )
        if refusal:
            raise refusal

    def in_limit(self, reading_c: float) -> bool:
        return in_range(reading_c, self.min_temp_c, self.max_temp_c)

    def take_reading(self, reading: Sample, recorded: Sequence[Sample]) -> ReadingOutcome:
        """A temperature reading, with the shipment's readings recorded before it: the cumulative time
        outside the limit decides; beyond the tolerance, the first time, the shipment handles the
        excursion (excursion_at: when its time outside began)."""
        samples = [*recorded, reading]
        minutes = minutes_outside(samples)
        outcome = after_reading(
            self.status,
            in_range=reading.in_range,
            minutes=minutes,
            tolerance_min=self.excursion_tolerance_min,
            excursion_reported=self.excursion_at is not None,
        )
        if outcome.publish_excursion:
            start = first_outside(samples)
            extra: dict[str, Any] = {
                "excursion_at": start.measured_at if start else reading.measured_at,
                "excursion_minutes": round(minutes, 3),
            }
            if outcome.new_status != self.status:
                extra["held_from_status"] = self.status
            self.move_to(outcome.new_status, TEMPERATURE_EXCURSION, **extra)
        return outcome

    def learn_din(self, din: str) -> bool:
        """The collection's DIN, from order.apheresis_completed: kept once learnt (False if another)."""
        if self.din is None:
            self.move_to(self.status, self.status_reason or "apheresis_completed", din=din)
            return True
        return self.din == din

    def stop_on_coi_mismatch(self) -> None:
        """A handoff presented another order's COI: a live shipment stops (no automatic resume)."""
        new_status = status_after_coi_mismatch(self.status)
        extra = {"held_from_status": self.status} if new_status != self.status else {}
        self.move_to(new_status, COI_MISMATCH, **extra)

    def apheresis_completed(self, collected_at: datetime) -> None:
        extra = {"ready_for_pickup_at": collected_at} if self.ready_for_pickup_at is None else {}
        self.move_to(status_after_apheresis(self.status), "apheresis_completed", **extra)

    def cancel(self, reason: str) -> None:
        self.move_to(CANCELLED, reason)

    @property
    def collected(self) -> bool:
        """Inbound: the material exists (the order's apheresis was completed; its DIN is known)."""
        return self.leg == "inbound_apheresis" and self.din is not None

    def reroute(self, destination: str, booking_id: uuid.UUID) -> str:
        """Issue 11: live collected material goes to another site (the order's new booking); its status is
        kept (a courier on the way takes it there). Returns the previous destination."""
        if self.status not in LIVE or not self.collected:
            raise shipment_state_conflict("destination", f"a {self.status} shipment cannot be rerouted")
        previous = self.destination
        self.move_to(self.status, REROUTED, destination=destination, booking_id=booking_id)
        self.status_reason = REROUTED
        self.pending.append(StatusChange(self.status, self.status, REROUTED))  # in its history too
        return previous

    def quarantine_decided(self, decision: str, reason: str, *, lane_taken: bool) -> bool:
        """QA decided on the material this (compromised) shipment carries (a quarantine decision, or the
        disposition of an excursion); True when it resumed.

        release: it resumes where it was halted, unless another shipment of the leg took the lane
        meanwhile (`lane_taken`); reject: it stays compromised. The decision is recorded either way.
        """
        if decision == "release":
            resume = status_after_quarantine_release(self.status, self.held_from_status)
            if not (lane_taken and holds_lane(resume)):
                self.move_to(resume, reason, quarantine_decision=decision)
                return True
        self.move_to(self.status, reason, quarantine_decision=decision)
        return False

    def saved(self) -> None:
        """The repository wrote the pending changes."""
        self.pending.clear()
        self.dirty = False


_EXTRA_FIELDS: Final = frozenset(
    {
        "ready_for_pickup_at",
        "excursion_at",
        "held_from_status",
        "quarantine_decision",
        "picked_up_at",
        "delivered_at",
        "excursion_minutes",
        "din",
        "destination",  # a reroute (issue 11)
        "booking_id",
    }
)


@dataclass(frozen=True, kw_only=True)
class CustodyEvent:
    """One handoff or movement in the chain of custody (append-only). Fields follow `custody_events`."""

    id: int | None = None
    shipment_id: uuid.UUID
    milestone: str
    occurred_at: datetime
    recorded_at: datetime | None = None
    location: str
    handled_by: str
    received_from: str | None
    temperature_c: float | None
    coi_verified: bool
    din: str | None = None  # the DIN (inbound) or lot (outbound) the handoff presented
    lot: str | None = None
    pair_verified: bool = False  # checked against the one logistics learnt (False: none known)


@dataclass(frozen=True, kw_only=True)
class TemperatureReading:
    """One temperature reading and the range it was checked against. Fields follow `temperature_readings`."""

    id: int | None = None
    shipment_id: uuid.UUID
    reading_c: float
    measured_at: datetime
    recorded_at: datetime | None = None
    source: ReadingSource
    custody_event_id: int | None = None
    min_c: float
    max_c: float
    in_range: bool
    coi_verified: bool
