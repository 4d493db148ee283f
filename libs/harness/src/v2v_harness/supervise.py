"""The harness as a process manager under `make run`: a child that dies (a service, the broker or
Postgres) is restarted with exponential backoff, and every restart is logged.

A child is anything with `alive()` and `restart()`; the backoff doubles after each death up to a cap and
starts again from the bottom once the child has stayed up for `healthy_after_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Child:
    name: str
    alive: Callable[[], bool]
    restart: Callable[[], None]
    describe_exit: Callable[[], str] = lambda: "exited"
    restarts: int = 0
    backoff_s: float = 0.0
    next_try: float | None = None  # when it died: the earliest time of the next restart
    up_since: float | None = None  # since when it has been up (first seen, or restarted)


class ProcessSupervisor:
    def __init__(
        self,
        children: list[Child],
        *,
        log: Callable[[str], None] = print,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        healthy_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = children
        self.log = log
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self.clock = clock

    def check(self) -> None:
        """One round: notice deaths, restart those whose backoff has passed."""
        now = self.clock()
        for child in self.children:
            if child.next_try is None:
                if child.alive():
                    if child.up_since is None:
                        child.up_since = now
                    elif now - child.up_since >= self.healthy_after_s:
                        child.backoff_s = 0.0  # stayed up: the next death starts from the bottom again
                    continue
                child.backoff_s = (
                    self.initial_backoff_s
                    if child.backoff_s == 0.0
                    else min(child.backoff_s * 2, self.max_backoff_s)
                )
                child.next_try = now + child.backoff_s
                self.log(
                    f"vein2vein: {child.name} {child.describe_exit()}; restarting in {child.backoff_s:.0f} s"
                )
            if child.next_try is not None and now >= child.next_try:
                try:
                    child.restart()
                except Exception as exc:  # try again after a longer wait
                    child.backoff_s = min(
                        max(child.backoff_s, self.initial_backoff_s) * 2, self.max_backoff_s
                    )
                    child.next_try = now + child.backoff_s
                    wait = f"{child.backoff_s:.0f} s"
                    self.log(f"vein2vein: {child.name} did not restart ({exc}); next try in {wait}")
                    continue
                child.restarts += 1
                child.next_try = None
                child.up_since = self.clock()
                self.log(f"vein2vein: {child.name} restarted (restart {child.restarts})")
