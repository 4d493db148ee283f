"""The simulator (tools/simulator/simulator.py, `make demo`): its arithmetic and plan as unit tests, and a
small run end to end against the five service processes.

The unit tests carry no marker (no I/O); the end-to-end run is marked `e2e`.
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from v2v_contracts.coi import coi_problem, is_valid_coi
from v2v_harness.platform import Platform

SIMULATOR = Path(__file__).resolve().parents[2] / "tools" / "simulator" / "simulator.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("v2v_simulator", SIMULATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


sim = _load()

# The shape of the seeded network (services/site/src/site_service/seed/sites.yaml and the order service's
# seed), enough for the plan: regions, regulators, approvals, capacity.
CENTRES = [
    {"id": "TC-US-NJ-001", "region": "north_america", "regulator": "FDA"},
    {"id": "TC-DE-BE-001", "region": "europe", "regulator": "EMA"},
    {"id": "TC-CH-ZH-001", "region": "europe", "regulator": "Swissmedic"},
    {"id": "TC-JP-TK-001", "region": "asia_pacific", "regulator": "PMDA"},
    {"id": "TC-CN-SH-001", "region": "asia_pacific", "regulator": "NMPA"},
    {"id": "TC-AU-VI-001", "region": "asia_pacific", "regulator": "TGA"},
]
PRODUCTS = [
    {"code": "TISA-CEL", "manufacturing_days": 17, "qc_days": 14},
    {"code": "AXI-CEL", "manufacturing_days": 14, "qc_days": 7},
    {"code": "CILTA-CEL", "manufacturing_days": 19, "qc_days": 14},
]


def _site(site_id: str, region: str, approvals: list[tuple[str, str, list[str]]], cap: dict[str, int]) -> Any:
    return {
        "site_id": site_id,
        "region": region,
        "active": True,
        "approvals": [
            {"regulator": r, "use": u, "product_code": p} for r, u, products in approvals for p in products
        ],
        "daily_capacity": cap,
    }


SITES = [
    _site(
        "US-MORRIS-PLAINS",
        "north_america",
        [
            ("FDA", "commercial", ["TISA-CEL", "AXI-CEL", "CILTA-CEL"]),
            ("FDA", "clinical", ["TISA-CEL", "AXI-CEL", "CILTA-CEL"]),
            ("EMA", "clinical", ["TISA-CEL"]),
            ("PMDA", "commercial", ["TISA-CEL"]),
            ("TGA", "commercial", ["TISA-CEL"]),
        ],
        {"TISA-CEL": 6, "AXI-CEL": 4, "CILTA-CEL": 2},
    ),
    _site(
        "DE-LEIPZIG-IZI",
        "europe",
        [
            ("EMA", "commercial", ["TISA-CEL"]),
            ("EMA", "clinical", ["TISA-CEL", "CILTA-CEL"]),
            ("Swissmedic", "commercial", ["TISA-CEL"]),
        ],
        {"TISA-CEL": 3, "CILTA-CEL": 1},
    ),
    _site(
        "FR-LES-ULIS",
        "europe",
        [("EMA", "commercial", ["TISA-CEL", "AXI-CEL"]), ("EMA", "clinical", ["TISA-CEL", "AXI-CEL"])],
        {"TISA-CEL": 3, "AXI-CEL": 2},
    ),
    _site(
        "CH-STEIN",
        "europe",
        [
            ("EMA", "commercial", ["TISA-CEL"]),
            ("EMA", "clinical", ["TISA-CEL"]),
            ("Swissmedic", "commercial", ["TISA-CEL"]),
            ("Swissmedic", "clinical", ["TISA-CEL"]),
        ],
        {"TISA-CEL": 4},
    ),
    _site(
        "CN-SHANGHAI",
        "asia_pacific",
        [("NMPA", "commercial", ["TISA-CEL"]), ("NMPA", "clinical", ["TISA-CEL", "CILTA-CEL"])],
        {"TISA-CEL": 2, "CILTA-CEL": 1},
    ),
    _site(
        "JP-KOBE",
        "asia_pacific",
        [("PMDA", "commercial", ["TISA-CEL"]), ("PMDA", "clinical", ["TISA-CEL"])],
        {"TISA-CEL": 2},
    ),
    _site(
        "AU-MELBOURNE",
        "asia_pacific",
        [("TGA", "commercial", ["TISA-CEL"]), ("TGA", "clinical", ["TISA-CEL"])],
        {"TISA-CEL": 2},
    ),
]
TODAY = date(2026, 3, 2)


# ---- unit: command line, clock, arithmetic -----------------------------------------------------------------


def test_command_line_defaults_are_the_make_run_ports() -> None:
    cfg = sim.parse_args([])
    assert cfg.orders == 200 and cfg.exceptions == 0.2 and cfg.concurrency == 20 and cfg.timeout_s == 600
    assert cfg.urls == {
        "order": "http://127.0.0.1:8001",
        "scheduling": "http://127.0.0.1:8002",
        "site": "http://127.0.0.1:8003",
        "logistics": "http://127.0.0.1:8004",
        "notification": "http://127.0.0.1:8005",
    }
    assert cfg.start_platform


def test_command_line_options() -> None:
    cfg = sim.parse_args(
        [
            "--orders",
            "12",
            "--exceptions",
            "0.5",
            "--seed",
            "9",
            "--base-url-site",
            "http://h:1/",
            "--no-start",
        ]
    )
    assert (cfg.orders, cfg.exceptions, cfg.seed) == (12, 0.5, 9)
    assert cfg.urls["site"] == "http://h:1" and not cfg.start_platform
    with pytest.raises(SystemExit):
        sim.parse_args(["--exceptions", "1.5"])
    with pytest.raises(SystemExit):
        sim.parse_args(["--orders", "0"])


def test_compressed_clock_runs_day_seconds_per_simulated_day() -> None:
    now = [100.0]
    start = datetime(2026, 3, 2, 9, tzinfo=UTC)
    clock = sim.SimClock(start, 0.5, monotonic=lambda: now[0])
    assert clock.now() == start
    now[0] += 1.0  # one real second = two simulated days
    assert clock.now() == start + timedelta(days=2)
    assert clock.real_delay(start + timedelta(days=3)) == pytest.approx(0.5)
    assert clock.real_delay(start) == 0.0
    assert clock.at(date(2026, 3, 5), 8.5) == datetime(2026, 3, 5, 8, 30, tzinfo=UTC)
    frozen = sim.SimClock(start, 0.0, monotonic=lambda: now[0])
    assert frozen.real_delay(start + timedelta(days=30)) == 0.0


def test_percentiles_interpolate_between_ranks() -> None:
    assert sim.percentile([], 50) is None
    assert sim.percentile([7], 90) == 7
    assert sim.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert sim.percentile(range(1, 11), 90) == pytest.approx(9.1)
    assert sim.percentile([10, 0], 100) == 10


def test_utilisation_is_consumed_slots_over_capacity_in_the_window() -> None:
    sites = [{"site_id": "A", "daily_capacity": {"X": 2, "Y": 1}}, {"site_id": "B", "daily_capacity": {}}]
    rows = sim.utilisation(sites, {"A": 6}, (date(2026, 3, 1), date(2026, 3, 10)))
    assert rows[0] == {"site_id": "A", "consumed": 6, "capacity": 30, "share": pytest.approx(0.2)}
    assert rows[1]["capacity"] == 0 and rows[1]["share"] == 0.0
    assert sim.utilisation(sites, {}, None)[0]["capacity"] == 0


def test_a_mistyped_check_character_is_caught_by_the_coi_check() -> None:
    for coi in ("V2V0026000001" + "0", "G123498654321H"):
        typo = sim.mistype_check_character(coi)
        assert typo != coi and typo[:13] == coi[:13]
    assert is_valid_coi("G123498654321H")
    assert coi_problem(sim.mistype_check_character("G123498654321H"))


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
    seen = sim.reactions_of(timeline)
    assert seen["quarantine rejected by QA"] == 1
    assert seen["remanufactured (new run from retained material)"] == 1
    assert seen["recollected (new apheresis and slot)"] == 2
    assert seen["rebooked after the site outage"] == 1
    assert seen["quarantine released by QA"] == 1
    assert seen["failed: nothing left to try"] == 1


def test_errors_are_grouped_by_kind_without_order_details() -> None:
    errors = [
        "order #3 1cd3985a (TISA-CEL at US-MORRIS-PLAINS, no exception) stuck waiting for the platform: "
        "status booking_confirmed run 1 for 90 s",
        "order #15 328437b8 (AXI-CEL at JP-KOBE, qc_oos) stuck waiting for the platform: "
        "status booking_confirmed run 1 for 90 s",
        "order #2 e9bb89f5 place order: POST /v1/orders -> 500 boom",
    ]
    groups = sim.group_errors(errors)
    assert len(groups) == 2
    assert len(groups["order stuck waiting for the platform: status booking_confirmed"]) == 2


# ---- unit: the plan ----------------------------------------------------------------------------------------


def test_every_site_is_the_first_choice_of_some_approved_combination() -> None:
    combos = sim.feasible_combos(CENTRES, PRODUCTS, SITES)
    assert {c.primary for c in combos} == {s["site_id"] for s in SITES}
    by_key = {(c.centre, c.product, c.order_type): c for c in combos}
    assert by_key[("TC-DE-BE-001", "CILTA-CEL", "clinical")].sites == ("DE-LEIPZIG-IZI",)
    assert by_key[("TC-DE-BE-001", "AXI-CEL", "commercial")].primary == "FR-LES-ULIS"
    assert by_key[("TC-JP-TK-001", "TISA-CEL", "commercial")].sites == ("JP-KOBE", "US-MORRIS-PLAINS")
    assert ("TC-DE-BE-001", "CILTA-CEL", "commercial") not in by_key  # no site approved


def test_plan_is_reproducible_approved_and_mixes_the_exceptions() -> None:
    cfg = sim.Config(orders=200, exceptions=0.2, seed=11)
    plan = sim.make_plan(cfg, CENTRES, PRODUCTS, SITES, TODAY)
    again = sim.make_plan(cfg, CENTRES, PRODUCTS, SITES, TODAY)
    assert [(o.combo, o.requested_date, o.kind) for o in plan.orders] == [
        (o.combo, o.requested_date, o.kind) for o in again.orders
    ]
    assert len(plan.orders) == 200
    assert len({o.patient_ref for o in plan.orders}) == 200
    assert all(o.patient_ref.startswith("SIM-") for o in plan.orders)
    assert {o.combo.primary for o in plan.orders} == {s["site_id"] for s in SITES}
    kinds = [o.kind for o in plan.orders if o.kind]
    assert len(kinds) == 40
    assert set(kinds) == set(sim.EXCEPTION_WEIGHTS)  # 40 exceptions: every kind at least once
    assert all(o.requested_date >= TODAY + timedelta(days=3) for o in plan.orders)
    assert any(o.lymph_refusal for o in plan.orders) and any(o.coi_typo for o in plan.orders)
    # the outage cohort lands first at the outage site, has an alternative, and comes after the others
    cohort = [o for o in plan.orders if o.kind == "site_outage"]
    assert plan.outage_site == "CH-STEIN"
    assert all(o.combo.primary == plan.outage_site and len(o.combo.sites) > 1 for o in cohort)
    assert plan.outage_gate is not None
    assert all(o.requested_date >= plan.outage_gate for o in cohort)
    assert all(o.requested_date < plan.outage_gate for o in plan.orders if o.kind != "site_outage")


def test_no_exceptions_means_none_planned() -> None:
    plan = sim.make_plan(sim.Config(orders=30, exceptions=0.0, seed=1), CENTRES, PRODUCTS, SITES, TODAY)
    assert not [o for o in plan.orders if o.kind] and plan.outage_site is None


# ---- end to end ------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_simulated_orders_all_end_in_a_terminal_state_without_errors(platform: Platform) -> None:
    cfg = sim.Config(
        orders=18,
        exceptions=0.5,
        seed=5,
        urls={name: platform.url(name) for name in sim.SERVICES},
        start_platform=False,
        day_seconds=0.05,
        timeout_s=150,
        stall_s=45,
        poll_s=0.3,
        progress_s=5,
    )
    lines: list[str] = []
    simulator = sim.Simulator(cfg, lines.append)
    try:
        code = await simulator.run()
    finally:
        await simulator.api.close()
    output = "\n".join(lines)
    print(output)
    assert code == 0, output
    assert simulator.stats.errors == []
    terminal = simulator.summary["terminal"]
    assert sum(terminal.values()) == cfg.orders, output
    assert terminal.get("completed", 0) > 0
    for state, count in terminal.items():
        assert f"  {state:<12}{count:>6}" in output
    assert "exceptions injected" in output.lower() and "Per-site utilisation" in output
    assert "Vein-to-vein days" in output and "errors: none" in output
    assert any(k.startswith("lymphodepletion before release -> 409") for k in simulator.stats.intended)
