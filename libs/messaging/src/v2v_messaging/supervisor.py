"""Supervised background loops: restarted with backoff when they crash, watched for heartbeats.

    supervisor = Supervisor(backoff_initial_s=0.5, backoff_max_s=30, stall_after_s=60)
    supervisor.spawn("outbox-relay", relay.run, beats=True)      # run(heartbeat) beats on every pass
    supervisor.spawn("webhooks", lambda hb: job(rt))              # a loop that does not know about beats
    ...
    supervisor.problems()   # {"outbox-relay": "dead: ...", "webhooks": "stuck: ..."}: what /ready shows

A loop that raises is logged, counted (`v2v.background.restarts`) and started again after an exponential,
capped, jittered backoff (reset once a run has lasted a while). A loop that returns has finished and is
not restarted. A loop that beats (`heartbeat.beat()`; spawned with `beats=True`, or from its first beat
on) is *stuck* when it has not beaten for longer than its `stall_after_s`. Inside a supervised loop,
`current_heartbeat()` is that loop's heartbeat (for loops that only get the runtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from v2v_observability import get_logger, meter
from v2v_observability import names as tn

log = get_logger(__name__)
RESTARTS = meter(tn.METER_MESSAGING).create_counter(
    tn.BACKGROUND_RESTARTS, description="Background loops restarted after a crash, by loop"
)


class Heartbeat:
    """What a loop calls to say it is making progress."""

    def __init__(self, name: str, *, expects_beats: bool = False) -> None:
        self.name = name
        self.expects_beats = expects_beats  # stuck detection applies (before the first beat too)
        self.last_beat = time.monotonic()
        self.beats = 0

    def beat(self) -> None:
        self.last_beat = time.monotonic()
        self.beats += 1
        self.expects_beats = True

    def reset(self) -> None:
        self.last_beat = time.monotonic()

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.last_beat


_CURRENT: contextvars.ContextVar[Heartbeat | None] = contextvars.ContextVar("v2v_heartbeat", default=None)


def current_heartbeat() -> Heartbeat:
    """The heartbeat of the supervised loop running this code (a detached one outside any)."""
    hb = _CURRENT.get()
    return hb if hb is not None else Heartbeat("unsupervised")


Loop = Callable[[Heartbeat], Awaitable[None]]


@dataclass
class LoopHealth:
    name: str
    state: str = "starting"  # running | backoff (crashed, restarting) | finished | stopped
    restarts: int = 0
    last_error: str | None = None
    crashed_at: float | None = None  # monotonic
    last_backoff_s: float = 0.0  # the wait before the latest restart
    stall_after_s: float = 60.0
    heartbeat: Heartbeat = field(default_factory=lambda: Heartbeat(""))

    def problem(self) -> str | None:
        """None when healthy, else why not (for /ready)."""
        if self.state == "backoff":
            return f"dead: {self.last_error} (restarts: {self.restarts})"
        if self.state == "stopped":
            return "stopped"
        if self.state == "running" and self.heartbeat.expects_beats:
            age = self.heartbeat.age_s
            if age > self.stall_after_s:
                return f"stuck: no heartbeat for {age:.0f}s"
        return None

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_heartbeat_age_s": round(self.heartbeat.age_s, 3),
            "problem": self.problem(),
        }


class Supervisor:
    def __init__(
        self,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stall_after_s: float = 60.0,
        healthy_after_s: float = 30.0,
    ) -> None:
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stall_after_s = stall_after_s
        self.healthy_after_s = healthy_after_s  # a run that lasted this long resets the backoff
        self.loops: dict[str, LoopHealth] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def spawn(
        self, name: str, loop: Loop, *, beats: bool = False, stall_after_s: float | None = None
    ) -> Heartbeat:
        """Run `loop(heartbeat)` under supervision; `beats`: it promises to beat (stuck detection)."""
        if name in self.loops:
            raise ValueError(f"a loop named {name!r} is already supervised")
        heartbeat = Heartbeat(name, expects_beats=beats)
        health = LoopHealth(
            name,
            stall_after_s=stall_after_s if stall_after_s is not None else self.stall_after_s,
            heartbeat=heartbeat,
        )
        self.loops[name] = health
        self._tasks[name] = asyncio.create_task(self._supervise(health, loop), name=f"supervised:{name}")
        return heartbeat

    def beat(self, name: str) -> None:
        self.loops[name].heartbeat.beat()

    def health(self) -> dict[str, LoopHealth]:
        return dict(self.loops)

    def problems(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, health in self.loops.items():
            problem = health.problem()
            if problem is not None:
                out[name] = problem
        return out

    async def _supervise(self, health: LoopHealth, loop: Loop) -> None:
        _CURRENT.set(health.heartbeat)  # this task's own context: the loop sees its heartbeat
        backoff = self.backoff_initial_s
        while not self._stopping:
            health.state = "running"
            health.heartbeat.reset()
            started = time.monotonic()
            try:
                await loop(health.heartbeat)
            except asyncio.CancelledError:
                health.state = "stopped"
                raise
            except Exception as exc:
                if self._stopping:
                    break
                if time.monotonic() - started >= self.healthy_after_s:
                    backoff = self.backoff_initial_s
                delay = backoff * (0.75 + random.random() / 2)
                health.state = "backoff"
                health.restarts += 1
                health.last_error = f"{exc.__class__.__name__}: {exc}"[:500]
                health.crashed_at = time.monotonic()
                health.last_backoff_s = delay
                RESTARTS.add(1, {"loop": health.name})
                log.error(
                    "background loop crashed, restarting",
                    loop=health.name,
                    error=repr(exc),
                    restarts=health.restarts,
                    restart_in_s=round(delay, 2),
                    exc_info=exc,
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            health.state = "finished"
            log.info("background loop finished", loop=health.name)
            return
        health.state = "stopped"

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel every loop and wait (at most `timeout`) for them to end."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(tasks, timeout=timeout)
        for health in self.loops.values():
            health.state = "stopped" if health.state != "finished" else health.state
