"""`make bench`: the pure arithmetic (percentiles, summaries, knee, schedule, rates)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from v2v_harness.bench.load import midpoint
from v2v_harness.bench.stats import (
    find_knee,
    parse_rates,
    percentile,
    recovery,
    send_schedule,
    step_passes,
    summarise,
)


def test_percentile_interpolates_between_closest_ranks() -> None:
    data = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 100.0
    assert percentile(data, 50) == pytest.approx(50.5)
    assert percentile(data, 99) == pytest.approx(99.01)
    assert percentile(data, 99.9) == pytest.approx(99.901)
    assert percentile([7.0], 99.9) == 7.0
    assert percentile([1.0, 3.0], 50) == 2.0


def test_percentile_refuses_empty_input_and_bad_quantiles() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_has_every_percentile_and_sorts_its_input() -> None:
    s = summarise([5, 1, 4, 2, 3])
    assert s["count"] == 5
    assert (s["min"], s["max"], s["mean"]) == (1.0, 5.0, 3.0)
    assert s["p50"] == 3.0
    assert s["p95"] == pytest.approx(4.8)
    assert s["p99"] == pytest.approx(4.96)
    assert s["p99_9"] == pytest.approx(4.996)


def test_summary_of_nothing_is_all_none() -> None:
    s = summarise([])
    assert s["count"] == 0
    assert all(s[k] is None for k in ("mean", "min", "max", "p50", "p95", "p99", "p99_9"))


def step(rate: float, p99: float | None = 200.0, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rate": rate,
        "orders": 100,
        "accepted": 100,
        "completed": 100,
        "errors": 0,
        "chain_ms": {"p99": p99},
    }
    base.update(over)
    return base


def test_a_step_holds_only_when_every_chain_ends_without_errors_under_one_second() -> None:
    assert step_passes(step(10))
    assert not step_passes(step(10, p99=1000.0))  # p99 must stay strictly under 1 s
    assert not step_passes(step(10, completed=99))
    assert not step_passes(step(10, accepted=99, completed=99))
    assert not step_passes(step(10, errors=1))
    assert not step_passes(step(10, p99=None, completed=0))
    assert not step_passes(step(10, orders=0, accepted=0, completed=0))


def test_knee_is_the_highest_rate_that_holds_below_the_first_that_fails() -> None:
    assert find_knee([step(10), step(25), step(50, p99=1500.0), step(100, p99=3000.0)]) == 25.0
    # order of the steps does not matter (refinement steps come last)
    assert find_knee([step(10), step(50, p99=1500.0), step(25), step(37.5)]) == 37.5
    # a rate that passes above a failing one does not count
    assert find_knee([step(10), step(25, completed=90), step(50)]) == 10.0
    assert find_knee([step(10, errors=3)]) is None
    assert find_knee([]) is None
    assert find_knee([step(10), step(25)]) == 25.0


def test_schedule_is_evenly_spaced_at_the_rate() -> None:
    offsets = send_schedule(4, 2.5)
    assert offsets == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
    big = send_schedule(200, 15)
    assert len(big) == 3000
    assert big[0] == 0.0
    assert big[-1] == pytest.approx(14.995)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(big)}
    assert gaps == {0.005}
    assert send_schedule(0, 10) == []
    assert send_schedule(10, 0) == []
    assert len(send_schedule(2.5, 2)) == 5


def test_rates_parse_sorted_and_positive() -> None:
    assert parse_rates("50, 10,25,10") == [10.0, 25.0, 50.0]
    assert parse_rates("2.5") == [2.5]
    for bad in ("", "0", "-5", "10,abc", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_refinement_midpoint_is_round_and_strictly_between() -> None:
    assert midpoint(5, 10) == 8.0  # 7.5 rounds to an even 8
    assert midpoint(10, 25) == 18.0
    assert midpoint(5, 8) == 6.5
    assert 5 < midpoint(5, 6) < 6


def test_recovery_is_when_the_probes_are_back_under_the_base_p99() -> None:
    # 2 s windows: 0-2 s slow (a backlog), 2-4 s one probe of ten never ends, then at base with one
    # stray slow probe at 7 s
    probes: list[tuple[float, float | None]] = []
    for i in range(50):
        t = i * 0.2
        latency: float | None = 100.0
        if t < 2.0:
            latency = 5000.0 - t * 1000
        elif t == pytest.approx(3.0):
            latency = None
        elif t == pytest.approx(7.0):
            latency = 900.0
        probes.append((t, latency))
    out = recovery(probes, base_p99_ms=200.0, window_s=2.0)
    assert out["recovery_s"] == 4.0  # the window with a lost probe still counts as not at base
    assert out["recovery_s_strict"] == pytest.approx(7.2)  # the first probe after the stray slow one
    series = out["series"]
    assert [r["t_s"] for r in series] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert [r["at_base"] for r in series] == [False, False, True, True, True]
    assert series[1]["probes"] == 10 and series[1]["completed"] == 9 and series[1]["p90_ms"] is None
    assert series[3]["p50_ms"] == 100.0 and series[3]["p99_ms"] > 200.0


def test_recovery_is_none_when_the_last_window_is_still_slow_and_zero_when_never_slow() -> None:
    slow = [(t * 0.5, 1000.0 if t > 6 else 50.0) for t in range(10)]
    out = recovery(slow, base_p99_ms=200.0, window_s=1.0)
    assert out["recovery_s"] is None and out["recovery_s_strict"] is None
    fine = [(0.3 + t * 0.5, 50.0) for t in range(10)]
    out = recovery(fine, base_p99_ms=200.0, window_s=1.0)
    assert out["recovery_s"] == 0.0 and out["recovery_s_strict"] == pytest.approx(0.3)
    assert recovery(fine, base_p99_ms=None, window_s=1.0)["recovery_s"] is None
    assert recovery([], base_p99_ms=200.0, window_s=1.0) == {
        "window_s": 1.0,
        "window_percentile": "p90",
        "recovery_s": None,
        "recovery_s_strict": None,
        "series": [],
    }


def test_recovery_needs_the_hold_at_base_before_the_probes_end() -> None:
    # slow until 58 s, then two windows at base before the probes end (the end of a 60 s probe run)
    probes = [(t * 0.5, 900.0 if t * 0.5 < 58 else 100.0) for t in range(121)]
    assert recovery(probes, base_p99_ms=200.0, window_s=2.0)["recovery_s"] == 58.0
    held = recovery(probes, base_p99_ms=200.0, window_s=2.0, hold_s=20.0)
    assert held["recovery_s"] is None  # 4 s at base is not 20
    assert [r["at_base"] for r in held["series"]][-2:] == [True, True]
    # at base from 30 s on: 32 s of it, more than the hold
    early = [(t * 0.5, 900.0 if t * 0.5 < 30 else 100.0) for t in range(121)]
    assert recovery(early, base_p99_ms=200.0, window_s=2.0, hold_s=20.0)["recovery_s"] == 30.0
