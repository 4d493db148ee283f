"""What leaves the platform about an event: an allow-list of fields per event type, each with the kind of
value it may hold. A webhook carries the CloudEvent's envelope and only the allow-listed data fields whose
values are of their kind (a reason must be a reason code, an id a code, a date a date...): no patient
data, no free text, even when an upstream event carries some. E-mails use the same value kinds
(`domain.alerts`).

Every event type a centre can subscribe to has an entry here (a unit test keeps it so): a new event type
sends its common fields only until its fields are reviewed and listed.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any, Literal

from v2v_contracts import CloudEvent
from v2v_contracts.coi import is_valid_coi
from v2v_contracts.fields import CODE_PATTERN, REASON_CODE_PATTERN

# "coi": a chain-of-identity id or a DIN: a code, or an ISBT 128-shaped id whose check character is `*`
# (one sequence number in 37; "code" alone refused it, and the webhook lost the order's COI)
Kind = Literal["uuid", "code", "coi", "reason", "date", "datetime", "number", "int", "bool", "range"]

_CODE = re.compile(CODE_PATTERN)
_REASON = re.compile(REASON_CODE_PATTERN)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATETIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{5,18}(?:Z|[+-][0-9]{2}:[0-9]{2})?")
MAX_NUMBER = 1e9

# fields every order event carries: opaque references only
COMMON: dict[str, Kind] = {"order_id": "uuid", "coi": "coi", "treatment_center_id": "code"}

# per event type, the data fields a webhook may carry besides COMMON. Left out on purpose: free text
# (`detail`), and a courier's references (`location`, `handled_by`, `received_from`).
WEBHOOK_FIELDS: dict[str, dict[str, Kind]] = {
    "order.submitted.v1": {
        "product_code": "code",
        "order_type": "code",
        "regulator": "code",
        "country": "code",
        "region": "code",
        "requested_apheresis_date": "date",
        "offer_id": "uuid",  # the slot offer the centre held (scheduling's availability), if any
    },
    "order.cancelled.v1": {"reason": "reason", "previous_status": "code"},
    "order.failed.v1": {"reason": "reason"},
    "order.rebook_requested.v1": {
        "kind": "code",
        "reason": "reason",
        "product_code": "code",
        "order_type": "code",
        "regulator": "code",
        "region": "code",
        "apheresis_date": "date",
        "exclude_site_id": "code",
    },
    "order.remanufacture_requested.v1": {"site_id": "code", "reason": "reason", "run": "int"},
    "order.apheresis_completed.v1": {"collected_at": "datetime", "din": "coi", "collection": "int"},
    "order.product_received.v1": {"received_at": "datetime"},
    "order.lymphodepletion_started.v1": {"started_at": "datetime"},
    "order.completed.v1": {"infused_at": "datetime"},
    "order.quarantine_decided.v1": {"decision": "code", "reason": "reason"},
    "order.disposition_decided.v1": {
        "cause": "code",
        "outcome": "code",
        "site_id": "code",
        "run": "int",
        "shipment_id": "uuid",
        "leg": "code",
        "reason": "reason",
        "document_reference": "code",
    },
    "order.physician_decision_requested.v1": {
        "site_id": "code",
        "run": "int",
        "reason": "reason",
        "qa_reason": "reason",
    },
    "order.coi_mismatch_detected.v1": {"where": "code"},
    # issue 11: treatment gates and the patient's journey (reason codes and statuses only; the order's
    # indication and weight never leave the order service)
    "order.lymphodepletion_cleared.v1": {"reason": "reason", "repeat_allowed": "bool"},
    "order.put_on_hold.v1": {"reason": "reason", "previous_status": "code"},
    "order.resumed.v1": {"reason": "reason", "status": "code"},
    "order.material_disposition_recorded.v1": {
        "material": "code",
        "left_at": "code",
        "outcome": "code",
        "reason": "reason",
        "document_reference": "code",
    },
    "scheduling.slot_reserved.v1": {
        "slot_id": "uuid",
        "site_id": "code",
        "product_code": "code",
        "order_type": "code",
        "apheresis_date": "date",
        "manufacturing_start_date": "date",
        "reason": "reason",
        "run": "int",
    },
    "scheduling.slot_unavailable.v1": {"reason": "reason", "waitlisted": "bool"},
    "scheduling.slot_released.v1": {"slot_id": "uuid", "site_id": "code", "reason": "reason"},
    "site.booking_confirmed.v1": {
        "booking_id": "uuid",
        "slot_id": "uuid",
        "site_id": "code",
        "product_code": "code",
        "manufacturing_start_date": "date",
        "apheresis_date": "date",
    },
    "site.booking_cancelled.v1": {
        "booking_id": "uuid",
        "slot_id": "uuid",
        "site_id": "code",
        "reason": "reason",
    },
    "site.booking_affected.v1": {
        "booking_id": "uuid",
        "site_id": "code",
        "reason": "reason",
        "material_at_site": "bool",
        "run": "int",
        "state": "code",
    },
    "site.material_received.v1": {"site_id": "code", "received_at": "datetime", "lot": "code", "din": "coi"},
    "site.material_rejected.v1": {"site_id": "code", "reason": "reason"},
    "site.manufacturing_step_completed.v1": {
        "site_id": "code",
        "step": "code",
        "run": "int",
        "completed_at": "datetime",
        "lot": "code",
    },
    "site.product_released.v1": {
        "site_id": "code",
        "run": "int",
        "released_at": "datetime",
        "lot": "code",
        "coa_reference": "code",
        "certification": "code",
        "import_certified": "bool",
        "exceptional": "bool",
    },
    "site.product_out_of_specification.v1": {
        "site_id": "code",
        "run": "int",
        "reason": "reason",
        "retained_material": "bool",
        "lot": "code",
    },
    "site.manufacturing_failed.v1": {
        "site_id": "code",
        "run": "int",
        "reason": "reason",
        "retained_material": "bool",
        "lot": "code",
    },
    "site.manufacturing_stopped.v1": {"site_id": "code", "reason": "reason"},
    "site.coi_mismatch_detected.v1": {"site_id": "code", "where": "code", "mismatched": "code"},
    "logistics.shipment_planned.v1": {
        "shipment_id": "uuid",
        "leg": "code",
        "origin": "code",
        "destination": "code",
        "material_condition": "code",
        "temperature_range_c": "range",
        "planned_pickup_date": "date",
        "slot_id": "uuid",
    },
    "logistics.shipment_milestone.v1": {
        "shipment_id": "uuid",
        "leg": "code",
        "milestone": "code",
        "occurred_at": "datetime",
        "temperature_c": "number",
    },
    "logistics.shipment_excursion.v1": {
        "shipment_id": "uuid",
        "leg": "code",
        "reading_c": "number",
        "min_c": "number",
        "max_c": "number",
        "measured_at": "datetime",
        "duration_min": "number",
    },
    "logistics.shipment_cancelled.v1": {"shipment_id": "uuid", "leg": "code", "reason": "reason"},
    "logistics.shipment_rerouted.v1": {
        "shipment_id": "uuid",
        "leg": "code",
        "previous_destination": "code",
        "destination": "code",
        "status": "code",
        "slot_id": "uuid",
    },
    "logistics.coi_mismatch_detected.v1": {"shipment_id": "uuid", "where": "code", "identifier": "code"},
}


def _number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= MAX_NUMBER
    )


def _parses(parse: Any, value: str) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


def conforms(kind: Kind, value: Any) -> bool:
    """Whether `value` is a value of `kind` (a JSON value as an event carries it)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "number":
        return _number(value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_NUMBER
    if kind == "range":
        return isinstance(value, list | tuple) and len(value) == 2 and all(_number(v) for v in value)
    if not isinstance(value, str):
        return False
    if kind == "uuid":
        return len(value) <= 36 and _parses(uuid.UUID, value)
    if kind == "code":
        return bool(_CODE.fullmatch(value))
    if kind == "coi":
        return bool(_CODE.fullmatch(value)) or is_valid_coi(value)
    if kind == "reason":
        return len(value) <= 120 and bool(_REASON.fullmatch(value))
    if kind == "date":
        return bool(_DATE.fullmatch(value)) and _parses(date.fromisoformat, value)
    if kind == "datetime":
        return bool(_DATETIME.fullmatch(value)) and _parses(datetime.fromisoformat, value)
    return False


def allowed(data: Mapping[str, Any], fields: Mapping[str, Kind]) -> dict[str, Any]:
    """The fields of `data` on the allow-list whose values are of their kind (or null: an optional field
    the event does not fill), in `data`'s order."""
    return {k: v for k, v in data.items() if k in fields and (v is None or conforms(fields[k], v))}


def webhook_fields(event_type: str) -> dict[str, Kind]:
    return {**COMMON, **WEBHOOK_FIELDS.get(event_type, {})}


def webhook_payload(event: CloudEvent) -> bytes:
    """The CloudEvent a webhook carries: the envelope's attributes (no extensions but `coi`) and the
    allow-listed data fields. An event whose every field is allowed comes out byte for byte as it was."""
    subject = event.subject if event.subject is not None and conforms("uuid", event.subject) else None
    coi = event.coi if event.coi is not None and conforms("coi", event.coi) else None
    return CloudEvent(
        id=event.id,
        source=event.source,
        type=event.type,
        subject=subject,
        time=event.time,
        coi=coi,
        data=allowed(event.data, webhook_fields(event.type)),
    ).to_json()
