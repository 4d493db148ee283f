"""`make bench`: the open model sends on schedule, never waiting for answers, and bounds what is in flight."""

from __future__ import annotations

import asyncio
import time

from v2v_harness.bench.loadgen import open_loop
from v2v_harness.bench.stats import send_schedule


async def test_sends_leave_on_schedule_while_answers_are_slow() -> None:
    fired_at: list[float] = []
    answered = 0

    async def slow(_i: int) -> None:
        nonlocal answered
        fired_at.append(time.perf_counter())
        await asyncio.sleep(0.3)  # far longer than the gap between sends
        answered += 1

    start = time.perf_counter()
    result = await open_loop(send_schedule(100, 0.2), slow, max_inflight=1000)
    assert result.scheduled == result.fired == 20
    assert result.overflow == 0 and result.exceptions == 0
    assert answered == 20  # it waits for the answers at the end
    # all 20 left within the 0.2 s window (plus scheduling slack), not one per 0.3 s answer
    assert fired_at[-1] - start < 0.2 + 0.15
    assert result.lateness_ms["count"] == 20


async def test_a_send_beyond_the_in_flight_bound_is_an_error_not_a_wait() -> None:
    release = asyncio.Event()

    async def stuck(_i: int) -> None:
        await release.wait()

    task = asyncio.create_task(open_loop(send_schedule(200, 0.1), stuck, max_inflight=5))
    await asyncio.sleep(0.25)
    release.set()
    result = await task
    assert result.scheduled == 20
    assert result.fired == 5
    assert result.overflow == 15


async def test_exceptions_in_a_send_are_counted() -> None:
    async def boom(i: int) -> None:
        if i % 2:
            raise RuntimeError("no")

    result = await open_loop(send_schedule(200, 0.05), boom, max_inflight=100)
    assert result.fired == 10
    assert result.exceptions == 5


async def test_stop_ends_the_schedule_early_and_counts_only_what_was_due() -> None:
    fired: list[int] = []

    async def note(i: int) -> None:
        fired.append(i)

    result = await open_loop(send_schedule(100, 1.0), note, max_inflight=100, stop=lambda: len(fired) >= 7)
    assert result.scheduled == result.fired == 7
    assert sorted(fired) == list(range(7))
    assert result.elapsed_s < 0.5
