"""Pure rules of a shipment (logistics_service.domain) and the shipping lanes of the seed."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
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


T0 = datetime(2030, 5, 6, 9, 0, tzinfo=UTC)


def samples(*points: tuple[int, bool]) -> list[d.Sample]:
    """Readings at T0 + minutes, inside (True) or outside (False) the limit."""
    return [d.Sample(T0 + timedelta(minutes=m), 0.0 if ok else 99.0, ok) for m, ok in points]


def test_time_outside_counts_from_an_out_of_range_reading_to_the_next_and_adds_up() -> None:
    assert d.minutes_outside([]) == 0.0
    assert d.minutes_outside(samples((0, False))) == 0.0  # how long it lasted is not known yet
    assert d.minutes_outside(samples((0, False)), until=T0 + timedelta(minutes=7)) == 7.0
    assert d.minutes_outside(samples((0, True), (5, False), (9, True))) == 4.0
    # cumulative: two spells add up; consecutive readings outside make one longer spell
    assert d.minutes_outside(samples((0, False), (3, True), (10, False), (12, False), (20, True))) == 13.0
    # measurement order, not arrival order (a logger download fills in the gaps)
    assert d.minutes_outside(samples((20, True), (0, False), (12, False), (3, True), (10, False))) == 13.0


@given(st.lists(st.tuples(st.integers(0, 10_000), st.booleans()), max_size=40))
def test_time_outside_is_never_negative_nor_longer_than_the_readings_span(
    points: list[tuple[int, bool]],
) -> None:
    total = d.minutes_outside(samples(*points))
    span = (max(m for m, _ in points) - min(m for m, _ in points)) if points else 0
    assert 0.0 <= total <= span
    if all(ok for _, ok in points):
        assert total == 0.0


def test_only_a_time_outside_beyond_the_tolerance_breaches_the_rule() -> None:
    assert not d.excursion_breached(10.0, 10.0)  # exactly the tolerance: within it
    assert d.excursion_breached(10.01, 10.0)
    assert d.excursion_breached(0.5, 0.0)
    assert not d.excursion_breached(0.0, 0.0)


def test_a_breach_compromises_a_live_shipment_and_publishes_once() -> None:
    short = d.after_reading(
        d.IN_TRANSIT, in_range=False, minutes=9.0, tolerance_min=10.0, excursion_reported=False
    )
    assert short == d.ReadingOutcome(False, d.IN_TRANSIT, False, 9.0)  # recorded, holds nothing
    first = d.after_reading(
        d.IN_TRANSIT, in_range=True, minutes=12.0, tolerance_min=10.0, excursion_reported=False
    )
    assert first == d.ReadingOutcome(True, d.COMPROMISED, True, 12.0)  # an in-range reading may close it
    again = d.after_reading(
        d.COMPROMISED, in_range=False, minutes=40.0, tolerance_min=10.0, excursion_reported=True
    )
    assert again == d.ReadingOutcome(False, d.COMPROMISED, False, 40.0)
    delivered = d.after_reading(
        d.DELIVERED, in_range=False, minutes=11.0, tolerance_min=10.0, excursion_reported=False
    )
    assert delivered.new_status == d.COMPROMISED and delivered.publish_excursion  # a logger download


def test_an_excursion_on_a_stopped_shipment_is_reported_but_it_stays_stopped() -> None:
    out = d.after_reading(
        d.STOPPED, in_range=False, minutes=31.0, tolerance_min=30.0, excursion_reported=False
    )
    assert out == d.ReadingOutcome(
        in_range=False, new_status=d.STOPPED, publish_excursion=True, minutes_outside=31.0
    )


@given(statuses, st.booleans(), st.floats(0, 1000), st.floats(0, 120), st.booleans())
def test_a_reading_never_makes_an_illegal_move_and_publishes_only_a_first_breach(
    status: str, ok: bool, minutes: float, tolerance: float, reported: bool
) -> None:
    out = d.after_reading(
        status, in_range=ok, minutes=minutes, tolerance_min=tolerance, excursion_reported=reported
    )
    assert out.in_range == ok and out.minutes_outside == minutes
    assert d.can_transition(status, out.new_status)
    if out.publish_excursion:
        assert minutes > tolerance and not reported
    if reported or minutes <= tolerance:
        assert out.new_status == status and not out.publish_excursion


# ---- the reading window ----------------------------------------------------------------------------

PICKUP = T0
DELIVERY = T0 + timedelta(hours=10)


@pytest.mark.parametrize("status", sorted(d.PRE_PICKUP))
def test_a_live_reading_before_pickup_is_refused_naming_measured_at(status: str) -> None:
    refusal = d.reading_window_refusal(
        status, source="courier", measured_at=T0, picked_up_at=None, delivered_at=None
    )
    assert refusal is not None and status_of(refusal) == 409
    assert [e.field for e in refusal.errors] == ["measured_at"] and "not picked up yet" in refusal.errors[
        0
    ].reason


@pytest.mark.parametrize(
    ("source", "minutes", "delivered", "expected"),
    [
        ("courier", 5, False, None),  # in transit
        ("courier", -5, False, (422, "measured_at")),  # measured before the pickup
        ("courier", 5, True, (409, "shipment_id")),  # delivered: no live readings
        ("logger_download", 5, False, (409, "source")),  # a download only after delivery
        ("logger_download", 5, True, None),
        ("logger_download", -5, True, (422, "measured_at")),
        ("logger_download", 601, True, (422, "measured_at")),  # after the delivery
        ("logger_download", 600, True, None),  # at the delivery
    ],
)
def test_the_reading_window(
    source: d.ReadingSource, minutes: int, delivered: bool, expected: tuple[int, str] | None
) -> None:
    refusal = d.reading_window_refusal(
        d.DELIVERED if delivered else d.IN_TRANSIT,
        source=source,
        measured_at=T0 + timedelta(minutes=minutes),
        picked_up_at=PICKUP,
        delivered_at=DELIVERY if delivered else None,
    )
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None and (status_of(refusal), refusal.errors[0].field) == expected


@pytest.mark.parametrize("source", ["courier", "logger_download"])
def test_no_reading_on_a_cancelled_shipment(source: d.ReadingSource) -> None:
    refusal = d.reading_window_refusal(
        d.CANCELLED, source=source, measured_at=T0, picked_up_at=PICKUP, delivered_at=DELIVERY
    )
    assert refusal is not None and status_of(refusal) == 409


# ---- identity pairs --------------------------------------------------------------------------------


def test_the_second_id_of_a_handoffs_pair() -> None:
    assert d.pair_field("inbound_apheresis") == "din" and d.pair_field("outbound_product") == "lot"
    assert d.check_pair("X", "X") == "verified"
    assert d.check_pair("X", "Y") == "mismatch"
    assert d.check_pair("X", None) == "missing"
    assert d.check_pair(None, "Y") == "unverified"  # never guessed
    assert d.check_pair(None, None) == "unverified"


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
    recorded: list[d.Sample] = []
    for kind, arg in steps:
        new = status
        if kind == "milestone":
            assert isinstance(arg, str)
            if d.milestone_refusal(status, arg) is None:
                new = d.status_after_milestone(status, arg)
        elif kind == "reading":
            assert isinstance(arg, float)
            if d.reading_refusal(status) is None:
                recorded.append(
                    d.Sample(T0 + timedelta(minutes=7 * len(recorded)), arg, d.in_range(arg, lo, hi))
                )
                out = d.after_reading(
                    status,
                    in_range=recorded[-1].in_range,
                    minutes=d.minutes_outside(recorded),
                    tolerance_min=10.0,
                    excursion_reported=reported,
                )
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
