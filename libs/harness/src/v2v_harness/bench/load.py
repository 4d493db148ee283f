"""The platform side: prepare the network (capacity, webhook subscriptions), then post orders at each
rate of the ramp and measure what comes back.

Everyone acts with their own credentials, as on the real platform: ops reads the catalogue, the registry
admin raises the sites' capacity, each centre subscribes its own endpoint (the platform generates the
signing secret, which the webhook receiver checks) and posts its own orders with its bearer token and a
fresh `Idempotency-Key` per order. Tokens live at most 5 minutes: `CentreTokens` keeps each centre's
fresh in the background, so the hot path never waits for the token endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg
import httpx

from v2v_harness.bench.config import BenchConfig
from v2v_harness.bench.httpio import CHAIN_END, HttpPool, WebhookSink
from v2v_harness.bench.loadgen import LoopResult, open_loop
from v2v_harness.bench.procs import ProcessGroups, SpanCounter
from v2v_harness.bench.stats import (
    RECOVERY_LIMIT_S,
    fmt_rate,
    recovery,
    send_schedule,
    step_passes,
    summarise,
)
from v2v_harness.e2e import Parties, order_body

if TYPE_CHECKING:
    from v2v_harness.identity import Credentials

CHAIN = (
    "order.submitted.v1",
    "scheduling.slot_reserved.v1",
    "site.booking_confirmed.v1",
    CHAIN_END,
)
HOPS = tuple(f"{a.removesuffix('.v1')} → {b.removesuffix('.v1')}" for a, b in itertools.pairwise(CHAIN))
BIG_CAPACITY = 100_000  # starts per day and product: no order waits for a slot

# (centre, product) pairs that some active site is approved for, if the catalogue cannot be read: the
# seeds of services/order and services/site (issue 11: each product at its own manufacturers' sites;
# TISA-CEL everywhere but China, where it has no commercial approval; AXI-CEL and CILTA-CEL in the US, the
# EU, the UK and Canada, and AXI-CEL in China)
FALLBACK_COMBOS: tuple[tuple[str, str], ...] = (
    *(
        (c, "TISA-CEL")
        for c in (
            "TC-US-NJ-001",
            "TC-US-TX-002",
            "TC-DE-BE-001",
            "TC-FR-PA-001",
            "TC-CH-ZH-001",
            "TC-JP-TK-001",
            "TC-AU-VI-001",
            "TC-GB-LN-001",
            "TC-CA-ON-001",
        )
    ),
    *(
        (c, p)
        for p in ("AXI-CEL", "CILTA-CEL")
        for c in (
            "TC-US-NJ-001",
            "TC-US-TX-002",
            "TC-DE-BE-001",
            "TC-FR-PA-001",
            "TC-GB-LN-001",
            "TC-CA-ON-001",
        )
    ),
    ("TC-CN-SH-001", "AXI-CEL"),
)

Progress = Callable[[str], None]


def feasible_combos(
    centres: list[dict[str, Any]], products: list[str], sites: list[dict[str, Any]]
) -> list[tuple[str, str]]:
    """(centre, product) pairs for commercial orders that an active site is approved for (by the
    regulator of the centre's market), in a stable order."""
    combos: list[tuple[str, str]] = []
    for centre in sorted(centres, key=lambda c: str(c["id"])):
        for product in sorted(products):
            if any(
                s.get("active", True)
                and any(
                    a.get("regulator") == centre.get("regulator")
                    and a.get("use") == "commercial"
                    and a.get("product_code") == product
                    for a in s.get("approvals") or []
                )
                for s in sites
            ):
                combos.append((str(centre["id"]), product))
    return combos


def event_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass
class Network:
    combos: list[tuple[str, str]]
    centres: list[str]
    capacity: dict[str, dict[str, int]]  # site -> product -> capacity set


def _ok(resp: httpx.Response, what: str, status: int = 200) -> Any:
    if resp.status_code != status:
        raise RuntimeError(f"{what}: {resp.status_code} {resp.text[:300]}")
    return resp.json()


async def subscribe_centre(parties: Parties, urls: Callable[[str], str], centre: str, url: str) -> str:
    """The centre subscribes `url` with its own token; returns the signing secret the platform made."""
    resp = await parties.centre(centre).post(f"{urls('notification')}/v1/subscriptions", json={"url": url})
    secret = str(_ok(resp, f"POST /v1/subscriptions ({centre})", 201).get("secret", ""))
    if not secret.startswith("whsec_"):
        raise RuntimeError(f"POST /v1/subscriptions ({centre}): no signing secret in the answer")
    return secret


async def prepare_network(
    parties: Parties,
    urls: Callable[[str], str],
    sink: WebhookSink,
    dsn: str,
    progress: Progress,
) -> Network:
    """Raise every site's daily capacity (as the registry admin), subscribe every centre that has a
    client to the sink (as that centre), and wait until scheduling has taken in the new capacity."""
    ops, admin = parties.ops, parties.admin
    catalogue = _ok(await ops.get(f"{urls('order')}/v1/treatment-centers"), "GET /v1/treatment-centers")
    products = [p["code"] for p in _ok(await ops.get(f"{urls('order')}/v1/products"), "GET /v1/products")]
    sites = _ok(await admin.get(f"{urls('site')}/v1/sites"), "GET /v1/sites")
    with_client = {c.entity_id for c in parties.credentials.clients("centre")}
    centres = [c for c in catalogue if c.get("certified", True) and c["id"] in with_client]
    capacity: dict[str, dict[str, int]] = {}
    for site in sites:
        approved = {a["product_code"] for a in site.get("approvals") or []} | set(
            site.get("daily_capacity") or {}
        )
        wanted = {p: BIG_CAPACITY for p in sorted(approved) if p in products}
        if not wanted:
            continue
        resp = await admin.patch(
            f"{urls('site')}/v1/sites/{site['site_id']}", json={"daily_capacity": wanted}
        )
        _ok(resp, f"PATCH /v1/sites/{site['site_id']}")
        capacity[site["site_id"]] = wanted
    centre_ids = sorted(str(c["id"]) for c in centres)
    combos = feasible_combos(centres, products, sites) or [c for c in FALLBACK_COMBOS if c[0] in centre_ids]
    if not combos:
        raise RuntimeError("no certified centre with a client may order any product")
    for centre in centre_ids:
        path = f"/hook/{centre}"
        sink.secrets[path] = await subscribe_centre(parties, urls, centre, sink.url(path))
    progress(
        f"capacity raised to {BIG_CAPACITY}/day on {len(capacity)} sites; {len(centre_ids)} centres "
        f"subscribed (platform-made secrets); {len(combos)} (centre, product) pairs"
    )
    if not await wait_for_scheduling_capacity(dsn, capacity, timeout=60):
        progress("could not confirm scheduling's copy of the capacity; waiting 3 s instead")
        await asyncio.sleep(3)
    return Network(combos, centre_ids, capacity)


async def wait_for_scheduling_capacity(dsn: str, capacity: dict[str, dict[str, int]], timeout: float) -> bool:
    """Scheduling keeps its own copy of each site (from `site.registered`): wait until it shows the new
    capacity. False if it cannot be read (its table may have moved) or not in time."""
    deadline = time.monotonic() + timeout
    try:
        conn = await asyncpg.connect(dsn)
    except Exception:
        return False
    try:
        while time.monotonic() < deadline:
            try:
                rows = await conn.fetch("SELECT site_id, daily_capacity FROM scheduling.sites")
            except Exception:
                return False
            seen: dict[str, dict[str, Any]] = {}
            for row in rows:
                raw = row["daily_capacity"]
                seen[row["site_id"]] = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
            if all(
                int(seen.get(site, {}).get(p, 0)) >= n
                for site, wanted in capacity.items()
                for p, n in wanted.items()
            ):
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await conn.close()


class CentreTokens:
    """Each centre's `Authorization` header for the hot path, renewed in the background every `every_s`
    (Credentials hands out a cached token until a minute before it expires, then a new one)."""

    def __init__(
        self, credentials: Credentials, centres: list[str], progress: Progress, every_s: float = 15.0
    ) -> None:
        self.credentials = credentials
        self.client_ids = {c: credentials.client_id("centre", c) for c in centres}
        self.progress = progress
        self.every_s = every_s
        self.headers: dict[str, str] = {}
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> CentreTokens:
        await self.refresh()
        self._task = asyncio.create_task(self._keep_fresh())
        return self

    async def refresh(self) -> None:
        for centre, client_id in self.client_ids.items():
            self.headers[centre] = "Bearer " + await self.credentials.token(client_id)

    def authorization(self, centre: str) -> str:
        return self.headers[centre]

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.refresh()
            except Exception as exc:  # the tokens in hand last a minute more: try again next time
                self.failures += 1
                self.progress(f"token renewal failed ({exc.__class__.__name__}); retrying")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass
class StepState:
    sent_at: dict[str, float] = field(default_factory=dict)  # order id -> wall clock at send
    intake_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    timeouts: int = 0
    exceptions: int = 0
    waiting: set[str] = field(default_factory=set)  # accepted orders whose chain end has not arrived
    closed: bool = False  # every send has been answered: `waiting` only shrinks from here
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def chain_end(self, order_id: str) -> None:
        self.waiting.discard(order_id)
        if self.closed and not self.waiting:
            self.drained.set()

    async def drain(self, timeout: float) -> bool:
        """After the last answer: wait up to `timeout` for the remaining chain ends."""
        self.closed = True
        if not self.waiting:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.drained.wait()
        return not self.waiting


class PlatformLoad:
    def __init__(
        self,
        cfg: BenchConfig,
        order_url: str,
        sink: WebhookSink,
        network: Network,
        groups: ProcessGroups,
        spans: SpanCounter,
        progress: Progress,
        tokens: CentreTokens,
    ) -> None:
        parts = urlsplit(order_url)
        self.cfg = cfg
        self.tokens = tokens
        self.pool = HttpPool(parts.hostname or "127.0.0.1", parts.port or 80, limit=cfg.max_inflight)
        self.sink = sink
        self.network = network
        self.groups = groups
        self.spans = spans
        self.progress = progress
        self.counter = 0
        self.state = StepState()
        self.open_states: list[StepState] = []
        self.idle_cores: dict[str, float | None] = {}
        sink.on_chain_end = self._chain_end

    def _chain_end(self, order_id: str) -> None:
        for state in self.open_states:
            state.chain_end(order_id)
        self.open_states = [st for st in self.open_states if st.waiting or not st.closed]

    def _new_state(self) -> StepState:
        self.state = StepState()
        self.open_states.append(self.state)
        return self.state

    def outstanding(self) -> int:
        """Accepted orders of every step so far whose chain end has not arrived."""
        return sum(len(st.waiting) for st in self.open_states)

    async def quiesce(self, timeout: float) -> int:
        """Wait (up to `timeout`) for the backlog of earlier steps; returns what is still outstanding."""
        deadline = time.monotonic() + timeout
        for state in list(self.open_states):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await state.drain(left)
        return self.outstanding()

    def bodies(self, count: int) -> list[tuple[str, bytes]]:
        """(centre, body) of the next `count` orders: each is posted by its centre."""
        out = []
        for _ in range(count):
            n = self.counter
            self.counter += 1
            centre, product = self.network.combos[n % len(self.network.combos)]
            body = order_body(centre, product, days_ahead=10 + n % 40, patient_ref=f"BENCH-{n:07d}")
            out.append((centre, json.dumps(body).encode()))
        return out

    async def post(self, state: StepState, order: tuple[str, bytes]) -> None:
        centre, body = order
        headers = {
            "authorization": self.tokens.authorization(centre),
            "idempotency-key": str(uuid.uuid4()),  # one per order: a retried send is the same order
        }
        sent = time.time()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.request_timeout):
                status, payload = await self.pool.request("POST", "/v1/orders", body, headers=headers)
        except TimeoutError:
            state.timeouts += 1
            return
        except Exception:
            state.exceptions += 1
            return
        state.statuses[status] += 1
        if status != 201:
            return
        state.intake_ms.append((time.perf_counter() - t0) * 1000.0)
        order_id = str(json.loads(payload)["order_id"])
        state.sent_at[order_id] = sent
        if CHAIN_END not in self.sink.arrivals.get(order_id, {}):
            state.waiting.add(order_id)

    async def warmup(self, count: int, timeout: float = 90.0) -> None:
        if count <= 0:
            return
        state = self._new_state()
        bodies = self.bodies(count)
        for chunk in range(0, len(bodies), 8):
            await asyncio.gather(*(self.post(state, b) for b in bodies[chunk : chunk + 8]))
        await state.drain(timeout)
        ok = len(state.sent_at) - len(state.waiting)
        self.progress(f"warm-up: {ok}/{count} orders reached the chain end")
        if ok < count:
            raise RuntimeError(
                f"warm-up: only {ok} of {count} orders reached {CHAIN_END} within {timeout:g} s"
            )

    async def measure_idle(self, seconds: float) -> dict[str, float | None]:
        """CPU cores each process group uses with no orders coming in (pollers, fetch loops, relays)."""
        before = self.groups.snapshot()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        cpu = self.groups.delta(before, self.groups.snapshot())
        window = time.monotonic() - t0
        self.idle_cores = {g: (v / window if v is not None else None) for g, v in cpu.items()}
        busy = sum(v for v in self.idle_cores.values() if v is not None)
        self.progress(f"idle: {busy:.2f} cores busy with no load ({seconds:g} s)")
        return self.idle_cores

    async def _report(self, rate: float, state: StepState, started: float, phase: Callable[[], str]) -> None:
        interval = 1.0 if self.cfg.smoke else 2.0
        while True:
            await asyncio.sleep(interval)
            accepted = len(state.sent_at)
            errors = state.timeouts + state.exceptions + sum(n for s, n in state.statuses.items() if s != 201)
            self.progress(
                f"platform {fmt_rate(rate)}/s {phase()} t={time.monotonic() - started:5.1f}s "
                f"accepted {accepted} chains {accepted - len(state.waiting)} errors {errors}"
            )

    async def step(self, rate: float) -> dict[str, Any]:
        cfg = self.cfg
        offsets = send_schedule(rate, cfg.seconds)
        bodies = self.bodies(len(offsets))
        state = self._new_state()
        duplicates0 = self.sink.duplicates
        self.spans.mark()
        cpu0 = self.groups.snapshot()
        started = time.monotonic()
        phase = "sending"
        reporter = asyncio.create_task(self._report(rate, state, started, lambda: phase))
        try:
            loop = await open_loop(
                offsets, lambda i: self.post(state, bodies[i]), max_inflight=cfg.max_inflight
            )
            phase = "draining"
            await state.drain(cfg.drain)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        window = time.monotonic() - started
        cutoff = time.time()  # a chain end after the drain does not count
        cpu1 = self.groups.snapshot()
        await asyncio.sleep(cfg.settle)
        span_lines = self.spans.count_since_mark()
        result = self.measure(rate, offsets, state, loop.lateness_ms, loop.overflow + loop.exceptions, cutoff)
        cpu = self.groups.delta(cpu0, cpu1)
        accepted = max(1, len(state.sent_at))
        result["window_s"] = window
        result["cpu_s"] = cpu
        result["cpu_s_per_order"] = {g: (v / accepted if v is not None else None) for g, v in cpu.items()}
        result["cpu_ms_per_order"] = {
            g: (v * 1000.0 / accepted if v is not None else None) for g, v in cpu.items()
        }
        result["cpu_cores"] = {g: (v / window if v is not None else None) for g, v in cpu.items()}
        measured = [v for v in cpu.values() if v is not None]
        result["cpu_ms_per_order_total"] = sum(measured) * 1000.0 / accepted
        # what the orders added on top of the idle background, per order
        net = {
            g: (
                max(0.0, v - (self.idle_cores.get(g) or 0.0) * window) * 1000.0 / accepted
                if v is not None
                else None
            )
            for g, v in cpu.items()
        }
        result["cpu_ms_per_order_net_of_idle"] = net
        result["cpu_ms_per_order_net_of_idle_total"] = sum(v for v in net.values() if v is not None)
        result["spans"] = span_lines
        result["spans_per_order"] = (sum(span_lines.values()) / accepted) if span_lines else None
        result["spans_per_order_by_service"] = {s: n / accepted for s, n in span_lines.items()}
        result["duplicates"] = self.sink.duplicates - duplicates0
        result["pass"] = step_passes(result)
        chain = result["chain_ms"]
        self.progress(
            f"platform {fmt_rate(rate)}/s done: {result['completed']}/{result['orders']} chains, "
            f"chain p50 {_ms(chain['p50'])} p99 {_ms(chain['p99'])}, intake p99 "
            f"{_ms(result['intake_ms']['p99'])}, errors {result['errors']}, "
            f"cpu {result['cpu_ms_per_order_total']:.1f} ms/order -> {'ok' if result['pass'] else 'FAIL'}"
        )
        return result

    def measure(
        self,
        rate: float,
        offsets: list[float],
        state: StepState,
        lateness: dict[str, Any],
        loop_errors: int,
        cutoff: float,
    ) -> dict[str, Any]:
        first_ms: list[float] = []
        chain_ms: list[float] = []
        post_to_submitted: list[float] = []
        end_to_webhook: list[float] = []
        hops: dict[str, list[float]] = {h: [] for h in HOPS}
        for order_id, sent in state.sent_at.items():
            arrivals = self.sink.arrivals.get(order_id)
            if not arrivals:
                continue
            first_ms.append((min(a.at for a in arrivals.values()) - sent) * 1000.0)
            end = arrivals.get(CHAIN_END)
            if end is not None and end.at <= cutoff:
                chain_ms.append((end.at - sent) * 1000.0)
                end_to_webhook.append((end.at - event_ts(end.event_time)) * 1000.0)
            if CHAIN[0] in arrivals:
                post_to_submitted.append((event_ts(arrivals[CHAIN[0]].event_time) - sent) * 1000.0)
            for hop, a, b in zip(HOPS, CHAIN, CHAIN[1:], strict=False):
                if a in arrivals and b in arrivals:
                    lag = event_ts(arrivals[b].event_time) - event_ts(arrivals[a].event_time)
                    hops[hop].append(lag * 1000.0)
        http_errors = sum(n for s, n in state.statuses.items() if s != 201)
        errors = loop_errors + state.timeouts + state.exceptions + http_errors
        return {
            "rate": rate,
            "seconds": self.cfg.seconds,
            "orders": len(offsets),
            "accepted": len(state.sent_at),
            "completed": len(chain_ms),
            "errors": errors,
            "error_detail": {
                "overflow_or_generator": loop_errors,
                "timeouts": state.timeouts,
                "exceptions": state.exceptions,
                "http": {str(s): n for s, n in sorted(state.statuses.items()) if s != 201},
            },
            "send_lateness_ms": lateness,
            "intake_ms": summarise(state.intake_ms),
            "first_webhook_ms": summarise(first_ms),
            "chain_ms": summarise(chain_ms),
            "post_to_submitted_event_ms": summarise(post_to_submitted),
            "hop_lag_ms": {h: summarise(v) for h, v in hops.items()},
            "chain_end_event_to_webhook_ms": summarise(end_to_webhook),
        }

    def _latency_ms(self, order_id: str, sent: float) -> float | None:
        end = self.sink.arrivals.get(order_id, {}).get(CHAIN_END)
        return None if end is None else (end.at - sent) * 1000.0

    def _probe_recovery(self, probes: StepState, ended: float, base_p99: float | None) -> dict[str, Any]:
        return recovery(
            [(sent - ended, self._latency_ms(oid, sent)) for oid, sent in probes.sent_at.items()],
            base_p99,
            self.cfg.recovery_window_s,
            hold_s=self.cfg.recovery_hold_s,
        )

    async def overload(self, knee: float, base: dict[str, Any]) -> dict[str, Any]:
        """Issue 12's overload: `overload_factor` x the knee for `overload_seconds` (open model), then
        probe orders at the knee rate for up to `recovery_seconds`, measuring when the overload's backlog
        has drained and when the probes' chain latency is back at `base` (the knee step's chain p99; see
        `stats.recovery`). The probes stop early once the backlog has drained and the last
        `recovery_hold_s` of fully answered probe windows were all at base."""
        cfg = self.cfg
        rate = knee * cfg.overload_factor
        base_p99 = (base.get("chain_ms") or {}).get("p99")
        offsets = send_schedule(rate, cfg.overload_seconds)
        bodies = self.bodies(len(offsets))
        over = self._new_state()
        started = time.monotonic()
        phase = "overload"
        probes = StepState()
        reporter = asyncio.create_task(
            self._report(
                rate,
                over,
                started,
                lambda: (
                    phase
                    if phase == "overload"
                    else f"{phase} (probes at {fmt_rate(knee)}/s: accepted {len(probes.sent_at)} "
                    f"chains {len(probes.sent_at) - len(probes.waiting)})"
                ),
            )
        )
        outstanding: list[dict[str, Any]] = []
        probe_offsets = send_schedule(knee, cfg.recovery_seconds)
        ended = time.time()
        probe_loop = None

        def answered(_task: asyncio.Task[LoopResult]) -> None:
            # every overload send has been answered: from here its `waiting` only shrinks
            over.closed = True
            if not over.waiting:
                over.drained.set()

        sender = asyncio.create_task(
            open_loop(offsets, lambda i: self.post(over, bodies[i]), max_inflight=cfg.max_inflight)
        )
        sender.add_done_callback(answered)
        watcher: asyncio.Task[None] | None = None
        try:
            # the overload ends with its last scheduled send (answers may lag); the probes start one
            # overload gap later
            await asyncio.sleep(max(0.0, started + (offsets[-1] if offsets else 0.0) - time.monotonic()))
            ended = time.time()
            await asyncio.sleep(1.0 / rate)
            phase = "recovery"
            self.open_states.append(probes)
            self.state = probes
            stop = False

            async def watch() -> None:
                nonlocal stop
                while True:
                    await asyncio.sleep(min(1.0, cfg.recovery_window_s))
                    now = time.time()
                    outstanding.append(
                        {
                            "t_s": now - ended,
                            "overload_outstanding": len(over.waiting),
                            "answered": over.closed,
                        }
                    )
                    if not over.closed or over.waiting or base_p99 is None:
                        continue
                    # windows whose probes have had the base p99 to end: each is done or already late
                    rows = self._probe_recovery(probes, ended, base_p99)["series"]
                    late = now - ended - float(base_p99) / 1000.0 - cfg.recovery_window_s
                    judged = [r for r in rows if r["t_s"] <= late and r["at_base"] is not None]
                    good = 0.0
                    for r in reversed(judged):
                        if not r["at_base"]:
                            break
                        good += cfg.recovery_window_s
                    if good >= cfg.recovery_hold_s:
                        stop = True
                        return

            watcher = asyncio.create_task(watch())
            probe_bodies = self.bodies(len(probe_offsets))
            probe_loop = await open_loop(
                probe_offsets,
                lambda i: self.post(probes, probe_bodies[i]),
                max_inflight=cfg.max_inflight,
                stop=lambda: stop,
            )
            phase = "draining"
            loop = await sender
            await asyncio.gather(over.drain(cfg.drain), probes.drain(cfg.drain))
        finally:
            for task in (watcher, reporter, sender):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        cutoff = time.time()
        result = self.measure(rate, offsets, over, loop.lateness_ms, loop.overflow + loop.exceptions, cutoff)
        result["seconds"] = cfg.overload_seconds
        ends = [
            self.sink.arrivals[oid][CHAIN_END].at
            for oid in over.sent_at
            if CHAIN_END in self.sink.arrivals.get(oid, {})
        ]
        drained = result["completed"] == result["orders"] and result["errors"] == 0
        drained_s = (max(ends) - ended) if ends else None
        rec = self._probe_recovery(probes, ended, base_p99)
        probe_latencies = [self._latency_ms(o, s) for o, s in probes.sent_at.items()]
        probe_errors = (probe_loop.overflow + probe_loop.exceptions if probe_loop else 0) + (
            probes.timeouts + probes.exceptions + sum(n for st, n in probes.statuses.items() if st != 201)
        )
        recovery_s = rec["recovery_s"]
        out = {
            "rate": rate,
            "knee_rate": knee,
            "factor": cfg.overload_factor,
            "seconds": cfg.overload_seconds,
            "overload": result,
            "orders": result["orders"],
            "completed": result["completed"],
            "errors": result["errors"],
            "drained": drained,
            # the last overload order's chain end, seconds after the overload's last send (all or not)
            "drained_s": drained_s if drained else None,
            "last_chain_end_s": drained_s,
            "base_chain_ms": {"p50": (base.get("chain_ms") or {}).get("p50"), "p99": base_p99},
            "probe_rate": knee,
            # how long probes were sent: less than recovery_seconds when they stopped early
            "probe_seconds": (probe_loop.scheduled / knee) if probe_loop else 0.0,
            "probes_stopped_early": bool(probe_loop and probe_loop.scheduled < len(probe_offsets)),
            "probes": len(probe_latencies) + probe_errors,
            "probes_completed": sum(1 for v in probe_latencies if v is not None),
            "probe_errors": probe_errors,
            "probe_chain_ms": summarise(v for v in probe_latencies if v is not None),
            "recovery_s": recovery_s,
            "recovery_s_strict": rec["recovery_s_strict"],
            "recovery_window_s": rec["window_s"],
            "recovery_window_percentile": rec["window_percentile"],
            "recovery_hold_s": cfg.recovery_hold_s,  # at base that long before the probes ended
            "limit_s": RECOVERY_LIMIT_S,
            "recovered_within_limit": bool(
                drained
                and drained_s is not None
                and drained_s <= RECOVERY_LIMIT_S
                and recovery_s is not None
                and recovery_s <= RECOVERY_LIMIT_S
            ),
            "probe_series": rec["series"],
            "backlog_series": outstanding,
        }
        self.progress(
            f"overload {fmt_rate(rate)}/s for {cfg.overload_seconds:g} s: {result['completed']}/"
            f"{result['orders']} chains, drained "
            f"{'in ' + format(drained_s, '.1f') + ' s' if drained and drained_s is not None else 'NO'}, "
            f"base p99 {_ms(base_p99)}, back at base after "
            f"{'-' if recovery_s is None else format(recovery_s, '.1f') + ' s'} "
            f"-> {'ok' if out['recovered_within_limit'] else 'FAIL'} (limit {RECOVERY_LIMIT_S:g} s)"
        )
        return out

    async def aclose(self) -> None:
        await self.tokens.aclose()
        await self.pool.aclose()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def midpoint(lo: float, hi: float) -> float:
    """A round rate between a rate that holds and one that does not."""
    mid = (lo + hi) / 2
    return float(round(mid)) if hi - lo >= 4 else round(mid, 1)


async def run_ramp(load: PlatformLoad, cfg: BenchConfig, progress: Progress) -> list[dict[str, Any]]:
    """The rates in order until one fails (all of them with keep_going), then `cfg.refine` bisection
    steps between the highest rate that held and the lowest that did not."""
    steps: list[dict[str, Any]] = []
    for i, rate in enumerate(cfg.rates):
        step = await load.step(rate)
        steps.append(step)
        if not step["pass"] and not cfg.keep_going:
            skipped = cfg.rates[i + 1 :]
            if skipped:
                progress(
                    f"stopping the ramp: {fmt_rate(rate)}/s did not hold (skipped "
                    f"{', '.join(fmt_rate(r) for r in skipped)}; --keep-going runs them)"
                )
            break
    for _ in range(cfg.refine):
        passed = sorted(s["rate"] for s in steps if s["pass"])
        failed = sorted(s["rate"] for s in steps if not s["pass"])
        if not passed or not failed:
            break
        lo = max(r for r in passed if r < failed[0]) if any(r < failed[0] for r in passed) else None
        if lo is None:
            break
        mid = midpoint(lo, failed[0])
        if mid <= lo or mid >= failed[0] or any(s["rate"] == mid for s in steps):
            break
        left = await load.quiesce(cfg.drain * 2)
        if left:
            progress(f"refining: {left} orders of earlier rates still outstanding")
        await asyncio.sleep(cfg.settle)
        progress(f"refining the knee between {fmt_rate(lo)}/s and {fmt_rate(failed[0])}/s: {fmt_rate(mid)}/s")
        step = await load.step(mid)
        step["refinement"] = True
        steps.append(step)
    return steps
