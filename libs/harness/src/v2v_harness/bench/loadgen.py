"""The open model: requests leave at scheduled times, whatever the answers are doing.

A send never waits for an earlier answer. The number of requests in flight is bounded; a send that
finds the bound reached is not made and counts as an error (`overflow`), so a saturated system shows
up as errors instead of silently slowing the generator down (which would turn it into a closed model).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from v2v_harness.bench.stats import summarise


@dataclass
class LoopResult:
    scheduled: int
    fired: int = 0
    overflow: int = 0  # sends skipped because max_inflight requests were outstanding
    exceptions: int = 0  # fire() raised
    elapsed_s: float = 0.0
    lateness_ms: dict[str, Any] = field(default_factory=dict)  # how late sends left vs. the schedule


async def open_loop(
    offsets: Sequence[float],
    fire: Callable[[int], Awaitable[None]],
    *,
    max_inflight: int,
    wait_for_answers: bool = True,
    stop: Callable[[], bool] | None = None,
) -> LoopResult:
    """Call `fire(i)` at `start + offsets[i]` for every i, each in its own task; with `stop`, end the
    schedule early at the first send time at which `stop()` is true (`scheduled` is then what was due)."""
    loop = asyncio.get_running_loop()
    result = LoopResult(scheduled=len(offsets))
    inflight: set[asyncio.Task[None]] = set()
    lateness: list[float] = []

    async def guarded(i: int) -> None:
        try:
            await fire(i)
        except Exception:
            result.exceptions += 1

    start = loop.time()
    for i, offset in enumerate(offsets):
        due = start + offset
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if stop is not None and stop():
            result.scheduled = i
            break
        lateness.append(max(0.0, loop.time() - due) * 1000.0)
        if len(inflight) >= max_inflight:
            result.overflow += 1
            continue
        task = asyncio.create_task(guarded(i))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        result.fired += 1
    if wait_for_answers and inflight:
        await asyncio.gather(*inflight)
    result.elapsed_s = loop.time() - start
    result.lateness_ms = summarise(lateness)
    return result
