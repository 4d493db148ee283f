"""Field types for anything a caller sends: bounded, printable text; finite numbers; reported times and
booking dates inside a window. Every API model uses these, so hostile input is refused (422 naming the
field) before it reaches a service layer, an event, a log or a span.

- `Text32` .. `Text2000` (1..n characters after stripping): no control characters (C0, DEL, C1), no lone
  surrogates, no Unicode "non-characters". Error messages never echo the input.
- `CoiRef`: a chain-of-identity id as read from a label (its check character may be `*`).
- `Code`: an identifier or reason code (letters, digits, `_ - . :`), at most 64 characters.
- `ReasonCode`: what events carry as a reason (`patient_deceased`, `outage:maintenance`).
- `Finite`: a float that is neither NaN nor ±Infinity.
- `ReportedAt`: an aware timestamp within [now - 30 days, now + 5 minutes] (a fact being reported).
- `booking_window(today)`: the dates a booking may ask for: tomorrow .. today + 180 days.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, StringConstraints

REPORTED_PAST = timedelta(days=30)
REPORTED_FUTURE = timedelta(minutes=5)
BOOKING_MIN_DAYS = 1
BOOKING_MAX_DAYS = 180

_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]"  # controls, surrogates, non-characters
)


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        if _FORBIDDEN.search(value):
            raise ValueError("must not contain control characters or invalid Unicode")
        return unicodedata.normalize("NFC", value)
    return value


def _text(max_length: int, *, min_length: int = 1) -> Any:
    """Printable text of `min_length`..`max_length` characters (surrounding white space stripped)."""
    return Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=min_length, max_length=max_length),
        BeforeValidator(_printable),
    ]


# mypy needs type aliases, not calls, in annotations: one alias per bound in use
Text32 = _text(32)
Text64 = _text(64)
Text100 = _text(100)
Text200 = _text(200)
Text500 = _text(500)
Text2000 = _text(2000)

CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
Code = Annotated[str, StringConstraints(pattern=CODE_PATTERN), BeforeValidator(_printable)]
"""An identifier or reason code (site id, centre id, product code, reason code)."""

COI_PATTERN = r"^[A-Za-z0-9*][A-Za-z0-9*_.:\-]{0,31}$"
CoiRef = Annotated[str, StringConstraints(pattern=COI_PATTERN), BeforeValidator(_printable)]
"""A chain-of-identity id as read from a label: letters, digits and `*` (ISO 7064 MOD 37-2's check
character can be `*`), at most 32 characters; verified against the order by the service."""

REASON_CODE_PATTERN = r"^[a-z][a-z0-9_]{0,47}(:[a-z0-9_]{1,47}){0,3}$"
ReasonCode = Annotated[str, StringConstraints(pattern=REASON_CODE_PATTERN, max_length=120)]
"""A machine-readable reason in an event (`patient_deceased`, `outage:maintenance`): never free text."""

Finite = Annotated[float, Field(allow_inf_nan=False)]

# ---- issue 10: site ----
# A lot (batch) number per manufacturing run: capital letters, digits and `-`, 4..32 characters, starting
# with a letter or digit. The site issues it (`<site prefix>-<sequence>`); a remanufacture gets a new one.
LOT_PATTERN = r"^[A-Z0-9][A-Z0-9-]{3,31}$"  # for pydantic's (Rust) regex, where `$` is the very end
LOT_RE = re.compile(LOT_PATTERN[:-1] + r"\Z")  # Python's `$` also matches before a final newline


def lot_problem(lot: str) -> str | None:
    """Why a lot number is refused, or None when it is well formed."""
    if not isinstance(lot, str) or not LOT_RE.match(lot):
        return "must be 4..32 capital letters, digits or '-', starting with a letter or digit"
    return None


def _lot(value: Any) -> Any:
    if isinstance(value, str):
        problem = lot_problem(value)
        if problem:
            raise ValueError(problem)
    return value


Lot = Annotated[str, BeforeValidator(_lot)]
"""A lot number as read from a product's label (`LOT_RE`); verified against the order by the service."""


def in_reported_window(value: datetime, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    if value < now - REPORTED_PAST:
        raise ValueError("must be within the last 30 days")
    if value > now + REPORTED_FUTURE:
        raise ValueError("must not be in the future")
    return value


ReportedAt = Annotated[AwareDatetime, AfterValidator(in_reported_window)]
"""When a reported fact happened: an aware timestamp in [now - 30 days, now + 5 min]."""


def booking_window(today: date | None = None) -> tuple[date, date]:
    today = today or datetime.now(UTC).date()
    return today + timedelta(days=BOOKING_MIN_DAYS), today + timedelta(days=BOOKING_MAX_DAYS)


def in_booking_window(value: date) -> date:
    first, last = booking_window()
    if value < first:
        raise ValueError("must be tomorrow or later")
    if value > last:
        raise ValueError(f"must be within {BOOKING_MAX_DAYS} days from today")
    return value


BookingDate = Annotated[date, AfterValidator(in_booking_window)]
"""A date a centre asks to book (apheresis): tomorrow .. today + 180 days."""

__all__ = [
    "BOOKING_MAX_DAYS",
    "LOT_PATTERN",
    "LOT_RE",
    "BookingDate",
    "Code",
    "CoiRef",
    "Finite",
    "Lot",
    "ReasonCode",
    "ReportedAt",
    "Text32",
    "Text64",
    "Text100",
    "Text200",
    "Text500",
    "Text2000",
    "booking_window",
    "in_booking_window",
    "in_reported_window",
    "lot_problem",
]
