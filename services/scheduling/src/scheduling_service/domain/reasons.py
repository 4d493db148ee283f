"""Reason codes: what scheduling stores and publishes as a reason is a code, never free text.

Scheduling's own reasons are codes (`initial`, `waitlist`, `rebook:<kind>`, `no_capacity`,
`approval_withdrawn`, ...). A reason it takes over from an order event (a rebook's, a cancellation's) is
kept only when it is a reason code itself; free text typed by a person elsewhere is replaced by
scheduling's own code for what happened.
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
    """`reason` when it is a reason code, else `fallback` (a code of scheduling's)."""
    return reason if is_code(reason) else fallback
