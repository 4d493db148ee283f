"""`python -m v2v_harness chaos` (what `make chaos` calls): one seeded chaos run, end to end.

1. Its own embedded Postgres (durable: fsync and synchronous_commit on) and broker, its own token issuer
   and demo clients, the five services with two replicas each, all supervised by the harness's
   `ProcessSupervisor` (what `make run` uses) on a thread of its own.
2. A webhook receiver subscribed for every certified centre (as the centre).
3. The workload: the simulator's parties (`v2v_simulator`: centres, couriers, sites' MES, QA, admin, ops,
   each with its own token) drive ORDERS orders to their end through the public API, spread over the
   replicas by a client-side balancer that records every call; the simulator retries with the same
   Idempotency-Key (patiently: faults last seconds).
4. The nemesis (`nemesis.Nemesis`) injects faults for SECONDS seconds, then heals everything.
5. Wait until every order is terminal, at most `deadline_s` (120 s) after the last healed fault.
6. Read the final state from the database, check the invariants (`checker`), print the summary, write
   `history.json` and `timeline.png` into the run's folder; exit 1 if an invariant failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from v2v_harness.catalog import SERVICES
from v2v_harness.chaos.checker import TERMINAL, UNDRIVEN_END, FinalState, Intent, check
from v2v_harness.chaos.nemesis import Nemesis
from v2v_harness.chaos.report import plot_timeline, summary_table, write_history
from v2v_harness.chaos.workload import ReplicaBalancer
from v2v_harness.identity import Credentials, start_identity
from v2v_harness.infra import start_infrastructure
from v2v_harness.platform import Platform
from v2v_harness.provision import provision, with_database
from v2v_harness.receiver import WebhookReceiver
from v2v_harness.supervise import ProcessSupervisor

DATABASE = "v2v_chaos"
# exception kinds the chaos workload leaves out: `persistent_oos` (every run out of specification:
# remanufacture, recollection, ... up to six manufacturing runs and about 170 simulated days, each OOS now
# waiting for QA's signed disposition) cannot end within the run it is part of; `make demo` plays it
WORKLOAD_WITHOUT = ("persistent_oos",)
CHAOS_FETCH_WAIT_MS = 100  # the embedded broker's fetch wait under chaos (unless V2V_KAFKA_FETCH_MAX_WAIT_MS)


@dataclass
class ChaosConfig:
    orders: int = 100
    seconds: float = 180.0
    seed: int = 1
    replicas: int = 2
    exceptions: float = 0.2
    day_seconds: float | None = None  # real seconds per simulated day (default: from SECONDS)
    warmup_s: float = 5.0
    deadline_s: float = 120.0
    state_dir: Path = Path(".v2v/chaos")
    kinds: dict[str, int] | None = None  # fault kind -> weight (default: nemesis.KINDS)
    every_kind_first: bool = False  # each kind once first (the short run in `make test`)
    waves: int | None = None  # simulator runs started in turn (default: one per 50 orders, at most 4)
    out: Any = field(default=print, repr=False)

    def day(self) -> float:
        # the simulator's orders are placed over a week or two of simulated time and take ~6 more weeks:
        # pace it so that a wave lasts about half as long as the nemesis, and the last wave's orders are
        # due to end well before it does (faults and recollections make them later than planned)
        return self.day_seconds if self.day_seconds is not None else max(0.05, self.seconds / 110)

    def wave_plan(self) -> list[tuple[float, int]]:
        """(start, orders) of each wave: the orders split evenly, the waves started over the first 30% of
        the nemesis, so that faults meet orders at every stage all along (one wave placing everything at
        once would load the platform far beyond its capacity at first and leave the last faults idle)."""
        n = self.waves if self.waves is not None else max(1, min(4, self.orders // 50))
        n = max(1, min(n, self.orders))
        step = 0.3 * self.seconds / n
        return [(k * step, self.orders // n + (1 if k < self.orders % n else 0)) for k in range(n)]


def run(cfg: ChaosConfig) -> int:
    return asyncio.run(_run(cfg))


async def _run(cfg: ChaosConfig) -> int:
    out = cfg.out
    state_dir = cfg.state_dir.resolve()
    if state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)
    t0 = [time.monotonic(), time.time()]  # the run's clock starts when the workload does

    def clock() -> float:
        return time.monotonic() - t0[0]

    out(f"chaos: seed {cfg.seed}, {cfg.orders} orders, nemesis for {cfg.seconds:.0f} s, state {state_dir}")
    # two replicas of five services on two cores: the broker's idle fetches are CPU the consumers lack
    # (docs/RELIABILITY.md: 0.82 cores idle at 20 ms, 0.31 at 100 ms)
    infra = start_infrastructure(state_dir, durable=True, embedded_fetch_wait_ms=CHAOS_FETCH_WAIT_MS)
    identity = None
    platform: Platform | None = None
    receiver: WebhookReceiver | None = None
    supervisor_log: list[tuple[float, str]] = []
    stop_supervisor = threading.Event()
    supervisor_thread: threading.Thread | None = None
    try:
        identity = start_identity(state_dir / "identity")
        credentials = Credentials(identity.url, state_dir / "identity")
        urls = await provision(infra.admin_url, DATABASE)
        platform = Platform(infra, DATABASE, namespace="chaos", state_dir=state_dir, issuer=identity.url)
        # the platform, with its replicas, is started from the supervisor's thread: children die with the
        # thread that spawned them (PR_SET_PDEATHSIG), so every spawn happens on that one long-lived thread
        started = threading.Event()
        failure: list[BaseException] = []
        plat = platform

        def supervise() -> None:
            try:
                plat.start(
                    urls, fixed_ports=False, timeout=180, replicas={s.name: cfg.replicas for s in SERVICES}
                )
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            from v2v_harness.__main__ import _children

            sup = ProcessSupervisor(
                _children(infra, plat), log=lambda line: supervisor_log.append((clock(), line.strip()))
            )
            started.set()
            while not stop_supervisor.is_set():
                sup.check()
                time.sleep(0.25)

        supervisor_thread = threading.Thread(target=supervise, name="chaos-supervisor", daemon=True)
        supervisor_thread.start()
        await asyncio.to_thread(started.wait)
        if failure:
            raise failure[0]
        out(f"chaos: {infra.describe()}")
        out(f"chaos: {len(platform.processes())} service processes ({cfg.replicas} per service), supervised")

        receiver = WebhookReceiver().start()
        await _subscribe(platform, credentials, receiver)

        import v2v_simulator.api as simapi
        from v2v_simulator import Config, Simulator
        from v2v_simulator.tracker import Tracker

        balancer = ReplicaBalancer(
            {
                int(platform.services[s.name].port): (s.name, [r.port for r in platform.replicas[s.name]])
                for s in SERVICES
            },
            clock,
        )
        sim_lines: list[str] = []

        def sim_out(line: str) -> None:
            sim_lines.append(line)
            if line.startswith("[") or line.startswith("simulator:"):
                out("  " + line)

        simulators: list[Any] = []
        for k, (_start, orders) in enumerate(cfg.wave_plan()):
            sim_cfg = Config(
                orders=orders,
                exceptions=cfg.exceptions,
                seed=cfg.seed * 100 + k,
                urls={s.name: platform.url(s.name) for s in SERVICES},
                concurrency=20,
                timeout_s=cfg.seconds + cfg.deadline_s + 60,
                day_seconds=cfg.day(),
                stall_s=cfg.deadline_s + 60,
                poll_s=0.5,
                progress_s=15,
                start_platform=False,
                run_id=f"C{cfg.seed}W{k}",
                without=WORKLOAD_WITHOUT,
            )
            simulator = Simulator(sim_cfg, sim_out, credentials)
            await simulator.api.close()
            simulator.api = simapi.Api(
                sim_cfg.urls,
                sim_cfg.concurrency,
                simulator.stats,
                credentials=credentials,
                transport=balancer,
                # faults last seconds: the same key, again, for longer
                transport_retries=15,
                server_retries=10,
                # a key whose first request died with its process is taken over after the claim's lease
                # (60 s): wait 409 idempotency-key-in-flight out for longer than that (0.5 s x 1..20 = 105 s)
                in_flight_retries=20,
            )
            simulator.tracker = Tracker(simulator.api, sim_cfg.poll_s)
            simulators.append(simulator)

        roles = {name: s.role for name, s in urls.services.items()}
        nemesis = Nemesis(
            platform,
            infra,
            DATABASE,
            roles,
            random.Random(cfg.seed),
            clock,
            log=out,
            every_kind_first=cfg.every_kind_first,
        )
        if cfg.kinds is not None:
            nemesis.kinds = lambda: dict(cfg.kinds or {})  # type: ignore[method-assign]

        t0[:] = [time.monotonic(), time.time()]

        async def wave(simulator: Any, start: float) -> int:
            await asyncio.sleep(start)
            code: int = await simulator.run()
            return code

        sim_tasks = [
            asyncio.create_task(wave(sim, start))
            for sim, (start, _) in zip(simulators, cfg.wave_plan(), strict=True)
        ]
        sim_task = asyncio.gather(*sim_tasks)
        if len(simulators) > 1:
            out(
                f"chaos: {len(simulators)} waves of orders, started at t="
                + ", ".join(f"{start:.0f}" for start, _ in cfg.wave_plan())
                + " s"
            )
        await asyncio.sleep(cfg.warmup_s)
        await nemesis.run(until_s=cfg.warmup_s + cfg.seconds)
        last_heal = nemesis.last_heal()
        out(f"chaos: nemesis done, {len(nemesis.faults)} faults; last healed at t={last_heal:.1f}s")

        deadline = last_heal + cfg.deadline_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(sim_task), timeout=max(1.0, deadline - clock()))
        settled_s, open_orders = await _settle(
            platform,
            urls,
            deadline,
            clock,
            lambda: {a.order_id for sim in simulators for a in sim.actors if a.order_id},
        )
        settled_s = max(0.0, settled_s - last_heal)
        if not sim_task.done():
            sim_task.cancel()
        sim_code = None
        with contextlib.suppress(BaseException):
            codes = await sim_task
            sim_code = max(codes)
        for simulator in simulators:
            await simulator.api.close()
        await balancer.shutdown()

        final = await _final_state(platform, urls, receiver)
        final.broker_losses = [
            (t0[1] + f.start, t0[1] + (f.healed if f.healed is not None else clock()))
            for f in nemesis.faults
            if f.kind == "broker-restart"
        ]
        intents = [Intent(a.plan.patient_ref, a.order_id or None) for sim in simulators for a in sim.actors]
        errors = [e for sim in simulators for e in sim.stats.errors]
        verdicts = check(intents, final, deadline_s=cfg.deadline_s, settled_s=settled_s)
        end = clock()
        transitions = [
            e["recorded_at"] - t0[1]
            for entries in final.timelines.values()
            for e in entries
            if e.get("status_after")
        ]
        restarts = [line for _, line in supervisor_log if line.endswith(")") and "restarted" in line]
        facts = {
            "orders intended / acknowledged": f"{len(intents)} / {sum(1 for i in intents if i.order_id)}",
            "final statuses": ", ".join(
                f"{k} {v}" for k, v in sorted(_count(o["status"] for o in final.orders.values()).items())
            ),
            "open orders at the deadline": str(open_orders),
            "HTTP calls (5xx / transport errors)": (
                f"{len(balancer.calls)} ({sum(1 for c in balancer.calls if c.status >= 500)} / "
                f"{sum(1 for c in balancer.calls if c.status == 0)})"
            ),
            "workload errors (retried or not)": str(len(errors)),
            "simulator exit": str(sim_code),
            "supervisor restarts": str(len(restarts)),
            "run time": f"{end:.0f} s",
        }
        out(summary_table(nemesis.faults, verdicts, facts))
        history = {
            "config": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "out"
            },
            "facts": facts,
            "last_heal_s": last_heal,
            "settled_after_heal_s": settled_s,
            "faults": [f.as_dict() for f in nemesis.faults],
            "supervisor": [{"t": round(t, 3), "line": line} for t, line in supervisor_log],
            "invariants": [v.as_dict() for v in verdicts],
            "intents": [asdict(i) for i in intents],
            "orders": final.orders,
            "timelines": final.timelines,
            "dead_letters": final.dead_letters,
            "ready": final.ready,
            "calls": [[round(c.t, 3), c.service, c.method, c.status, round(c.ms, 1)] for c in balancer.calls],
            "workload_errors": errors[:500],
        }
        write_history(state_dir / "history.json", history)
        plot_timeline(
            state_dir / "timeline.png",
            nemesis.faults,
            balancer.calls,
            transitions,
            end,
            last_heal,
            f"make chaos ORDERS={cfg.orders} SECONDS={cfg.seconds:.0f} SEED={cfg.seed}",
        )
        out(f"chaos: history {state_dir / 'history.json'}, timeline {state_dir / 'timeline.png'}")
        return 0 if all(v.ok for v in verdicts) else 1
    finally:
        stop_supervisor.set()
        if supervisor_thread is not None:
            await asyncio.to_thread(supervisor_thread.join, 5)
        if receiver is not None:
            receiver.stop()
        if platform is not None:
            platform.stop()
        infra.close()
        if identity is not None:
            identity.stop()


def _count(values: Any) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(values))


async def _subscribe(platform: Platform, credentials: Credentials, receiver: WebhookReceiver) -> None:
    """Every certified centre subscribes the receiver (as itself), with a path of its own."""
    from v2v_harness.client import V2VClient

    for client in credentials.clients("centre"):
        centre = str(client.entity_id)
        async with credentials.client("centre", centre, timeout=15) as http:
            api = V2VClient({"notification": platform.url("notification")}, client=http)
            resp = await api.subscribe(
                None, receiver.url(f"/chaos/{centre}"), None, headers={"Idempotency-Key": f"sub-{centre}"}
            )
            if resp.status != 201:
                raise RuntimeError(f"subscription of {centre}: {resp.status} {resp.text}")


async def _connect(platform: Platform, urls: Any, deadline: float, clock: Any) -> asyncpg.Connection:
    while True:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                with_database(platform.infra.admin_url, DATABASE), timeout=5
            )
            return conn
        except Exception:
            if clock() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _settle(
    platform: Platform, urls: Any, deadline: float, clock: Any, acknowledged: Callable[[], set[str]]
) -> tuple[float, int]:
    """Wait until every order is terminal, at most until `deadline`; (when, how many still open). An
    order whose creation was never acknowledged is driven by no one: what the platform does alone is its
    end (see the checker)."""
    conn = await _connect(platform, urls, deadline + 30, clock)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT order_id::text, status FROM ordering.orders WHERE status <> ALL($1::text[])",
                list(TERMINAL),
            )
            acked = acknowledged()
            open_orders = sum(1 for r in rows if r["order_id"] in acked or r["status"] not in UNDRIVEN_END)
            if open_orders == 0 or clock() >= deadline:
                return clock(), open_orders
            await asyncio.sleep(1.0)
    finally:
        await conn.close()


async def _final_state(platform: Platform, urls: Any, receiver: WebhookReceiver) -> FinalState:
    conn = await _connect(platform, urls, float("inf"), lambda: 0.0)
    try:
        orders = {
            r["order_id"]: {"patient_ref": r["patient_ref"], "status": r["status"]}
            for r in await conn.fetch("SELECT order_id::text, patient_ref, status FROM ordering.orders")
        }
        timelines: dict[str, list[dict[str, Any]]] = {oid: [] for oid in orders}
        for r in await conn.fetch(
            """SELECT order_id::text, status_before, status_after, event_type,
                      extract(epoch FROM recorded_at)::float8 AS recorded_at
                 FROM ordering.order_timeline ORDER BY id"""
        ):
            timelines.setdefault(r["order_id"], []).append(
                {k: r[k] for k in ("status_before", "status_after", "event_type", "recorded_at")}
            )
        slots = [dict(r) for r in await conn.fetch("SELECT order_id::text, status FROM scheduling.slots")]
        shipments = [
            dict(r)
            for r in await conn.fetch(
                "SELECT order_id::text, leg, status, booking_id::text, run FROM logistics.shipments"
            )
        ]
        deliveries = [
            dict(r)
            for r in await conn.fetch(
                "SELECT subscription_id::text, event_id::text FROM notification.deliveries"
            )
        ]
        published: list[dict[str, Any]] = []
        consumed: dict[str, dict[str, float]] = {}
        for svc in urls.services.values():
            published += [
                dict(r)
                for r in await conn.fetch(
                    f"""SELECT id, event_id::text, event_type, topic, message_key,
                               published_at IS NOT NULL AS published,
                               extract(epoch FROM published_at)::float8 AS published_at
                          FROM {svc.schema}.outbox"""
                )
            ]
            for r in await conn.fetch(
                f"SELECT consumer, event_id::text, extract(epoch FROM processed_at)::float8 AS t "
                f"FROM {svc.schema}.inbox"
            ):
                consumed.setdefault(r["consumer"], {})[r["event_id"]] = r["t"]
        manufacturing = [
            dict(r)
            for r in await conn.fetch(
                f"SELECT booking_id::text, order_id::text, run, action "
                f"FROM {urls.services['site'].schema}.manufacturing_history"
            )
        ]
        dead: dict[str, list[dict[str, Any]]] = {}
        for name, svc in urls.services.items():
            if await conn.fetchval("SELECT to_regclass($1)", f"{svc.schema}.dead_letters") is None:
                continue
            dead[name] = [
                dict(r)
                for r in await conn.fetch(
                    f"SELECT consumer, event_type, error, attempts FROM {svc.schema}.dead_letters ORDER BY id"
                )
            ]
    finally:
        await conn.close()
    webhooks = []
    for hook in list(receiver.received):
        with contextlib.suppress(Exception):
            body = hook.json()
            webhooks.append(
                {
                    "webhook_id": hook.headers.get("webhook-id", ""),
                    "event_id": str(body.get("id")),
                    "order_id": body.get("subject"),
                }
            )
    ready: dict[str, int] = {}
    consumers: dict[str, dict[str, list[str]]] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        for svc in platform.processes():
            try:
                answer = await http.get(svc.url + "/ready")
            except httpx.HTTPError:
                ready[svc.label] = 0
                continue
            ready[svc.label] = answer.status_code
            with contextlib.suppress(ValueError, KeyError, TypeError):
                for c in answer.json().get("consumers", []):
                    consumers[c["group"]] = {"topics": list(c["topics"]), "handles": list(c["handles"])}
    return FinalState(
        orders,
        timelines,
        slots,
        shipments,
        deliveries,
        webhooks,
        dead,
        ready,
        published=published,
        consumers=consumers,
        consumed=consumed,
        manufacturing=manufacturing,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m v2v_harness chaos")
    p.add_argument("--orders", type=int, default=100)
    p.add_argument("--seconds", type=float, default=180.0, help="how long the nemesis injects faults")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--exceptions", type=float, default=0.2, help="share of orders with a business exception")
    p.add_argument("--day-seconds", type=float, default=None, help="real seconds per simulated day")
    p.add_argument(
        "--deadline-s", type=float, default=120.0, help="orders terminal this long after the last heal"
    )
    p.add_argument(
        "--waves",
        type=int,
        default=None,
        help="simulator runs started in turn (default: 1 per 50 orders, <= 4)",
    )
    p.add_argument("--state-dir", default=".v2v/chaos")
    a = p.parse_args(argv)
    cfg = ChaosConfig(
        orders=a.orders,
        seconds=a.seconds,
        seed=a.seed,
        replicas=a.replicas,
        exceptions=a.exceptions,
        day_seconds=a.day_seconds,
        deadline_s=a.deadline_s,
        state_dir=Path(a.state_dir),
        waves=a.waves,
        out=lambda line: print(line, flush=True),
    )
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
