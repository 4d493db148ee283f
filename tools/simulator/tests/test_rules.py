"""The rules checked at the end of a run (no I/O): each over a clean order and over one that breaks it, and
the accuracy of the predictions per product and per lane."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from v2v_simulator.plan import Combo, OrderPlan
from v2v_simulator.report import OrderResult, accuracy, accuracy_by, accuracy_lines, rule_lines
from v2v_simulator.rules import (
    TERMINAL_RULE,
    RunStart,
    check_rules,
    every_order_terminal,
    fresh_booked_in_time,
    fresh_started_in_time,
    infusion_in_window_recorded,
    infusion_in_window_simulated,
    lymphodepletion_after_release_and_delivery,
)

T0 = datetime(2026, 3, 10, 9, tzinfo=UTC)  # a simulated moment: the day of the release
PRODUCTS: dict[str, dict[str, Any]] = {
    "AXI-CEL": {"code": "AXI-CEL", "planning": {"starting_material": "fresh", "max_fresh_hours": 48}},
    "TISA-CEL": {"code": "TISA-CEL", "planning": {"starting_material": "cryopreserved"}},
}
# the infusion window the order shows for an LD started on 2026-03-11 (3 days' regimen, then 2-7 days)
WINDOW = {
    "indication": "LBCL_2L",
    "lymphodepletion_started_on": "2026-03-11",
    "lymphodepletion_completed_on": "2026-03-14",
    "min_days_after_completion": 2,
    "max_days_after_completion": 7,
    "earliest_infusion": "2026-03-16",
    "latest_infusion": "2026-03-21",
    "repeat_lymphodepletion_from": "2026-03-22",
}


def result(index: int, product: str = "AXI-CEL", **kw: Any) -> OrderResult:
    combo = Combo("TC-US-NJ-001", product, "commercial", ("US-SITE",), "US-SITE")
    r = OrderResult(OrderPlan(index, f"SIM-{index}", combo, date(2026, 2, 1), 0.0))
    r.order_id = f"00000000-0000-0000-0000-{index:012d}"
    for key, value in kw.items():
        setattr(r, key, value)
    return r


def infused(
    index: int, *, ld_after_release_h: float = 20, infusion_after_ld_days: int = 6, **kw: Any
) -> OrderResult:
    """A completed order: released at T0, its delivery booked and picked up, LD, received, infused; the
    platform's record of its window and of the infusion (in New York's calendar)."""
    ld = T0 + timedelta(hours=ld_after_release_h)
    infusion = ld + timedelta(days=infusion_after_ld_days)
    moments = [
        ("QC released", T0),
        ("outbound booked", T0 + timedelta(hours=2)),
        ("outbound picked_up", T0 + timedelta(hours=6)),
        ("lymphodepletion", ld),
        ("product receipt", T0 + timedelta(days=2)),
        ("infusion", infusion),
    ]
    facts: dict[str, Any] = {
        "final_status": "completed",
        "moments": sorted(moments, key=lambda m: m[1]),
        "indication": "LBCL_2L",
        "infusion_window": WINDOW,
        "infused_at": datetime(2026, 3, 17, 15, tzinfo=UTC),  # 11:00 in New York
        "centre_tz": "America/New_York",
    }
    return result(index, **{**facts, **kw})


# ---- every order terminal --------------------------------------------------------------------------------


def test_an_order_not_terminal_or_not_readable_is_a_violation() -> None:
    check = every_order_terminal(
        [result(0, final_status="completed"), result(1, final_status="qc_pending"), result(2)]
    )
    assert check.rule == TERMINAL_RULE and check.checked == 3
    assert check.violations == [
        "order #2 00000000-0000-0000-0000-000000000001: qc_pending",
        "order #3 00000000-0000-0000-0000-000000000002: not readable",
    ]


# ---- LD only after release and confirmed delivery ------------------------------------------------------


def test_ld_after_the_release_and_the_booked_delivery_is_clean() -> None:
    check = lymphodepletion_after_release_and_delivery([infused(0), result(1, final_status="cancelled")])
    assert (check.checked, check.violations) == (1, [])  # the cancelled order was never infused


def test_ld_before_the_release_or_before_the_delivery_was_confirmed_is_a_violation() -> None:
    early = infused(0, ld_after_release_h=-5)
    unconfirmed = infused(1, ld_after_release_h=1)  # after the release, before the courier booked it
    no_ld = infused(2)
    no_ld.moments = [m for m in no_ld.moments if m[0] != "lymphodepletion"]
    check = lymphodepletion_after_release_and_delivery([early, unconfirmed, no_ld])
    assert check.checked == 3
    assert [v.split(": ", 1)[1] for v in check.violations] == [
        "LD 5.0 h before the release",
        "LD before the product's delivery was confirmed",
        "infused with no LD before it",
    ]


def test_the_ld_that_counts_is_the_last_one_before_the_infusion() -> None:
    # a product lost after LD: a new lot released later, and LD repeated after its delivery was booked
    r = infused(0)
    again = T0 + timedelta(days=30)
    r.moments = [m for m in r.moments if m[0] != "infusion"] + [
        ("release after the disposition", again),
        ("outbound booked", again + timedelta(hours=2)),
        ("lymphodepletion", again + timedelta(hours=12)),
        ("infusion", again + timedelta(days=6)),
    ]
    assert lymphodepletion_after_release_and_delivery([r]).violations == []
    r.moments = [m for m in r.moments if m[1] != again + timedelta(hours=12)]  # no repeat LD: the old one
    assert lymphodepletion_after_release_and_delivery([r]).violations == [
        "order #1 00000000-0000-0000-0000-000000000000: LD 700.0 h before the release"
    ]


# ---- infusion inside the window --------------------------------------------------------------------------


def test_the_recorded_infusion_inside_the_window_in_the_centres_calendar_is_clean() -> None:
    check = infusion_in_window_recorded([infused(0), result(1, final_status="failed")])
    assert (check.checked, check.violations, check.unchecked) == (1, [], 0)


def test_a_recorded_infusion_outside_the_window_is_a_violation() -> None:
    late = infused(0, infused_at=datetime(2026, 3, 22, 3, tzinfo=UTC))  # still the 21st in New York
    later = infused(1, infused_at=datetime(2026, 3, 22, 5, tzinfo=UTC))  # the 22nd there
    early = infused(2, infused_at=datetime(2026, 3, 15, 12, tzinfo=UTC))
    missing = infused(3, infusion_window=None)
    check = infusion_in_window_recorded([late, later, early, missing])
    assert check.checked == 4
    assert [v.split(": ", 1)[1] for v in check.violations] == [
        "infused on 2026-03-22, window 2026-03-16 .. 2026-03-21",
        "infused on 2026-03-15, window 2026-03-16 .. 2026-03-21",
        "completed with no infusion window recorded",
    ]


def test_an_order_without_an_indication_has_no_window_to_meet() -> None:
    check = infusion_in_window_recorded([infused(0, indication=None, infusion_window=None)])
    assert (check.checked, check.unchecked, check.violations) == (0, 1, [])
    assert "1 infused without an indication" in check.note


def test_the_simulated_days_from_ld_to_infusion_are_checked_against_the_platforms_window() -> None:
    # regimen 3 days + 2..7 days after it: 5..10 days after the LD's start
    inside = [infused(0, infusion_after_ld_days=5), infused(1, infusion_after_ld_days=10)]
    assert infusion_in_window_simulated(inside).violations == []
    outside = [infused(2, infusion_after_ld_days=4), infused(3, infusion_after_ld_days=11)]
    check = infusion_in_window_simulated(inside + outside)
    assert check.checked == 4
    assert [v.split(": ", 1)[1] for v in check.violations] == [
        "infused 4 days after LD started (allowed 5-10)",
        "infused 11 days after LD started (allowed 5-10)",
    ]


def test_simulated_days_count_in_the_centres_calendar() -> None:
    # LD at 03:00 UTC is the evening before in New York: six days later in UTC, seven there
    r = infused(0, centre_tz="America/New_York")
    r.moments = [
        ("QC released", T0),
        ("outbound booked", T0 + timedelta(hours=1)),
        ("lymphodepletion", datetime(2026, 3, 11, 3, tzinfo=UTC)),
        ("infusion", datetime(2026, 3, 17, 14, tzinfo=UTC)),
    ]
    r.infusion_window = {**WINDOW, "max_days_after_completion": 3}  # allowed 5..6 days after the start
    assert [v.split(": ", 1)[1] for v in infusion_in_window_simulated([r]).violations] == [
        "infused 7 days after LD started (allowed 5-6)"
    ]
    r.centre_tz = "Europe/Berlin"  # the same moments in Berlin: six days
    assert infusion_in_window_simulated([r]).violations == []


# ---- fresh material on time ------------------------------------------------------------------------------


def run(collected_h: float, started_h: float, booked: tuple[int, int] | None = (0, 2)) -> RunStart:
    """A run collected and started that many hours after T0; its slot booked on T0's day + those days."""
    return RunStart(
        "US-SITE",
        "slot-1",
        T0 + timedelta(hours=collected_h),
        T0 + timedelta(hours=started_h),
        booked_collection=T0.date() + timedelta(days=booked[0]) if booked else None,
        booked_start=T0.date() + timedelta(days=booked[1]) if booked else None,
    )


def test_fresh_material_started_within_its_hours_is_clean_and_late_is_a_violation() -> None:
    clean = result(0, collected_runs=[run(0, 47.5)])
    late = result(1, collected_runs=[run(0, 20), run(100, 151)])  # a recollection's run started late
    frozen = result(2, "TISA-CEL", collected_runs=[run(0, 500)])  # cryopreserved: no limit
    check = fresh_started_in_time([clean, late, frozen], PRODUCTS)
    assert check.checked == 3
    assert check.violations == [
        "order #2 00000000-0000-0000-0000-000000000001: started at US-SITE 51.0 h after collection (max 48 h)"
    ]


def test_the_platforms_booked_days_for_fresh_material_are_checked_in_whole_days() -> None:
    clean = result(0, collected_runs=[run(0, 40, booked=(0, 2))])
    far = result(1, collected_runs=[run(0, 40, booked=(0, 3))])
    unknown = result(2, collected_runs=[run(0, 40, booked=None)])  # its slot was not found
    check = fresh_booked_in_time([clean, far, unknown], PRODUCTS)
    assert (check.checked, check.unchecked) == (2, 1)
    assert check.violations == [
        "order #2 00000000-0000-0000-0000-000000000001: slot slot-1 at US-SITE booked to start 3 days after "
        "its collection day (max 48 h)"
    ]
    assert "1 run(s) whose slot was not found" in check.note


def test_check_rules_runs_every_rule_and_the_section_lists_the_violators() -> None:
    clean = [infused(0, collected_runs=[run(0, 40)]), result(1, final_status="cancelled")]
    checks = check_rules(clean, PRODUCTS)
    assert len(checks) == 6 and all(c.violations == [] for c in checks)
    assert [c.checked for c in checks] == [2, 1, 1, 1, 1, 1]
    lines = rule_lines(checks)
    assert lines[0] == "Rules the orders obey (checked over the run; 0 violation(s), 0 expected)"
    assert not any(line.startswith("      - ") for line in lines)

    broken = [*clean, infused(2, infusion_after_ld_days=12, collected_runs=[run(0, 60)])]
    checks = check_rules(broken, PRODUCTS)
    assert [len(c.violations) for c in checks] == [0, 0, 0, 1, 1, 0]
    lines = rule_lines(checks)
    assert lines[0] == "Rules the orders obey (checked over the run; 2 violation(s), 0 expected)"
    fresh = next(i for i, line in enumerate(lines) if line.lstrip().startswith("fresh material started"))
    assert lines[fresh].split()[-2:] == ["2", "1"]  # checked, violations
    assert lines[fresh + 2] == (
        "      - order #3 00000000-0000-0000-0000-000000000002: started at US-SITE 60.0 h after collection "
        "(max 48 h)"
    )


def test_many_violations_are_listed_up_to_a_limit() -> None:
    late = [result(i, final_status="manufacturing") for i in range(25)]
    lines = rule_lines([every_order_terminal(late)])
    assert sum(line.startswith("      - order #") for line in lines) == 20
    assert lines[-1] == "      ... and 5 more"


# ---- predicted vs simulated, per product and per lane --------------------------------------------------


def done(index: int, product: str, market: str, site: str, predicted: int, simulated: float) -> OrderResult:
    return result(
        index,
        product,
        final_status="completed",
        market=market,
        site_id=site,
        predicted_days=predicted,
        simulated_days=simulated,
    )


def test_accuracy_is_the_bias_and_the_p90_of_the_absolute_error() -> None:
    group = [
        done(0, "AXI-CEL", "US", "A", 30, 28.0),
        done(1, "AXI-CEL", "US", "A", 30, 33.0),
        done(2, "AXI-CEL", "US", "A", 30, 40.0),
    ]
    a = accuracy(group)
    assert a.n == 3 and a.predicted_median == 30.0 and a.simulated_median == 33.0
    assert a.bias == pytest.approx((2 - 3 - 10) / 3)  # predicted - simulated: late predictions are +
    assert a.p90_abs_error == pytest.approx(3 + (10 - 3) * 0.8)  # |errors| 2, 3, 10
    no_prediction = done(3, "AXI-CEL", "US", "A", 0, 30.0)
    no_prediction.predicted_days = None
    b = accuracy([no_prediction])
    assert (b.n, b.bias, b.p90_abs_error, b.simulated_median) == (1, None, None, 30.0)


def test_completed_orders_are_grouped_per_product_and_per_lane() -> None:
    results = [
        done(0, "AXI-CEL", "US", "US-A", 20, 22.0),
        done(1, "AXI-CEL", "DE", "EU-B", 20, 26.0),
        done(2, "TISA-CEL", "US", "US-A", 40, 38.0),
        result(3, "TISA-CEL", final_status="cancelled", market="US", site_id="US-A"),
    ]
    per_lane = dict(accuracy_by(results, lambda r: r.lane))
    assert list(per_lane) == ["DE → EU-B", "US → US-A"]
    assert per_lane["US → US-A"].n == 2 and per_lane["US → US-A"].bias == pytest.approx(0.0)
    assert per_lane["DE → EU-B"].bias == pytest.approx(-6.0)
    per_product = dict(accuracy_by(results, lambda r: r.plan.combo.product))
    assert per_product["AXI-CEL"].p90_abs_error == pytest.approx(2 + 4 * 0.9)
    lines = accuracy_lines(results)
    lane = lines.index("Per lane (the centre's market → the site that made the product)")
    assert lines[lane + 2].split() == ["DE", "→", "EU-B", "1*", "20.0", "20.0", "26.0", "26.0", "-6.0", "6.0"]
    assert lines[lane + 3].split()[:4] == ["US", "→", "US-A", "2*"]
    assert lines[-1] == "  (*: fewer than 5 orders, their p90 is little more than their maximum)"
