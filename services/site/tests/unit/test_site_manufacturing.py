"""Manufacturing at a site as a pure state machine: steps only in order, runs from retained material,
QC passed waiting for the signed release, material at risk held for QA's disposition, and no sequence of
MES reports, QA decisions and order commands ever reaches an illegal state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from site_service.adapters.repository import SITES_SEED as SEED
from site_service.domain import manufacturing as mfg
from site_service.domain.manufacturing import (
    DISPOSITION_STATE,
    STATE_AFTER,
    STEPS,
    Manufacturing,
    Rules,
    State,
    Transition,
)
from site_service.domain.manufacturing import ManufacturingConflict as Conflict
from site_service.domain.registry import site_from_seed
from site_service.service_layer.products import known_products, rules_for
from v2v_contracts.errors import Conflict as DomainConflict
from v2v_contracts.errors import Invalid
from v2v_contracts.reference import load_products, product_catalogue

S = State
RETAINS = Rules(retains_material=True, max_runs=2)
NO_RETAIN = Rules(retains_material=False, max_runs=1)

# the legal moves, written out independently of the implementation
LEGAL: set[tuple[State, State]] = {
    (S.AWAITING_MATERIAL, S.MATERIAL_RECEIVED),
    (S.AWAITING_MATERIAL, S.HELD_AT_RECEIPT),  # refused at receipt: held for QA (issue 10)
    (S.HELD_AT_RECEIPT, S.MATERIAL_RECEIVED),  # QA releases the held material: run 1
    (S.HELD_AT_RECEIPT, S.REJECTED),  # QA rejects it
    (S.MATERIAL_RECEIVED, S.ACTIVATION),
    (S.ACTIVATION, S.TRANSDUCTION),
    (S.TRANSDUCTION, S.EXPANSION),
    (S.EXPANSION, S.HARVEST),
    (S.HARVEST, S.QC_PENDING),
    (S.QC_PENDING, S.QC_PASSED),  # QC passed: the signed release follows
    (S.QC_PASSED, S.RELEASED),  # every signature there
    (S.OUT_OF_SPECIFICATION, S.QC_PASSED),  # QA released the OOS lot (or on the physician's request)
    (S.QC_PENDING, S.OUT_OF_SPECIFICATION),
    (S.QC_PENDING, S.FAILED),
    (S.OUT_OF_SPECIFICATION, S.MATERIAL_RECEIVED),
    (S.FAILED, S.MATERIAL_RECEIVED),
}
LEGAL |= {(s, S.FAILED) for s in (S.MATERIAL_RECEIVED, S.ACTIVATION, S.TRANSDUCTION, S.EXPANSION, S.HARVEST)}
LEGAL |= {(s, S.STOPPED) for s in (*STATE_AFTER, S.QC_PASSED, S.HELD_AT_RECEIPT)}
ABSORBING = {S.RELEASED, S.REJECTED, S.STOPPED}


def received(lot: str = "CH-STEIN-00000001") -> Manufacturing:
    return mfg.receive(Manufacturing(), accepted=True, lot=lot).after


def passed(m: Manufacturing | None = None) -> Manufacturing:
    return mfg.qc(through(m or received(), STEPS), "passed", RETAINS).after


def through(m: Manufacturing, steps: tuple[str, ...] | list[str]) -> Manufacturing:
    for step in steps:
        m = mfg.complete_step(m, step).after
    return m


# ---- examples ---------------------------------------------------------------------------------------


def test_a_run_goes_from_receipt_through_the_steps_to_release() -> None:
    m = received()
    assert (m.state, m.run, m.next_step) == (S.MATERIAL_RECEIVED, 1, "activation")
    seen = []
    for step in STEPS:
        m = mfg.complete_step(m, step).after
        seen.append(m.state)
    assert seen == [S.ACTIVATION, S.TRANSDUCTION, S.EXPANSION, S.HARVEST, S.QC_PENDING]
    assert m.next_step is None
    t = mfg.qc(m, "passed", RETAINS)
    assert t.changed and t.after.state == S.QC_PASSED and not t.after.retained_material
    assert t.after.lot == "CH-STEIN-00000001"  # the run's lot, from the receipt on
    r = mfg.release(t.after)  # once every signature is there
    assert r.changed and r.after.state == S.RELEASED and r.after.lot == t.after.lot
    assert not mfg.release(r.after).changed


def test_a_step_out_of_order_is_refused_naming_step() -> None:
    m = received()
    with pytest.raises(Conflict) as exc:
        mfg.complete_step(m, "transduction")
    assert exc.value.field == "step"
    assert "activation" in exc.value.reason
    m = through(m, ["activation", "transduction"])
    with pytest.raises(Conflict):
        mfg.complete_step(m, "harvest")


def test_the_same_step_twice_is_a_no_op() -> None:
    m = through(received(), ["activation", "transduction"])
    for step in ("transduction", "activation"):
        t = mfg.complete_step(m, step)
        assert not t.changed and t.after == m
    done = through(m, STEPS[2:])
    assert not mfg.complete_step(done, "cryopreservation").changed


def test_no_step_before_receipt_or_after_rejection() -> None:
    with pytest.raises(Conflict):
        mfg.complete_step(Manufacturing(), "activation")
    held = mfg.receive(Manufacturing(), accepted=False).after
    assert held.state == S.HELD_AT_RECEIPT
    with pytest.raises(Conflict):
        mfg.complete_step(held, "activation")
    rejected = mfg.decide_receipt(held, "reject").after
    assert rejected.state == S.REJECTED
    with pytest.raises(Conflict):
        mfg.complete_step(rejected, "activation")


def test_unknown_step_or_disposition_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        mfg.complete_step(received(), "formulation")
    with pytest.raises(ValueError):
        mfg.qc(through(received(), STEPS), "maybe", RETAINS)


def test_a_repeated_receipt_is_a_no_op_and_a_contradicting_one_is_refused() -> None:
    m = received()
    assert not mfg.receive(m, accepted=True).changed
    with pytest.raises(Conflict) as exc:
        mfg.receive(m, accepted=False)
    assert exc.value.field == "accepted"
    held = mfg.receive(Manufacturing(), accepted=False).after
    assert not mfg.receive(held, accepted=False).changed
    with pytest.raises(Conflict) as exc:
        mfg.receive(held, accepted=True)  # held: only QA's disposition releases it
    assert "held" in exc.value.reason
    rejected = mfg.decide_receipt(held, "reject").after
    assert not mfg.receive(rejected, accepted=False).changed
    with pytest.raises(Conflict):
        mfg.receive(rejected, accepted=True)


def test_qc_only_in_qc_pending_and_a_repeated_disposition_is_a_no_op() -> None:
    with pytest.raises(Conflict) as exc:
        mfg.qc(through(received(), STEPS[:3]), "passed", RETAINS)
    assert exc.value.field == "disposition"
    ok = passed()
    assert not mfg.qc(ok, "passed", RETAINS).changed
    with pytest.raises(Conflict):
        mfg.qc(ok, "failed", RETAINS)
    released = mfg.release(ok).after
    with pytest.raises(Conflict):
        mfg.qc(released, "failed", RETAINS)


def test_released_is_no_qc_disposition_and_a_lot_is_released_only_after_qc_passed() -> None:
    with pytest.raises(ValueError):
        mfg.qc(through(received(), STEPS), "released", RETAINS)
    with pytest.raises(Invalid) as exc:  # 422 naming disposition
        mfg.check_qc_report("released", None)
    assert exc.value.errors[0].field == "disposition" and "signed" in exc.value.errors[0].reason
    for m in (through(received(), STEPS), mfg.qc(through(received(), STEPS), "failed", RETAINS).after):
        with pytest.raises(Conflict) as conflict:
            mfg.release(m)
        assert conflict.value.field == "state"


def test_a_passed_qc_carries_results_and_a_certificate_and_no_positive_microbiology() -> None:
    mfg.check_qc_evidence("passed", {"viability_pct": 91.5, "sterility": "negative"}, "COA-1")
    mfg.check_qc_evidence("out_of_specification", None, None)  # only a pass needs its evidence
    cases = [
        ({}, "COA-1", "results"),
        ({"viability_pct": 91.5}, None, "coa_reference"),
        ({"sterility": "positive"}, "COA-1", "results.sterility"),
        ({"mycoplasma": "positive"}, "COA-1", "results.mycoplasma"),
    ]
    for results, coa, field in cases:
        with pytest.raises(Invalid) as exc:
            mfg.check_qc_evidence("passed", results, coa)
        assert exc.value.errors[0].field == field


def test_qa_releases_or_rejects_material_held_at_receipt() -> None:
    held = mfg.receive(Manufacturing(), accepted=False).after
    t = mfg.decide_receipt(held, "release", lot="CH-STEIN-00000007")
    assert t.changed
    assert (t.after.state, t.after.run, t.after.lot) == (S.MATERIAL_RECEIVED, 1, "CH-STEIN-00000007")
    assert not mfg.decide_receipt(t.after, "release").changed  # redelivered
    rejected = mfg.decide_receipt(held, "reject").after
    assert (rejected.state, rejected.run) == (S.REJECTED, 0)
    assert not mfg.decide_receipt(rejected, "reject").changed
    with pytest.raises(Conflict):
        mfg.decide_receipt(held, "release_on_physician_request")  # only for an OOS product
    with pytest.raises(Conflict):
        mfg.decide_receipt(received(), "reject")  # nothing held


@pytest.mark.parametrize(
    ("outcome", "exceptional"), [("release", False), ("release_on_physician_request", True)]
)
def test_qa_releases_an_oos_run_to_qc_passed_where_it_waits_for_the_signed_release(
    outcome: str, exceptional: bool
) -> None:
    oos = mfg.qc(through(received(), STEPS), "out_of_specification", RETAINS).after
    assert oos.retained_material
    t = mfg.decide_oos(oos, outcome, run=1)
    assert t.changed and t.after.state == S.QC_PASSED and t.after.exceptional is exceptional
    assert t.after.lot == oos.lot and not t.after.retained_material
    assert not mfg.decide_oos(t.after, outcome, run=1).changed  # redelivered
    assert mfg.release(t.after).after.exceptional is exceptional
    assert not mfg.decide_oos(oos, "reject", run=1).changed  # reject: the order asks for a new run
    with pytest.raises(Conflict) as exc:
        mfg.decide_oos(oos, outcome, run=2)
    assert exc.value.field == "run"
    with pytest.raises(Conflict):
        mfg.decide_oos(through(received(), STEPS), "release", run=1)  # not out of specification
    with pytest.raises(Conflict):
        mfg.decide_oos(mfg.qc(through(received(), STEPS), "failed", RETAINS).after, "release", run=1)


def test_a_failed_step_loses_the_run_and_keeps_material_when_the_product_retains_it() -> None:
    m = through(received(), ["activation"])
    t = mfg.fail_step(m, "transduction", RETAINS)
    assert t.after.state == S.FAILED
    assert t.after.failed_step == "transduction"
    assert t.after.retained_material
    assert not mfg.fail_step(t.after, "transduction", RETAINS).changed  # the same failure again
    with pytest.raises(Conflict):
        mfg.fail_step(t.after, "expansion", RETAINS)
    with pytest.raises(Conflict):
        mfg.complete_step(t.after, "transduction")
    assert not mfg.fail_step(m, "transduction", NO_RETAIN).after.retained_material


def test_only_the_step_in_progress_can_fail() -> None:
    m = through(received(), ["activation"])
    with pytest.raises(Conflict):
        mfg.fail_step(m, "activation", RETAINS)  # already done
    with pytest.raises(Conflict):
        mfg.fail_step(m, "harvest", RETAINS)  # not started
    with pytest.raises(Conflict):
        mfg.fail_step(through(received(), STEPS), "cryopreservation", RETAINS)  # QC decides now


def test_remanufacture_starts_run_two_from_retained_material_and_run_two_retains_nothing() -> None:
    oos = mfg.qc(through(received(), STEPS), "out_of_specification", RETAINS).after
    assert oos.retained_material
    t = mfg.remanufacture(oos, 2, lot="CH-STEIN-00000002")
    assert t.changed
    assert (t.after.state, t.after.run, t.after.steps_completed) == (S.MATERIAL_RECEIVED, 2, 0)
    assert t.after.lot == "CH-STEIN-00000002" != oos.lot  # a new run, a new lot
    assert not mfg.remanufacture(t.after, 2).changed  # the same command again
    second = mfg.qc(through(t.after, STEPS), "failed", RETAINS).after
    assert second.state == S.FAILED and second.run == 2
    assert not second.retained_material  # max_runs 2: nothing left
    with pytest.raises(Conflict) as exc:
        mfg.remanufacture(second, 3)
    assert exc.value.field == "run"


def test_no_remanufacture_without_retained_material_or_while_running() -> None:
    failed = mfg.qc(through(received(), STEPS), "failed", NO_RETAIN).after
    with pytest.raises(Conflict):
        mfg.remanufacture(failed, 2)
    with pytest.raises(Conflict):
        mfg.remanufacture(through(received(), STEPS[:2]), 2)


@pytest.mark.parametrize("done", range(len(STEPS) + 1))
def test_stop_ends_a_running_manufacture(done: int) -> None:
    m = through(received(), STEPS[:done])
    t = mfg.stop(m)
    assert t.changed and t.after.state == S.STOPPED
    assert not mfg.stop(t.after).changed


@pytest.mark.parametrize(
    "m", [passed(), mfg.receive(Manufacturing(), accepted=False).after], ids=["qc_passed", "held"]
)
def test_stop_ends_a_lot_waiting_for_release_and_material_held_at_receipt(m: Manufacturing) -> None:
    t = mfg.stop(m)
    assert t.changed and t.after.state == S.STOPPED


@pytest.mark.parametrize(
    "m",
    [
        Manufacturing(),
        mfg.decide_receipt(mfg.receive(Manufacturing(), accepted=False).after, "reject").after,
        mfg.release(passed()).after,
        mfg.qc(through(received(), STEPS), "failed", RETAINS).after,
    ],
    ids=["awaiting", "rejected", "released", "failed"],
)
def test_stop_leaves_anything_not_running_alone(m: Manufacturing) -> None:
    assert not mfg.stop(m).changed


@pytest.mark.parametrize(("run", "expected"), [(1, True), (2, False), (3, False)])
def test_retained_material_is_product_config_and_runs_left(run: int, expected: bool) -> None:
    assert RETAINS.retained_after(run) is expected
    assert NO_RETAIN.retained_after(run) is False


# ---- any sequence -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str
    arg: Any = None


ops = st.one_of(
    st.builds(Op, st.just("receive"), st.booleans()),
    st.builds(Op, st.just("step"), st.sampled_from(STEPS)),
    st.builds(Op, st.just("fail"), st.sampled_from(STEPS)),
    st.builds(Op, st.just("qc"), st.sampled_from(sorted(DISPOSITION_STATE))),
    st.builds(Op, st.just("remanufacture"), st.integers(min_value=0, max_value=4)),
    st.builds(Op, st.just("stop")),
    st.builds(Op, st.just("receipt_decision"), st.sampled_from(mfg.OUTCOMES)),
    st.builds(Op, st.just("oos_decision"), st.tuples(st.sampled_from(mfg.OUTCOMES), st.integers(1, 3))),
    st.builds(Op, st.just("release")),
)
# mostly well-formed runs (receipt, steps in order) with noise mixed in, plus pure noise
happy = st.just([Op("receive", True), *(Op("step", s) for s in STEPS)])
sequences = st.lists(ops, max_size=40) | st.tuples(happy, st.lists(ops, max_size=25)).flatmap(
    lambda t: st.permutations(t[0] + t[1]).map(list) | st.just(t[0] + t[1])
)


def apply(m: Manufacturing, op: Op, rules: Rules) -> Transition:
    match op.kind:
        case "receive":
            return mfg.receive(m, op.arg)
        case "step":
            return mfg.complete_step(m, op.arg)
        case "fail":
            return mfg.fail_step(m, op.arg, rules)
        case "qc":
            return mfg.qc(m, op.arg, rules)
        case "remanufacture":
            return mfg.remanufacture(m, op.arg, lot=f"LOT-{op.arg:04d}")
        case "receipt_decision":
            return mfg.decide_receipt(m, op.arg, lot="LOT-0001")
        case "oos_decision":
            return mfg.decide_oos(m, *op.arg)
        case "release":
            return mfg.release(m)
        case _:
            return mfg.stop(m)


def check_consistent(m: Manufacturing, rules: Rules) -> None:
    assert isinstance(m.state, State)
    assert 0 <= m.steps_completed <= len(STEPS)
    if m.state in {S.AWAITING_MATERIAL, S.REJECTED, S.HELD_AT_RECEIPT}:
        assert (m.run, m.steps_completed) == (0, 0)
    elif m.state == S.STOPPED and m.run == 0:  # material held at receipt, then the order ended
        assert m.steps_completed == 0 and m.lot is None
    else:
        assert m.run >= 1
    if m.state in STATE_AFTER:
        assert m.state == STATE_AFTER[m.steps_completed]
    if m.state in {S.RELEASED, S.OUT_OF_SPECIFICATION, S.QC_PASSED}:
        assert m.steps_completed == len(STEPS)
    if m.exceptional:
        assert m.state in {S.QC_PASSED, S.RELEASED, S.STOPPED}
    if m.state == S.FAILED:
        if m.failed_step is None:
            assert m.steps_completed == len(STEPS)  # failed at QC
        else:
            assert STEPS[m.steps_completed] == m.failed_step
    else:
        assert m.failed_step is None
    if m.retained_material:
        assert m.state in {S.OUT_OF_SPECIFICATION, S.FAILED}
        assert rules.retains_material and m.run < rules.max_runs


@settings(max_examples=400)
@given(sequences, st.sampled_from([RETAINS, NO_RETAIN, Rules(retains_material=True, max_runs=3)]))
def test_no_sequence_reaches_an_illegal_state(sequence: list[Op], rules: Rules) -> None:
    m = Manufacturing()
    completed_this_run: list[str] = []
    remanufactures = 0
    for op in sequence:
        try:
            t = apply(m, op, rules)
        except Conflict:
            continue  # refused: nothing changes
        assert t.before == m
        after = t.after
        if not t.changed:
            assert after == m
            continue
        assert (m.state, after.state) in LEGAL, f"{m.state} -> {after.state} by {op}"
        assert m.state not in ABSORBING
        assert after.run >= m.run
        if m.run == 0 and after.run != 0:  # run 1 starts only at an accepted receipt (or QA's release)
            assert op in (Op("receive", True), Op("receipt_decision", "release")) and after.run == 1
            if op.kind == "receipt_decision":
                assert m.state == S.HELD_AT_RECEIPT
        elif after.run != m.run:  # a later run: only from lost material that was retained
            assert op.kind == "remanufacture" and after.run == op.arg
            assert m.state in {S.OUT_OF_SPECIFICATION, S.FAILED} and m.retained_material
            remanufactures += 1
            completed_this_run = []
        if after.state == S.RELEASED:  # only a lot that passed QC (or QA released) is released
            assert op.kind == "release" and m.state == S.QC_PASSED
        if op.kind == "step":
            completed_this_run.append(op.arg)
            assert tuple(completed_this_run) == STEPS[: len(completed_this_run)]  # only in order
        check_consistent(after, rules)
        m = after
    # retained material allows at most max_runs - 1 remanufactures, and none without it
    assert remanufactures <= (rules.max_runs - 1 if rules.retains_material else 0)


# ---- the product catalogue ------------------------------------------------------------------------
# Product facts come from the one shared catalogue (v2v_contracts.reference), the source the order
# service reads too; the site keeps no copy of its own.


def test_the_site_keeps_no_copy_of_the_product_facts_and_knows_every_catalogue_product() -> None:
    assert SEED.name == "sites.yaml"
    assert not (SEED.parent / "manufacturing.yaml").exists()
    assert known_products() == set(product_catalogue())
    assert rules_for("TISA-CEL").retains_material is True
    assert rules_for("AXI-CEL").retains_material is False
    assert rules_for("CILTA-CEL").retains_material is True


def test_the_rules_agree_with_the_catalogue_on_retained_material_and_runs() -> None:
    for code, product in product_catalogue().items():
        assert rules_for(code).retains_material == product.retains_material, code
        assert rules_for(code).max_runs == product.max_runs, code


def test_every_site_capacity_is_for_a_known_product() -> None:
    for entry in yaml.safe_load(SEED.read_text()):
        assert set(site_from_seed(entry).daily_capacity) <= known_products()


def test_unknown_products_retain_nothing_and_bad_runs_are_refused(tmp_path: Any) -> None:
    assert rules_for("NOPE") == Rules()
    assert rules_for(None).retains_material is False
    with pytest.raises(ValueError):
        Rules(retains_material=True, max_runs=0)
    bad = tmp_path / "products.yaml"
    bad.write_text(
        "- {code: X, name: x, apheresis_material: fresh, manufacturing_days: 1, qc_days: 0,"
        " retains_material: true, max_runs: 0, max_recollections: 0}\n"
    )
    with pytest.raises(ValueError):
        load_products(bad)


def test_a_manufacturing_conflict_is_a_domain_conflict_with_todays_problem() -> None:
    with pytest.raises(DomainConflict) as exc:
        mfg.complete_step(received(), "transduction")
    err = exc.value
    assert (err.kind, err.title) == ("conflict", "Conflict with the current state")
    assert err.detail == "step: steps come in order: the next step is activation, not transduction"
    assert [e.as_dict() for e in err.errors] == [
        {"field": "step", "reason": "steps come in order: the next step is activation, not transduction"}
    ]
