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
a step further ahead is refused (`Conflict` on `step`). Every function returns a `Transition`;
`changed=False` means "already so, nothing to record or publish".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


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


@dataclass(frozen=True)
class Rules:
    """Per product, from `seed/manufacturing.yaml`."""

    retains_material: bool = False  # part of the apheresis material is kept for a remanufacture
    max_runs: int = 1  # runs the material allows (1 = no remanufacture)

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


class Conflict(Exception):
    """The manufacturing state does not allow the request (an HTTP 409 naming `field`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


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
            raise Conflict("accepted", "the material was already rejected at receipt")
        return _same(m)
    if not accepted:
        raise Conflict("accepted", f"the material was already accepted (manufacturing is {m.state})")
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
        raise Conflict("step", f"no step can complete while manufacturing is {m.state}")
    if index != m.steps_completed:
        raise Conflict("step", f"steps come in order: the next step is {m.next_step}, not {step}")
    done = index + 1
    return _to(m, state=STATE_AFTER[done], steps_completed=done)


def fail_step(m: Manufacturing, step: str, rules: Rules) -> Transition:
    """The step in progress failed: the run is lost."""
    index = step_index(step)
    if m.state == S.FAILED and m.failed_step == step:
        return _same(m)
    if m.state not in IN_STEPS:
        raise Conflict("step", f"no step is in progress while manufacturing is {m.state}")
    if index != m.steps_completed:
        raise Conflict("step", f"the step in progress is {m.next_step}, not {step}")
    return _to(m, state=S.FAILED, failed_step=step, retained_material=rules.retained_after(m.run))


def qc(m: Manufacturing, disposition: str, rules: Rules) -> Transition:
    """QC's disposition of the run's product; only in `qc_pending`. A repeated disposition is a no-op."""
    if disposition not in DISPOSITION_STATE:
        raise ValueError(f"unknown QC disposition {disposition!r}")
    target = DISPOSITION_STATE[disposition]
    if m.state == target and m.steps_completed == len(STEPS) and m.failed_step is None:
        return _same(m)
    if m.state != S.QC_PENDING:
        raise Conflict("disposition", f"QC decides only in qc_pending; manufacturing is {m.state}")
    retained = target in LOST and rules.retained_after(m.run)
    return _to(m, state=target, retained_material=retained)


def remanufacture(m: Manufacturing, run: int, rules: Rules | None = None) -> Transition:
    """Start run `run` from retained material (no new receipt). A run already started is a no-op.

    Also after release, when QA rejects the product (a quarantine after a shipping excursion)."""
    if run <= m.run:
        return _same(m)
    rejected_after_release = m.state == S.RELEASED and rules is not None and rules.retained_after(m.run)
    if m.state not in LOST and not rejected_after_release:
        raise Conflict(
            "run", f"a new run starts only after OOS, failure or rejection; manufacturing is {m.state}"
        )
    if not (m.retained_material or rejected_after_release):
        raise Conflict("run", "no retained material is left for another run")
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
