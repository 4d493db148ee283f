"""`make run` heals itself (issue 9): the real `python -m v2v_harness run` in a process of its own, on its own
ports and state folder; the simulator's parties place orders through the public API while the test kills
(-9) a service process and then the embedded broker (memory-only: it comes back empty). The harness
restarts both (and says so), and every order -- placed before, during and after the kills -- completes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from v2v_harness.identity import Credentials
from v2v_harness.processes import free_port
from v2v_simulator import SERVICES, Config, Simulator

pytestmark = pytest.mark.e2e

READY = "vein2vein: all five services are ready"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _child(run_pid: int, needle: str) -> int:
    matches = [p for p in _children(run_pid) if needle in _cmdline(p)]
    assert len(matches) == 1, (needle, [(p, _cmdline(p)) for p in _children(run_pid)])
    return matches[0]


class Run:
    def __init__(self, state_dir: Path, log: Path) -> None:
        self.state_dir, self.log = state_dir, log
        env = dict(os.environ)
        env.update(
            V2V_FIXED_PORTS="false",
            V2V_PG_PORT=str(free_port()),
            V2V_KAFKA_PORT=str(free_port()),
            V2V_ISSUER_PORT=str(free_port()),
            V2V_DATABASE_NAME="v2v_run_heals",
            V2V_TOPIC_NAMESPACE=f"heal{os.getpid()}",
        )
        self.external_broker = bool(env.get("V2V_KAFKA_BOOTSTRAP_SERVERS"))
        self._out = open(log, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "v2v_harness", "run", "--state-dir", str(state_dir)],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            assert self.proc.poll() is None, f"make run exited:\n{self.text()[-4000:]}"
            time.sleep(0.3)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()[-4000:]}")

    def urls(self) -> dict[str, str]:
        found = dict(re.findall(r"^  (\w+)\s+(http://127\.0\.0\.1:\d+)  \(docs", self.text(), re.M))
        assert set(found) >= set(SERVICES), self.text()
        return {name: found[name] for name in SERVICES}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Ctrl-C: it stops its children itself
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[Run]:
    run = Run(tmp_path / "state", tmp_path / "run.log")
    try:
        run.wait_for(re.escape(READY), 240)
        yield run
    finally:
        run.stop()
        print(run.text()[-6000:])


async def _simulator(
    run: Run, credentials: Credentials, run_id: str, seed: int
) -> tuple[Simulator, list[str]]:
    """Two orders of their own (patient references carry `run_id`), all expected to complete."""
    import v2v_simulator.api as simapi
    from v2v_simulator.tracker import Tracker

    cfg = Config(
        orders=2,
        exceptions=0.0,
        seed=seed,
        urls=run.urls(),
        start_platform=False,
        day_seconds=0.5,
        timeout_s=300,
        stall_s=150,
        poll_s=0.5,
        progress_s=30,
        run_id=run_id,
    )
    lines: list[str] = []
    simulator = Simulator(cfg, lines.append, credentials)
    await simulator.api.close()
    # a killed process answers nothing for a few seconds: the same Idempotency-Key, again, for longer
    simulator.api = simapi.Api(
        cfg.urls,
        cfg.concurrency,
        simulator.stats,
        credentials=credentials,
        transport_retries=20,
        server_retries=15,
        in_flight_retries=20,
    )
    simulator.tracker = Tracker(simulator.api, cfg.poll_s)
    return simulator, lines


@pytest.mark.timeout(480)
async def test_kill_9_of_a_service_and_of_the_broker_is_healed_and_every_order_completes(
    make_run: Run,
) -> None:
    run = make_run
    issuer = run.wait_for(r"token issuer (http://\S+);", 5).group(1)
    credentials = Credentials(issuer, run.state_dir)
    batches: dict[str, Simulator] = {}
    outputs: dict[str, list[str]] = {}
    tasks: dict[str, asyncio.Task[int]] = {}

    async def start(name: str, seed: int) -> None:
        sim, outputs[name] = await _simulator(run, credentials, name, seed)
        batches[name] = sim
        tasks[name] = asyncio.create_task(sim.run())

    kills: dict[str, float] = {}
    try:
        await start("BEFORE", 1)
        # both of its orders placed (the plan spreads placements over the first simulated days) before
        # the intake is killed
        deadline = time.monotonic() + 120
        while not (len(batches["BEFORE"].actors) == 2 and all(a.order_id for a in batches["BEFORE"].actors)):
            assert time.monotonic() < deadline, "the BEFORE orders were not placed within 120 s"
            await asyncio.sleep(0.2)
        os.kill(_child(run.proc.pid, "-m order_service"), signal.SIGKILL)  # the intake itself
        kills["order"] = time.time()
        await start("DURING", 2)  # its POSTs meet a dead order service and are retried with their keys
        await asyncio.to_thread(run.wait_for, r"vein2vein: order\S* restarted", 60)
        if not run.external_broker:
            await asyncio.sleep(2)
            os.kill(_child(run.proc.pid, "tansu"), signal.SIGKILL)  # memory-only: it comes back empty
            kills["broker"] = time.time()
            await start("NOBROKER", 3)
            await asyncio.to_thread(run.wait_for, r"vein2vein: broker restarted", 60)
        await asyncio.sleep(2)
        await start("AFTER", 4)
        codes = dict(zip(tasks, await asyncio.wait_for(asyncio.gather(*tasks.values()), 360), strict=True))
    finally:
        for task in tasks.values():
            if not task.done():
                task.cancel()
        for sim in batches.values():
            await sim.api.close()
    output = "\n\n".join("\n".join(lines) for lines in outputs.values())
    print(output)
    assert codes == dict.fromkeys(batches, 0), output
    for name, sim in batches.items():
        assert sim.summary["terminal"] == {"completed": 2}, (name, output)

    # when each batch's orders were created, against the kills
    created: dict[str, list[float]] = {}
    async with credentials.client("ops", None, timeout=15) as ops:
        for name, sim in batches.items():
            for actor in sim.actors:
                answer = await ops.get(f"{sim.cfg.urls['order']}/v1/orders/{actor.order_id}")
                assert answer.status_code == 200, answer.text
                created.setdefault(name, []).append(
                    datetime.fromisoformat(answer.json()["created_at"]).timestamp()
                )
    assert max(created["BEFORE"]) < kills["order"] < min(created["DURING"]), (kills, created)
    if "broker" in kills:
        assert min(created["NOBROKER"]) > kills["broker"]
    assert min(created["AFTER"]) > max(kills.values())
    log = run.text()
    assert re.search(r"vein2vein: order\S* exited \(-9\)", log), log[-4000:]
    if not run.external_broker:
        assert "vein2vein: broker exited (-9)" in log, log[-4000:]
    async with httpx.AsyncClient(timeout=5) as http:
        for name, url in run.urls().items():
            assert (await http.get(url + "/ready")).status_code == 200, name
