"""What each process of the run costs: CPU seconds from psutil, by process group, and span lines written
by the services (`<state dir>/telemetry/spans-<service>.jsonl`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

POSTGRES = "postgres"
BROKER = "broker"
BENCH = "bench"


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


@dataclass
class CpuSnapshot:
    by_pid: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (group, cpu seconds)


class ProcessGroups:
    """Sorts this process's descendants into groups: each service by name (with anything it started),
    `postgres` (the postmaster and its backends), `broker` (Tansu), and this process as `bench`.

    Only descendants count, so Postgres and the broker are measured only when this process (or the
    pytest process that runs it in-process) started them; with V2V_DATABASE_URL /
    V2V_KAFKA_BOOTSTRAP_SERVERS pointing elsewhere those groups stay empty."""

    def __init__(self, service_pids: Mapping[str, int], broker_binary: str | None = None) -> None:
        self.service_pids = dict(service_pids)
        self.broker_binary = broker_binary
        self.me = psutil.Process(os.getpid())

    def groups(self) -> list[str]:
        return [*self.service_pids, POSTGRES, BROKER, BENCH]

    def _classify(self, proc: psutil.Process, owner: dict[int, str]) -> str | None:
        try:
            name = proc.name()
            cmd = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        if name.startswith("postgres") or (cmd and os.path.basename(cmd[0]) == "postgres"):
            return POSTGRES
        if "tansu" in name or (cmd and self.broker_binary and cmd[0] == self.broker_binary):
            return BROKER
        parent = proc.ppid()
        return owner.get(parent)

    def snapshot(self) -> CpuSnapshot:
        snap = CpuSnapshot()
        try:
            snap.by_pid[self.me.pid] = (BENCH, _cpu(self.me))
            children = self.me.children(recursive=True)
        except psutil.Error:
            return snap
        owner: dict[int, str] = {pid: name for name, pid in self.service_pids.items()}
        # parents before children: children(recursive=True) walks breadth first
        for proc in children:
            group = owner.get(proc.pid) or self._classify(proc, owner)
            if group is None:
                continue
            if proc.pid not in owner and group not in (POSTGRES, BROKER):
                owner[proc.pid] = group  # a service's own child process
            try:
                snap.by_pid[proc.pid] = (group, _cpu(proc))
            except psutil.Error:
                continue
        return snap

    def delta(self, before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float | None]:
        """CPU seconds per group between two snapshots; a process that started in between counts from
        zero, one that ended in between is lost. None for a group with no process seen."""
        out: dict[str, float | None] = dict.fromkeys(self.groups())
        for pid, (group, cpu) in after.by_pid.items():
            prev = before.by_pid.get(pid)
            base = prev[1] if prev is not None and prev[0] == group else 0.0
            out[group] = (out.get(group) or 0.0) + max(0.0, cpu - base)
        return out

    def rss_mb(self) -> dict[str, float]:
        out: dict[str, float] = {}
        snap = self.snapshot()
        for pid, (group, _cpu_s) in snap.by_pid.items():
            try:
                out[group] = out.get(group, 0.0) + psutil.Process(pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
        return out


class SpanCounter:
    """Counts span lines appended to `<telemetry>/spans-<service>.jsonl` since the last `mark()`."""

    def __init__(self, telemetry_dir: Path) -> None:
        self.dir = telemetry_dir
        self._offsets: dict[Path, int] = {}

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("spans-*.jsonl")) if self.dir.is_dir() else []

    def mark(self) -> None:
        self._offsets = {f: f.stat().st_size for f in self._files()}

    def count_since_mark(self) -> dict[str, int]:
        """New span lines per service since `mark()` (a file that appeared since counts whole)."""
        out: dict[str, int] = {}
        for path in self._files():
            start = self._offsets.get(path, 0)
            lines = 0
            with path.open("rb") as fh:
                fh.seek(start)
                while chunk := fh.read(1 << 20):
                    lines += chunk.count(b"\n")
            out[path.stem.removeprefix("spans-")] = lines
        return out
