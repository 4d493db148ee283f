"""`FromNow`: a parametrized moment resolved when the test runs, not when it was collected."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from v2v_servicekit.testing import FromNow, resolve_times


def test_a_date_from_now_is_the_utc_date_when_resolved() -> None:
    value = FromNow(days=181, date_only=True)
    before = (datetime.now(UTC) + timedelta(days=181)).date()
    resolved = resolve_times({"requested_apheresis_date": value, "other": [value, "x"]})
    after = (datetime.now(UTC) + timedelta(days=181)).date()
    day = date.fromisoformat(resolved["requested_apheresis_date"])
    assert before <= day <= after and resolved["other"] == [day.isoformat(), "x"]
    assert repr(value) == "now(days=181, date)"


def test_a_moment_from_now_keeps_its_time_and_zone() -> None:
    at = datetime.fromisoformat(FromNow(minutes=10).iso())
    assert at.tzinfo is not None and timedelta(minutes=9) < at - datetime.now(UTC) <= timedelta(minutes=10)
    assert datetime.fromisoformat(FromNow(naive=True).iso()).tzinfo is None
