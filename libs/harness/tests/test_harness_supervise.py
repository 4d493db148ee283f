"""The harness' process manager (`make run`): a child that dies is restarted after a backoff that doubles
up to a cap, the backoff starts again once the child stayed up, a failed restart is tried again later, and
a real process killed with SIGKILL comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from v2v_harness.supervise import Child, ProcessSupervisor


class Fake:
    def __init__(self) -> None:
        self.up = True
        self.starts = 0
        self.fail_next = 0

    def restart(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("port still taken")
        self.starts += 1
        self.up = True


def test_a_dead_child_is_restarted_after_a_doubling_backoff_that_resets_once_it_stays_up() -> None:
    now = [0.0]
    fake, logs = Fake(), []
    child = Child("order", lambda: fake.up, fake.restart)
    sup = ProcessSupervisor(
        [child],
        log=logs.append,
        initial_backoff_s=1,
        max_backoff_s=4,
        healthy_after_s=60,
        clock=lambda: now[0],
    )
    sup.check()
    waits = []
    for _ in range(4):  # dies right after each restart: 1, 2, 4, 4 s
        fake.up = False
        sup.check()
        waits.append(child.backoff_s)
        now[0] += child.backoff_s - 0.01
        sup.check()
        assert not fake.up, "not before the backoff has passed"
        now[0] += 0.02
        sup.check()
        assert fake.up
    assert waits == [1, 2, 4, 4] and child.restarts == 4 == fake.starts
    assert any("order exited; restarting in 4 s" in line for line in logs)
    now[0] += 61  # stays up: the next death waits the initial backoff again
    sup.check()
    fake.up = False
    sup.check()
    assert child.backoff_s == 1


def test_a_restart_that_fails_is_tried_again_later() -> None:
    now = [0.0]
    fake, logs = Fake(), []
    fake.up, fake.fail_next = False, 1
    sup = ProcessSupervisor(
        [Child("broker", lambda: fake.up, fake.restart)], log=logs.append, clock=lambda: now[0]
    )
    sup.check()
    now[0] += 1
    sup.check()
    assert not fake.up and any("did not restart" in line for line in logs)
    now[0] += 2
    sup.check()
    assert fake.up and fake.starts == 1


def test_a_process_killed_with_sigkill_comes_back() -> None:
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]

    def restart() -> None:
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))

    sup = ProcessSupervisor(
        [Child("site", lambda: procs[-1].poll() is None, restart)], log=lambda _: None, initial_backoff_s=0.1
    )
    try:
        sup.check()
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(5)
        deadline = time.monotonic() + 5
        while len(procs) == 1 and time.monotonic() < deadline:
            sup.check()
            time.sleep(0.05)
        assert len(procs) == 2 and procs[-1].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
