"""The garbage collector's policy for a long-running service process.

CPython's cyclic collector runs a young collection every 700 net allocations of tracked objects and,
every 10 of those, an older one; every 100 older ones a full collection walks every tracked object
of the process - the hundreds of thousands that FastAPI, pydantic, OpenTelemetry, aiokafka and the
service's own modules made at start-up and keep until the end. A profile of the services under load
(docs/BENCHMARKS.md, "Optimisation round 6") found 3-7 % of a service's main thread in `gc_collect_main`.

So, once start-up is done:
- `gc.freeze()` moves everything alive to the permanent generation, which no collection walks again
  (the start-up objects live as long as the process; nothing is leaked: the frozen objects are still
  freed by reference counting when released);
- the young threshold is raised (`V2V_GC_YOUNG_THRESHOLD`, 0 keeps CPython's): reference counting frees
  almost everything a request or an event allocates, and the collector exists only for cycles, which a
  few thousand more allocations between collections do not make any larger in practice.

The time spent collecting is counted (`collections`, `seconds`), for the benchmark and for tests.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GcStats:
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])  # per generation
    seconds: float = 0.0
    _started: float = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1


STATS = GcStats()


def apply(*, freeze: bool, young_threshold: int) -> tuple[int, int, int]:
    """Freeze what start-up made and set the young threshold (0: unchanged); returns the thresholds."""
    if STATS.callback not in gc.callbacks:
        gc.callbacks.append(STATS.callback)
    if freeze:
        gc.collect()  # what start-up left as garbage is not frozen with the rest
        gc.freeze()
    if young_threshold > 0:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young_threshold, older, oldest)
    return gc.get_threshold()
