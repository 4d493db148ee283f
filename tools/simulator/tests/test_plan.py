"""The plan: feasible combinations, the mix of exceptions, the outage cohort; and the hospital's deliberate
COI typo (no I/O)."""

from __future__ import annotations

import random
from datetime import date, timedelta
from typing import Any, get_args

import pytest

from order_service.domain.reasons import CANCEL_REASONS, QUARANTINE_REASONS, RESCHEDULE_REASONS
from v2v_contracts.coi import coi_problem, is_valid_coi
from v2v_contracts.events import QcFinding, ReceiptRejection, StepFailure
from v2v_contracts.fields import booking_window
from v2v_simulator.config import Config
from v2v_simulator.hospitals import mistype_check_character
from v2v_simulator.plan import EXCEPTION_WEIGHTS, choose_kinds, feasible_combos, make_plan, site_weights

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


# ---- the plan --------------------------------------------------------------------------------------------


def test_every_site_is_the_first_choice_of_some_approved_combination() -> None:
    combos = feasible_combos(CENTRES, PRODUCTS, SITES)
    assert {c.primary for c in combos} == {s["site_id"] for s in SITES}
    by_key = {(c.centre, c.product, c.order_type): c for c in combos}
    assert by_key[("TC-DE-BE-001", "CILTA-CEL", "clinical")].sites == ("DE-LEIPZIG-IZI",)
    assert by_key[("TC-DE-BE-001", "AXI-CEL", "commercial")].primary == "FR-LES-ULIS"
    assert by_key[("TC-JP-TK-001", "TISA-CEL", "commercial")].sites == ("JP-KOBE", "US-MORRIS-PLAINS")
    assert ("TC-DE-BE-001", "CILTA-CEL", "commercial") not in by_key  # no site approved


def test_plan_is_reproducible_approved_and_mixes_the_exceptions() -> None:
    cfg = Config(orders=200, exceptions=0.2, seed=11)
    plan = make_plan(cfg, CENTRES, PRODUCTS, SITES, TODAY)
    again = make_plan(cfg, CENTRES, PRODUCTS, SITES, TODAY)
    assert [(o.combo, o.requested_date, o.kind) for o in plan.orders] == [
        (o.combo, o.requested_date, o.kind) for o in again.orders
    ]
    assert len(plan.orders) == 200
    assert len({o.patient_ref for o in plan.orders}) == 200
    assert all(o.patient_ref.startswith("SIM-") for o in plan.orders)
    assert {o.combo.primary for o in plan.orders} == {s["site_id"] for s in SITES}
    kinds = [o.kind for o in plan.orders if o.kind]
    assert len(kinds) == 40
    assert set(kinds) == set(EXCEPTION_WEIGHTS)  # 40 exceptions: every kind at least once
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
    plan = make_plan(Config(orders=30, exceptions=0.0, seed=1), CENTRES, PRODUCTS, SITES, TODAY)
    assert not [o for o in plan.orders if o.kind] and plan.outage_site is None


def test_a_mistyped_check_character_is_caught_by_the_coi_check() -> None:
    for coi in ("V2V0026000001" + "0", "G123498654321H"):
        typo = mistype_check_character(coi)
        assert typo != coi and typo[:13] == coi[:13]
    assert is_valid_coi("G123498654321H")
    assert coi_problem(mistype_check_character("G123498654321H"))


def test_choose_kinds_takes_every_kind_once_heaviest_first_then_by_weight() -> None:
    weights = {"a": 5, "b": 10, "c": 0, "d": 1}
    assert sorted(choose_kinds(2, random.Random(1), weights)) == ["a", "b"]  # the two heaviest
    many = choose_kinds(40, random.Random(1), weights)
    assert len(many) == 40 and {"a", "b", "d"} <= set(many) and "c" not in many  # weight 0: never
    assert choose_kinds(0, random.Random(1), weights) == []
    assert choose_kinds(3, random.Random(1), {}) == []


def test_site_weights_are_the_capacity_for_the_products_landing_there_first() -> None:
    combos = feasible_combos(CENTRES, PRODUCTS, SITES)
    weights = site_weights(combos, SITES)
    assert weights == {
        "US-MORRIS-PLAINS": 12.0,  # TISA-CEL 6 + AXI-CEL 4 + CILTA-CEL 2
        "CH-STEIN": 4.0,  # TISA-CEL (first of the European sites by id)
        "FR-LES-ULIS": 2.0,  # AXI-CEL only: its TISA-CEL lands first at CH-STEIN
        "DE-LEIPZIG-IZI": 1.0,  # CILTA-CEL (clinical)
        "JP-KOBE": 2.0,
        "CN-SHANGHAI": 3.0,  # TISA-CEL 2 + CILTA-CEL 1
        "AU-MELBOURNE": 2.0,
    }


def test_inactive_or_capacity_less_sites_are_not_feasible() -> None:
    sites = [dict(s, active=False) if s["site_id"] == "JP-KOBE" else s for s in SITES]
    sites = [dict(s, daily_capacity={"TISA-CEL": 0}) if s["site_id"] == "AU-MELBOURNE" else s for s in sites]
    combos = feasible_combos(CENTRES, PRODUCTS, sites)
    assert not any({"JP-KOBE", "AU-MELBOURNE"} & set(c.sites) for c in combos)
    by_key = {(c.centre, c.product, c.order_type): c for c in combos}
    assert by_key[("TC-JP-TK-001", "TISA-CEL", "commercial")].sites == ("US-MORRIS-PLAINS",)
    assert ("TC-JP-TK-001", "TISA-CEL", "clinical") not in by_key


def test_a_network_without_any_approval_cannot_be_planned() -> None:
    with pytest.raises(RuntimeError, match="no \\(centre, product, use\\) combination"):
        make_plan(Config(orders=5), CENTRES, PRODUCTS, [dict(s, approvals=[]) for s in SITES], TODAY)


def test_the_outage_cohort_keeps_clear_of_an_outage_the_site_already_has() -> None:
    cfg = Config(orders=200, exceptions=0.2, seed=11)
    gate = make_plan(cfg, CENTRES, PRODUCTS, SITES, TODAY).outage_gate
    assert gate is not None
    earlier = {"start_date": (gate - timedelta(days=1)).isoformat(), "end_date": gate.isoformat()}
    sites = [dict(s, outages=[earlier]) if s["site_id"] == "CH-STEIN" else s for s in SITES]
    moved = make_plan(cfg, CENTRES, PRODUCTS, sites, TODAY)
    assert moved.outage_site == "CH-STEIN" and moved.outage_gate is not None
    assert moved.outage_gate > gate


def test_exception_parameters_and_deliberate_mistakes() -> None:
    plan = make_plan(Config(orders=200, exceptions=0.5, seed=3), CENTRES, PRODUCTS, SITES, TODAY)
    for o in plan.orders:
        if o.kind == "cancellation":
            assert o.params["stage"] in {
                "before_apheresis",
                "material_in_transit",
                "manufacturing",
                "qc_pending",
                "product_in_transit",
            }
            assert not o.lymph_refusal and not o.coi_typo  # no mistakes on orders cancelled on purpose
        elif o.kind == "outbound_excursion":
            assert o.params["decision"] in {"release", "reject"}
        elif o.kind == "apheresis_moved":
            assert 3 <= o.params["days"] <= 10
        elif o.kind == "manufacturing_failure":
            assert o.params["step"] and o.params["reason"]
        assert 0.0 <= o.place_day <= max(0.0, (o.requested_date - TODAY).days - 5.0)
    assert sum(o.lymph_refusal for o in plan.orders) == 10  # one in 20
    assert sum(o.coi_typo for o in plan.orders) == 8  # one in 25


def test_reasons_are_codes_of_the_platform_vocabularies() -> None:
    plan = make_plan(Config(orders=400, exceptions=0.8, seed=4), CENTRES, PRODUCTS, SITES, TODAY)
    site_codes = {
        "material_rejected": set(get_args(ReceiptRejection)),
        "manufacturing_failure": set(get_args(StepFailure)),
        "qc_oos": set(get_args(QcFinding)),
        "persistent_oos": set(get_args(QcFinding)),
    }
    seen: dict[str, set[str]] = {}
    for o in plan.orders:
        if o.kind in site_codes:
            assert o.params["reason"] in site_codes[o.kind]
            seen.setdefault(o.kind, set()).add(o.params["reason"])
        elif o.kind == "cancellation":
            assert o.params["reason_code"] in CANCEL_REASONS
        elif o.kind == "apheresis_moved":
            assert o.params["reason_code"] in RESCHEDULE_REASONS
        elif o.kind == "outbound_excursion":
            assert o.params["reason_code"] in QUARANTINE_REASONS[o.params["decision"]]
            assert o.params["reason_code"] != "other"
    assert set(seen) == set(site_codes) and all(len(codes) > 1 for codes in seen.values())


def test_patients_are_the_run_s_own_and_the_plan_does_not_depend_on_the_run() -> None:
    one = make_plan(Config(orders=50, seed=11, run_id="A1"), CENTRES, PRODUCTS, SITES, TODAY)
    two = make_plan(Config(orders=50, seed=11, run_id="B2"), CENTRES, PRODUCTS, SITES, TODAY)
    assert [(o.combo, o.requested_date, o.kind, o.params) for o in one.orders] == [
        (o.combo, o.requested_date, o.kind, o.params) for o in two.orders
    ]
    assert one.orders[0].patient_ref == "SIM-A1-011-00001"
    assert not {o.patient_ref for o in one.orders} & {o.patient_ref for o in two.orders}
    assert Config().run_id != Config().run_id  # a fresh run id by default


@pytest.mark.parametrize("orders", [20, 200, 5000])
def test_requested_dates_lie_in_the_booking_window(orders: int) -> None:
    plan = make_plan(Config(orders=orders, exceptions=0.5, seed=2), CENTRES, PRODUCTS, SITES, TODAY)
    first, last = booking_window(TODAY)
    assert all(first <= o.requested_date <= last for o in plan.orders)
    # a moved date still fits, and the outage cohort still comes after everyone else
    moved = [o.requested_date + timedelta(days=o.params["days"]) for o in plan.orders if "days" in o.params]
    assert all(d <= last for d in moved)
    assert plan.outage_gate is not None
    others = [o.requested_date for o in plan.orders if o.kind != "site_outage"]
    assert max(others) < plan.outage_gate <= last


def test_kinds_left_out_are_never_planned() -> None:
    cfg = Config(orders=200, exceptions=0.5, seed=3, without=("persistent_oos", "site_outage"))
    plan = make_plan(cfg, CENTRES, PRODUCTS, SITES, TODAY)
    kinds = {o.kind for o in plan.orders}
    assert "persistent_oos" not in kinds and "site_outage" not in kinds
    assert {"qc_oos", "cancellation"} <= kinds  # the others still are
