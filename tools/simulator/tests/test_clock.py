"""The compressed clock and the date/time helpers (no I/O)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from v2v_simulator.clock import SimClock, as_date, days_between, iso, parse_time


def test_compressed_clock_runs_day_seconds_per_simulated_day() -> None:
    now = [100.0]
    start = datetime(2026, 3, 2, 9, tzinfo=UTC)
    clock = SimClock(start, 0.5, monotonic=lambda: now[0])
    assert clock.now() == start
    now[0] += 1.0  # one real second = two simulated days
    assert clock.now() == start + timedelta(days=2)
    assert clock.real_delay(start + timedelta(days=3)) == pytest.approx(0.5)
    assert clock.real_delay(start) == 0.0
    assert clock.at(date(2026, 3, 5), 8.5) == datetime(2026, 3, 5, 8, 30, tzinfo=UTC)
    frozen = SimClock(start, 0.0, monotonic=lambda: now[0])
    assert frozen.real_delay(start + timedelta(days=30)) == 0.0


def test_a_frozen_clock_stays_at_its_start() -> None:
    now = [0.0]
    start = datetime(2026, 3, 2, tzinfo=UTC)
    clock = SimClock(start, 0.0, monotonic=lambda: now[0])
    now[0] += 1000
    assert clock.now() == start
    assert clock.at(date(2026, 3, 2)) == datetime(2026, 3, 2, 9, tzinfo=UTC)  # 09:00 by default


async def test_until_sleeps_the_real_delay_and_not_for_the_past() -> None:
    start = datetime.now(UTC)
    clock = SimClock(start, 0.05)  # a simulated day every 50 ms
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await clock.until(start - timedelta(days=5))
    assert loop.time() - t0 < 0.04
    await clock.until(start + timedelta(days=1))
    assert loop.time() - t0 >= 0.04
    assert clock.now() >= start + timedelta(days=1)


def test_iso_is_utc_to_the_second() -> None:
    cet = timezone(timedelta(hours=1))
    assert iso(datetime(2026, 3, 2, 10, 30, 15, 999, tzinfo=cet)) == "2026-03-02T09:30:15+00:00"


def test_days_between_dates_and_parsing() -> None:
    a = datetime(2026, 3, 1, tzinfo=UTC)
    assert days_between(a, a + timedelta(days=2, hours=12)) == pytest.approx(2.5)
    assert days_between(a + timedelta(days=1), a) == pytest.approx(-1.0)
    assert as_date("2026-03-05T08:00:00+00:00") == date(2026, 3, 5)
    assert as_date("2026-03-05") == date(2026, 3, 5)
    assert as_date(None) is None and as_date("") is None
    assert parse_time("2026-03-02T09:00:00Z") == datetime(2026, 3, 2, 9, tzinfo=UTC)
    assert parse_time(a) is a
