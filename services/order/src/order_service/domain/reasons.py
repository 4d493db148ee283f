"""Reason codes: what the order service puts into events, logs and spans instead of words.

Staff choose a code from an enumeration for every action that needs a reason (cancel, move the apheresis
date, QA's disposition of material at risk, the physician's decision on an OOS product); what they type
beside it is a `note`, kept on the order's timeline in the `ordering` schema and nowhere else. The
commands the state machine asks of the other services (rebook, remanufacture, fail) carry a code of the
cause too; the descriptive sentence stays on the timeline.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from v2v_contracts.errors import Invalid
from v2v_contracts.fields import REASON_CODE_PATTERN

CancelReason = Literal[
    "patient_deceased",
    "disease_progression",
    "patient_ineligible",
    "patient_unwell",
    "payer_denied",
    "consent_withdrawn",
    "physician_decision",
    "alternative_treatment",
    "duplicate_order",
    "entered_in_error",
    "other",
]
RescheduleReason = Literal[
    "patient_unwell",
    "patient_unavailable",
    "physician_decision",
    "centre_capacity",
    "apheresis_unit_unavailable",
    "payer_pending",
    "logistics",
    "other",
]
# issue 11: the patient's journey put on hold, and resumed. Death is not a hold (cancel:
# patient_deceased); a hold waits for the patient, the payer or the consent to come back.
HoldReason = Literal[
    "patient_unwell",  # an infection, organ toxicity, a bridging therapy's side effects
    "disease_progression",  # progression the physician wants to assess or treat first
    "patient_ineligible",  # eligibility to be re-established (labs, performance status)
    "payer_denied",  # a denial under appeal
    "payer_pending",
    "consent_withdrawn",  # consent withdrawn for now, to be discussed again
    "patient_unavailable",
    "physician_decision",
    "other",
]
ResumeReason = Literal[
    "patient_cleared",  # the physician cleared the patient for the next step
    "eligibility_confirmed",
    "payer_approved",
    "consent_confirmed",
    "physician_decision",
    "other",
]
# what was done with material or product that existed when the order ended (a late cancellation, a
# failure): a record, kept by the order service
MaterialKind = Literal["apheresis_material", "product"]
MaterialFate = Literal["destroyed", "returned"]
MaterialFateReason = Literal[
    "order_cancelled",
    "order_failed",
    "patient_deceased",
    "expired",
    "other",
]
QuarantineReleaseReason = Literal[
    "within_stability_data",
    "excursion_not_confirmed",
    "assessed_acceptable",
]
QuarantineRejectReason = Literal[
    "outside_stability_data",
    "integrity_compromised",
    "insufficient_data",
]
QuarantineReason = Literal[
    "within_stability_data",
    "excursion_not_confirmed",
    "assessed_acceptable",
    "outside_stability_data",
    "integrity_compromised",
    "insufficient_data",
    "other",
]

# QA's disposition of material at risk (OOS, excursion, refused at receipt), per outcome. The assessment
# itself is in QA's document system, named by `document_reference`.
DispositionReleaseReason = Literal[
    "within_stability_data",  # an excursion within the product's stability data
    "excursion_not_confirmed",  # the logger data do not confirm it
    "assessed_acceptable",  # risk assessed, acceptable
    "oos_invalidated",  # the OOS result was invalidated by the investigation (laboratory error)
    "receipt_deviation_acceptable",  # the receipt deviation does not affect the material
    "other",
]
DispositionPhysicianReason = Literal[
    "no_alternative_treatment",  # the patient has no alternative, the physician may accept the risk
    "risk_assessed_for_patient",  # the manufacturer's risk assessment supports a physician request
    "other",
]
DispositionRejectReason = Literal[
    "outside_stability_data",
    "integrity_compromised",
    "insufficient_data",
    "confirmed_out_of_specification",
    "patient_safety_risk",
    "other",
]
DispositionReason = Literal[
    "within_stability_data",
    "excursion_not_confirmed",
    "assessed_acceptable",
    "oos_invalidated",
    "receipt_deviation_acceptable",
    "no_alternative_treatment",
    "risk_assessed_for_patient",
    "outside_stability_data",
    "integrity_compromised",
    "insufficient_data",
    "confirmed_out_of_specification",
    "patient_safety_risk",
    "other",
]
DispositionOutcome = Literal["release", "release_on_physician_request", "reject"]
# the centre's physician on an OOS product QA released on physician request
PhysicianAcceptReason = Literal["benefit_outweighs_risk", "no_alternative_treatment", "other"]
PhysicianDeclineReason = Literal[
    "risk_not_acceptable", "patient_condition_changed", "alternative_treatment", "other"
]
PhysicianReason = Literal[
    "benefit_outweighs_risk",
    "no_alternative_treatment",
    "risk_not_acceptable",
    "patient_condition_changed",
    "alternative_treatment",
    "other",
]

CANCEL_REASONS: frozenset[str] = frozenset(get_args(CancelReason))
HOLD_REASONS: frozenset[str] = frozenset(get_args(HoldReason))
RESUME_REASONS: frozenset[str] = frozenset(get_args(ResumeReason))
MATERIAL_KINDS: frozenset[str] = frozenset(get_args(MaterialKind))
MATERIAL_FATES: frozenset[str] = frozenset(get_args(MaterialFate))
MATERIAL_FATE_REASONS: frozenset[str] = frozenset(get_args(MaterialFateReason))
RESCHEDULE_REASONS: frozenset[str] = frozenset(get_args(RescheduleReason))
QUARANTINE_REASONS: dict[str, frozenset[str]] = {
    "release": frozenset(get_args(QuarantineReleaseReason)) | {"other"},
    "reject": frozenset(get_args(QuarantineRejectReason)) | {"other"},
}

DISPOSITION_REASONS: dict[str, frozenset[str]] = {
    "release": frozenset(get_args(DispositionReleaseReason)),
    "release_on_physician_request": frozenset(get_args(DispositionPhysicianReason)),
    "reject": frozenset(get_args(DispositionRejectReason)),
}
PHYSICIAN_REASONS: dict[bool, frozenset[str]] = {
    True: frozenset(get_args(PhysicianAcceptReason)),
    False: frozenset(get_args(PhysicianDeclineReason)),
}

# causes of the commands the order asks of the other services (rebook, remanufacture, fail)
INBOUND_EXCURSION = "inbound_excursion"
MATERIAL_REJECTED = "material_rejected"
OUT_OF_SPECIFICATION = "out_of_specification"
MANUFACTURING_FAILED = "manufacturing_failed"
QUARANTINE_REJECTED = "quarantine_rejected"
SITE_OUTAGE = "site_outage"
NO_RECOLLECTION_LEFT = "no_recollection_left"
TEMPERATURE_EXCURSION = "temperature_excursion"  # why material is at risk after an excursion
PHYSICIAN_DECLINED = "physician_declined"  # the disposition reason a physician's decline publishes

_REASON_CODE = re.compile(REASON_CODE_PATTERN)


def is_code(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 120 and _REASON_CODE.fullmatch(value) is not None


def as_code(value: object, fallback: str) -> str:
    """`value` when it is a reason code (another service's), else `fallback`: never words in an event."""
    return value if is_code(value) else fallback  # type: ignore[return-value]


def check_cancel(code: str) -> str:
    if code not in CANCEL_REASONS:
        raise Invalid("reason_code", "is not a cancellation reason code")
    return code


def check_hold(code: str) -> str:
    if code not in HOLD_REASONS:
        raise Invalid("reason_code", "is not a reason code for putting an order on hold")
    return code


def check_resume(code: str) -> str:
    if code not in RESUME_REASONS:
        raise Invalid("reason_code", "is not a reason code for resuming an order")
    return code


def check_material_fate(material: str, fate: str, code: str) -> str:
    if material not in MATERIAL_KINDS:
        raise Invalid("material", "must be apheresis_material or product")
    if fate not in MATERIAL_FATES:
        raise Invalid("outcome", "must be destroyed or returned")
    if code not in MATERIAL_FATE_REASONS:
        raise Invalid("reason_code", "is not a reason code for the disposition of material")
    return code


def check_reschedule(code: str) -> str:
    if code not in RESCHEDULE_REASONS:
        raise Invalid("reason_code", "is not a reason code for moving the apheresis date")
    return code


def check_quarantine(decision: str, code: str) -> str:
    allowed = QUARANTINE_REASONS.get(decision)
    if allowed is None:
        raise Invalid("decision", "must be release or reject")
    if code not in allowed:
        raise Invalid("reason_code", f"is not a reason code for a quarantine {decision}")
    return code


def check_disposition(outcome: str, code: str) -> str:
    allowed = DISPOSITION_REASONS.get(outcome)
    if allowed is None:
        raise Invalid("outcome", "must be release, release_on_physician_request or reject")
    if code not in allowed:
        raise Invalid("reason_code", f"is not a reason code for a disposition {outcome}")
    return code


def check_physician(accept: bool, code: str) -> str:
    if code not in PHYSICIAN_REASONS[accept]:
        raise Invalid(
            "reason_code", f"is not a reason code for a physician {'accept' if accept else 'decline'}"
        )
    return code
