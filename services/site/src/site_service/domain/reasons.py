"""Reason codes: what the site stores, logs and publishes as a reason is a code, never free text.

The site's own reasons come from fixed vocabularies (`v2v_contracts.events`: OutageReason,
ReceiptRejection, StepFailure, QcFinding). A reason the site takes over from another service's event
(an order cancelled or failed, a remanufacture requested) is kept only when it is a reason code itself;
anything else (free text typed by a person elsewhere) is dropped for the site's own code.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from v2v_contracts.fields import REASON_CODE_PATTERN

_REASON_CODE = re.compile(REASON_CODE_PATTERN)
MAX_REASON = 120  # as `v2v_contracts.fields.ReasonCode`


def is_code(reason: object) -> TypeGuard[str]:
    return (
        isinstance(reason, str) and len(reason) <= MAX_REASON and _REASON_CODE.fullmatch(reason) is not None
    )


def code_or(reason: object, fallback: str) -> str:
    """`reason` when it is a reason code, else `fallback` (a code of the caller's)."""
    return reason if is_code(reason) else fallback


def qualified(prefix: str, reason: object) -> str:
    """`prefix:reason` when that is a reason code (`order_cancelled:patient_deceased`), else `prefix`."""
    combined = f"{prefix}:{reason}" if isinstance(reason, str) else prefix
    return combined if is_code(combined) else prefix
