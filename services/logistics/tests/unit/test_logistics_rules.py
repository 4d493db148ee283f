"""Pure rules of a shipment (logistics_service.domain) and the shipping lanes of the seed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import logistics_service
from logistics_service.config import SEED_FILE, load_shipping_lanes
from logistics_service.domain import shipment as d
from v2v_contracts import ShipmentPlannedV1
from v2v_contracts.errors import Conflict, Invalid
from v2v_contracts.reference import product_catalogue
from v2v_servicekit.problems import status_of

CONFIG = yaml.safe_load(SEED_FILE.read_text())
LANES = load_shipping_lanes()


def inbound_condition(product_code: str) -> tuple[str, float, float]:
    lane = LANES.inbound(product_code)
    return lane.condition, lane.min_c, lane.max_c


def outbound_condition() -> tuple[str, float, float]:
    return LANES.outbound.condition, LANES.outbound.min_c, LANES.outbound.max_c


MIGRATIONS = Path(logistics_service.__file__).parent / "migrations"
statuses = st.sampled_from(sorted(d.STATUSES))
milestones = st.sampled_from(d.MILESTONES)
temps = st.floats(min_value=-273.15, max_value=100.0, allow_nan=False)


# ---- temperature -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reading", "expected"),
    [(-196.0, True), (-150.0, True), (-170.2, True), (-149.99, False), (-196.01, False), (4.0, False)],
)
def test_cryopreserved_range_includes_both_bounds(reading: float, expected: bool) -> None:
    assert d.in_range(reading, -196.0, -150.0) is expected


@given(temps, temps, temps)
def test_in_range_is_exactly_between_the_bounds(reading: float, a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    assert d.in_range(reading, lo, hi) == (lo <= reading <= hi)


def test_an_empty_range_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        d.in_range(0.0, 8.0, 2.0)


def test_outbound_lane_is_vapour_phase_ln2_from_the_seed() -> None:
    condition, lo, hi = outbound_condition()
    assert condition == "cryopreserved"
    assert hi <= -150.0 < 0 and lo < hi
    assert (lo, hi) == (CONFIG["outbound_product"]["min_c"], CONFIG["outbound_product"]["max_c"])


def test_every_seeded_condition_is_a_contract_material_condition() -> None:
    allowed = set(get_args(ShipmentPlannedV1.model_fields["material_condition"].annotation))
    assert set(CONFIG["conditions"]) <= allowed
    assert outbound_condition()[0] in allowed
    for product in [*product_catalogue(), "UNKNOWN-PRODUCT"]:
        condition, lo, hi = inbound_condition(product)
        assert condition in allowed and lo < hi


def test_the_inbound_condition_is_the_catalogues_apheresis_material() -> None:
    for code, product in product_catalogue().items():
        condition, lo, hi = inbound_condition(code)
        assert condition == product.apheresis_material
        assert (lo, hi) == (
            CONFIG["conditions"][condition]["min_c"],
            CONFIG["conditions"][condition]["max_c"],
        )
    assert inbound_condition("TISA-CEL")[0] == "cryopreserved"  # Kymriah freezes it at the centre
    assert inbound_condition("UNKNOWN-PRODUCT")[0] == "fresh"
    assert "apheresis_material" not in CONFIG  # a product fact: the catalogue's, not a copy here


@pytest.mark.parametrize("status", sorted(d.READINGS_REFUSED))
def test_readings_are_refused_on_a_cancelled_or_delivered_shipment(status: str) -> None:
    refusal = d.reading_refusal(status)
    assert refusal is not None and status_of(refusal) == 409
    assert isinstance(refusal, Conflict) and refusal.kind == "shipment-state"
    assert refusal.title == "Shipment cannot take this input"


@pytest.mark.parametrize("status", sorted(d.STATUSES - d.READINGS_REFUSED))
def test_readings_are_taken_on_every_other_shipment(status: str) -> None:
    assert d.reading_refusal(status) is None


def test_first_out_of_range_reading_compromises_a_live_shipment_and_publishes_once() -> None:
    first = d.after_reading(d.IN_TRANSIT, -120.0, -196.0, -150.0, excursion_reported=False)
    assert first == d.ReadingOutcome(in_range=False, new_status=d.COMPROMISED, publish_excursion=True)
    again = d.after_reading(first.new_status, -110.0, -196.0, -150.0, excursion_reported=True)
    assert again == d.ReadingOutcome(in_range=False, new_status=d.COMPROMISED, publish_excursion=False)
    ok = d.after_reading(d.IN_TRANSIT, -180.0, -196.0, -150.0, excursion_reported=False)
    assert ok == d.ReadingOutcome(in_range=True, new_status=d.IN_TRANSIT, publish_excursion=False)


def test_an_excursion_on_a_stopped_shipment_is_reported_but_it_stays_stopped() -> None:
    out = d.after_reading(d.STOPPED, 12.0, 2.0, 8.0, excursion_reported=False)
    assert out == d.ReadingOutcome(in_range=False, new_status=d.STOPPED, publish_excursion=True)


@given(statuses, temps, st.booleans())
def test_a_reading_never_makes_an_illegal_move_and_publishes_only_a_first_excursion(
    status: str, reading: float, reported: bool
) -> None:
    out = d.after_reading(status, reading, 2.0, 8.0, excursion_reported=reported)
    assert out.in_range == (2.0 <= reading <= 8.0)
    assert d.can_transition(status, out.new_status)
    if out.publish_excursion:
        assert not out.in_range and not reported
    if out.in_range or reported:
        assert out.new_status == status


# ---- statuses and transitions ----------------------------------------------------------------------


def test_transitions_cover_every_status_and_only_name_statuses() -> None:
    assert set(d.TRANSITIONS) == set(d.STATUSES)
    for targets in d.TRANSITIONS.values():
        assert targets <= d.STATUSES


def test_cancelled_is_final_and_stopped_only_cancels() -> None:
    assert d.TRANSITIONS[d.CANCELLED] == frozenset()
    assert d.TRANSITIONS[d.STOPPED] == {d.CANCELLED}
    for status in d.STATUSES - {d.CANCELLED}:
        assert not d.can_transition(d.CANCELLED, status)


def test_progress_only_moves_forward() -> None:
    rank = {s: i for i, s in enumerate(d.PROGRESS)}
    for source in d.PROGRESS:
        for target in d.TRANSITIONS[source] & set(d.PROGRESS):
            assert rank[target] > rank[source], f"{source} -> {target} goes back"


def test_every_status_is_reachable_from_planned() -> None:
    reached = {d.PLANNED}
    frontier = [d.PLANNED]
    while frontier:
        for nxt in d.TRANSITIONS[frontier.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert reached == set(d.STATUSES)


@pytest.mark.parametrize("status", [d.COMPROMISED, d.STOPPED, d.CANCELLED])
@pytest.mark.parametrize("milestone", d.MILESTONES)
def test_a_halted_or_cancelled_shipment_refuses_every_milestone_with_409(status: str, milestone: str) -> None:
    refusal = d.milestone_refusal(status, milestone)
    assert refusal is not None and status_of(refusal) == 409 and status in refusal.errors[0].reason
    assert isinstance(refusal, Conflict) and refusal.kind == "shipment-state"


def test_a_milestone_never_goes_back_and_may_repeat_or_skip() -> None:
    refusal = d.milestone_refusal(d.IN_TRANSIT, d.PICKED_UP)
    assert refusal is not None and status_of(refusal) == 422 and refusal.errors[0].field == "milestone"
    assert isinstance(refusal, Invalid)
    assert d.status_after_milestone(d.IN_TRANSIT, d.IN_TRANSIT) == d.IN_TRANSIT
    assert d.status_after_milestone(d.PLANNED, d.PICKED_UP) == d.PICKED_UP
    assert d.status_after_milestone(d.READY_FOR_PICKUP, d.BOOKED) == d.BOOKED
    assert d.status_after_milestone(d.IN_TRANSIT, d.DELIVERED) == d.DELIVERED
    with pytest.raises(ValueError):
        d.status_after_milestone(d.STOPPED, d.DELIVERED)


@given(statuses, milestones)
def test_an_accepted_milestone_is_always_an_allowed_transition(status: str, milestone: str) -> None:
    if d.milestone_refusal(status, milestone) is None:
        assert d.can_transition(status, d.status_after_milestone(status, milestone))


def test_coi_mismatch_stops_a_live_shipment_and_leaves_the_others() -> None:
    for status in d.LIVE:
        assert d.status_after_coi_mismatch(status) == d.STOPPED
    for status in d.STATUSES - d.LIVE:
        assert d.status_after_coi_mismatch(status) == status


def test_compensation_rules() -> None:
    assert {s for s in d.STATUSES if d.cancellable_on_order_end(s)} == d.STATUSES - {d.DELIVERED, d.CANCELLED}
    inbound = {s for s in d.STATUSES if d.cancellable_on_booking_cancelled("inbound_apheresis", s)}
    assert inbound == {d.PLANNED, d.READY_FOR_PICKUP, d.BOOKED}
    assert not any(d.cancellable_on_booking_cancelled("outbound_product", s) for s in d.STATUSES)
    for status in d.STATUSES:
        if d.cancellable_on_order_end(status):
            assert d.can_transition(status, d.CANCELLED)


def test_apheresis_makes_only_a_planned_shipment_ready() -> None:
    assert d.status_after_apheresis(d.PLANNED) == d.READY_FOR_PICKUP
    for status in d.STATUSES - {d.PLANNED}:
        assert d.status_after_apheresis(status) == status


@pytest.mark.parametrize(
    ("held_from", "expected"),
    [(d.IN_TRANSIT, d.IN_TRANSIT), (d.DELIVERED, d.DELIVERED), (None, d.PLANNED), (d.STOPPED, d.PLANNED)],
)
def test_quarantine_release_resumes_where_the_shipment_was_halted(
    held_from: str | None, expected: str
) -> None:
    assert d.status_after_quarantine_release(d.COMPROMISED, held_from) == expected
    assert d.can_transition(d.COMPROMISED, expected)
    assert d.status_after_quarantine_release(d.CANCELLED, held_from) == d.CANCELLED


def test_lane_rule_matches_the_partial_unique_index_of_the_migration() -> None:
    sql = (MIGRATIONS / "0003.logistics-lifecycle.sql").read_text()
    match = re.search(r"shipments_one_live_leg_per_order .*?WHERE status NOT IN \(([^)]*)\)", sql, re.S)
    assert match is not None
    freed = {s.strip().strip("'") for s in match.group(1).split(",")}
    assert freed == d.LANE_FREED
    assert {s for s in d.STATUSES if not d.holds_lane(s)} == d.LANE_FREED


def test_treatment_centre_is_the_centre_end_of_the_leg() -> None:
    assert d.treatment_center_of("inbound_apheresis", "TC-1", "SITE-1") == "TC-1"
    assert d.treatment_center_of("outbound_product", "SITE-1", "TC-1") == "TC-1"


# ---- a shipment's life under any sequence of inputs ------------------------------------------------

inputs = st.one_of(
    st.tuples(st.just("milestone"), milestones),
    st.tuples(st.just("reading"), temps),
    st.tuples(st.just("mismatch"), st.none()),
    st.tuples(st.just("order_end"), st.none()),
    st.tuples(st.just("booking_cancelled"), st.none()),
    st.tuples(st.just("apheresis"), st.none()),
    st.tuples(st.just("release"), st.none()),
)


@given(st.lists(inputs, max_size=30))
def test_any_sequence_of_inputs_moves_legally_with_at_most_one_excursion(
    steps: list[tuple[str, object]],
) -> None:
    status, held, reported, excursions = d.PLANNED, None, False, 0
    lo, hi = -196.0, -150.0
    for kind, arg in steps:
        new = status
        if kind == "milestone":
            assert isinstance(arg, str)
            if d.milestone_refusal(status, arg) is None:
                new = d.status_after_milestone(status, arg)
        elif kind == "reading":
            assert isinstance(arg, float)
            if d.reading_refusal(status) is None:
                out = d.after_reading(status, arg, lo, hi, excursion_reported=reported)
                if out.publish_excursion:
                    excursions += 1
                    reported = True
                    held = status if out.new_status != status else held
                new = out.new_status
        elif kind == "mismatch":
            new = d.status_after_coi_mismatch(status)
        elif kind == "order_end":
            new = d.CANCELLED if d.cancellable_on_order_end(status) else status
        elif kind == "booking_cancelled":
            new = d.CANCELLED if d.cancellable_on_booking_cancelled("inbound_apheresis", status) else status
        elif kind == "apheresis":
            new = d.status_after_apheresis(status)
        elif kind == "release":
            new = d.status_after_quarantine_release(status, held)
        assert d.can_transition(status, new), f"{kind}: {status} -> {new}"
        if status == d.CANCELLED:
            assert new == d.CANCELLED
        status = new
    assert excursions <= 1
