"""Pure rules of a shipment: its statuses and their transitions, and the temperature range check.

No I/O here; the use cases (services.py, custody.py) ask these functions what to do and then do it.

Statuses of a shipment (one leg: inbound apheresis material or outbound product):

    planned ─▶ ready_for_pickup ─▶ booked ─▶ picked_up ─▶ in_transit ─▶ delivered
       (any status before delivered) ─▶ cancelled            (order cancelled/failed, booking cancelled)
       (any live status, delivered)  ─▶ compromised          (temperature excursion; QA release resumes)
       (any live status)             ─▶ stopped              (COI mismatch at a handoff; stays stopped)

Courier milestones may skip steps (a pickup scan without a `booked` scan) but never go back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

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
READINGS_REFUSED: Final = frozenset({CANCELLED, DELIVERED})

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


def can_transition(current: str, new: str) -> bool:
    """Whether a shipment may move from `current` to `new` (staying put is always allowed)."""
    return current == new or new in TRANSITIONS.get(current, frozenset())


@dataclass(frozen=True)
class Refusal:
    """Why an input is refused: `status` is the HTTP status (409 state conflict, 422 invalid input)."""

    status: int
    field: str
    reason: str


# ---- temperature -----------------------------------------------------------------------------------


def in_range(reading_c: float, min_c: float, max_c: float) -> bool:
    """A reading is acceptable when min_c <= reading <= max_c (both bounds inclusive)."""
    if min_c > max_c:
        raise ValueError(f"temperature range is empty: [{min_c}, {max_c}]")
    return min_c <= reading_c <= max_c


def reading_refusal(status: str) -> Refusal | None:
    """Readings are refused once the shipment is over (cancelled or delivered)."""
    if status in READINGS_REFUSED:
        return Refusal(409, "shipment_id", f"shipment is {status}: no further temperature readings")
    return None


@dataclass(frozen=True)
class ReadingOutcome:
    in_range: bool
    new_status: str
    publish_excursion: bool  # at most once per shipment


def after_reading(
    status: str, reading_c: float, min_c: float, max_c: float, *, excursion_reported: bool
) -> ReadingOutcome:
    """What a recorded reading does to the shipment.

    Outside the range, the first time for this shipment: the excursion is published, and a live (or
    just delivered) shipment becomes `compromised`; a `stopped` shipment stays stopped (identity doubt
    outranks the excursion) but the excursion is still reported. Later out-of-range readings are only
    recorded: the excursion is published once per shipment.
    """
    ok = in_range(reading_c, min_c, max_c)
    if ok or excursion_reported:
        return ReadingOutcome(ok, status, False)
    if status in LIVE or status == DELIVERED:
        return ReadingOutcome(False, COMPROMISED, True)
    return ReadingOutcome(False, status, status in HALTED)


# ---- milestones ------------------------------------------------------------------------------------


def milestone_refusal(status: str, milestone: str) -> Refusal | None:
    """A courier milestone is refused on a halted or cancelled shipment (409) or when it goes back (422)."""
    if milestone not in MILESTONES:
        return Refusal(422, "milestone", f"unknown milestone {milestone}")
    if status in HALTED or status == CANCELLED:
        return Refusal(409, "milestone", f"shipment is {status}: no further milestones")
    if status in MILESTONES and MILESTONES.index(milestone) < MILESTONES.index(status):
        return Refusal(422, "milestone", f"shipment is already {status}; cannot go back to {milestone}")
    return None


def status_after_milestone(status: str, milestone: str) -> str:
    """The status a milestone moves the shipment to (after `milestone_refusal` found nothing).

    A repeated milestone (several `in_transit` scans, a second `delivered` scan) keeps the status.
    """
    refusal = milestone_refusal(status, milestone)
    if refusal:
        raise ValueError(refusal.reason)
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
