"""The order: its states, the transitions the facts from other services may cause, and the timeline."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class OrderStatus(StrEnum):
    SUBMITTED = "submitted"
    WAITLISTED = "waitlisted"
    SLOT_RESERVED = "slot_reserved"
    BOOKING_CONFIRMED = "booking_confirmed"
    INBOUND_SHIPMENT_PLANNED = "inbound_shipment_planned"


S = OrderStatus
ALLOWED: dict[OrderStatus, frozenset[OrderStatus]] = {
    S.SUBMITTED: frozenset({S.WAITLISTED, S.SLOT_RESERVED}),
    S.WAITLISTED: frozenset({S.SLOT_RESERVED}),
    S.SLOT_RESERVED: frozenset({S.BOOKING_CONFIRMED}),
    S.BOOKING_CONFIRMED: frozenset({S.INBOUND_SHIPMENT_PLANNED}),
    S.INBOUND_SHIPMENT_PLANNED: frozenset(),
}

# which status each incoming fact moves the order to
EVENT_TARGET: dict[str, OrderStatus] = {
    "scheduling.slot_unavailable.v1": S.WAITLISTED,
    "scheduling.slot_reserved.v1": S.SLOT_RESERVED,
    "site.booking_confirmed.v1": S.BOOKING_CONFIRMED,
    "logistics.shipment_planned.v1": S.INBOUND_SHIPMENT_PLANNED,
}


# facts recorded on the timeline without moving the order (for now)
INFORMATIONAL: frozenset[str] = frozenset({"logistics.shipment_milestone.v1"})


@dataclass(frozen=True)
class Decision:
    new_status: OrderStatus | None  # None: recorded on the timeline, status unchanged
    reason: str


def can_move(current: OrderStatus, target: OrderStatus) -> bool:
    return target in ALLOWED[current]


def decide(current: OrderStatus, event_type: str) -> Decision:
    """What a fact does to an order in `current` state. Facts for a state already left are ignored."""
    target = EVENT_TARGET.get(event_type)
    if target is None:
        return Decision(None, "informational")
    if target == current:
        return Decision(None, "already in this state")
    if can_move(current, target):
        return Decision(target, event_type)
    return Decision(None, f"stale: order is {current.value}, cannot become {target.value}")
