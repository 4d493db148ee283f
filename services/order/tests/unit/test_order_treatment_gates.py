"""Issue 11, treatment gates at the centre and the patient's journey, in the pure order domain:
lymphodepletion (LD) only once the product is released and its delivery date confirmed; infusion inside the
window after LD completion of the order's indication (refused naming the window); a product lost after LD
clears it, alerts the centre and allows a repeat LD; a repeat once the recorded LD can no longer lead to an
infusion; nothing forces the product's use. On hold (with a resume) while the order's own steps go on
beneath the hold; structured hold and resume reasons; what material is left when an order ends and the
record of its disposition."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import date, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from order_service.domain import order as m
from order_service.domain import reasons
from order_service.domain.order import ALLOWED, TERMINAL, OrderState, OrderStatus, Rules, Window
from v2v_contracts.errors import Conflict, DomainError, Invalid, NotAllowedNow
from v2v_contracts.reference import product_catalogue
from v2v_servicekit.problems import status_of

S = OrderStatus
TODAY = date(2026, 11, 26)
SITE = "CH-STEIN"
# Kymriah, B-cell ALL: a 4-day regimen, infusion 2-14 days after completion, repeat after 28 days
B_ALL = Window("b_all", regimen_days=4, min_days=2, max_days=14, repeat_after_days=28)
FL = Window("fl", regimen_days=3, min_days=2, max_days=6, repeat_after_days=28)


def at(status: OrderStatus, **kw: Any) -> OrderState:
    return OrderState(status, site_id=SITE, slot_id=str(uuid.uuid4()), **kw)


def in_transit(**kw: Any) -> OrderState:
    return at(S.PRODUCT_IN_TRANSIT, **kw)


# ---- the catalogue ------------------------------------------------------------------------------------


def test_windows_come_from_the_catalogue_per_product_and_indication() -> None:
    products = product_catalogue()
    assert m.Window.of(products["TISA-CEL"], "b_all") == B_ALL
    assert m.Window.of(products["TISA-CEL"], "fl") == FL
    dlbcl = m.Window.of(products["TISA-CEL"], "dlbcl")
    assert dlbcl is not None and (dlbcl.regimen_days, dlbcl.min_days, dlbcl.max_days) == (3, 2, 11)
    mm = m.Window.of(products["CILTA-CEL"], "mm")
    assert mm is not None and (mm.regimen_days, mm.min_days, mm.max_days, mm.repeat_after_days) == (
        3,
        2,
        4,
        14,
    )
    lbcl = m.Window.of(products["AXI-CEL"], "lbcl")
    assert lbcl is not None and (lbcl.regimen_days, lbcl.min_days) == (3, 2)
    # infusion 2 days after the completion of a 3-day regimen: day 0 after LD on days -5, -4, -3
    assert lbcl.infusion_dates(TODAY)[0] == TODAY + timedelta(days=5)
    assert m.Window.of(products["TISA-CEL"], "mm") is None  # not one of its indications
    assert m.Window.of(products["TISA-CEL"], None) is None


def test_every_indication_names_its_sources_and_weight_rule() -> None:
    for product in product_catalogue().values():
        assert product.treatment is not None, product.code
        for code, facts in product.treatment.indications.items():
            assert facts.sources, (product.code, code)
            low, high = facts.infusion_window_days
            assert 0 <= low <= high
    tisa = product_catalogue()["TISA-CEL"]
    assert tisa.indication("b_all").weight_required is True  # type: ignore[union-attr]
    assert tisa.indication("dlbcl").weight_required is False  # type: ignore[union-attr]
    assert product_catalogue()["AXI-CEL"].indication("lbcl").weight_required is True  # type: ignore[union-attr]


def test_cilta_cel_window_matches_both_wordings_of_its_label() -> None:
    """2-4 days after completion of the 3-day regimen = 5-7 days after its start."""
    mm = m.Window.of(product_catalogue()["CILTA-CEL"], "mm")
    assert mm is not None
    first, last = mm.infusion_dates(TODAY)
    assert ((first - TODAY).days, (last - TODAY).days) == (5, 7)


# ---- lymphodepletion gates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [S.MATERIAL_RECEIVED, S.MANUFACTURING, S.QC_PENDING, S.MATERIAL_AT_RISK, S.AWAITING_PHYSICIAN],
)
def test_lymphodepletion_before_release_is_refused(status: OrderStatus) -> None:
    with pytest.raises(NotAllowedNow, match="released"):
        m.start_lymphodepletion(at(status), B_ALL, TODAY)


def test_lymphodepletion_when_released_but_delivery_not_confirmed_is_refused() -> None:
    with pytest.raises(NotAllowedNow, match="delivery date is confirmed") as refused:
        m.start_lymphodepletion(at(S.RELEASED), B_ALL, TODAY)
    assert status_of(refused.value) == 409


def test_the_couriers_booking_confirms_the_delivery_and_lets_lymphodepletion_start() -> None:
    booked = m.on_fact(
        at(S.RELEASED),
        "logistics.shipment_milestone.v1",
        {"leg": "outbound_product", "milestone": "booked"},
        Rules(),
        TODAY,
    )
    assert booked.changed and booked.state.status == S.RELEASED and booked.state.delivery_confirmed
    again = m.on_fact(
        booked.state,
        "logistics.shipment_milestone.v1",
        {"leg": "outbound_product", "milestone": "booked"},
        Rules(),
        TODAY,
    )
    assert not again.changed
    started = m.start_lymphodepletion(booked.state, B_ALL, TODAY)
    assert started.state.lymphodepletion and started.state.lymphodepletion_on == TODAY
    assert started.state.lymphodepletions == 1
    assert "2026-12-02 .. 2026-12-14" in started.reason  # completion 11-30, window 2..14 days after


@pytest.mark.parametrize("status", [S.PRODUCT_IN_TRANSIT, S.PRODUCT_DELIVERED, S.PRODUCT_RECEIVED])
def test_lymphodepletion_once_the_product_is_on_its_way_or_at_the_centre(status: OrderStatus) -> None:
    assert m.start_lymphodepletion(at(status), FL, TODAY).state.lymphodepletion


def test_a_second_lymphodepletion_inside_the_window_is_refused_and_a_repeat_allowed_after_it() -> None:
    first = m.start_lymphodepletion(in_transit(), FL, TODAY).state
    # FL: completion TODAY+3, window until TODAY+9; a repeat from TODAY+10
    assert FL.repeat_from(TODAY) == TODAY + timedelta(days=10)
    with pytest.raises(NotAllowedNow, match="a repeat may start from 2026-12-06"):
        m.start_lymphodepletion(first, FL, TODAY + timedelta(days=9))
    repeat = m.start_lymphodepletion(first, FL, TODAY + timedelta(days=10))
    assert repeat.state.lymphodepletion_on == TODAY + timedelta(days=10)
    assert repeat.state.lymphodepletions == 2 and "repeat" in repeat.reason


def test_the_repeat_delay_of_the_label_opens_a_repeat_before_a_longer_window_closes() -> None:
    long_window = Window("x", regimen_days=3, min_days=2, max_days=40, repeat_after_days=28)
    assert long_window.repeat_from(TODAY) == TODAY + timedelta(days=3 + 28 + 1)


def test_without_treatment_facts_lymphodepletion_is_recorded_once() -> None:
    first = m.start_lymphodepletion(in_transit()).state
    with pytest.raises(NotAllowedNow, match="already recorded"):
        m.start_lymphodepletion(first)


# ---- the infusion window --------------------------------------------------------------------------------


def received_after_ld(window: Window = B_ALL, started: date = TODAY) -> OrderState:
    ld = m.start_lymphodepletion(in_transit(), window, started).state
    return dataclasses.replace(ld, status=S.PRODUCT_RECEIVED)


def test_infusion_inside_the_window_completes() -> None:
    state = received_after_ld()
    first, last = B_ALL.infusion_dates(TODAY)
    assert (first, last) == (TODAY + timedelta(days=6), TODAY + timedelta(days=18))
    for day in (first, last):
        done = m.confirm_infusion(state, B_ALL, day)
        assert done.state.status == S.COMPLETED and "after lymphodepletion completed" in done.reason


@pytest.mark.parametrize("offset,when", [(5, "before"), (19, "after"), (0, "before"), (40, "after")])
def test_infusion_outside_the_window_is_refused_naming_the_window(offset: int, when: str) -> None:
    with pytest.raises(m.OutsideInfusionWindow) as refused:
        m.confirm_infusion(received_after_ld(), B_ALL, TODAY + timedelta(days=offset))
    problem = refused.value
    assert status_of(problem) == 409 and problem.kind == "infusion-window"
    assert problem.errors[0].field == "at"
    assert f"is {when} the infusion window 2026-12-02 .. 2026-12-14" in problem.errors[0].reason
    window = problem.extensions["window"]
    assert (window["earliest_infusion"], window["latest_infusion"]) == ("2026-12-02", "2026-12-14")
    assert (
        window["indication"],
        window["min_days_after_completion"],
        window["max_days_after_completion"],
    ) == (
        "b_all",
        2,
        14,
    )


def test_infusion_needs_lymphodepletion_and_the_product_received() -> None:
    with pytest.raises(NotAllowedNow, match="lymphodepletion recorded first"):
        m.confirm_infusion(at(S.PRODUCT_RECEIVED), B_ALL, TODAY)
    with pytest.raises(NotAllowedNow, match="product received"):
        m.confirm_infusion(m.start_lymphodepletion(in_transit(), B_ALL, TODAY).state, B_ALL, TODAY)


def test_nothing_forces_the_products_use_a_repeat_lymphodepletion_opens_a_new_window() -> None:
    """Deliver when ready: the product stays stored at the centre past the window; no fact or timer uses
    it up; the physician's repeat LD opens a new window."""
    state = received_after_ld(FL)
    late = TODAY + timedelta(days=30)
    with pytest.raises(m.OutsideInfusionWindow):
        m.confirm_infusion(state, FL, late)
    assert state.status == S.PRODUCT_RECEIVED  # still there, nothing changed
    again = m.start_lymphodepletion(state, FL, late).state
    assert again.status == S.PRODUCT_RECEIVED and again.lymphodepletion_on == late
    assert m.confirm_infusion(again, FL, late + timedelta(days=5)).state.status == S.COMPLETED


# ---- a product lost after lymphodepletion ----------------------------------------------------------------


def held_outbound(state: OrderState) -> OrderState:
    return m.on_fact(
        state,
        "logistics.shipment_excursion.v1",
        {"leg": "outbound_product", "reading_c": -90.0, "shipment_id": str(uuid.uuid4())},
        Rules(),
        TODAY,
    ).state


@pytest.mark.parametrize(
    "rules,after,command",
    [
        (Rules(max_runs=2, retains_material=True), S.MATERIAL_RECEIVED, m.Remanufacture),
        (Rules(max_runs=1, retains_material=False, max_recollections=1), S.RESCHEDULING, m.Rebook),
        (Rules(max_runs=1, retains_material=False, max_recollections=0), S.FAILED, m.Fail),
    ],
)
def test_a_product_lost_after_lymphodepletion_clears_it_alerts_and_allows_a_repeat(
    rules: Rules, after: OrderStatus, command: type
) -> None:
    ld = m.start_lymphodepletion(in_transit(), B_ALL, TODAY).state
    held = held_outbound(ld)
    assert held.status == S.MATERIAL_AT_RISK and held.lymphodepletion  # held, not lost yet
    lost = m.decide_disposition(held, "reject", "outside_stability_data", rules, TODAY)
    assert lost.state.status == after
    assert not lost.state.lymphodepletion and lost.state.lymphodepletion_on is None
    assert not lost.state.delivery_confirmed and lost.state.lymphodepletions == 1
    [cleared] = [c for c in lost.commands if isinstance(c, m.ClearLymphodepletion)]
    assert reasons.is_code(cleared.reason) and cleared.started_on == TODAY
    assert any(isinstance(c, command) for c in lost.commands)
    assert "lymphodepletion is cleared" in lost.reason
    if after == S.MATERIAL_RECEIVED:  # the next product: released, delivery confirmed, a repeat LD
        released = dataclasses.replace(lost.state, status=S.PRODUCT_IN_TRANSIT)
        repeat = m.start_lymphodepletion(released, B_ALL, TODAY + timedelta(days=3))
        assert repeat.state.lymphodepletion and repeat.state.lymphodepletions == 2
        assert "earlier one was cleared" in repeat.reason


def test_a_loss_without_lymphodepletion_raises_no_alert() -> None:
    lost = m.decide_disposition(
        held_outbound(in_transit()), "reject", "outside_stability_data", Rules(), TODAY
    )
    assert not any(isinstance(c, m.ClearLymphodepletion) for c in lost.commands)


# ---- on hold, and resumed -------------------------------------------------------------------------------


def test_on_hold_and_resume_with_structured_reasons() -> None:
    held = m.put_on_hold(at(S.QC_PENDING), "patient_unwell")
    assert held.state.status == S.ON_HOLD and held.state.paused_from == S.QC_PENDING
    assert "patient_unwell" in held.reason
    with pytest.raises(NotAllowedNow, match="on hold already"):
        m.put_on_hold(held.state, "other")
    back = m.resume(held.state, "patient_cleared")
    assert back.state.status == S.QC_PENDING and back.state.paused_from is None
    with pytest.raises(NotAllowedNow, match="not on hold"):
        m.resume(back.state, "patient_cleared")
    with pytest.raises(Invalid) as bad:
        m.put_on_hold(at(S.QC_PENDING), "patient_deceased")  # death is a cancellation, not a hold
    assert bad.value.errors[0].field == "reason_code"
    with pytest.raises(Invalid):
        m.resume(held.state, "because")


def test_facts_move_the_orders_own_steps_beneath_the_hold() -> None:
    held = m.put_on_hold(at(S.QC_PENDING), "payer_pending").state
    released = m.on_fact(held, "site.product_released.v1", {"run": 1}, Rules(), TODAY)
    assert released.changed and released.state.status == S.ON_HOLD
    assert released.state.paused_from == S.RELEASED and "beneath the hold" in released.reason
    picked = m.on_fact(
        released.state,
        "logistics.shipment_milestone.v1",
        {"leg": "outbound_product", "milestone": "picked_up"},
        Rules(),
        TODAY,
    ).state
    # the product arrives while the patient is on hold: received and stored at the centre
    delivered = m.on_fact(
        picked,
        "logistics.shipment_milestone.v1",
        {"leg": "outbound_product", "milestone": "delivered"},
        Rules(),
        TODAY,
    ).state
    stored = m.confirm_product_receipt(delivered).state
    assert (stored.status, stored.paused_from) == (S.ON_HOLD, S.PRODUCT_RECEIVED)
    for step in (
        lambda s: m.start_lymphodepletion(s, B_ALL, TODAY),
        lambda s: m.confirm_infusion(s, B_ALL, TODAY),
        m.confirm_apheresis,
    ):
        with pytest.raises(NotAllowedNow, match="on hold"):
            step(stored)
    resumed = m.resume(stored, "patient_cleared").state
    assert resumed.status == S.PRODUCT_RECEIVED
    ld = m.start_lymphodepletion(resumed, B_ALL, TODAY).state
    assert m.confirm_infusion(ld, B_ALL, TODAY + timedelta(days=7)).state.status == S.COMPLETED


def test_a_fact_not_yet_applicable_beneath_the_hold_is_parked_as_ever() -> None:
    held = m.put_on_hold(at(S.MANUFACTURING), "patient_unwell").state
    early = m.on_fact(
        held,
        "logistics.shipment_milestone.v1",
        {"leg": "outbound_product", "milestone": "delivered"},
        Rules(),
        TODAY,
    )
    assert not early.changed and early.state == held and early.reason.startswith(m.NOT_YET)


def test_a_failure_beneath_the_hold_ends_it_and_a_cancellation_needs_the_signature_it_always_did() -> None:
    held = m.put_on_hold(at(S.MANUFACTURING), "patient_unwell").state
    with pytest.raises(m.SignatureNeeded):
        m.cancel(held, "patient_deceased")
    assert m.cancel(held, "patient_deceased", signed=True).state.status == S.CANCELLED
    failed = m.on_fact(
        held,
        "site.manufacturing_failed.v1",
        {"run": 1, "reason": "contamination", "retained_material": False},
        Rules(max_runs=1, max_recollections=0),
        TODAY,
    )
    assert failed.state.status == S.FAILED and failed.state.paused_from is None


def test_qa_decides_on_material_at_risk_beneath_the_hold() -> None:
    held = m.put_on_hold(at(S.PRODUCT_IN_TRANSIT), "patient_unwell").state
    at_risk = held_outbound(held)
    assert (at_risk.status, at_risk.paused_from) == (S.ON_HOLD, S.MATERIAL_AT_RISK)
    released = m.decide_disposition(at_risk, "release", "within_stability_data", Rules(), TODAY, "QA-1")
    assert (released.state.status, released.state.paused_from) == (S.ON_HOLD, S.PRODUCT_IN_TRANSIT)


HOLD_STEPS = [
    ("hold", "patient_unwell"),
    ("resume", "patient_cleared"),
    ("fact", "scheduling.slot_reserved.v1"),
    ("fact", "site.booking_confirmed.v1"),
    ("fact", "logistics.shipment_planned.v1"),
    ("apheresis", ""),
    ("fact", "site.material_received.v1"),
    ("fact", "site.manufacturing_step_completed.v1"),
    ("fact", "site.product_released.v1"),
    ("fact", "site.product_out_of_specification.v1"),
    ("reject", ""),
    ("fact", "logistics.shipment_excursion.v1"),
    ("fact", "logistics.shipment_milestone.v1"),
    ("ld", ""),
    ("receipt", ""),
    ("infusion", ""),
    ("cancel", ""),
]
SLOT = str(uuid.uuid4())
FACT_DATA: dict[str, dict[str, Any]] = {
    "scheduling.slot_reserved.v1": {"slot_id": SLOT, "site_id": SITE, "apheresis_date": "2026-12-10"},
    "site.booking_confirmed.v1": {"slot_id": SLOT},
    "logistics.shipment_planned.v1": {"leg": "inbound_apheresis"},
    "site.manufacturing_step_completed.v1": {"step": "cryopreservation", "run": 1},
    "site.product_released.v1": {"run": 1},
    "site.product_out_of_specification.v1": {"run": 1, "reason": "potency", "retained_material": True},
    "logistics.shipment_excursion.v1": {"leg": "outbound_product", "reading_c": -90.0},
    "logistics.shipment_milestone.v1": {"leg": "outbound_product", "milestone": "picked_up"},
}


def hold_step(state: OrderState, item: tuple[str, str], r: Rules) -> m.Outcome:
    kind, name = item
    match kind:
        case "hold":
            return m.put_on_hold(state, name)
        case "resume":
            return m.resume(state, name)
        case "fact":
            return m.on_fact(state, name, FACT_DATA.get(name, {}), r, TODAY)
        case "apheresis":
            return m.confirm_apheresis(state)
        case "reject":
            return m.decide_disposition(state, "reject", "confirmed_out_of_specification", r, TODAY)
        case "ld":
            return m.start_lymphodepletion(state, FL, TODAY)
        case "receipt":
            return m.confirm_product_receipt(state)
        case "infusion":
            return m.confirm_infusion(state, FL, TODAY + timedelta(days=6))
        case _:
            return m.cancel(state, "disease_progression", signed=True)


@settings(max_examples=300)
@given(
    items=st.lists(st.sampled_from(HOLD_STEPS), max_size=40),
    r=st.builds(Rules, max_runs=st.integers(1, 3), max_recollections=st.integers(0, 2)),
)
def test_no_sequence_with_holds_breaks_the_machine(items: list[tuple[str, str]], r: Rules) -> None:
    """With holds and resumes among facts and actions: only ALLOWED transitions; on hold exactly while a
    paused status is kept; held for QA exactly while the order's own steps are at risk; LD only recorded
    with a release behind it; a cleared LD always alerted."""
    state = OrderState(S.SUBMITTED)
    for item in items:
        before = state.status
        try:
            outcome = hold_step(state, item, r)
        except DomainError as refused:
            assert isinstance(refused, Invalid | NotAllowedNow | Conflict)
            assert status_of(refused) in {409, 422}
            continue
        after = outcome.state
        if before in TERMINAL:
            assert after.status == before and not outcome.changed
        elif outcome.changed and after.status != before:
            assert after.status in ALLOWED[before], f"{before} -> {after.status} via {item}"
        if not outcome.changed:
            assert after == state and not outcome.commands
        assert (after.status == S.ON_HOLD) == (after.paused_from is not None)
        assert after.paused_from != S.ON_HOLD
        assert (after.at_risk is not None) == (m.effective_status(after) in m.HELD)
        if state.lymphodepletion and not after.lymphodepletion and after.status != S.COMPLETED:
            assert any(isinstance(c, m.ClearLymphodepletion) for c in outcome.commands)
        state = after


# ---- what is left when the order ends, and its disposition ------------------------------------------------


@pytest.mark.parametrize(
    "status,left",
    [
        (S.SLOT_RESERVED, None),
        (S.INBOUND_SHIPMENT_PLANNED, None),
        (S.APHERESIS_COMPLETED, ("apheresis_material", "centre")),
        (S.MATERIAL_IN_TRANSIT, ("apheresis_material", "in_transit")),
        (S.MATERIAL_RECEIVED, ("apheresis_material", "site")),
        (S.MANUFACTURING, ("product", "site")),
        (S.RELEASED, ("product", "site")),
        (S.PRODUCT_IN_TRANSIT, ("product", "in_transit")),
        (S.PRODUCT_RECEIVED, ("product", "centre")),
    ],
)
def test_material_left_when_an_order_ends(status: OrderStatus, left: tuple[str, str] | None) -> None:
    found = m.material_left(at(status))
    assert (None if found is None else (found["material"], found["location"])) == left
    paused = m.put_on_hold(at(status), "other").state  # beneath a hold: the same
    assert m.material_left(paused) == found


def test_material_at_risk_left_by_its_cause() -> None:
    receipt = m.AtRisk("receipt", "damaged_container")
    assert m.material_left(at(S.MATERIAL_AT_RISK, at_risk=receipt)) == {
        "material": "apheresis_material",
        "location": "site",
    }
    oos = m.AtRisk("out_of_specification", "potency")
    assert m.material_left(at(S.MATERIAL_AT_RISK, at_risk=oos)) == {"material": "product", "location": "site"}


def test_the_disposition_of_what_was_left_is_recorded_once_after_the_order_ended() -> None:
    left = {"material": "product", "location": "site"}
    ended = at(S.CANCELLED)
    words = m.record_material_fate(ended, left, set(), "product", "destroyed", "order_cancelled")
    assert "product destroyed" in words and "site" in words
    with pytest.raises(Conflict) as twice:
        m.record_material_fate(ended, left, {"product"}, "product", "returned", "other")
    assert twice.value.errors[0].field == "material"
    with pytest.raises(Invalid) as other_kind:
        m.record_material_fate(ended, left, set(), "apheresis_material", "destroyed", "other")
    assert other_kind.value.errors[0].field == "material"
    with pytest.raises(NotAllowedNow, match="cancelled or failed"):
        m.record_material_fate(at(S.MANUFACTURING), left, set(), "product", "destroyed", "other")
    with pytest.raises(NotAllowedNow, match="no material"):
        m.record_material_fate(ended, None, set(), "product", "destroyed", "other")
    for bad, field in [
        (("stuff", "destroyed", "other"), "material"),
        (("product", "burnt", "other"), "outcome"),
        (("product", "destroyed", "why"), "reason_code"),
    ]:
        with pytest.raises(Invalid) as refused:
            m.record_material_fate(ended, left, set(), *bad)
        assert refused.value.errors[0].field == field
