"""Which events go to which channel.

Webhooks go out for every order event but this service's own; e-mails go to a centre's recipients for the
exceptions in an order's life only. The consumer reads every topic that carries one of these types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from v2v_contracts import EVENT_TYPES, PUBLISHERS

# events about an order that a treatment centre may subscribe to
ORDER_EVENT_TYPES = sorted(t for t, model in EVENT_TYPES.items() if "order_id" in model.model_fields)

# webhooks go out for every order event but this service's own: a failed webhook about a failed webhook
# could fail again, and so on
WEBHOOK_EVENT_TYPES = frozenset(t for t in ORDER_EVENT_TYPES if not t.startswith("notification."))

# The events that are exceptions in an order's life: a centre's e-mail recipients hear of these (those
# listed in EXCEPTION_REASONS for some of their reasons only).
# notification.webhook_delivery_failed.v1 comes from this service's own topic; e-mail never publishes
# an event of its own, so alerting on it cannot loop.
EXCEPTION_EVENT_TYPES: tuple[str, ...] = (
    "order.cancelled.v1",
    "order.failed.v1",
    "site.material_rejected.v1",
    "site.product_out_of_specification.v1",
    "site.manufacturing_failed.v1",
    "site.booking_affected.v1",
    # issue 11: the patient's collected material goes to another site
    "logistics.shipment_rerouted.v1",
    "logistics.shipment_excursion.v1",
    "logistics.coi_mismatch_detected.v1",
    "order.coi_mismatch_detected.v1",
    "site.coi_mismatch_detected.v1",
    "notification.webhook_delivery_failed.v1",
    "scheduling.slot_unavailable.v1",
    # issue 10: the centre's physician is asked to accept an out-of-specification product (signed)
    "order.physician_decision_requested.v1",
    # issue 11: the product was lost after the patient's lymphodepletion (a repeat LD will be needed)
    "order.lymphodepletion_cleared.v1",
)

# Exception types that are an exception for some of their `reason` codes only.
EXCEPTION_REASONS: Mapping[str, frozenset[str]] = {
    # no approved manufacturing site is left for the order's market: nothing will schedule it until one
    # is approved again. Ordinary waitlisting (no capacity yet) is not an exception alert.
    "scheduling.slot_unavailable.v1": frozenset({"no_approved_site"}),
}

HANDLED_EVENT_TYPES = sorted(WEBHOOK_EVENT_TYPES | set(EXCEPTION_EVENT_TYPES))

# whose topics the consumer reads: every service that publishes one of the handled types
SOURCE_SERVICES = [s for s in PUBLISHERS if s in {EVENT_TYPES[t].SERVICE for t in HANDLED_EVENT_TYPES}]


def sent_as_webhook(event_type: str) -> bool:
    return event_type in WEBHOOK_EVENT_TYPES


def is_exception(event_type: str, data: Mapping[str, Any]) -> bool:
    """True when the event (its type and, for some types, its `reason`) is e-mailed as an alert."""
    if event_type not in EXCEPTION_EVENT_TYPES:
        return False
    reasons = EXCEPTION_REASONS.get(event_type)
    if reasons is None:
        return True
    reason = data.get("reason")
    return isinstance(reason, str) and reason in reasons
