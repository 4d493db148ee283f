"""What an exception e-mail says.

The consumer renders each alert when it queues it (`render`): only the order id, the COI, the event
type and the allow-listed status fields of the event (`ALLOWED_FIELDS`) ever reach the message, each only
when its value is of its kind (`domain.payloads`: a reason must be a reason code, a site a code...). So a
field that should not be in an event (a patient reference, say) or free text in an allowed one never
reaches a mailbox — nor the database row it is sent from.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from notification_service.domain.payloads import Kind, conforms
from v2v_contracts import CloudEvent

# Event data keys that may appear in an e-mail, with the kind of value each must hold: statuses, reason
# codes and opaque references, never a person, never free text.
ALLOWED_FIELDS: dict[str, Kind] = {
    "reason": "reason",
    "previous_status": "code",
    "disposition": "code",
    "site_id": "code",
    "run": "int",
    "retained_material": "bool",
    "step": "code",
    "leg": "code",
    "milestone": "code",
    "where": "code",
    "reading_c": "number",
    "min_c": "number",
    "max_c": "number",
    "event_type": "code",  # webhook_delivery_failed: the type of the event that could not be delivered
    "attempts": "int",
    "last_error": "code",  # ... and the outcome category of its last attempt
    "qa_reason": "reason",  # physician_decision_requested: QA's code for asking the physician
    "identifier": "code",  # coi_mismatch_detected: which id of the pair did not match (coi, din, lot)
    "mismatched": "code",
    "duration_min": "number",  # shipment_excursion: minutes outside the limit in all
    "lot": "code",
    "repeat_allowed": "bool",  # lymphodepletion_cleared: whether a repeat LD can follow (a product to come)
}
MAX_VALUE_CHARS = 200

# What an alert says in words for an (event type, reason code) whose type alone does not say it; the
# reason code is then named in the subject too (these codes are fixed strings, never input).
HEADLINES: dict[tuple[str, str], str] = {
    **{
        ("order.lymphodepletion_cleared.v1", cause): (
            "The product was lost after the patient's lymphodepletion: the lymphodepletion is cleared; "
            "a repeat is allowed once another product is released and its delivery confirmed."
        )
        for cause in ("quarantine_rejected", "out_of_specification", "manufacturing_failed")
    },
    ("scheduling.slot_unavailable.v1", "no_approved_site"): (
        "No approved manufacturing site is left for this order's market: it cannot be scheduled "
        "until a site is approved again."
    ),
}


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


def _clean(value: Any) -> str | None:
    """One line of at most MAX_VALUE_CHARS; None for anything but a scalar (no nested structures)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not isinstance(value, str | int | float):
        return None
    try:
        raw = str(value)
    except ValueError:  # an int too long to print
        return None
    text = " ".join("".join(c if c.isprintable() else " " for c in raw).split())
    if len(text) > MAX_VALUE_CHARS:
        text = text[: MAX_VALUE_CHARS - 1] + "…"
    return text or None


def headline(event: CloudEvent) -> tuple[str, str] | None:
    """The (reason code, sentence) of an alert whose reason needs saying, else None."""
    reason = event.data.get("reason")
    if not isinstance(reason, str):
        return None
    sentence = HEADLINES.get((event.type, reason))
    return None if sentence is None else (reason, sentence)


def render(event: CloudEvent) -> Rendered:
    """The alert for an exception event. Raises ValueError when the event names no valid order id."""
    order_id = uuid.UUID(str(event.data.get("order_id")))
    coi_value = event.coi or event.data.get("coi")
    coi = _clean(coi_value) if conforms("coi", coi_value) else None
    coi = coi or "(none)"
    details = [
        (key, text)
        for key, kind in ALLOWED_FIELDS.items()
        if conforms(kind, value := event.data.get(key)) and (text := _clean(value)) is not None
    ]
    width = max([len("event"), *(len(k) for k, _ in details)]) + 2
    said = headline(event)
    lines = [
        "An order of your treatment centre needs attention.",
        *([said[1]] if said else []),
        "",
        f"{'order':<{width}}{order_id}",
        f"{'coi':<{width}}{coi}",
        f"{'event':<{width}}{event.type}",
        *(f"{key:<{width}}{text}" for key, text in details),
        "",
        f"Details: GET /v1/orders/{order_id} (order service)",
        "",
        "No patient data here: order id, chain-of-identity id and status only.",
    ]
    what = f"{event.type} ({said[0]})" if said else event.type
    return Rendered(f"[vein2vein] {what} — order {order_id}", "\n".join(lines) + "\n")
