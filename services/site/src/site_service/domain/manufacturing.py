"""Manufacturing of one booking's material at a site, as a pure state machine (no I/O).

```
awaiting_material ─▶ material_received ─▶ activation ─▶ transduction ─▶ expansion ─▶ harvest
       │                  ▲    │ (a step fails: failed)                                 │
       ▼                  │    ▼                               cryopreservation done  ▼
    rejected              │  stopped ◀── (order cancelled/failed, while running) ── qc_pending
                          │                                                         │
                          └── remanufacture (run N, retained material) ◀── out_of_specification | failed
                                                                                    │
                                                                                    ▼ released
```

A state named after a step means that step is the last one completed in the current run; completing
`cryopreservation`, the last step, puts the run into `qc_pending` (as the order service reads it).
Steps come strictly in `STEPS` order; a step already completed in this run is a duplicate (no-op),
a step further ahead is refused (`ManufacturingConflict` on `step`). Every function returns a `Transition`;
`changed=False` means "already so, nothing to record or publish".
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
RUNNING = frozenset(STATE_AFTER)  # material received, product not yet dispositioned
LOST = frozenset({S.OUT_OF_SPECIFICATION, S.FAILED})  # a remanufacture may follow
FINAL = frozenset({S.RELEASED, S.REJECTED, S.STOPPED})
Disposition = Literal["released", "out_of_specification", "failed"]
DISPOSITION_STATE: dict[str, State] = {
    "released": S.RELEASED,
    "out_of_specification": S.OUT_OF_SPECIFICATION,
    "failed": S.FAILED,
}
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


def check_qc_report(disposition: str, reason: str | None) -> str | None:
    """A QC report names a known disposition, and a `QcFinding` code unless released; the code."""
    if disposition not in DISPOSITION_STATE:
        raise Invalid("disposition", f"must be one of {', '.join(DISPOSITION_STATE)}")
    return _reason(reason, QC_FINDINGS, disposition != "released", "the product is not released")


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


def receive(m: Manufacturing, accepted: bool) -> Transition:
    """The material arrived: accepted starts run 1, refused rejects it. A repeated receipt is a no-op."""
    if m.state == S.AWAITING_MATERIAL:
        if accepted:
            return _to(m, state=S.MATERIAL_RECEIVED, run=1, steps_completed=0)
        return _to(m, state=S.REJECTED)
    if m.state == S.REJECTED:
        if accepted:
            raise ManufacturingConflict("accepted", "the material was already rejected at receipt")
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


def remanufacture(m: Manufacturing, run: int, rules: Rules | None = None) -> Transition:
    """Start run `run` from retained material (no new receipt). A run already started is a no-op.

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
    )


def stop(m: Manufacturing) -> Transition:
    """The order was cancelled or failed: stop a running manufacture; anything else stays as it is."""
    if m.state in RUNNING:
        return _to(m, state=S.STOPPED)
    return _same(m)
