"""`make bench --smoke` end to end: raw limits and a tiny open-model ramp against the five service
processes, on the session's Postgres and broker, with every output written to a temporary folder.

The bench acts as the centres do: each subscribes with its own token and gets its signing secret from
the platform (the receiver verifies the first webhook of each centre with it), and posts its own orders
with its token and an Idempotency-Key per order; the platform runs without the per-client rate limit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from v2v_harness.bench import BenchConfig, run_bench
from v2v_harness.infra import Infrastructure

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEP_KEYS = {
    "rate",
    "orders",
    "accepted",
    "completed",
    "errors",
    "pass",
    "intake_ms",
    "first_webhook_ms",
    "chain_ms",
    "post_to_submitted_event_ms",
    "hop_lag_ms",
    "chain_end_event_to_webhook_ms",
    "cpu_s",
    "cpu_ms_per_order",
    "cpu_ms_per_order_net_of_idle",
    "spans_per_order",
    "send_lateness_ms",
}
PCTS = ("p50", "p95", "p99", "p99_9")


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


@pytest.mark.timeout(300)  # a hang guard, not a performance bound
async def test_smoke_bench_measures_every_order_and_writes_its_outputs(
    infra: Infrastructure, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    docs = REPO / "docs" / "BENCHMARKS.md"
    docs_before = _bytes(docs)
    returned = await run_bench(BenchConfig.smoke_run(out), infra=infra)
    check(returned, infra, out, docs, docs_before)


def check(
    returned: dict[str, Any], infra: Infrastructure, out: Path, docs: Path, docs_before: bytes | None
) -> None:
    result = json.loads((out / "latest.json").read_text())
    assert result["label"] == returned["label"] == "smoke"
    assert result["smoke"] is True
    assert {"machine", "settings", "platform", "raw", "knee_rate", "knee_fraction_of_raw_chain"} <= set(
        result
    )
    assert {"nproc", "cpu_model", "memory_gb", "python"} <= set(result["machine"])
    assert sorted(out.glob("bench-*.json")), "a timestamped copy of the result"

    steps = result["platform"]["steps"]
    assert [s["rate"] for s in steps] == [2.0, 4.0]
    # every centre that ordered got its webhooks signed with the secret the platform gave it
    combos = result["platform"]["combos"]
    overload = result["platform"]["overload"]  # its overload and probe orders come after the ramp's
    posted = sum(s["orders"] for s in steps) + overload["orders"] + overload["probes"]
    ordered = {centre for centre, _ in combos[:posted]}
    hooks = result["platform"]["webhooks"]
    assert hooks["bad_signatures"] == 0
    assert hooks["signatures_verified"] == len(ordered) >= 1
    assert result["platform"]["token_renewal_failures"] == 0
    for s in steps:
        assert set(s) >= STEP_KEYS
        assert s["orders"] > 0
        # every smoke order was accepted and its chain-end webhook arrived
        assert s["accepted"] == s["orders"]
        assert s["completed"] == s["orders"], s["error_detail"]
        assert s["errors"] == 0, s["error_detail"]
        for key in ("intake_ms", "first_webhook_ms", "chain_ms"):
            assert all(s[key][p] is not None and s[key][p] > 0 for p in PCTS), key
        assert len(s["hop_lag_ms"]) == 3
        assert all(h["count"] == s["orders"] for h in s["hop_lag_ms"].values())
        for service in ("order", "scheduling", "site", "logistics", "notification"):
            assert s["cpu_ms_per_order"][service] is not None and s["cpu_ms_per_order"][service] >= 0
        # the session's embedded Postgres and broker are children of this process: measured too
        if infra.postgres_kind == "embedded":
            assert s["cpu_ms_per_order"]["postgres"] is not None
        assert s["spans_per_order"] is not None and s["spans_per_order"] > 0

    check_overload(result)

    raw = result["raw"]
    for figure in (
        raw["postgres"]["sequential"]["per_s"],
        raw["postgres"]["concurrent_16"]["per_s"],
        raw["kafka"]["produce_batched"]["per_s"],
        raw["kafka"]["produce_awaited"]["per_s"],
        raw["kafka"]["consume"]["per_s"],
        raw["chain"]["max_rate"],
        raw["chain"]["p99_ms_at_reference_rate"],
    ):
        assert isinstance(figure, int | float) and figure > 0
    assert all(s["completed"] == s["orders"] for s in raw["chain"]["steps"])

    for key in ("latency_png", "cpu_png"):
        png = Path(result["outputs"][key])
        assert png.parent == out and png.stat().st_size > 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the smoke run renders its document into its own folder and leaves docs/BENCHMARKS.md alone
    assert Path(result["outputs"]["docs"]) == out / "BENCHMARKS.md"
    assert "<!-- bench:section:smoke -->" in (out / "BENCHMARKS.md").read_text()
    assert _bytes(docs) == docs_before
    text = (out / "BENCHMARKS.md").read_text()
    assert "### Overload and recovery" in text and "| overload /s |" in text


def check_overload(result: dict[str, Any]) -> None:
    """The overload phase ran after the ramp and reports its figures (values, not timings)."""
    o = result["platform"]["overload"]
    knee = result["platform"]["knee_rate"] or 2.0  # the lowest smoke rate when none held
    assert o["knee_rate"] == knee and o["rate"] == 2 * knee and o["factor"] == 2.0
    assert o["seconds"] == 3.0
    assert o["orders"] == round(2 * knee * 3.0) == o["overload"]["orders"]
    assert 0 <= o["completed"] <= o["orders"] and o["errors"] >= 0
    assert isinstance(o["drained"], bool)
    if o["drained"]:
        assert o["completed"] == o["orders"] and o["drained_s"] is not None and o["drained_s"] >= 0
    else:
        assert o["drained_s"] is None
    base_step = next(s for s in result["platform"]["steps"] if s["rate"] == knee)
    assert o["base_chain_ms"]["p99"] == base_step["chain_ms"]["p99"] > 0
    assert o["base_chain_ms"]["p50"] == base_step["chain_ms"]["p50"] > 0
    assert o["probe_rate"] == knee and 0 < o["probe_seconds"] <= 15.0
    assert 0 < o["probes_completed"] <= o["probes"]
    assert o["probe_chain_ms"]["count"] == o["probes_completed"]
    for key in ("recovery_s", "recovery_s_strict"):
        assert o[key] is None or 0 <= o[key] <= 15.0
    assert o["recovery_window_s"] == 1.0 and o["limit_s"] == 60.0
    assert o["recovered_within_limit"] == (
        o["drained"] and o["recovery_s"] is not None and o["drained_s"] <= 60 and o["recovery_s"] <= 60
    )
    series = o["probe_series"]
    assert series and sum(w["probes"] for w in series) == o["probes"] - o["probe_errors"]
    assert [w["t_s"] for w in series] == [float(i) for i in range(len(series))]
    for w in series:
        assert 0 <= w["completed"] <= w["probes"]
        if w["completed"]:
            assert 0 < w["p50_ms"] <= w["p99_ms"]
    assert o["backlog_series"] and all(b["overload_outstanding"] >= 0 for b in o["backlog_series"])
