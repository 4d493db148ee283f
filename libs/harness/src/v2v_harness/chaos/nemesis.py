"""The nemesis: seeded faults, one at a time, each recorded with when it began and when it was healed.

- `kill`: SIGKILL of a random service process (any replica); the harness's supervisor restarts it; healed
  when the new process answers `/ready`.
- `pause`: SIGSTOP of a random service process for longer than the consumer session timeout (and the
  relay's and webhook dispatcher's leases), then SIGCONT.
- `broker-restart`: SIGKILL of the embedded broker (Tansu keeps everything in memory: topics, messages and
  committed offsets are gone); the supervisor starts a fresh one on the same port.
- `postgres-restart`: an immediate shutdown of Postgres (SIGQUIT to the postmaster: no checkpoint, crash
  recovery on start; the run's Postgres has fsync and synchronous_commit on); the supervisor starts it.
- `terminate-backends`: `pg_terminate_backend` of every service role's connection.
- `read-only`: one service's runtime role gets `default_transaction_read_only = on` in the run's database
  (its connections are terminated so that new ones see it) for a while, then the setting is reset and its
  connections are terminated again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from v2v_harness.infra import Infrastructure
from v2v_harness.platform import Platform, RunningService
from v2v_harness.provision import with_database

KINDS: dict[str, int] = {  # kind -> weight
    "kill": 3,
    "pause": 2,
    "broker-restart": 1,
    "postgres-restart": 1,
    "terminate-backends": 2,
    "read-only": 1,
}


@dataclass
class Fault:
    kind: str
    target: str
    start: float  # seconds on the run's clock
    healed: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "start": round(self.start, 3),
            "healed": None if self.healed is None else round(self.healed, 3),
            "note": self.note,
        }


@dataclass
class Nemesis:
    platform: Platform
    infra: Infrastructure
    database: str
    roles: dict[str, str]  # service -> runtime role
    rng: random.Random
    clock: Callable[[], float]
    pause_s: tuple[float, float] = (8.0, 14.0)
    read_only_s: tuple[float, float] = (5.0, 10.0)
    gap_s: tuple[float, float] = (2.0, 8.0)
    heal_timeout_s: float = 120.0
    log: Callable[[str], None] = print
    every_kind_first: bool = False  # a short run: each kind once (in a seeded order), then by weight
    faults: list[Fault] = field(default_factory=list)
    _paused: set[int] = field(default_factory=set)
    _readonly_roles: set[str] = field(default_factory=set)

    @property
    def admin_url(self) -> str:
        return with_database(self.infra.admin_url, self.database)

    def kinds(self) -> dict[str, int]:
        found = dict(KINDS)
        if self.infra.tansu is None:
            found.pop("broker-restart")
        if self.infra.postgres is None:
            found.pop("postgres-restart")
        return found

    async def run(self, until_s: float) -> None:
        """Inject faults one after another until the run's clock reaches `until_s`, then heal all. With
        `every_kind_first`, every kind is injected once even if that takes longer than `until_s` (a slow
        machine must not leave a kind out)."""
        kinds = self.kinds()
        first = sorted(kinds) if self.every_kind_first else []
        self.rng.shuffle(first)
        try:
            while first or self.clock() < until_s:
                kind = (
                    first.pop(0) if first else self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
                )
                await self.inject(kind)
                await asyncio.sleep(self.rng.uniform(*self.gap_s))
        finally:
            await self.heal_all()

    async def inject(self, kind: str) -> Fault:
        fault = Fault(kind, "", self.clock())
        self.faults.append(fault)
        try:
            await getattr(self, "_" + kind.replace("-", "_"))(fault)
        except Exception as exc:  # the nemesis goes on; the fault says what happened
            fault.note = (fault.note + f"; nemesis error: {type(exc).__name__}: {exc}").strip("; ")
        healed = "not healed" if fault.healed is None else f"healed after {fault.healed - fault.start:.1f} s"
        self.log(f"chaos: t={fault.start:6.1f}s {fault.kind:<18} {fault.target:<16} {healed} {fault.note}")
        return fault

    # -- service processes --------------------------------------------------------------------------------

    def _victim(self) -> RunningService:
        return self.rng.choice(self.platform.processes())

    async def _kill(self, fault: Fault) -> None:
        svc = self._victim()
        fault.target = svc.label
        old = svc.proc
        with contextlib.suppress(ProcessLookupError):
            os.kill(old.pid, signal.SIGKILL)
        deadline = time.monotonic() + self.heal_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if svc.proc is not old and svc.proc.poll() is None:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(svc.url + "/ready")).status_code == 200:
                            fault.healed = self.clock()
                            return
                await asyncio.sleep(0.2)

    async def _pause(self, fault: Fault) -> None:
        svc = self._victim()
        fault.target = svc.label
        pid = svc.proc.pid
        seconds = self.rng.uniform(*self.pause_s)
        fault.note = f"{seconds:.1f} s"
        os.kill(pid, signal.SIGSTOP)
        self._paused.add(pid)
        try:
            await asyncio.sleep(seconds)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self._paused.discard(pid)
        fault.healed = self.clock()

    # -- infrastructure -------------------------------------------------------------------------------------

    async def _broker_restart(self, fault: Fault) -> None:
        tansu = self.infra.tansu
        assert tansu is not None and tansu.proc is not None
        fault.target = "tansu"
        old = tansu.proc
        old.kill()
        deadline = time.monotonic() + self.heal_timeout_s
        while time.monotonic() < deadline:
            proc = tansu.proc
            if proc is not None and proc is not old and proc.poll() is None and _port_open(tansu.port):
                fault.healed = self.clock()
                return
            await asyncio.sleep(0.1)

    async def _postgres_restart(self, fault: Fault) -> None:
        pg = self.infra.postgres
        assert pg is not None and pg.proc is not None
        fault.target = "postgres"
        old = pg.proc
        old.send_signal(signal.SIGQUIT)  # immediate shutdown: like a crash, recovery from the WAL on start
        deadline = time.monotonic() + self.heal_timeout_s
        while time.monotonic() < deadline:
            proc = pg.proc
            if proc is not None and proc is not old and proc.poll() is None:
                with contextlib.suppress(Exception):
                    conn = await asyncpg.connect(self.admin_url, timeout=2)
                    await conn.close()
                    fault.healed = self.clock()
                    return
            await asyncio.sleep(0.2)

    async def _admin(self) -> asyncpg.Connection:
        deadline = time.monotonic() + self.heal_timeout_s
        while True:
            try:
                conn: asyncpg.Connection = await asyncpg.connect(self.admin_url, timeout=3)
                return conn
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _terminate(self, conn: asyncpg.Connection, roles: list[str]) -> int:
        return int(
            await conn.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                    WHERE datname = $1 AND usename = ANY($2::text[]) AND pid <> pg_backend_pid()""",
                self.database,
                roles,
            )
        )

    async def _terminate_backends(self, fault: Fault) -> None:
        fault.target = "all services"
        conn = await self._admin()
        try:
            n = await self._terminate(conn, list(self.roles.values()))
        finally:
            await conn.close()
        fault.note = f"{n} backends"
        fault.healed = self.clock()

    async def _read_only(self, fault: Fault) -> None:
        service = self.rng.choice(sorted(self.roles))
        role = self.roles[service]
        fault.target = service
        seconds = self.rng.uniform(*self.read_only_s)
        conn = await self._admin()
        try:
            await conn.execute(
                f'ALTER ROLE "{role}" IN DATABASE "{self.database}" SET default_transaction_read_only = on'
            )
            self._readonly_roles.add(role)
            n = await self._terminate(conn, [role])
        finally:
            await conn.close()
        fault.note = f"{seconds:.1f} s, {n} backends moved to read-only"
        await asyncio.sleep(seconds)
        await self._writable(role)
        fault.healed = self.clock()

    async def _writable(self, role: str) -> None:
        conn = await self._admin()
        try:
            await conn.execute(
                f'ALTER ROLE "{role}" IN DATABASE "{self.database}" RESET default_transaction_read_only'
            )
            await self._terminate(conn, [role])
        finally:
            await conn.close()
        self._readonly_roles.discard(role)

    async def heal_all(self) -> None:
        """SIGCONT every paused process and make every role writable again (idempotent)."""
        for pid in list(self._paused):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self._paused.discard(pid)
        for role in list(self._readonly_roles):
            with contextlib.suppress(Exception):
                await self._writable(role)

    def last_heal(self) -> float:
        return max((f.healed or f.start for f in self.faults), default=0.0)


def _port_open(port: int) -> bool:
    from v2v_harness.processes import port_in_use

    return port_in_use(port)
