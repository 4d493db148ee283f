"""The order's lifecycle machine: no sequence of facts and actions — with duplicates and out-of-order
deliveries — takes an order through a transition that ALLOWED forbids; terminal states never move; the
commands it asks of the other services carry reason codes only, whatever words a fact brought."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from order_service.domain import order as m
from order_service.domain import reasons
from order_service.domain.order import ALLOWED, TERMINAL, OrderState, OrderStatus, Rules
from v2v_contracts.errors import DomainError, Invalid, NotAllowedNow
from v2v_servicekit.problems import status_of

S = OrderStatus
TODAY = date(2026, 11, 26)
SLOT_A, SLOT_B = str(uuid.uuid4()), str(uuid.uuid4())


def fact(event_type: str, **data: Any) -> tuple[str, str, dict[str, Any]]:
    return ("fact", event_type, data)


FACTS = [
    fact("scheduling.slot_unavailable.v1", reason="no_capacity", detail="full"),
    fact("scheduling.slot_reserved.v1", slot_id=SLOT_A, site_id="FR-LES-ULIS", apheresis_date="2026-12-10"),
    fact("scheduling.slot_reserved.v1", slot_id=SLOT_B, site_id="CH-STEIN", apheresis_date="2026-12-12"),
    fact("scheduling.slot_released.v1", slot_id=SLOT_A, reason="rebook"),
    fact("site.booking_confirmed.v1", slot_id=SLOT_A),
    fact("site.booking_confirmed.v1", slot_id=SLOT_B),
    fact("site.booking_affected.v1", site_id="FR-LES-ULIS", reason="outage:maintenance"),
    fact("logistics.shipment_planned.v1", leg="inbound_apheresis"),
    fact("logistics.shipment_planned.v1", leg="outbound_product"),
    fact("logistics.shipment_milestone.v1", leg="inbound_apheresis", milestone="picked_up"),
    fact("logistics.shipment_milestone.v1", leg="outbound_product", milestone="in_transit"),
    fact("logistics.shipment_milestone.v1", leg="outbound_product", milestone="delivered"),
    fact("logistics.shipment_excursion.v1", leg="inbound_apheresis", reading_c=12.0),
    fact("logistics.shipment_excursion.v1", leg="outbound_product", reading_c=-90.0),
    fact("site.material_received.v1"),
    fact("site.material_rejected.v1", reason="label damaged"),
    fact("site.manufacturing_step_completed.v1", step="activation", run=1),
    fact("site.manufacturing_step_completed.v1", step="cryopreservation", run=1),
    fact("site.manufacturing_step_completed.v1", step="activation", run=2),
    fact("site.manufacturing_step_completed.v1", step="cryopreservation", run=2),
    fact("site.product_released.v1", run=1),
    fact("site.product_released.v1", run=2),
    fact("site.product_out_of_specification.v1", run=1, reason="low viability", retained_material=True),
    fact("site.manufacturing_failed.v1", run=2, reason="contamination", retained_material=False),
    fact("logistics.coi_mismatch_detected.v1", where="HND"),
    fact("order.submitted.v1"),
    fact("something.unknown.v9"),
    fact("scheduling.slot_released.v1", slot_id=SLOT_A, site_id="FR-LES-ULIS", reason="approval_withdrawn"),
]
ACTIONS = [
    ("action", "cancel", {}),
    ("action", "reschedule", {}),
    ("action", "apheresis", {}),
    ("action", "lymphodepletion", {}),
    ("action", "receipt", {}),
    ("action", "infusion", {}),
    ("action", "quarantine_release", {}),
    ("action", "quarantine_reject", {}),
]
steps = st.lists(st.sampled_from(FACTS + ACTIONS), max_size=40)
rules = st.builds(
    Rules, max_runs=st.integers(1, 3), max_recollections=st.integers(0, 2), retains_material=st.booleans()
)


def step(state: OrderState, item: tuple[str, str, dict[str, Any]], r: Rules) -> m.Outcome:
    kind, name, data = item
    if kind == "fact":
        return m.on_fact(state, name, data, r, TODAY)
    match name:
        case "cancel":
            return m.cancel(state, "physician_decision")
        case "reschedule":
            return m.reschedule_apheresis(state, TODAY + timedelta(days=3), "patient_unwell", TODAY)
        case "apheresis":
            return m.confirm_apheresis(state)
        case "lymphodepletion":
            return m.start_lymphodepletion(state)
        case "receipt":
            return m.confirm_product_receipt(state)
        case "infusion":
            return m.confirm_infusion(state)
        case "quarantine_release":
            return m.decide_quarantine(state, "release", "within_stability_data", r, TODAY)
        case _:
            return m.decide_quarantine(state, "reject", "outside_stability_data", r, TODAY)


@settings(max_examples=400)
@given(items=steps, r=rules)
def test_no_sequence_takes_an_order_through_a_forbidden_transition(items: list[Any], r: Rules) -> None:
    state = OrderState(S.SUBMITTED)
    for item in items:
        before = state.status
        try:
            outcome = step(state, item, r)
        except DomainError as refused:
            assert isinstance(refused, Invalid | NotAllowedNow)
            assert status_of(refused) in {409, 422} and refused.errors[0].field and refused.errors[0].reason
            continue
        after = outcome.state.status
        if before in TERMINAL:
            assert after == before and not outcome.changed, "a terminal order never moves"
        elif outcome.changed and after != before:
            assert after in ALLOWED[before], f"{before} -> {after} via {item[1]}"
        if not outcome.changed:
            assert outcome.state == state and not outcome.commands
        assert outcome.reason
        assert all(reasons.is_code(c.reason) for c in outcome.commands), outcome.commands
        assert outcome.state.run <= max(r.max_runs, 1)
        assert outcome.state.recollections <= r.max_recollections
        state = outcome.state


@given(items=st.lists(st.sampled_from(FACTS), max_size=30), r=rules)
def test_a_fact_delivered_twice_in_a_row_changes_nothing_the_second_time(items: list[Any], r: Rules) -> None:
    state = OrderState(S.SUBMITTED)
    for item in items:
        first = step(state, item, r)
        second = step(first.state, item, r)
        if item[1] in {"site.manufacturing_step_completed.v1"} and item[2]["step"] == "activation":
            # a step report moves to `manufacturing`; its duplicate keeps it there
            assert second.state.status == first.state.status
        else:
            assert not second.changed or second.state.status == first.state.status, item
        state = first.state


def test_happy_path_reaches_completed() -> None:
    r = Rules()
    state = OrderState(S.SUBMITTED)
    path = [
        FACTS[1],
        FACTS[4],
        FACTS[7],
        ("action", "apheresis", {}),
        FACTS[9],
        FACTS[14],
        FACTS[16],
        FACTS[17],
        FACTS[20],
        ("action", "lymphodepletion", {}),
        FACTS[10],
        FACTS[11],
        ("action", "receipt", {}),
        ("action", "infusion", {}),
    ]
    seen = []
    for item in path:
        state = step(state, item, r).state
        seen.append(state.status)
    assert seen == [
        S.SLOT_RESERVED,
        S.BOOKING_CONFIRMED,
        S.INBOUND_SHIPMENT_PLANNED,
        S.APHERESIS_COMPLETED,
        S.MATERIAL_IN_TRANSIT,
        S.MATERIAL_RECEIVED,
        S.MANUFACTURING,
        S.QC_PENDING,
        S.RELEASED,
        S.RELEASED,
        S.PRODUCT_IN_TRANSIT,
        S.PRODUCT_DELIVERED,
        S.PRODUCT_RECEIVED,
        S.COMPLETED,
    ]
    assert state.lymphodepletion


def test_lymphodepletion_is_refused_before_release() -> None:
    for status in [S.SUBMITTED, S.MATERIAL_RECEIVED, S.MANUFACTURING, S.QC_PENDING]:
        with pytest.raises(NotAllowedNow) as info:
            m.start_lymphodepletion(OrderState(status))
        assert status_of(info.value) == 409 and "released" in info.value.errors[0].reason


def test_oos_remanufactures_from_retained_material_then_recollects_then_fails() -> None:
    r = Rules(max_runs=2, max_recollections=1, retains_material=True)
    state = OrderState(S.QC_PENDING, site_id="CH-STEIN")
    out = m.on_fact(
        state,
        "site.product_out_of_specification.v1",
        {"run": 1, "reason": "low CAR+", "retained_material": True},
        r,
        TODAY,
    )
    assert out.state.status == S.MATERIAL_RECEIVED and out.state.run == 2
    assert out.commands == (m.Remanufacture(2, "CH-STEIN", "out_of_specification"),)
    assert out.reason == "remanufacture (run 2): out of specification: low CAR+"
    out = m.on_fact(
        out.state,
        "site.manufacturing_failed.v1",
        {"run": 2, "reason": "sterility", "retained_material": True},
        r,
        TODAY,
    )
    assert out.state.status == S.RESCHEDULING and out.state.recollections == 1
    assert isinstance(out.commands[0], m.Rebook) and out.commands[0].kind == "recollection"
    assert out.commands[0].apheresis_date == TODAY + timedelta(days=r.recollection_lead_days)
    state = OrderState(S.MANUFACTURING, recollections=1, site_id="CH-STEIN", run=2)
    out = m.on_fact(state, "site.manufacturing_failed.v1", {"run": 2, "reason": "x"}, r, TODAY)
    assert out.state.status == S.FAILED and isinstance(out.commands[0], m.Fail)


def test_a_stale_fact_from_an_old_run_or_slot_is_recorded_and_ignored() -> None:
    state = OrderState(S.QC_PENDING, run=2, site_id="X")
    out = m.on_fact(state, "site.product_released.v1", {"run": 1}, Rules(), TODAY)
    assert not out.changed and "recorded only" in out.reason
    state = OrderState(S.SLOT_RESERVED, slot_id=SLOT_B)
    out = m.on_fact(state, "site.booking_confirmed.v1", {"slot_id": SLOT_A}, Rules(), TODAY)
    assert not out.changed


def test_outbound_excursion_quarantines_and_release_returns_to_where_it_was() -> None:
    state = OrderState(S.PRODUCT_IN_TRANSIT, site_id="X")
    out = m.on_fact(
        state,
        "logistics.shipment_excursion.v1",
        {"leg": "outbound_product", "reading_c": -100},
        Rules(),
        TODAY,
    )
    assert out.state.status == S.QUARANTINED
    back = m.decide_quarantine(out.state, "release", "within_stability_data", Rules(), TODAY)
    assert back.state.status == S.PRODUCT_IN_TRANSIT


def test_predicted_dates_follow_the_facts() -> None:
    d = m.Durations(manufacturing_days=17, qc_days=14, outbound_transit_days=2)
    planned = m.predict(
        d, m.Actuals(apheresis_date=date(2026, 12, 1), manufacturing_start_date=date(2026, 12, 3))
    )
    assert planned["release"] == date(2027, 1, 3) and planned["delivery"] == date(2027, 1, 5)
    assert planned["earliest_infusion"] == date(2027, 1, 5)
    actual = m.predict(
        d,
        m.Actuals(
            apheresis_date=date(2026, 12, 1),
            manufacturing_start_date=date(2026, 12, 3),
            released=datetime(2026, 12, 30, tzinfo=UTC).date(),
        ),
    )
    assert actual["release"] == date(2026, 12, 30) and actual["delivery"] == date(2027, 1, 1)


def test_while_a_rebook_is_pending_only_its_own_slot_moves_the_order() -> None:
    waiting = OrderState(S.WAITLISTED)
    moved = m.reschedule_apheresis(waiting, TODAY + timedelta(days=5), "patient_unwell", TODAY)
    assert moved.state.status == S.RESCHEDULING and moved.state.rebook_pending
    # the old request was served from the waitlist meanwhile: recorded, ignored, not parked for later
    stale = m.on_fact(
        moved.state,
        "scheduling.slot_reserved.v1",
        {"slot_id": SLOT_A, "site_id": "X", "apheresis_date": "2026-12-01", "reason": "waitlist"},
        Rules(),
        TODAY,
    )
    assert not stale.changed and not stale.reason.startswith(m.NOT_YET)
    fresh = m.on_fact(
        moved.state,
        "scheduling.slot_reserved.v1",
        {"slot_id": SLOT_B, "site_id": "Y", "apheresis_date": "2026-12-01", "reason": "rebook:reschedule"},
        Rules(),
        TODAY,
    )
    assert fresh.state.status == S.SLOT_RESERVED and not fresh.state.rebook_pending


def test_a_slot_scheduling_moves_off_a_site_that_may_no_longer_make_it_is_followed() -> None:
    booked = OrderState(S.BOOKING_CONFIRMED, slot_id=SLOT_A, site_id="FR-LES-ULIS")
    released = {"slot_id": SLOT_A, "site_id": "FR-LES-ULIS", "reason": "approval_withdrawn"}
    moved = m.on_fact(booked, "scheduling.slot_released.v1", released, Rules(), TODAY)
    assert moved.state.status == S.RESCHEDULING and moved.state.rebook_pending and not moved.commands
    assert "approval_withdrawn" in moved.reason
    # scheduling found no other approved site: the order waits, told why
    waits = m.on_fact(
        moved.state,
        "scheduling.slot_unavailable.v1",
        {"reason": "no_approved_site", "detail": "no active site approved for AXI-CEL (commercial) by EMA"},
        Rules(),
        TODAY,
    )
    assert waits.state.status == S.WAITLISTED and "no active site approved" in waits.reason
    # a release of a slot the order already left, or an ordinary release, only records
    for data in ({**released, "slot_id": SLOT_B}, {**released, "reason": "rebook"}):
        kept = m.on_fact(booked, "scheduling.slot_released.v1", data, Rules(), TODAY)
        assert not kept.changed and not kept.reason.startswith(m.NOT_YET)


# ---- reason codes -------------------------------------------------------------------------------------


def test_the_commands_carry_the_cause_as_a_code_and_the_timeline_keeps_the_words() -> None:
    r = Rules(max_runs=1, max_recollections=1)
    excursion = m.on_fact(
        OrderState(S.MATERIAL_IN_TRANSIT, site_id="X"),
        "logistics.shipment_excursion.v1",
        {"leg": "inbound_apheresis", "reading_c": 12.5},
        r,
        TODAY,
    )
    assert excursion.commands == (
        m.Rebook("recollection", "inbound_excursion", TODAY + timedelta(days=r.recollection_lead_days)),
    )
    assert excursion.reason == "recollection: temperature excursion 12.5 °C on inbound_apheresis"
    rejected = m.on_fact(
        OrderState(S.MATERIAL_IN_TRANSIT, recollections=1),
        "site.material_rejected.v1",
        {"reason": "label damaged, see note"},
        r,
        TODAY,
    )
    assert rejected.state.status == S.FAILED
    assert rejected.commands == (m.Fail("material_rejected:no_recollection_left"),)
    assert "label damaged, see note" in rejected.reason
    lost = m.decide_quarantine(
        OrderState(S.QUARANTINED, site_id="X", status_before_quarantine=S.PRODUCT_IN_TRANSIT),
        "reject",
        "integrity_compromised",
        Rules(max_runs=2, retains_material=True),
        TODAY,
    )
    assert lost.commands == (m.Remanufacture(2, "X", "quarantine_rejected"),)
    assert lost.reason == "remanufacture (run 2): quarantined product rejected: integrity_compromised"


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("outage:maintenance", "outage:maintenance"),
        ("site flooded, call Bob", "site_outage"),
        (None, "site_outage"),
    ],
)
def test_a_site_outage_rebook_passes_on_the_sites_code_and_never_its_words(reason: Any, code: str) -> None:
    out = m.on_fact(
        OrderState(S.BOOKING_CONFIRMED, site_id="FR-LES-ULIS", apheresis_date=TODAY + timedelta(days=9)),
        "site.booking_affected.v1",
        {"site_id": "FR-LES-ULIS", "reason": reason},
        Rules(),
        TODAY,
    )
    [rebook] = out.commands
    assert isinstance(rebook, m.Rebook) and rebook.kind == "site_outage" and rebook.reason == code


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: m.cancel(s, "patient withdrew"), "reason_code"),
        (lambda s: m.cancel(s, "within_stability_data"), "reason_code"),
        (
            lambda s: m.reschedule_apheresis(s, TODAY + timedelta(days=3), "patient_deceased", TODAY),
            "reason_code",
        ),
        (
            lambda s: m.decide_quarantine(s, "release", "outside_stability_data", Rules(), TODAY),
            "reason_code",
        ),
        (lambda s: m.decide_quarantine(s, "reject", "within_stability_data", Rules(), TODAY), "reason_code"),
        (lambda s: m.decide_quarantine(s, "hold", "other", Rules(), TODAY), "decision"),
    ],
    ids=[
        "cancel-words",
        "cancel-foreign-code",
        "reschedule-cancel-code",
        "release-for-a-reject-reason",
        "reject-for-a-release-reason",
        "unknown-decision",
    ],
)
def test_an_action_takes_only_a_reason_code_of_its_own_enumeration(call: Any, field: str) -> None:
    state = OrderState(S.QUARANTINED, status_before_quarantine=S.PRODUCT_IN_TRANSIT)
    with pytest.raises(Invalid) as info:
        call(state)
    assert status_of(info.value) == 422 and info.value.errors[0].field == field


def test_other_fits_either_quarantine_decision_and_every_enumeration_is_made_of_codes() -> None:
    state = OrderState(S.QUARANTINED, site_id="X", status_before_quarantine=S.PRODUCT_IN_TRANSIT)
    assert m.decide_quarantine(state, "release", "other", Rules(), TODAY).state.status == S.PRODUCT_IN_TRANSIT
    assert m.decide_quarantine(state, "reject", "other", Rules(), TODAY).changed
    everything = reasons.CANCEL_REASONS | reasons.RESCHEDULE_REASONS | reasons.QUARANTINE_REASONS["release"]
    assert all(reasons.is_code(c) for c in everything | reasons.QUARANTINE_REASONS["reject"])
    assert set().union(*reasons.QUARANTINE_REASONS.values()) == set(
        reasons.QuarantineReason.__args__  # type: ignore[attr-defined]
    )
