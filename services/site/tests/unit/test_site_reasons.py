"""Reasons are codes: the vocabularies of the site's reports, the codes its events compose from them, what
it keeps of another service's reason, and the outage window."""

from __future__ import annotations

from datetime import date, timedelta
from typing import get_args

import pytest
from pydantic import TypeAdapter, ValidationError

from site_service.domain import manufacturing as mfg
from site_service.domain import registry
from site_service.domain.reasons import code_or, is_code, qualified
from v2v_contracts.errors import Invalid
from v2v_contracts.events import OutageReason, QcFinding, ReceiptRejection, StepFailure
from v2v_contracts.fields import ReasonCode

REASON_CODE = TypeAdapter(ReasonCode)
TODAY = date(2031, 5, 1)


def test_the_vocabularies_are_the_documented_ones() -> None:
    assert get_args(OutageReason) == (
        "maintenance",
        "equipment_failure",
        "contamination",
        "utilities",
        "staffing",
        "regulatory_hold",
        "other",
    )
    assert get_args(ReceiptRejection) == (
        "damaged_container",
        "temperature_excursion",
        "label_mismatch",
        "insufficient_volume",
        "documentation_missing",
        "other",
    )
    assert {
        "sterility",
        "endotoxin",
        "mycoplasma",
        "viability",
        "potency",
        "dose",
        "identity",
        "other",
    } <= set(get_args(QcFinding))
    assert "other" in get_args(StepFailure)


def test_every_reason_the_site_publishes_is_a_reason_code() -> None:
    composed = [
        registry.CAPACITY_CUT,
        *(registry.outage_reason(r) for r in get_args(OutageReason)),
        *get_args(ReceiptRejection),
        *get_args(QcFinding),
        *(mfg.qc_failed_reason(r) for r in get_args(QcFinding)),
        *(mfg.step_failed_reason(s, r) for s in mfg.STEPS for r in get_args(StepFailure)),
        qualified("order_cancelled", "patient_withdrew"),
        qualified("order_failed", "no_material_left"),
    ]
    for code in composed:
        assert REASON_CODE.validate_python(code) == code and is_code(code)


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        ("patient_deceased", "order_cancelled:patient_deceased"),
        ("rebook:reschedule", "order_cancelled:rebook:reschedule"),
        ("patient withdrew consent", "order_cancelled"),  # free text: dropped
        ("Mr Smith", "order_cancelled"),
        ("x" * 200, "order_cancelled"),
        ("a:b:c:d", "order_cancelled"),  # one part too many once qualified
        ("", "order_cancelled"),
        (None, "order_cancelled"),
    ],
)
def test_another_services_reason_is_kept_only_as_a_code(reason: str | None, kept: str) -> None:
    assert qualified("order_cancelled", reason) == kept
    assert is_code(kept)


def test_code_or_falls_back_for_anything_but_a_code() -> None:
    assert code_or("rebook:reschedule", "slot_released") == "rebook:reschedule"
    for bad in ("rebook: reschedule", "Cancelled", "cancelled\n", "x" * 121, 42, None, "\ud800"):
        assert code_or(bad, "slot_released") == "slot_released"
        assert not is_code(bad)
    with pytest.raises(ValidationError):
        REASON_CODE.validate_python("cancelled by the centre")


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        (TODAY - timedelta(days=31), TODAY, "start_date"),
        (TODAY + timedelta(days=731), TODAY + timedelta(days=731), "start_date"),
        (TODAY, TODAY + timedelta(days=731), "end_date"),
        (TODAY + timedelta(days=5), TODAY + timedelta(days=4), "end_date"),
        (TODAY, TODAY + timedelta(days=366), "end_date"),  # 367 days
        (date(9999, 12, 31), date(9999, 12, 31), "start_date"),
    ],
)
def test_an_outage_window_is_bounded(start: date, end: date, field: str) -> None:
    with pytest.raises(Invalid) as exc:
        registry.check_outage(start, end, "maintenance", TODAY)
    assert exc.value.errors[0].field == field


def test_an_outage_window_at_its_bounds_is_accepted() -> None:
    assert registry.check_outage(TODAY - timedelta(days=30), TODAY, "other", TODAY) == "other"
    assert registry.check_outage(TODAY, TODAY + timedelta(days=365), "staffing", TODAY) == "staffing"
    last = TODAY + timedelta(days=730)
    assert registry.check_outage(last, last, "utilities", TODAY) == "utilities"
    with pytest.raises(Invalid) as exc:
        registry.check_outage(TODAY, TODAY, "power cut", TODAY)
    assert exc.value.errors[0].field == "reason"


@pytest.mark.parametrize(
    ("check", "args"),
    [
        (mfg.check_step_report, ("activation", True, "Contamination")),
        (mfg.check_step_report, ("activation", False, "contamination")),
        (mfg.check_qc_report, ("passed", "potency")),
        (mfg.check_qc_report, ("failed", "low potency")),
        (mfg.check_qc_report, ("out_of_specification", None)),
    ],
)
def test_an_mes_report_gives_a_reason_code_exactly_when_it_needs_one(
    check: object, args: tuple[object, ...]
) -> None:
    with pytest.raises(Invalid) as exc:
        check(*args)  # type: ignore[operator]
    assert exc.value.errors[0].field == "reason"
