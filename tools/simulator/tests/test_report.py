"""The summary maths and the report (no I/O)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime

import pytest

from v2v_simulator.config import Config
from v2v_simulator.plan import Combo, OrderPlan
from v2v_simulator.report import (
    REACTIONS_ORDER,
    OrderResult,
    Stats,
    error_lines,
    fmt,
    group_errors,
    percentile,
    progress_line,
    reactions_of,
    render_summary,
    utilisation,
)


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7], 90) == 7
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(range(1, 11), 90) == pytest.approx(9.1)
    assert percentile([10, 0], 100) == 10


def test_percentile_extremes_and_unsorted_input() -> None:
    assert percentile([5, 1, 3], 0) == 1.0
    assert percentile([5, 1, 3], 50) == 3.0
    assert percentile((x / 2 for x in range(5)), 25) == pytest.approx(0.5)
    assert isinstance(percentile([1, 2], 50), float)


def test_utilisation_is_consumed_slots_over_capacity_in_the_window() -> None:
    sites = [{"site_id": "A", "daily_capacity": {"X": 2, "Y": 1}}, {"site_id": "B", "daily_capacity": {}}]
    rows = utilisation(sites, {"A": 6}, (date(2026, 3, 1), date(2026, 3, 10)))
    assert rows[0] == {"site_id": "A", "consumed": 6, "capacity": 30, "share": pytest.approx(0.2)}
    assert rows[1]["capacity"] == 0 and rows[1]["share"] == 0.0
    assert utilisation(sites, {}, None)[0]["capacity"] == 0


def test_reactions_are_read_from_the_timeline() -> None:
    timeline = [
        {"type": "site.product_out_of_specification.v1", "status": "material_received", "reason": "x"},
        {"type": "order.remanufacture_requested.v1", "status": "material_received", "reason": "x"},
        {"type": "site.material_rejected.v1", "status": "rescheduling", "reason": "recollection: bag"},
        {"type": "site.booking_affected.v1", "status": "rescheduling", "reason": "moving"},
        {"type": "order.quarantine_decided.v1", "status": "released", "reason": "quarantine released: ok"},
        {"type": "order.failed.v1", "status": "failed", "reason": "no recollection left"},
        {
            "type": "order.quarantine_decided.v1",
            "status": "rescheduling",
            "reason": "recollection: quarantined product rejected: excursion confirmed",
        },
    ]
    seen = reactions_of(timeline)
    assert seen["quarantine rejected by QA"] == 1
    assert seen["remanufactured (new run from retained material)"] == 1
    assert seen["recollected (new apheresis and slot)"] == 2
    assert seen["rebooked after the site outage"] == 1
    assert seen["quarantine released by QA"] == 1
    assert seen["failed: nothing left to try"] == 1


def test_the_other_reactions_and_entries_without_reason() -> None:
    seen = reactions_of(
        [
            {"type": "order.rebook_requested.v1", "status": "rescheduling", "reason": "apheresis moved: x"},
            {"type": "logistics.shipment_excursion.v1", "status": "quarantined", "reason": None},
            {"type": "scheduling.slot_unavailable.v1", "status": "waitlisted"},
            {"type": "order.cancelled.v1", "status": "cancelled", "reason": "consent"},
            {"type": "order.submitted.v1", "status": "submitted", "reason": "placed"},
        ]
    )
    assert seen == Counter(
        {
            "rebooked after the apheresis date moved": 1,
            "quarantined after an outbound excursion": 1,
            "waitlisted (no capacity)": 1,
            "cancelled by the centre": 1,
        }
    )
    assert set(seen) <= set(REACTIONS_ORDER)


def test_errors_are_grouped_by_kind_without_order_details() -> None:
    errors = [
        "order #3 1cd3985a (TISA-CEL at US-MORRIS-PLAINS, no exception) stuck waiting for the platform: "
        "status booking_confirmed run 1 for 90 s",
        "order #15 328437b8 (AXI-CEL at JP-KOBE, qc_oos) stuck waiting for the platform: "
        "status booking_confirmed run 1 for 90 s",
        "order #2 e9bb89f5 place order: POST /v1/orders -> 500 boom",
    ]
    groups = group_errors(errors)
    assert len(groups) == 2
    assert len(groups["order stuck waiting for the platform: status booking_confirmed"]) == 2


def test_error_lines_group_and_list_few_errors() -> None:
    assert error_lines([]) == ["errors: none"]
    errors = ["order #1 aaaaaaaa x: boom", "order #2 bbbbbbbb x: boom", "registry site outage: down"]
    lines = error_lines(errors)
    assert lines[0] == "errors: 3, 2 kind(s)"
    assert lines[1] == "     2 x order x: boom"  # the biggest group first
    assert lines[2] == "         e.g. order #1 aaaaaaaa x: boom"
    assert lines[-4:] == ["all errors:", *(f"  - {e}" for e in errors)]
    many = error_lines([f"order #{i} {i:08x} stuck" for i in range(31)])
    assert many[0] == "errors: 31, 1 kind(s)" and "all errors:" not in many


def test_fmt_and_the_progress_line() -> None:
    assert fmt(None) == "-" and fmt(2.25) == "2.2" and fmt(17) == "17.0"
    line = progress_line(
        12.34,
        datetime(2026, 3, 9, 5, tzinfo=UTC),
        [None, "submitted", "material_in_transit", "qc_pending", "completed", "completed", "weird"],
        calls=42,
        errors=1,
    )
    assert line == (
        "[  12.3s] sim 2026-03-09 | not placed 1 · booking 2 · inbound 1 · manufacturing 1 · completed 2 "
        "| calls 42 | errors 1"
    )


def _result(index: int, product: str, **kw: object) -> OrderResult:
    kw = {"market": "DE", "site_id": "CH-STEIN", **kw}
    combo = Combo("TC-DE-BE-001", product, "commercial", ("CH-STEIN",), "CH-STEIN")
    kind = kw.pop("kind", None)
    params = kw.pop("params", {})
    plan = OrderPlan(index, f"SIM-{index}", combo, date(2026, 3, 10), 0.0, kind, params)  # type: ignore[arg-type]
    result = OrderResult(plan)
    for key, value in kw.items():
        setattr(result, key, value)
    return result


def test_the_summary_counts_states_exceptions_sites_and_days() -> None:
    results = [
        _result(0, "TISA-CEL", final_status="completed", predicted_days=30, simulated_days=28.0,
                sites_manufactured=["CH-STEIN"]),
        _result(1, "AXI-CEL", final_status="completed", predicted_days=24, simulated_days=40.0, applied=True,
                kind="qc_oos", params={"reason": "x"}, sites_manufactured=["CH-STEIN", "CH-STEIN"]),
        _result(2, "TISA-CEL", final_status="cancelled", applied=True, kind="cancellation",
                params={"stage": "qc_pending"}),
        _result(3, "TISA-CEL", final_status="cancelled", aborted="place order: HTTP 500"),
    ]  # fmt: skip
    stats = Stats()
    stats.calls.update({"place order": 4, "infusion": 2})
    stats.statuses.update({201: 4, 200: 1, 503: 1})
    stats.intended["lymphodepletion before release -> 409"] = 1
    summary = {
        "terminal": {"completed": 2, "cancelled": 2},
        "reactions": {"remanufactured (new run from retained material)": 1, "something new": 2},
        "utilisation": utilisation(
            [{"site_id": "CH-STEIN", "daily_capacity": {"TISA-CEL": 4}}],
            {"CH-STEIN": 3},
            (date(2026, 3, 10), date(2026, 3, 11)),
        ),
        "window": (date(2026, 3, 10), date(2026, 3, 11)),
    }
    text = render_summary(
        Config(orders=5, seed=3, day_seconds=0.2),
        stats,
        summary,
        results,
        elapsed=61.0,
        start=datetime(2026, 3, 1, tzinfo=UTC),
        last=datetime(2026, 4, 20, tzinfo=UTC),
        outage_note="none",
    )
    lines = text.splitlines()
    assert lines[2] == "vein2vein simulation summary"
    assert "5 orders, seed 3, 61 s real; simulated 2026-03-01 .. 2026-04-20 (1 day = 0.2 s)" in lines
    assert "HTTP calls 6: 5xx 1; intended refusals lymphodepletion before release -> 409: 1" in lines
    assert not any("rate-limited" in line for line in lines)  # no 429: no line about it
    assert "  completed        2" in lines and "  cancelled        2" in lines
    assert "  failed           0" in lines and "  not terminal     1" in lines
    assert "  (1 of the cancelled were cancelled by the simulator after an error)" in lines
    assert f"  {'cancellation':<24}{1:>8}{1:>10}  qc_pending 1" in lines
    assert f"  {'qc_oos':<24}{1:>8}{1:>10}  " in lines
    assert f"  {'total':<24}{2:>8}{2:>10}" in lines
    assert f"  {'remanufactured (new run from retained material)':<56}{1:>6}" in lines
    assert f"  {'something new':<56}{2:>6}" in lines  # reactions not in the known order come last
    assert (
        "Per-site utilisation (manufacturing starts of this run: 2026-03-10 .. 2026-03-11, 2 days)" in lines
    )
    assert f"  {'CH-STEIN':<18}{2:>7}{3:>6}{3:>12}{8:>10}{'37.5%':>12}" in lines
    # predicted vs simulated per product (n < 5 marked), with the bias and the p90 of the error's size
    at = lines.index("Vein-to-vein days, completed orders: predicted at first booking vs simulated")
    assert lines[at + 3].split() == [
        "product", "n", "predicted", "median", "p90", "simulated", "median", "p90", "bias", "p90", "|error|"
    ]  # fmt: skip
    assert lines[at + 4].split() == ["AXI-CEL", "1*", "24.0", "24.0", "40.0", "40.0", "-16.0", "16.0"]
    assert lines[at + 5].split() == ["TISA-CEL", "1*", "30.0", "30.0", "28.0", "28.0", "+2.0", "2.0"]
    assert lines[at + 6].split() == ["all", "2*", "27.0", "29.4", "34.0", "38.8", "-7.0", "14.6"]
    assert lines[at + 7].split() == ["no", "exception", "1*", "30.0", "30.0", "28.0", "28.0", "+2.0", "2.0"]
    lane = lines.index("Per lane (the centre's market → the site that made the product)")
    assert lines[lane + 2].split() == [
        "DE",
        "→",
        "CH-STEIN",
        "2*",
        "27.0",
        "29.4",
        "34.0",
        "38.8",
        "-7.0",
        "14.6",
    ]
    assert "Rules the orders obey (checked over the run; 0 violation(s), 0 expected)" in lines
    assert lines[-1] == "=" * 100

    stats.throttled.update({"ops": 3, "site CH-STEIN": 1})
    again = render_summary(
        Config(orders=5, seed=3, day_seconds=0.2),
        stats,
        summary,
        results,
        elapsed=61.0,
        start=datetime(2026, 3, 1, tzinfo=UTC),
        last=datetime(2026, 4, 20, tzinfo=UTC),
    ).splitlines()
    at = again.index("HTTP calls 6: 5xx 1; intended refusals lymphodepletion before release -> 409: 1")
    assert again[at + 1] == "  rate-limited (429, waited out and retried) 4: ops 3, site CH-STEIN 1"
