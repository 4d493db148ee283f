"""Manufacturing of one booking's material at a site, as a pure state machine (no I/O).

```
awaiting_material ─▶ material_received ─▶ activation ─▶ transduction ─▶ expansion ─▶ harvest
   │      ▲ (QA: release)     ▲    │ (a step fails: failed)                               │
   ▼      │                   │    ▼                             cryopreservation done  ▼
 held_at_receipt ─(QA: reject)─▶ rejected   stopped ◀── (order cancelled/failed) ── qc_pending
                              │                                                       │ passed
                              └── remanufacture (run N, new lot) ◀── out_of_specification | failed
                                                                          │ QA: release[_on_physician_request]
                                                                          ▼                   ▼
                                                   released ◀── every signature ── qc_passed
```

A state named after a step means that step is the last one completed in the current run; completing
`cryopreservation`, the last step, puts the run into `qc_pending` (as the order service reads it).
Steps come strictly in `STEPS` order; a step already completed in this run is a duplicate (no-op),
a step further ahead is refused (`ManufacturingConflict` on `step`). Every function returns a `Transition`;
`changed=False` means "already so, nothing to record or publish".

Issue 10 (release as it is done): each run has its own **lot** (run 1 from the receipt, a new lot per
remanufacture; the lot number is issued by the caller, this module only carries it). QC no longer
releases: `passed` puts the run into `qc_passed`, where it waits for the signed release (quality unit,
21 CFR 211.22; or a Qualified Person's certification, EU GMP Annex 16); only `release` (called once every
required signature is there) makes it `released`. Material at risk is held, not lost: a refused receipt
holds the material (`held_at_receipt`) until QA's disposition (release: run 1 starts; reject: rejected);
an out-of-specification run that QA releases (or releases on the physician's request: `exceptional`)
goes to `qc_passed` and waits for the signed release like any other.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, get_args

from v2v_contracts.coi import coi_problem
from v2v_contracts.errors import Conflict, Invalid
from v2v_contracts.events import QcFinding, ReceiptRejection, StepFailure


class State(StrEnum):
    AWAITING_MATERIAL = "awaiting_material"
    MATERIAL_RECEIVED = "material_received"
    ACTIVATION = "activation"
    TRANSDUCTION = "transduction"
    EXPANSION = "expansion"
    HARVEST = "harvest"
    QC_PENDING = "qc_pending"
    QC_PASSED = "qc_passed"  # QC passed (or QA released an OOS run): waiting for the signed release
    HELD_AT_RECEIPT = "held_at_receipt"  # refused at receipt, held until QA's disposition
    RELEASED = "released"
    OUT_OF_SPECIFICATION = "out_of_specification"
    FAILED = "failed"
    REJECTED = "rejected"
    STOPPED = "stopped"


S = State
STEPS: tuple[str, ...] = ("activation", "transduction", "expansion", "harvest", "cryopreservation")
# the state after the n-th step of a run is done (index = number of steps completed)
STATE_AFTER: tuple[State, ...] = (
    S.MATERIAL_RECEIVED,
    S.ACTIVATION,
    S.TRANSDUCTION,
    S.EXPANSION,
    S.HARVEST,
    S.QC_PENDING,
)
IN_STEPS = frozenset(STATE_AFTER[:-1])  # a step is in progress: material_received .. harvest
# material at the site, product not yet released: an order's cancellation stops these
RUNNING = frozenset({*STATE_AFTER, S.QC_PASSED, S.HELD_AT_RECEIPT})
LOST = frozenset({S.OUT_OF_SPECIFICATION, S.FAILED})  # a remanufacture may follow
FINAL = frozenset({S.RELEASED, S.REJECTED, S.STOPPED})
Disposition = Literal["passed", "out_of_specification", "failed"]
DISPOSITION_STATE: dict[str, State] = {
    "passed": S.QC_PASSED,
    "out_of_specification": S.OUT_OF_SPECIFICATION,
    "failed": S.FAILED,
}
# QA's outcomes of material at risk (`order.disposition_decided.v1`)
Outcome = Literal["release", "release_on_physician_request", "reject"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
# the reason codes an MES report may give (no free text: the detail stays in the site's quality system)
RECEIPT_REJECTIONS: tuple[str, ...] = get_args(ReceiptRejection)
STEP_FAILURES: tuple[str, ...] = get_args(StepFailure)
QC_FINDINGS: tuple[str, ...] = get_args(QcFinding)


@dataclass(frozen=True)
class Rules:
    """Per product, from the shared product catalogue (`service_layer.products.rules_for`)."""

    retains_material: bool = False  # part of the apheresis material is kept for a remanufacture
    max_runs: int = 1  # runs the material allows (1 = no remanufacture)

    def __post_init__(self) -> None:
        if self.max_runs < 1:
            raise ValueError("max_runs must be at least 1")

    def retained_after(self, run: int) -> bool:
        """Whether retained material is left for another run once `run` is lost."""
        return self.retains_material and run < self.max_runs


@dataclass(frozen=True)
class Manufacturing:
    state: State = S.AWAITING_MATERIAL
    run: int = 0  # 1 from the receipt on; N for the (N-1)-th remanufacture
    steps_completed: int = 0  # in the current run
    failed_step: str | None = None  # the step that failed (None: failed at QC, or not failed)
    retained_material: bool = False  # known when the run is lost: material left for another run
    lot: str | None = None  # the current run's lot (None before a run starts)
    exceptional: bool = False  # the run was released by QA after OOS on the physician's request

    @property
    def next_step(self) -> str | None:
        return STEPS[self.steps_completed] if self.state in IN_STEPS else None


@dataclass(frozen=True)
class Transition:
    before: Manufacturing
    after: Manufacturing
    changed: bool


@dataclass(frozen=True)
class Manufacture:
    """One booking's manufacture at a site: whose material it is, and where its state machine stands."""

    booking_id: uuid.UUID
    order_id: uuid.UUID
    coi: str
    treatment_center_id: str
    site_id: str
    product_code: str | None
    state: Manufacturing
    received_at: datetime | None = None
    qc_results: dict[str, Any] | None = None  # the current run's QC summary (numbers and codes)
    coa_reference: str | None = None  # its certificate of analysis (an opaque document id)
    din: str | None = None  # the DIN of the bag received (verified at receipt; None: not presented)

    def ref(self) -> dict[str, Any]:
        """The order references every event about this manufacture carries."""
        return {"order_id": self.order_id, "coi": self.coi, "treatment_center_id": self.treatment_center_id}


class ManufacturingConflict(Conflict):
    """The manufacturing state does not allow the request (a 409 "conflict" naming `field`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


# ---- what an MES report must carry (checked before any state is read) ---------------------------------


def _reason(reason: str | None, codes: tuple[str, ...], needed: bool, when: str) -> str | None:
    """The reason code of a report: one of `codes` when `needed`, else none at all."""
    if not needed:
        if reason is not None:
            raise Invalid("reason", f"is given only when {when}")
        return None
    if reason is None:
        raise Invalid("reason", f"is required when {when}")
    if reason not in codes:
        raise Invalid("reason", f"must be one of {', '.join(codes)}")
    return reason


def check_receipt(coi: str, accepted: bool, reason: str | None) -> str | None:
    """A receipt names a well-formed COI, and a `ReceiptRejection` code exactly when the material is
    refused; returns the code."""
    problem = coi_problem(coi)
    if problem:
        raise Invalid("coi", problem)
    return _reason(reason, RECEIPT_REJECTIONS, not accepted, "the material is refused")


def check_step_report(step: str, failed: bool, reason: str | None) -> str | None:
    """A step report names a known step, and a `StepFailure` code exactly when it failed; the code."""
    if step not in STEPS:
        raise Invalid("step", f"must be one of {', '.join(STEPS)}")
    return _reason(reason, STEP_FAILURES, failed, "a step failed")


RELEASE_IS_SIGNED = (
    "release is a signed step, not a QC disposition: report passed, then sign the release "
    "(POST .../manufacturing/{order_id}/release)"
)


def check_qc_report(disposition: str, reason: str | None) -> str | None:
    """A QC report names a known disposition (`released` is refused: release is signed), and a
    `QcFinding` code unless passed; the code."""
    if disposition == "released":
        raise Invalid("disposition", RELEASE_IS_SIGNED)
    if disposition not in DISPOSITION_STATE:
        raise Invalid("disposition", f"must be one of {', '.join(DISPOSITION_STATE)}")
    return _reason(reason, QC_FINDINGS, disposition != "passed", "QC did not pass")


# what a QC report's `results` may say about the microbiological tests that must be negative to pass
MUST_BE_NEGATIVE = ("sterility", "mycoplasma")


def check_qc_evidence(disposition: str, results: dict[str, Any] | None, coa_reference: str | None) -> None:
    """A passed QC carries its results summary and the certificate of analysis it is documented in; a
    microbiological test named positive cannot pass (21 CFR 211.165(a), 610.12; Ph. Eur. 2.6.1)."""
    if disposition != "passed":
        return
    if not results:
        raise Invalid("results", "a passed QC carries its results summary")
    if not coa_reference:
        raise Invalid("coa_reference", "a passed QC names its certificate of analysis")
    for test in MUST_BE_NEGATIVE:
        if results.get(test) == "positive":
            raise Invalid(f"results.{test}", "a positive result cannot pass QC")


def step_failed_reason(step: str, failure: str) -> str:
    """The reason code of `site.manufacturing_failed` for a failed step: `step_failed:<step>:<code>`."""
    return f"step_failed:{step}:{failure}"


def qc_failed_reason(finding: str) -> str:
    """The reason code of `site.manufacturing_failed` for a failed QC: `qc_failed:<code>`."""
    return f"qc_failed:{finding}"


# ---- the transitions ------------------------------------------------------------------------------


def _same(m: Manufacturing) -> Transition:
    return Transition(m, m, changed=False)


def _to(m: Manufacturing, **changes: object) -> Transition:
    return Transition(m, dataclasses.replace(m, **changes), changed=True)  # type: ignore[arg-type]


def receive(m: Manufacturing, accepted: bool, lot: str | None = None) -> Transition:
    """The material arrived: accepted starts run 1 (lot `lot`); refused holds it for QA's disposition
    (`held_at_receipt`). A repeated receipt is a no-op."""
    if m.state == S.AWAITING_MATERIAL:
        if accepted:
            return _to(m, state=S.MATERIAL_RECEIVED, run=1, steps_completed=0, lot=lot)
        return _to(m, state=S.HELD_AT_RECEIPT)
    if m.state in (S.HELD_AT_RECEIPT, S.REJECTED):
        if accepted:
            raise ManufacturingConflict(
                "accepted",
                "the material was refused at receipt: it is held until QA's disposition"
                if m.state == S.HELD_AT_RECEIPT
                else "the material was already rejected at receipt",
            )
        return _same(m)
    if not accepted:
        raise ManufacturingConflict(
            "accepted", f"the material was already accepted (manufacturing is {m.state})"
        )
    return _same(m)


def step_index(step: str) -> int:
    if step not in STEPS:
        raise ValueError(f"unknown manufacturing step {step!r}")
    return STEPS.index(step)


def complete_step(m: Manufacturing, step: str) -> Transition:
    index = step_index(step)
    if m.run >= 1 and index < m.steps_completed:
        return _same(m)  # already completed in this run: a duplicate report
    if m.state not in IN_STEPS:
        raise ManufacturingConflict("step", f"no step can complete while manufacturing is {m.state}")
    if index != m.steps_completed:
        raise ManufacturingConflict(
            "step", f"steps come in order: the next step is {m.next_step}, not {step}"
        )
    done = index + 1
    return _to(m, state=STATE_AFTER[done], steps_completed=done)


def fail_step(m: Manufacturing, step: str, rules: Rules) -> Transition:
    """The step in progress failed: the run is lost."""
    index = step_index(step)
    if m.state == S.FAILED and m.failed_step == step:
        return _same(m)
    if m.state not in IN_STEPS:
        raise ManufacturingConflict("step", f"no step is in progress while manufacturing is {m.state}")
    if index != m.steps_completed:
        raise ManufacturingConflict("step", f"the step in progress is {m.next_step}, not {step}")
    return _to(m, state=S.FAILED, failed_step=step, retained_material=rules.retained_after(m.run))


def qc(m: Manufacturing, disposition: str, rules: Rules) -> Transition:
    """QC's disposition of the run's product; only in `qc_pending`. A repeated disposition is a no-op."""
    if disposition not in DISPOSITION_STATE:
        raise ValueError(f"unknown QC disposition {disposition!r}")
    target = DISPOSITION_STATE[disposition]
    if m.state == target and m.steps_completed == len(STEPS) and m.failed_step is None:
        return _same(m)
    if m.state != S.QC_PENDING:
        raise ManufacturingConflict(
            "disposition", f"QC decides only in qc_pending; manufacturing is {m.state}"
        )
    retained = target in LOST and rules.retained_after(m.run)
    return _to(m, state=target, retained_material=retained)


def decide_receipt(m: Manufacturing, outcome: str, lot: str | None = None) -> Transition:
    """QA's disposition of material held at receipt: release starts run 1 (lot `lot`), reject rejects
    it. A repeated decision is a no-op; material not held is left alone (a conflict)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown disposition outcome {outcome!r}")
    if outcome == "release_on_physician_request":
        raise ManufacturingConflict("outcome", "a release on physician request is only for an OOS product")
    if m.state == S.HELD_AT_RECEIPT:
        if outcome == "release":
            return _to(m, state=S.MATERIAL_RECEIVED, run=1, steps_completed=0, lot=lot)
        return _to(m, state=S.REJECTED)
    if (outcome == "reject" and m.state == S.REJECTED) or (outcome == "release" and m.run >= 1):
        return _same(m)  # already decided (a redelivered decision)
    raise ManufacturingConflict("outcome", f"no material is held at receipt; manufacturing is {m.state}")


def decide_oos(m: Manufacturing, outcome: str, run: int) -> Transition:
    """QA's disposition of run `run` found out of specification: release (or release on the physician's
    request: `exceptional`) puts it into `qc_passed`, waiting for the signed release; reject leaves it out
    of specification (the order requests a remanufacture or a recollection). Repeated: a no-op."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown disposition outcome {outcome!r}")
    if run != m.run:
        raise ManufacturingConflict("run", f"the current run is {m.run}, not {run}")
    exceptional = outcome == "release_on_physician_request"
    if m.state == S.OUT_OF_SPECIFICATION:
        if outcome == "reject":
            return _same(m)
        return _to(m, state=S.QC_PASSED, exceptional=exceptional, retained_material=False)
    if m.state in (S.QC_PASSED, S.RELEASED) and outcome != "reject" and m.exceptional == exceptional:
        return _same(m)
    raise ManufacturingConflict(
        "outcome", f"run {run} is not out of specification awaiting QA; manufacturing is {m.state}"
    )


def release(m: Manufacturing) -> Transition:
    """Every signature the release needs is there: the lot is released. Only from `qc_passed`."""
    if m.state == S.RELEASED:
        return _same(m)
    if m.state != S.QC_PASSED:
        raise ManufacturingConflict(
            "state", f"a lot is released only after QC passed (qc_passed); manufacturing is {m.state}"
        )
    return _to(m, state=S.RELEASED)


def remanufacture(
    m: Manufacturing, run: int, rules: Rules | None = None, lot: str | None = None
) -> Transition:
    """Start run `run` (with its own lot `lot`) from retained material (no new receipt). A run already
    started is a no-op.

    Also after release, when QA rejects the product (a quarantine after a shipping excursion)."""
    if run <= m.run:
        return _same(m)
    rejected_after_release = m.state == S.RELEASED and rules is not None and rules.retained_after(m.run)
    if m.state not in LOST and not rejected_after_release:
        raise ManufacturingConflict(
            "run", f"a new run starts only after OOS, failure or rejection; manufacturing is {m.state}"
        )
    if not (m.retained_material or rejected_after_release):
        raise ManufacturingConflict("run", "no retained material is left for another run")
    return _to(
        m,
        state=S.MATERIAL_RECEIVED,
        run=run,
        steps_completed=0,
        failed_step=None,
        retained_material=False,
        lot=lot,
        exceptional=False,
    )


def stop(m: Manufacturing) -> Transition:
    """The order was cancelled or failed: stop a running manufacture; anything else stays as it is."""
    if m.state in RUNNING:
        return _to(m, state=S.STOPPED)
    return _same(m)
