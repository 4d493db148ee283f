"""The A/B comparison of `python -m v2v_harness.bench.ab`: run order, figures of a step, the verdict."""

from __future__ import annotations

from typing import Any

import pytest

from v2v_harness.bench.ab import Side, compare, parse_env, render, run_order, step_metrics


def result(cpu: float, p99: float, *, holds: bool = True, steps: int = 1) -> dict[str, Any]:
    step = {
        "rate": 20.0,
        "orders": 500,
        "completed": 500,
        "errors": 0,
        "pass": holds,
        "cpu_ms_per_order_total": cpu,
        "cpu_cores": {"order": 0.3, "postgres": 0.4, "broker": 0.2},
        "chain_ms": {"p50": 90.0, "p99": p99},
        "intake_ms": {"p99": 25.0},
    }
    return {"platform": {"steps": [step] * steps}}


def test_the_sides_alternate_which_goes_first() -> None:
    assert run_order(1) == ["A", "B"]
    assert run_order(3) == ["A", "B", "B", "A", "A", "B"]


def test_a_step_gives_its_cpu_per_order_cores_and_latencies() -> None:
    m = step_metrics(result(64.0, 140.0))
    assert m["cpu_ms_per_order"] == 64.0
    assert m["cores_busy"] == 0.9
    assert (m["chain_p50_ms"], m["chain_p99_ms"], m["intake_p99_ms"]) == (90.0, 140.0, 25.0)
    assert m["holds"] is True and (m["completed"], m["orders"]) == (500, 500)
    with pytest.raises(ValueError, match="one platform step"):
        step_metrics(result(64.0, 140.0, steps=2))


def test_a_difference_counts_only_beyond_the_spread_between_runs_of_a_side() -> None:
    a = [step_metrics(result(cpu, 150.0)) for cpu in (60.0, 70.0)]  # spread 10
    near = [step_metrics(result(cpu, 150.0, holds=False)) for cpu in (62.0, 66.0)]
    far = [step_metrics(result(cpu, 150.0)) for cpu in (45.0, 48.0)]

    within = compare(a, near)
    assert within["cpu_ms_per_order"]["beyond_spread"] is False
    assert within["cpu_ms_per_order"]["a_mean"] == 65.0 and within["cpu_ms_per_order"]["b_mean"] == 64.0
    assert within["holds"] == {"a": 2, "b": 0, "runs": 2}

    beyond = compare(a, far)
    assert beyond["cpu_ms_per_order"]["beyond_spread"] is True
    assert beyond["cpu_ms_per_order"]["b_vs_a_pct"] == pytest.approx(-28.46, abs=0.01)
    assert beyond["chain_p99_ms"]["beyond_spread"] is False  # equal: no difference at all

    one_each = compare(a[:1], far[:1])
    assert one_each["cpu_ms_per_order"]["beyond_spread"] is None  # no spread to weigh it against
    text = render(
        {
            "A": Side("A", __import__("pathlib").Path("/a")),
            "B": Side("B", __import__("pathlib").Path("/b"), {"X": "1"}),
        },
        [("A", a[0]), ("B", far[0])],
        one_each,
    )
    assert "the spread is unknown" in text and "/b X=1" in text


def test_settings_are_name_value_pairs() -> None:
    assert parse_env(["V2V_CONSUMER_BATCH_MAX=1", "OTEL_TRACES_SAMPLER=always_off"]) == {
        "V2V_CONSUMER_BATCH_MAX": "1",
        "OTEL_TRACES_SAMPLER": "always_off",
    }
    assert parse_env(None) == {}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        parse_env(["V2V_CONSUMER_BATCH_MAX"])
