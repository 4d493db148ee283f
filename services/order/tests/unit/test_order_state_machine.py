"""The order's lifecycle machine: no sequence of facts and actions — with duplicates and out-of-order
deliveries — takes an order through a transition that ALLOWED forbids; terminal states never move; the
commands it asks of the other services carry reason codes only, whatever words a fact brought. Material
at risk (OOS, excursion, refused at receipt) is held for QA's disposition; only a reject (or the
physician's decline) loses it; a cancellation once manufacture started needs a signature."""

from __future__ import annotations

import dataclasses
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
    fact("logistics.shipment_excursion.v1", leg="outbound_product", reading_c=-90.0, duration_min=45.0),
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
    ("action", "cancel_signed", {}),
    ("action", "release", {}),
    ("action", "reject", {}),
    ("action", "release_on_physician_request", {}),
    ("action", "physician_accept", {}),
    ("action", "physician_decline", {}),
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
        case "cancel_signed":
            return m.cancel(state, "physician_decision", signed=True)
        case "release":
            return m.decide_disposition(state, "release", "assessed_acceptable", r, TODAY, "QA-DOC-1")
        case "reject":
            return m.decide_disposition(state, "reject", "outside_stability_data", r, TODAY)
        case "release_on_physician_request":
            return m.decide_disposition(state, name, "no_alternative_treatment", r, TODAY, "QA-DOC-2")
        case "physician_accept":
            return m.physician_decision(state, True, "benefit_outweighs_risk", "FDA", r, TODAY)
        case _:
            return m.physician_decision(state, False, "risk_not_acceptable", "EMA", r, TODAY)


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
        except m.SignatureNeeded as needed:
            assert item[1] == "cancel" and needed.meaning == "cancellation"
            assert m.cancellation_is_signed(state) and state.status not in TERMINAL
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
        # held exactly while at risk; a release on physician request only of an OOS product
        assert (outcome.state.at_risk is not None) == (outcome.state.status in m.HELD)
        if outcome.state.status == S.AWAITING_PHYSICIAN:
            assert outcome.state.at_risk and outcome.state.at_risk.cause == "out_of_specification"
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
        FACTS[10],
        ("action", "lymphodepletion", {}),  # issue 11: once the product's delivery is confirmed
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
        S.PRODUCT_IN_TRANSIT,
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


def oos(state: OrderState, retained: bool = True, run: int = 1) -> m.Outcome:
    return m.on_fact(
        state,
        "site.product_out_of_specification.v1",
        {"run": run, "reason": "potency", "retained_material": retained, "site_id": "CH-STEIN"},
        Rules(),
        TODAY,
    )


def test_oos_is_held_for_qa_and_a_reject_remanufactures_then_recollects_then_fails() -> None:
    r = Rules(max_runs=2, max_recollections=1, retains_material=True)
    held = oos(OrderState(S.QC_PENDING, site_id="CH-STEIN"))
    assert held.state.status == S.MATERIAL_AT_RISK and not held.commands  # nothing lost yet
    assert held.state.at_risk == m.AtRisk(
        "out_of_specification", "potency", site_id="CH-STEIN", run=1, retained=True
    )
    assert held.state.status_before_hold == S.QC_PENDING
    assert "held for QA" in held.reason
    out = m.decide_disposition(held.state, "reject", "confirmed_out_of_specification", r, TODAY, "QA-1")
    assert out.state.status == S.MATERIAL_RECEIVED and out.state.run == 2 and out.state.at_risk is None
    assert out.commands == (m.Remanufacture(2, "CH-STEIN", "out_of_specification"),)
    assert out.reason.startswith("remanufacture (run 2): QA rejected the material at risk")
    # a true manufacturing failure keeps today's path, without QA
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


def test_a_remanufactures_own_slot_is_recorded_and_nothing_else_moves_the_order() -> None:
    """Issue 10: scheduling books a remanufacture a new slot at the site holding the material; the order
    keeps its state and records the slot; slots of other runs or sites are recorded only (never parked)."""
    state = OrderState(S.MATERIAL_RECEIVED, site_id="CH-STEIN", run=2, slot_id="old-slot")

    def slot(**kw: object) -> dict[str, object]:
        base = {"reason": "remanufacture", "run": 2, "site_id": "CH-STEIN", "slot_id": "new-slot"}
        return {**base, "manufacturing_start_date": "2031-03-10", **kw}

    out = m.on_fact(state, "scheduling.slot_reserved.v1", slot(), Rules(), TODAY)
    assert out.changed and out.state == dataclasses.replace(state, slot_id="new-slot") and not out.commands
    assert out.reason == "remanufacture (run 2) booked at CH-STEIN: manufacturing starts 2031-03-10"
    for other in (slot(run=3), slot(site_id="DE-X")):
        kept = m.on_fact(state, "scheduling.slot_reserved.v1", other, Rules(), TODAY)
        assert not kept.changed and kept.reason.startswith("recorded only") and not m_may_wait(kept)


def m_may_wait(outcome: m.Outcome) -> bool:
    return outcome.reason.startswith(m.NOT_YET)


def test_oos_released_on_physician_request_waits_for_the_physician_then_accept_goes_on() -> None:
    held = oos(OrderState(S.QC_PENDING, site_id="CH-STEIN"))
    asked = m.decide_disposition(
        held.state, "release_on_physician_request", "no_alternative_treatment", Rules(), TODAY, "QA-7"
    )
    assert asked.state.status == S.AWAITING_PHYSICIAN and not asked.commands
    assert asked.state.at_risk and asked.state.at_risk.requested == "no_alternative_treatment"
    assert asked.state.at_risk.document_reference == "QA-7"
    # FDA: expanded access, and the authority-notification task
    us = m.physician_decision(asked.state, True, "benefit_outweighs_risk", "FDA", Rules(), TODAY)
    assert us.state.status == S.QC_PENDING and us.state.expanded_access and us.state.at_risk is None
    assert us.commands == (m.NotifyAuthority("FDA", "out_of_specification"),)
    # EMA: the order's use stays; the authority is notified all the same
    eu = m.physician_decision(asked.state, True, None, "EMA", Rules(), TODAY)
    assert eu.state.status == S.QC_PENDING and not eu.state.expanded_access
    assert eu.commands == (m.NotifyAuthority("EMA", "out_of_specification"),)
    # the site's exceptional release then moves the order on as any release
    released = m.on_fact(eu.state, "site.product_released.v1", {"run": 1}, Rules(), TODAY)
    assert released.state.status == S.RELEASED


def test_a_physicians_decline_is_a_reject() -> None:
    held = oos(OrderState(S.QC_PENDING, site_id="CH-STEIN"), retained=False)
    asked = m.decide_disposition(
        held.state, "release_on_physician_request", "risk_assessed_for_patient", Rules(), TODAY
    )
    declined = m.physician_decision(asked.state, False, "risk_not_acceptable", "FDA", Rules(), TODAY)
    assert declined.state.status == S.RESCHEDULING and not declined.state.expanded_access
    assert declined.commands == (m.Rebook("recollection", "out_of_specification", TODAY + timedelta(days=7)),)
    assert "physician declined" in declined.reason


def test_release_on_physician_request_is_only_for_an_oos_product_and_a_physician_only_when_asked() -> None:
    excursion = m.on_fact(
        OrderState(S.PRODUCT_IN_TRANSIT, site_id="X"),
        "logistics.shipment_excursion.v1",
        {"leg": "outbound_product", "reading_c": -100, "duration_min": 30},
        Rules(),
        TODAY,
    )
    with pytest.raises(Invalid) as info:
        m.decide_disposition(excursion.state, "release_on_physician_request", "other", Rules(), TODAY)
    assert info.value.errors[0].field == "outcome"
    with pytest.raises(NotAllowedNow):
        m.physician_decision(excursion.state, True, None, "FDA", Rules(), TODAY)
    with pytest.raises(NotAllowedNow):
        m.decide_disposition(OrderState(S.QC_PENDING), "release", "other", Rules(), TODAY)
    with pytest.raises(Invalid) as info:
        m.physician_decision(excursion.state, True, "risk_not_acceptable", "FDA", Rules(), TODAY)
    assert info.value.errors[0].field == "reason_code"


@pytest.mark.parametrize(
    ("status", "fact", "data"),
    [
        (S.MATERIAL_IN_TRANSIT, "logistics.shipment_excursion.v1", {"leg": "inbound_apheresis"}),
        (S.APHERESIS_COMPLETED, "site.material_rejected.v1", {"reason": "damaged_container"}),
        (S.PRODUCT_DELIVERED, "logistics.shipment_excursion.v1", {"leg": "outbound_product"}),
    ],
    ids=["inbound-excursion", "refused-at-receipt", "outbound-excursion"],
)
def test_material_at_risk_is_held_and_a_qa_release_goes_back_where_it_was(
    status: OrderStatus, fact: str, data: dict[str, Any]
) -> None:
    held = m.on_fact(OrderState(status, site_id="X"), fact, {**data, "reading_c": 12.0}, Rules(), TODAY)
    assert held.state.status == S.MATERIAL_AT_RISK and not held.commands
    # the same risk again, while held: recorded, neither re-held nor parked for later
    again = m.on_fact(held.state, fact, {**data, "reading_c": 13.0}, Rules(), TODAY)
    assert not again.changed and not again.reason.startswith(m.NOT_YET)
    back = m.decide_disposition(held.state, "release", "within_stability_data", Rules(), TODAY, "QA-2")
    assert back.state.status == status and back.state.at_risk is None and not back.commands


def test_cancelling_once_manufacture_started_needs_a_signature() -> None:
    for status in [S.SUBMITTED, S.BOOKING_CONFIRMED, S.MATERIAL_IN_TRANSIT, S.MATERIAL_RECEIVED]:
        assert m.cancel(OrderState(status), "consent_withdrawn").state.status == S.CANCELLED
    started = [S.MANUFACTURING, S.QC_PENDING, S.RELEASED, S.PRODUCT_IN_TRANSIT, S.PRODUCT_RECEIVED]
    for status in started:
        with pytest.raises(m.SignatureNeeded):
            m.cancel(OrderState(status), "consent_withdrawn")
        signed = m.cancel(OrderState(status), "consent_withdrawn", signed=True)
        assert signed.state.status == S.CANCELLED and "(signed)" in signed.reason
    with pytest.raises(m.SignatureNeeded):  # a remanufacture: a run was made already
        m.cancel(OrderState(S.MATERIAL_RECEIVED, run=2), "consent_withdrawn")
    held_inbound = m.on_fact(
        OrderState(S.MATERIAL_IN_TRANSIT), "site.material_rejected.v1", {"reason": "other"}, Rules(), TODAY
    )
    assert m.cancel(held_inbound.state, "consent_withdrawn").state.status == S.CANCELLED
    with pytest.raises(m.SignatureNeeded):
        m.cancel(oos(OrderState(S.QC_PENDING)).state, "consent_withdrawn")


def test_a_stale_fact_from_an_old_run_or_slot_is_recorded_and_ignored() -> None:
    state = OrderState(S.QC_PENDING, run=2, site_id="X")
    out = m.on_fact(state, "site.product_released.v1", {"run": 1}, Rules(), TODAY)
    assert not out.changed and "recorded only" in out.reason
    state = OrderState(S.SLOT_RESERVED, slot_id=SLOT_B)
    out = m.on_fact(state, "site.booking_confirmed.v1", {"slot_id": SLOT_A}, Rules(), TODAY)
    assert not out.changed


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


def test_predicted_release_has_qc_inside_the_published_apheresis_to_release_days() -> None:
    """Axi-cel in the US: a published median of 14 days from apheresis to release (QC inside), not
    manufacturing days + QC days on top (issue 11: 21 days)."""
    from v2v_contracts.reference import product_catalogue

    axi = product_catalogue().get("AXI-CEL")
    assert axi is not None and axi.planning is not None
    collected = date(2026, 12, 1)
    start = collected + timedelta(days=axi.planning.start_lag_days)
    d = m.Durations(
        axi.manufacturing_days,
        axi.qc_days,
        release_after_start_days=axi.planning.release_after_start("north_america"),
    )
    planned = m.predict(d, m.Actuals(apheresis_date=collected, manufacturing_start_date=start))
    assert planned["release"] == collected + timedelta(days=14)
    old = m.predict(
        m.Durations(axi.manufacturing_days, axi.qc_days), m.Actuals(manufacturing_start_date=start)
    )
    assert old["release"] is not None and old["release"] > collected + timedelta(days=14)  # double-counted


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


def test_collected_material_moved_off_a_site_by_scheduling_waits_for_a_site_and_follows_it() -> None:
    """Issue 11: a site that loses its approval while the collected material waits for pickup or is on
    its way: the order keeps its status, waits (told why) while no site can take the material, and
    follows the material to the site scheduling books (a rebook: `rebook:site_outage`)."""
    collected = OrderState(S.MATERIAL_IN_TRANSIT, slot_id=SLOT_A, site_id="FR-LES-ULIS")
    released = {"slot_id": SLOT_A, "site_id": "FR-LES-ULIS", "reason": "approval_withdrawn"}
    moved = m.on_fact(collected, "scheduling.slot_released.v1", released, Rules(), TODAY)
    assert moved.state.status == S.MATERIAL_IN_TRANSIT and moved.state.rebook_pending and not moved.commands
    assert "collected material goes to another site" in moved.reason
    waits = m.on_fact(
        moved.state,
        "scheduling.slot_unavailable.v1",
        {"reason": "no_capacity", "detail": "no site can start it within its window"},
        Rules(),
        TODAY,
    )
    assert waits.state.status == S.MATERIAL_IN_TRANSIT and "waits for one" in waits.reason
    assert not waits.reason.startswith(m.NOT_YET)
    booked = m.on_fact(
        waits.state,
        "scheduling.slot_reserved.v1",
        {
            "slot_id": SLOT_B,
            "site_id": "DE-X",
            "reason": "rebook:site_outage",
            "manufacturing_start_date": "2031-01-02",
        },
        Rules(),
        TODAY,
    )
    assert booked.state.status == S.MATERIAL_IN_TRANSIT
    assert (booked.state.slot_id, booked.state.site_id) == (SLOT_B, "DE-X")
    assert not booked.state.rebook_pending


# ---- reason codes -------------------------------------------------------------------------------------


def test_the_commands_carry_the_cause_as_a_code_and_the_timeline_keeps_the_words() -> None:
    r = Rules(max_runs=1, max_recollections=1)
    excursion = m.on_fact(
        OrderState(S.MATERIAL_IN_TRANSIT, site_id="X"),
        "logistics.shipment_excursion.v1",
        {"leg": "inbound_apheresis", "reading_c": 12.5, "duration_min": 40.0},
        r,
        TODAY,
    )
    assert excursion.reason == (
        "material at risk: temperature excursion 12.5 °C on inbound_apheresis for 40.0 min; "
        "held for QA's disposition"
    )
    assert excursion.state.at_risk and excursion.state.at_risk.reason == "temperature_excursion"
    rejected_excursion = m.decide_disposition(excursion.state, "reject", "outside_stability_data", r, TODAY)
    assert rejected_excursion.commands == (
        m.Rebook("recollection", "inbound_excursion", TODAY + timedelta(days=r.recollection_lead_days)),
    )
    assert rejected_excursion.reason == (
        "recollection: QA rejected the material at risk (excursion): outside_stability_data"
    )
    held = m.on_fact(
        OrderState(S.MATERIAL_IN_TRANSIT, recollections=1),
        "site.material_rejected.v1",
        {"reason": "label damaged, see note"},
        r,
        TODAY,
    )
    assert "label damaged, see note" in held.reason
    assert held.state.at_risk and held.state.at_risk.reason == "material_rejected"  # words: not a code
    rejected = m.decide_disposition(held.state, "reject", "integrity_compromised", r, TODAY)
    assert rejected.state.status == S.FAILED
    assert rejected.commands == (m.Fail("material_rejected:no_recollection_left"),)
    outbound = m.on_fact(
        OrderState(S.PRODUCT_IN_TRANSIT, site_id="X"),
        "logistics.shipment_excursion.v1",
        {"leg": "outbound_product", "reading_c": -100.0},
        r,
        TODAY,
    )
    lost = m.decide_disposition(
        outbound.state, "reject", "integrity_compromised", Rules(max_runs=2, retains_material=True), TODAY
    )
    assert lost.commands == (m.Remanufacture(2, "X", "quarantine_rejected"),)
    assert lost.reason == (
        "remanufacture (run 2): QA rejected the material at risk (excursion): integrity_compromised"
    )


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
            lambda s: m.decide_disposition(s, "release", "outside_stability_data", Rules(), TODAY),
            "reason_code",
        ),
        (lambda s: m.decide_disposition(s, "reject", "within_stability_data", Rules(), TODAY), "reason_code"),
        (
            lambda s: m.decide_disposition(
                s, "release_on_physician_request", "within_stability_data", Rules(), TODAY
            ),
            "reason_code",
        ),
        (lambda s: m.decide_disposition(s, "hold", "other", Rules(), TODAY), "outcome"),
    ],
    ids=[
        "cancel-words",
        "cancel-foreign-code",
        "reschedule-cancel-code",
        "release-for-a-reject-reason",
        "reject-for-a-release-reason",
        "physician-request-for-a-release-reason",
        "unknown-outcome",
    ],
)
def test_an_action_takes_only_a_reason_code_of_its_own_enumeration(call: Any, field: str) -> None:
    state = oos(OrderState(S.QC_PENDING, site_id="X")).state
    with pytest.raises(Invalid) as info:
        call(state)
    assert status_of(info.value) == 422 and info.value.errors[0].field == field


def test_other_fits_every_disposition_and_every_enumeration_is_made_of_codes() -> None:
    state = oos(OrderState(S.QC_PENDING, site_id="X")).state
    assert m.decide_disposition(state, "release", "other", Rules(), TODAY).state.status == S.QC_PENDING
    assert m.decide_disposition(state, "reject", "other", Rules(), TODAY).changed
    assert m.decide_disposition(state, "release_on_physician_request", "other", Rules(), TODAY).changed
    everything = reasons.CANCEL_REASONS | reasons.RESCHEDULE_REASONS
    everything |= set().union(*reasons.DISPOSITION_REASONS.values(), *reasons.PHYSICIAN_REASONS.values())
    assert all(reasons.is_code(c) for c in everything)
    assert set().union(*reasons.DISPOSITION_REASONS.values()) == set(
        reasons.DispositionReason.__args__  # type: ignore[attr-defined]
    )
    assert set().union(*reasons.PHYSICIAN_REASONS.values()) == set(
        reasons.PhysicianReason.__args__  # type: ignore[attr-defined]
    )
    # the former quarantine decision's codes are disposition codes of the same outcome
    for decision, allowed in reasons.QUARANTINE_REASONS.items():
        assert allowed <= reasons.DISPOSITION_REASONS[decision]


def test_allowed_names_every_status_and_the_held_states_lead_back() -> None:
    assert set(ALLOWED) == set(OrderStatus)
    assert (
        S.MATERIAL_AT_RISK in ALLOWED[S.QC_PENDING] and S.MATERIAL_AT_RISK in ALLOWED[S.MATERIAL_IN_TRANSIT]
    )
    assert S.AWAITING_PHYSICIAN in ALLOWED[S.MATERIAL_AT_RISK]
    assert S.QC_PENDING in ALLOWED[S.AWAITING_PHYSICIAN]


@pytest.mark.parametrize("status", [S.APHERESIS_COMPLETED, S.MATERIAL_IN_TRANSIT])
def test_an_outage_sends_collected_material_to_another_site_without_going_back(status: OrderStatus) -> None:
    """Issue 11: the material exists; the order asks for another site (the collection date kept), keeps its
    status, and takes the new site when scheduling books it; logistics reroutes the shipment."""
    planned = TODAY - timedelta(days=1)  # collected on its planned date, yesterday
    state = OrderState(status, site_id="OLD", slot_id="s-old", apheresis_date=planned)
    affected = {"site_id": "OLD", "reason": "outage:equipment_failure"}
    out = m.on_fact(state, "site.booking_affected.v1", affected, Rules(), TODAY)
    assert out.state == dataclasses.replace(state, rebook_pending=True)
    assert out.commands == (
        m.Rebook("site_outage", "outage:equipment_failure", planned, exclude_site_id="OLD", collected=True),
    )
    # another site's outage, or a fact about the old slot, moves nothing
    assert not m.on_fact(
        state, "site.booking_affected.v1", {**affected, "site_id": "X"}, Rules(), TODAY
    ).commands
    released = m.on_fact(
        out.state, "scheduling.slot_released.v1", {"slot_id": "s-old", "reason": "outage"}, Rules(), TODAY
    )
    assert not released.changed and released.state.status == status
    slot = {
        "slot_id": "s-new",
        "site_id": "NEW",
        "reason": "rebook:site_outage",
        "apheresis_date": planned.isoformat(),
        "manufacturing_start_date": TODAY.isoformat(),
    }
    moved = m.on_fact(out.state, "scheduling.slot_reserved.v1", slot, Rules(), TODAY)
    assert (moved.state.status, moved.state.site_id, moved.state.slot_id) == (status, "NEW", "s-new")
    assert not moved.state.rebook_pending and moved.reason.startswith("material redirected to NEW")
    booked = m.on_fact(moved.state, "site.booking_confirmed.v1", {"slot_id": "s-new"}, Rules(), TODAY)
    assert not booked.changed and not booked.reason.startswith(m.NOT_YET)  # recorded, never parked
    rerouted = {"previous_destination": "OLD", "destination": "NEW", "status": "in_transit"}
    kept = m.on_fact(moved.state, "logistics.shipment_rerouted.v1", rerouted, Rules(), TODAY)
    assert not kept.changed and kept.reason == "material rerouted from OLD to NEW (in_transit)"
    # no site can take it yet: it waits, the centre told (not parked, not cancelled)
    waits = m.on_fact(out.state, "scheduling.slot_unavailable.v1", {"reason": "no_capacity"}, Rules(), TODAY)
    assert not waits.changed and "waits for one" in waits.reason


def test_an_outage_at_the_site_holding_the_material_is_recorded_not_moved() -> None:
    state = OrderState(S.MATERIAL_RECEIVED, site_id="OLD", slot_id="s-old", run=1)
    data = {"site_id": "OLD", "reason": "outage:maintenance", "material_at_site": True, "run": 1}
    out = m.on_fact(state, "site.booking_affected.v1", data, Rules(), TODAY)
    assert not out.changed and not out.commands and "its run waits there" in out.reason
