#!/usr/bin/env python3
"""vein2vein simulator: plays hospitals, couriers and site manufacturing systems through the public APIs.

    python tools/simulator/simulator.py --orders 200 --exceptions 0.2 --seed 7      (or: make demo)

N orders are placed at the certified treatment centres for (centre, product, use) combinations that some
site approves, spread so that all seven sites get work. Each order is one asyncio task that acts, in
turn, as the hospital (apheresis, lymphodepletion, product receipt, infusion), the courier (milestones
and temperature readings of the inbound and outbound shipments) and the site's MES (receipt,
manufacturing steps, QC) whenever the order reaches the state where that actor acts, and waits for the
platform's reaction in between. A fraction of the orders gets one exception (cancellation, rejected
material, temperature excursions, OOS, failed manufacture, a moved apheresis date, a site outage; see
EXCEPTION_WEIGHTS). A few deliberate mistakes (lymphodepletion before release, a mistyped COI check
character) must be refused; they are counted apart from errors.

Time is compressed: a simulated clock starts now and runs `--day-seconds` real seconds per simulated day.
Every action waits for its simulated time and reports it (`at`, `occurred_at`, `completed_at`, ...), so
vein-to-vein days are simulated days. The platform itself lives in real time: a recollection's new
apheresis date is computed by the order service from the real date, so the simulator never collects
before the simulated moment of the failure plus the product's recollection lead time.

If the order service does not answer on the default ports, the platform is started as a child process
(`python -m v2v_harness run --state-dir .v2v/demo`) and stopped at the end.

Exit status: 0 when every order reached a terminal state (completed, cancelled, failed) and no error
(unexpected HTTP 5xx or 4xx, order stuck, timeout) happened; 1 otherwise; 2 when the platform could not
be reached or started.

Only the standard library and httpx (from the project's .venv) are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("order", "scheduling", "site", "logistics", "notification")
DEFAULT_PORTS = {"order": 8001, "scheduling": 8002, "site": 8003, "logistics": 8004, "notification": 8005}
DEFAULT_URLS = {name: f"http://127.0.0.1:{port}" for name, port in DEFAULT_PORTS.items()}

TERMINAL = frozenset({"completed", "cancelled", "failed"})
BUCKETS: dict[str, tuple[str, ...]] = {
    "booking": (
        "submitted",
        "waitlisted",
        "slot_reserved",
        "booking_confirmed",
        "rescheduling",
        "inbound_shipment_planned",
    ),
    "inbound": ("apheresis_completed", "material_in_transit"),
    "manufacturing": ("material_received", "manufacturing", "qc_pending"),
    "outbound": ("released", "product_in_transit", "product_delivered", "quarantined", "product_received"),
    "completed": ("completed",),
    "cancelled": ("cancelled",),
    "failed": ("failed",),
}
BUCKET_OF = {status: bucket for bucket, statuses in BUCKETS.items() for status in statuses}
MATERIAL_ON_THE_WAY = frozenset({"apheresis_completed", "material_in_transit"})
IN_MANUFACTURE = frozenset({"material_received", "manufacturing", "qc_pending"})
PRODUCT_OUT = frozenset({"released", "product_in_transit", "product_delivered"})
SHIPMENT_LIVE = frozenset({"planned", "ready_for_pickup", "booked", "picked_up", "in_transit"})
MILESTONES = ("booked", "picked_up", "in_transit", "delivered")
STEPS = ("activation", "transduction", "expansion", "harvest", "cryopreservation")
# when each step is reported, as a fraction of the product's manufacturing days after the run starts
STEP_FRACTION = {
    "activation": 0.06,
    "transduction": 0.15,
    "expansion": 0.7,
    "harvest": 0.9,
    "cryopreservation": 1.0,
}
MES_RUNNING = frozenset(
    {"material_received", "activation", "transduction", "expansion", "harvest", "qc_pending"}
)

# Relative weights of the exception kinds (an order gets at most one; printed with the summary).
EXCEPTION_WEIGHTS: dict[str, int] = {
    "cancellation": 14,  # the centre cancels at a random step
    "material_rejected": 12,  # the site refuses the apheresis material at receipt -> recollection
    "inbound_excursion": 12,  # inbound reading out of range -> recollection
    "qc_oos": 14,  # out of specification at QC -> remanufacture (retained material) or recollection
    "manufacturing_failure": 10,  # a step fails -> remanufacture or recollection
    "outbound_excursion": 12,  # outbound reading out of range -> quarantine -> QA release or reject
    "apheresis_moved": 12,  # the centre moves the apheresis date before apheresis -> rebook
    "site_outage": 8,  # in the cohort whose bookings the one site outage of the run hits -> rebook
    "persistent_oos": 6,  # every run out of specification -> remanufacture, recollection, ... failed
}
CANCEL_STAGES = (
    "before_apheresis",
    "material_in_transit",
    "manufacturing",
    "qc_pending",
    "product_in_transit",
)
QA_RELEASE_SHARE = 0.6  # quarantined products released by QA (the rest rejected)
REJECT_REASONS = ("label damaged, identity not verifiable", "bag leaking on arrival", "volume below minimum")
OOS_REASONS = ("viability 61% below 80% specification", "CAR+ 9% below 15% specification", "potency low")
FAIL_REASONS = ("insufficient expansion", "transduction efficiency too low", "bioreactor contamination alarm")


# ---- configuration ----------------------------------------------------------------------------------


@dataclass
class Config:
    orders: int = 200
    exceptions: float = 0.2
    seed: int = 2020
    urls: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_URLS))
    concurrency: int = 20
    timeout_s: float = 600.0
    day_seconds: float = 0.2
    stall_s: float = 90.0
    poll_s: float = 0.5
    progress_s: float = 2.0
    start_platform: bool = True
    state_dir: str = ".v2v/demo"


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="python tools/simulator/simulator.py",
        description="Play hospitals, couriers and site MES for N orders through the public APIs.",
    )
    p.add_argument("--orders", type=int, default=200, help="number of orders (default 200)")
    p.add_argument("--exceptions", type=float, default=0.2, help="share of orders with an exception (0-1)")
    p.add_argument("--seed", type=int, default=2020, help="random seed (same seed, same plan)")
    for name in SERVICES:
        p.add_argument(f"--base-url-{name}", default=DEFAULT_URLS[name], help=f"{name} service base URL")
    p.add_argument("--concurrency", type=int, default=20, help="HTTP requests in flight at most (default 20)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="give up after this many real seconds")
    p.add_argument("--day-seconds", type=float, default=0.2, help="real seconds per simulated day")
    p.add_argument(
        "--stall-s", type=float, default=90.0, help="an order waiting this long for the platform is stuck"
    )
    p.add_argument("--poll-s", type=float, default=0.5, help="how often order statuses are read")
    p.add_argument("--progress-s", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--no-start", action="store_true", help="never start the platform, fail if it is down")
    p.add_argument("--state-dir", default=".v2v/demo", help="state folder of a platform the simulator starts")
    a = p.parse_args(argv)
    if a.orders < 1:
        p.error("--orders must be at least 1")
    if not 0.0 <= a.exceptions <= 1.0:
        p.error("--exceptions must be between 0 and 1")
    if a.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if a.day_seconds < 0:
        p.error("--day-seconds must be 0 or more")
    return Config(
        orders=a.orders,
        exceptions=a.exceptions,
        seed=a.seed,
        urls={name: getattr(a, f"base_url_{name}").rstrip("/") for name in SERVICES},
        concurrency=a.concurrency,
        timeout_s=a.timeout_s,
        day_seconds=a.day_seconds,
        stall_s=a.stall_s,
        poll_s=a.poll_s,
        progress_s=a.progress_s,
        start_platform=not a.no_start,
        state_dir=a.state_dir,
    )


# ---- the compressed clock ----------------------------------------------------------------------------


class SimClock:
    """Simulated time: starts at `start` and advances one day every `day_seconds` real seconds."""

    def __init__(
        self, start: datetime, day_seconds: float, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.start = start
        self.day_seconds = day_seconds
        self._monotonic = monotonic
        self._t0 = monotonic()

    def now(self) -> datetime:
        if self.day_seconds <= 0:
            return self.start
        return self.start + timedelta(days=(self._monotonic() - self._t0) / self.day_seconds)

    def real_delay(self, when: datetime) -> float:
        """Real seconds until the simulated clock reaches `when` (0 if it has)."""
        if self.day_seconds <= 0:
            return 0.0
        return max(0.0, (when - self.now()).total_seconds() / 86400 * self.day_seconds)

    async def until(self, when: datetime) -> None:
        delay = self.real_delay(when)
        if delay > 0:
            await asyncio.sleep(delay)

    def at(self, day: date, hour: float = 9.0) -> datetime:
        """A simulated moment on `day` at `hour` (UTC)."""
        return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(hours=hour)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def days_between(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() / 86400


# ---- summary maths -----------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; None if empty."""
    xs = sorted(values)
    if not xs:
        return None
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def utilisation(
    sites: list[dict[str, Any]], consumed: dict[str, int], window: tuple[date, date] | None
) -> list[dict[str, Any]]:
    """Per site: slots consumed by manufacture vs. the capacity (starts/day x days) over the window."""
    days = (window[1] - window[0]).days + 1 if window else 0
    out = []
    for site in sites:
        capacity = sum(int(n) for n in (site.get("daily_capacity") or {}).values()) * days
        used = consumed.get(site["site_id"], 0)
        out.append(
            {
                "site_id": site["site_id"],
                "consumed": used,
                "capacity": capacity,
                "share": (used / capacity) if capacity else 0.0,
            }
        )
    return out


# ---- the plan: which orders, where, with which exception ---------------------------------------------


@dataclass(frozen=True)
class Combo:
    centre: str
    product: str
    order_type: str
    sites: tuple[str, ...]  # approved sites, in the order scheduling prefers them when all are free
    primary: str


def feasible_combos(
    centres: list[dict[str, Any]], products: list[dict[str, Any]], sites: list[dict[str, Any]]
) -> list[Combo]:
    """Every (centre, product, use) some active site approves; `primary` is where it lands when all sites
    have room (the nearest region first, then by site id, as scheduling chooses)."""
    combos = []
    for centre in centres:
        for product in products:
            for use in ("commercial", "clinical"):
                eligible = [
                    s
                    for s in sites
                    if s.get("active", True)
                    and int((s.get("daily_capacity") or {}).get(product["code"], 0)) > 0
                    and any(
                        a["regulator"] == centre["regulator"]
                        and a["use"] == use
                        and a["product_code"] == product["code"]
                        for a in s.get("approvals") or []
                    )
                ]
                if not eligible:
                    continue
                ranked = sorted(eligible, key=lambda s: (s["region"] != centre["region"], s["site_id"]))
                ids = tuple(s["site_id"] for s in ranked)
                combos.append(Combo(centre["id"], product["code"], use, ids, ids[0]))
    return combos


@dataclass
class OrderPlan:
    index: int
    patient_ref: str
    combo: Combo
    requested_date: date
    place_day: float  # simulated days after the start when the centre places the order
    kind: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    lymph_refusal: bool = False  # tries lymphodepletion before release (must be refused: 409)
    coi_typo: bool = False  # confirms apheresis with a mistyped COI check character first (422)


@dataclass
class Plan:
    orders: list[OrderPlan]
    outage_site: str | None
    outage_gate: date | None  # first requested apheresis date of the outage cohort
    spread_days: int


def site_weights(combos: list[Combo], sites: list[dict[str, Any]]) -> dict[str, float]:
    """A site's share of the orders: its daily capacity for the products that land there first."""
    capacity = {s["site_id"]: s.get("daily_capacity") or {} for s in sites}
    products: dict[str, set[str]] = defaultdict(set)
    for c in combos:
        products[c.primary].add(c.product)
    return {site: float(sum(int(capacity[site].get(p, 0)) for p in ps)) for site, ps in products.items()}


def choose_kinds(n_exceptions: int, rng: random.Random, weights: dict[str, int]) -> list[str]:
    """Exception kinds for `n_exceptions` orders: every kind once while there is room (heaviest first),
    then drawn by weight."""
    kinds = [k for k, w in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0])) if w > 0]
    chosen = kinds[:n_exceptions]
    rest = n_exceptions - len(chosen)
    if rest > 0 and kinds:
        chosen += rng.choices(kinds, weights=[weights[k] for k in kinds], k=rest)
    rng.shuffle(chosen)
    return chosen


def make_plan(
    cfg: Config,
    centres: list[dict[str, Any]],
    products: list[dict[str, Any]],
    sites: list[dict[str, Any]],
    today: date,
) -> Plan:
    rng = random.Random(cfg.seed)
    combos = feasible_combos(centres, products, sites)
    if not combos:
        raise RuntimeError("no (centre, product, use) combination is approved at any site")
    capacity = {s["site_id"]: s.get("daily_capacity") or {} for s in sites}
    weights = site_weights(combos, sites)
    by_site: dict[str, list[Combo]] = defaultdict(list)
    for c in combos:
        by_site[c.primary].append(c)
    site_ids = sorted(by_site)
    total_weight = sum(weights[s] for s in site_ids) or 1.0

    # the outage cohort: combos that land first at one site but have an alternative (else the rebook
    # could only wait); the site with the most capacity for them
    outage_options = [c for c in combos if len(c.sites) > 1]
    kinds_weights = dict(EXCEPTION_WEIGHTS)
    outage_site = None
    outage_combos: list[Combo] = []
    if outage_options:
        outage_site = max(
            {c.primary for c in outage_options},
            key=lambda s: (
                sum(int(capacity[s].get(c.product, 0)) for c in outage_options if c.primary == s),
                s,
            ),
        )
        outage_combos = [c for c in outage_options if c.primary == outage_site]
    else:
        kinds_weights["site_outage"] = 0

    n = cfg.orders
    n_exc = round(n * cfg.exceptions)
    kinds = choose_kinds(n_exc, rng, kinds_weights) + [None] * (n - n_exc)  # type: ignore[list-item]
    rng.shuffle(kinds)
    # enough days for the booked demand to fit the network's capacity about twice over
    spread = max(14, math.ceil(2.0 * n / total_weight))
    first_offset = 3
    cohort = [i for i, k in enumerate(kinds) if k == "site_outage"]
    gate = None
    if cohort and outage_site is not None:
        # after everyone else's dates, and clear of outages the site already has (an earlier run's)
        per_day = max(1, min(int(capacity[outage_site].get(c.product, 1)) for c in outage_combos) // 2)
        needed = timedelta(days=len(cohort) // per_day + 3)
        gate = today + timedelta(days=first_offset + spread + 10)
        closed = [
            (as_date(o["start_date"]), as_date(o["end_date"]))
            for s in sites
            if s["site_id"] == outage_site
            for o in s.get("outages") or []
        ]
        while any(lo and hi and lo <= gate + needed and gate <= hi for lo, hi in closed):
            gate += timedelta(days=1)

    orders: list[OrderPlan] = []
    for i, kind in enumerate(kinds):
        if kind == "site_outage" and outage_combos and gate is not None:
            combo = outage_combos[cohort.index(i) % len(outage_combos)]
            requested = gate + timedelta(days=cohort.index(i) // per_day)
        else:
            site = rng.choices(site_ids, weights=[weights[s] for s in site_ids])[0]
            group = by_site[site]
            # within a site, products in proportion to its capacity for them
            cw = [
                int(capacity[site].get(c.product, 0)) / sum(1 for g in group if g.product == c.product)
                for c in group
            ]
            combo = rng.choices(group, weights=cw)[0]
            requested = today + timedelta(days=first_offset + rng.randrange(spread))
        # the centre orders some time between now and 5 days before the apheresis date it asks for
        place_day = rng.uniform(0.0, max(0.0, (requested - today).days - 5.0))
        params: dict[str, Any] = {}
        if kind == "cancellation":
            params["stage"] = rng.choice(CANCEL_STAGES)
        elif kind == "material_rejected":
            params["reason"] = rng.choice(REJECT_REASONS)
        elif kind in {"qc_oos", "persistent_oos"}:
            params["reason"] = rng.choice(OOS_REASONS)
        elif kind == "manufacturing_failure":
            params["step"] = rng.choice(STEPS)
            params["reason"] = rng.choice(FAIL_REASONS)
        elif kind == "outbound_excursion":
            params["decision"] = "release" if rng.random() < QA_RELEASE_SHARE else "reject"
        elif kind == "apheresis_moved":
            params["days"] = rng.randint(3, 10)
        orders.append(
            OrderPlan(
                index=i,
                patient_ref=f"SIM-{cfg.seed % 1000:03d}-{i + 1:05d}",
                combo=combo,
                requested_date=requested,
                place_day=place_day,
                kind=kind,
                params=params,
            )
        )
    # deliberate mistakes, on orders that are not cancelled on purpose
    candidates = [o for o in orders if o.kind != "cancellation"] or orders
    for o in rng.sample(candidates, min(len(candidates), max(1, n // 20))):
        o.lymph_refusal = True
    for o in rng.sample(candidates, min(len(candidates), max(1, n // 25))):
        o.coi_typo = True
    return Plan(orders, outage_site if cohort else None, gate, spread)


def mistype_check_character(coi: str) -> str:
    """The same COI with another check character (ISO 7064 MOD 37-2 alphabet: 0-9, A-Z, *)."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ*"
    last = coi[-1]
    return (
        coi[:-1] + alphabet[(alphabet.index(last) + 1) % len(alphabet)]
        if last in alphabet
        else coi[:-1] + "0"
    )


# ---- HTTP with accounting -----------------------------------------------------------------------------


class OrderAbort(Exception):
    """An order's actor cannot go on (an unexpected answer, or the order is stuck)."""


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    intended: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors.append(message)


class Api:
    def __init__(self, urls: dict[str, str], concurrency: int, stats: Stats) -> None:
        self.urls = urls
        self.stats = stats
        self.sem = asyncio.Semaphore(concurrency)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=5.0),
            limits=httpx.Limits(max_connections=concurrency + 10, max_keepalive_connections=concurrency + 10),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def call(
        self,
        method: str,
        service: str,
        path: str,
        *,
        label: str,
        who: str = "",
        json: Any = None,
        params: dict[str, Any] | None = None,
        ok: Iterable[int] = (200, 201),
        intended: Iterable[int] = (),
        throttle: bool = True,
    ) -> tuple[int, Any]:
        """One request. Answers in `ok` are returned; in `intended` counted as intended refusals and
        returned; anything else is recorded as an error and raises OrderAbort. 5xx and transport errors
        are recorded and retried (twice, resp. four times) first."""
        url = self.urls[service] + path
        ok_set, intended_set = set(ok), set(intended)
        server_errors = transport_errors = 0
        while True:
            try:
                if throttle:
                    async with self.sem:
                        resp = await self.client.request(method, url, json=json, params=params)
                else:
                    resp = await self.client.request(method, url, json=json, params=params)
            except httpx.TransportError as exc:
                transport_errors += 1
                if transport_errors <= 4:
                    await asyncio.sleep(0.5 * transport_errors)
                    continue
                self.stats.error(f"{who} {label}: {method} {path}: {type(exc).__name__}: {exc}")
                raise OrderAbort(f"{label}: {exc}") from exc
            self.stats.calls[label] += 1
            self.stats.statuses[resp.status_code] += 1
            try:
                body = resp.json() if resp.content else None
            except ValueError:
                body = resp.text
            if resp.status_code in ok_set:
                return resp.status_code, body
            if resp.status_code in intended_set:
                self.stats.intended[f"{label} -> {resp.status_code}"] += 1
                return resp.status_code, body
            detail = body.get("detail") if isinstance(body, dict) else str(body)[:300]
            self.stats.error(f"{who} {label}: {method} {path} -> {resp.status_code} {detail}")
            if resp.status_code >= 500 and server_errors < 2:
                server_errors += 1
                await asyncio.sleep(0.5 * server_errors)
                continue
            raise OrderAbort(f"{label}: HTTP {resp.status_code}")


# ---- order status tracking ------------------------------------------------------------------------------


def parse_time(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def signature(row: dict[str, Any]) -> tuple[Any, ...]:
    slot = row.get("slot") or {}
    return (row["status"], row.get("run"), slot.get("slot_id"), row.get("recollections"))


class Tracker:
    """Reads every simulated order's status from the paginated order list (one request per 200 orders),
    and lets the actors wait for a change."""

    def __init__(self, api: Api, poll_s: float) -> None:
        self.api = api
        self.poll_s = poll_s
        self.rows: dict[str, dict[str, Any]] = {}
        self.events: dict[str, asyncio.Event] = {}
        self.base_offset = 0

    async def start(self) -> None:
        _, page = await self.api.call(
            "GET", "order", "/v1/orders", params={"limit": 1}, label="list orders", throttle=False
        )
        self.base_offset = max(0, int(page["total"]) - 1)

    def add(self, row: dict[str, Any]) -> None:
        oid = str(row["order_id"])
        self.events.setdefault(oid, asyncio.Event())
        self.observe(row)

    def observe(self, row: dict[str, Any]) -> None:
        oid = str(row["order_id"])
        if oid not in self.events:
            return
        current = self.rows.get(oid)
        if current is not None and parse_time(current["updated_at"]) > parse_time(row["updated_at"]):
            return
        self.rows[oid] = row
        if current is None or signature(current) != signature(row):
            self.events[oid].set()
            self.events[oid] = asyncio.Event()

    async def poll_once(self) -> None:
        offset = self.base_offset
        while True:
            _, page = await self.api.call(
                "GET",
                "order",
                "/v1/orders",
                params={"limit": 200, "offset": offset},
                label="list orders",
                throttle=False,
            )
            for row in page["items"]:
                self.observe(row)
            if page.get("next_offset") is None:
                return
            offset = page["next_offset"]

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OrderAbort):
                await self.poll_once()
            await asyncio.sleep(self.poll_s)

    async def wait_change(self, order_id: str, sig: tuple[Any, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.rows[order_id]
            if signature(row) != sig:
                return row
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events[order_id].wait(), remaining)

    async def wait_for(
        self, order_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.rows[order_id]
            if predicate(row) or row["status"] in TERMINAL:
                return row
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events[order_id].wait(), remaining)


# ---- the site outage ---------------------------------------------------------------------------------------


@dataclass
class OutageState:
    site: str | None
    gate: date | None
    posted: asyncio.Event = field(default_factory=asyncio.Event)
    window: tuple[date, date] | None = None
    affected: int = 0
    note: str = ""

    def holds(self, manufacturing_start: date | None) -> bool:
        """Whether an order booked for then must wait for the outage (declared at a site the outage
        cohort was booked at) before its apheresis."""
        return (
            self.gate is not None
            and not self.posted.is_set()
            and manufacturing_start is not None
            and manufacturing_start >= self.gate
        )

    def covers(self, site_id: str | None, manufacturing_start: date | None) -> bool:
        return (
            self.window is not None
            and site_id == self.site
            and manufacturing_start is not None
            and self.window[0] <= manufacturing_start <= self.window[1]
        )


# ---- one order: hospital, courier and site MES in turn -----------------------------------------------------


def as_date(value: Any) -> date | None:
    return date.fromisoformat(str(value)[:10]) if value else None


@dataclass
class OrderResult:
    plan: OrderPlan
    order_id: str | None = None
    final_status: str | None = None
    ended_reason: str | None = None
    predicted_days: int | None = None
    simulated_days: float | None = None
    applied: bool = False  # the exception was injected
    decision: str | None = None
    sites_manufactured: list[str] = field(default_factory=list)  # one entry per run started
    reactions: Counter[str] = field(default_factory=Counter)
    aborted: str | None = None


class OrderActor:
    def __init__(self, sim: Simulator, plan: OrderPlan) -> None:
        self.sim = sim
        self.plan = plan
        self.product = sim.products[plan.combo.product]
        self.result = OrderResult(plan)
        self.rng = random.Random(f"{sim.cfg.seed}-{plan.index}")
        self.order_id = ""
        self.coi = ""
        self.floor = sim.clock.start  # simulated time of the last action (actions never go back)
        self.done: set[Any] = set()
        self.posted: dict[str, set[str]] = defaultdict(set)  # milestones posted per shipment
        self.leave: frozenset[str] = frozenset()  # after an injected exception: wait until these are left
        self.first_apheresis: datetime | None = None
        self.apheresis_at: dict[str, datetime] = {}  # per slot id
        self.run_start: dict[tuple[str, int], datetime] = {}  # per (slot id, run)
        self.release_at: datetime | None = None
        self.lymphodepleted = False
        self.refusal_done = False

    # -- helpers ---------------------------------------------------------------------------------------

    @property
    def who(self) -> str:
        return f"order #{self.plan.index + 1} {self.order_id[:8]}"

    @property
    def row(self) -> dict[str, Any]:
        return self.sim.tracker.rows[self.order_id]

    def stamp(self, when: datetime) -> datetime:
        """A simulated moment for the next action: never before the previous one."""
        when = max(when, self.floor + timedelta(minutes=5))
        self.floor = when
        return when

    async def at(self, when: datetime) -> str:
        """Wait for the simulated moment of an action; its ISO timestamp."""
        moment = self.stamp(when)
        await self.sim.clock.until(moment)
        return iso(moment)

    async def call(self, method: str, service: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, body = await self.sim.api.call(method, service, path, who=self.who, **kw)
        if service == "order" and status in (200, 201) and isinstance(body, dict) and "status" in body:
            self.sim.tracker.observe(body)
        return status, body

    async def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        try:
            return await self.sim.tracker.wait_for(self.order_id, predicate, self.sim.cfg.stall_s)
        except TimeoutError:
            raise await self.stuck(f"waiting for {what}") from None

    async def stuck(self, what: str) -> OrderAbort:
        """Record the order as stuck, with the timeline entries that show why (facts the order ignored)."""
        row = self.row
        message = (
            f"{self.who} ({self.plan.combo.product} at {row.get('site_id')}, "
            f"{self.plan.kind or 'no exception'}) stuck {what}: status {row['status']} run {row.get('run')} "
            f"for {self.sim.cfg.stall_s:.0f} s"
        )
        with contextlib.suppress(OrderAbort, KeyError, TypeError):
            _, detail = await self.call("GET", "order", f"/v1/orders/{self.order_id}", label="get order")
            ignored = []
            for t in detail.get("timeline") or []:
                if "not applicable while" not in (t.get("reason") or ""):
                    continue
                state = t["reason"].rsplit(" ", 1)[-1]
                if t["type"].startswith("logistics.shipment_milestone") or (
                    t["type"].startswith("logistics.shipment_planned")
                    and state in IN_MANUFACTURE | PRODUCT_OUT
                ):
                    continue  # courier scans the order does not need, the outbound leg planned
                ignored.append(f"{t['type']} while {state}")
            if ignored:
                message += "; facts the order ignored: " + ", ".join(ignored)
        self.sim.stats.error(message)
        return OrderAbort(message)

    async def poll(
        self,
        what: str,
        fetch: Callable[[], Any],
        accept: Callable[[Any], Any],
        describe: Callable[[Any], str] | None = None,
    ) -> Any:
        """Call `fetch` with backoff until `accept(result)` gives something (or the order ends)."""
        deadline = time.monotonic() + self.sim.cfg.stall_s
        delay = 0.1
        while True:
            result = await fetch()
            found = accept(result)
            if found:
                return found
            if self.row["status"] in TERMINAL:
                return None
            if time.monotonic() > deadline:
                seen = f" ({describe(result)})" if describe else ""
                raise await self.stuck(f"waiting for {what}{seen}")
            await asyncio.sleep(delay)
            delay = min(delay * 1.6, 1.5)

    async def shipment(self, leg: str, run: int | None = None) -> dict[str, Any] | None:
        async def fetch() -> Any:
            _, ships = await self.call(
                "GET",
                "logistics",
                "/v1/shipments",
                params={"order_id": self.order_id},
                label="list shipments",
            )
            return ships

        def accept(ships: list[dict[str, Any]]) -> dict[str, Any] | None:
            live = [
                s
                for s in ships
                if s["leg"] == leg
                and s["status"] in SHIPMENT_LIVE | {"delivered"}
                and (run is None or s.get("run") in (None, run))
                and not (leg == "inbound_apheresis" and s["status"] == "delivered")
            ]
            return live[-1] if live else None

        def describe(ships: list[dict[str, Any]]) -> str:
            mine = [f"{s.get('run') or '-'}:{s['status']}" for s in ships if s["leg"] == leg]
            return f"{leg} shipments (run:status): {', '.join(mine) or 'none'}"

        found: dict[str, Any] | None = await self.poll(f"the {leg} shipment", fetch, accept, describe)
        return found

    # -- the order's life ------------------------------------------------------------------------------

    async def run(self) -> OrderResult:
        try:
            await self.sim.clock.until(self.sim.clock.start + timedelta(days=self.plan.place_day))
            await self.place()
            while True:
                row = self.row
                if row["status"] in TERMINAL:
                    break
                sig = signature(row)
                if await self.act(row):
                    continue  # look again at once
                if self.row["status"] in TERMINAL:
                    break
                try:
                    await self.sim.tracker.wait_change(self.order_id, sig, self.sim.cfg.stall_s)
                except TimeoutError:
                    raise await self.stuck("waiting for the platform") from None
        except OrderAbort as abort:
            self.result.aborted = str(abort)
            await self.tidy_up()
        except asyncio.CancelledError:
            self.result.aborted = "timeout"
            raise
        return self.result

    async def tidy_up(self) -> None:
        """After an error the centre cancels the order, so the platform is not left with it half done."""
        if not self.order_id or self.row["status"] in TERMINAL:
            return
        with contextlib.suppress(OrderAbort):
            await self.call(
                "POST",
                "order",
                f"/v1/orders/{self.order_id}/cancel",
                json={"reason": "simulator gave up on this order after an error"},
                label="cancel after error",
                ok=(200,),
                intended=(409,),
            )

    async def place(self) -> None:
        c = self.plan.combo
        _, body = await self.call(
            "POST",
            "order",
            "/v1/orders",
            json={
                "treatment_center_id": c.centre,
                "product_code": c.product,
                "order_type": c.order_type,
                "patient_ref": self.plan.patient_ref,
                "requested_apheresis_date": self.plan.requested_date.isoformat(),
            },
            label="place order",
            ok=(201,),
        )
        self.order_id = str(body["order_id"])
        self.coi = body["coi"]
        self.result.order_id = self.order_id
        self.sim.tracker.add(body)

    async def act(self, row: dict[str, Any]) -> bool:
        """Do what the order's state asks of the centre, courier or site; True: look again at once."""
        status = row["status"]
        if status in self.leave:
            return False
        self.leave = frozenset()
        if status == "inbound_shipment_planned":
            return await self.hospital_apheresis(row)
        if status in MATERIAL_ON_THE_WAY:
            await self.courier_inbound(row)
        elif status in IN_MANUFACTURE:
            await self.site_manufacture(row)
        elif status in PRODUCT_OUT:
            await self.courier_outbound(row)
        elif status == "quarantined":
            await self.qa_decision(row)
        elif status == "product_received":
            await self.hospital_infusion(row)
        # submitted, waitlisted, slot_reserved, booking_confirmed, rescheduling: the platform acts
        return False

    async def cancel(self, stage: str) -> None:
        await self.call(
            "POST",
            "order",
            f"/v1/orders/{self.order_id}/cancel",
            json={"reason": f"patient withdrew consent ({stage.replace('_', ' ')})"},
            label="cancel",
            ok=(200,),
        )
        self.result.applied = True

    def cancels_at(self, stage: str) -> bool:
        return (
            self.plan.kind == "cancellation"
            and self.plan.params["stage"] == stage
            and not self.result.applied
        )

    def injects(self, kind: str) -> bool:
        return self.plan.kind == kind and not self.result.applied

    # -- hospital: apheresis ---------------------------------------------------------------------------

    async def hospital_apheresis(self, row: dict[str, Any]) -> bool:
        slot = row.get("slot") or {}
        slot_id = str(slot.get("slot_id"))
        if ("apheresis", slot_id) in self.done:
            return False
        booked = as_date(slot.get("apheresis_date")) or self.plan.requested_date
        mfg_start = as_date(slot.get("manufacturing_start_date"))
        if self.result.predicted_days is None:
            _, detail = await self.call("GET", "order", f"/v1/orders/{self.order_id}", label="get order")
            infusion = as_date((detail.get("predicted") or {}).get("earliest_infusion"))
            if infusion is not None:
                self.result.predicted_days = (infusion - booked).days
        outage = self.sim.outage
        if outage.holds(mfg_start):
            await outage.posted.wait()
            return True  # look again: the booking may have to move
        if outage.covers(row.get("site_id"), mfg_start):
            return False  # the platform must move this booking elsewhere: wait for the rebook
        when = max(self.sim.clock.at(booked, 8 + self.rng.uniform(0, 4)), self.floor + timedelta(hours=1))
        if row.get("recollections") and self.floor > self.sim.clock.start:
            lead = int(self.product.get("recollection_lead_days", 7))
            when = max(when, self.floor + timedelta(days=lead))
        if self.injects("apheresis_moved"):
            await self.at(when - timedelta(days=4))
            new_date = booked + timedelta(days=int(self.plan.params["days"]))
            await self.call(
                "POST",
                "order",
                f"/v1/orders/{self.order_id}/apheresis-date",
                json={
                    "requested_apheresis_date": new_date.isoformat(),
                    "reason": "patient not fit on the day",
                },
                label="move apheresis date",
                ok=(200,),
            )
            self.result.applied = True
            self.done.add(("apheresis", slot_id))
            return False
        if self.cancels_at("before_apheresis"):
            await self.at(when - timedelta(days=2))
            await self.cancel("before_apheresis")
            return False
        at = await self.at(when)
        if self.plan.coi_typo and not self.refusal_done:
            self.refusal_done = True
            await self.call(
                "POST",
                "order",
                f"/v1/orders/{self.order_id}/apheresis",
                json={"coi": mistype_check_character(self.coi), "at": at},
                label="apheresis with mistyped COI",
                ok=(),
                intended=(422,),
            )
        await self.call(
            "POST",
            "order",
            f"/v1/orders/{self.order_id}/apheresis",
            json={"coi": self.coi, "at": at},
            label="confirm apheresis",
            ok=(200,),
        )
        self.done.add(("apheresis", slot_id))
        moment = datetime.fromisoformat(at)
        self.apheresis_at[slot_id] = moment
        if self.first_apheresis is None:
            self.first_apheresis = moment
        return False

    # -- courier (inbound) and site receipt --------------------------------------------------------------

    def reading(self, ship: dict[str, Any], *, excursion: bool = False) -> float:
        lo, hi = float(ship["min_temp_c"]), float(ship["max_temp_c"])
        if excursion:
            return round(hi + self.rng.uniform(4, 10), 1)
        return round(lo + (hi - lo) * self.rng.uniform(0.3, 0.7), 1)

    async def milestone(
        self, ship: dict[str, Any], milestone: str, when: datetime, location: str, temperature: float | None
    ) -> None:
        sid = str(ship["shipment_id"])
        if milestone in self.posted[sid]:
            return
        at = await self.at(when)
        body: dict[str, Any] = {
            "milestone": milestone,
            "occurred_at": at,
            "location": location,
            "handled_by": f"courier-{self.rng.randrange(100, 999)}",
            "coi": self.coi,
        }
        if milestone == "picked_up":
            body["received_from"] = ship["origin"]
        if temperature is not None:
            body["temperature_c"] = temperature
        await self.call(
            "POST",
            "logistics",
            f"/v1/shipments/{sid}/milestones",
            json=body,
            label=f"{ship['leg'].split('_')[0]} {milestone}",
            ok=(201,),
        )
        self.posted[sid].add(milestone)

    async def excursion(self, ship: dict[str, Any], when: datetime) -> None:
        at = await self.at(when)
        _, body = await self.call(
            "POST",
            "logistics",
            f"/v1/shipments/{ship['shipment_id']}/temperature",
            json={"reading_c": self.reading(ship, excursion=True), "measured_at": at, "coi": self.coi},
            label=f"{ship['leg'].split('_')[0]} temperature excursion",
            ok=(201,),
        )
        if not body.get("excursion_published"):
            self.sim.stats.error(f"{self.who}: out-of-range reading did not raise an excursion: {body}")
        self.result.applied = True

    async def courier_inbound(self, row: dict[str, Any]) -> None:
        slot = row.get("slot") or {}
        slot_id = str(slot.get("slot_id"))
        if ("inbound", slot_id) in self.done:
            return
        ship = await self.shipment("inbound_apheresis")
        if ship is None:
            return
        a = self.apheresis_at.get(slot_id) or self.floor
        booked = as_date(slot.get("apheresis_date"))
        mfg = as_date(slot.get("manufacturing_start_date"))
        transit = min(2, max(1, (mfg - booked).days)) if booked and mfg else 1
        site = ship["destination"]
        await self.milestone(ship, "booked", a + timedelta(hours=1), ship["origin"], None)
        await self.milestone(ship, "picked_up", a + timedelta(hours=3), ship["origin"], self.reading(ship))
        if self.cancels_at("material_in_transit"):
            await self.cancel("material_in_transit")
            return
        await self.milestone(ship, "in_transit", a + timedelta(days=transit / 2), "HUB", self.reading(ship))
        if self.injects("inbound_excursion"):
            await self.excursion(ship, a + timedelta(days=transit / 2, hours=2))
            self.done.add(("inbound", slot_id))
            self.leave = MATERIAL_ON_THE_WAY
            return
        delivered = a + timedelta(days=transit, hours=-1)
        await self.milestone(ship, "delivered", delivered, site, self.reading(ship))
        reject = self.injects("material_rejected")
        at = await self.at(delivered + timedelta(hours=1))
        await self.call(
            "POST",
            "site",
            f"/v1/sites/{site}/receipts",
            json={
                "order_id": self.order_id,
                "coi": self.coi,
                "accepted": not reject,
                "reason": self.plan.params["reason"] if reject else None,
                "received_at": at,
            },
            label="site receipt (refused)" if reject else "site receipt",
            ok=(200, 201),
        )
        self.done.add(("inbound", slot_id))
        if reject:
            self.result.applied = True
            self.leave = MATERIAL_ON_THE_WAY
        else:
            self.run_start[(slot_id, 1)] = max(
                datetime.fromisoformat(at) + timedelta(hours=3),
                self.sim.clock.at(mfg, 8) if mfg else datetime.fromisoformat(at),
            )
            self.result.sites_manufactured.append(site)

    # -- site MES ----------------------------------------------------------------------------------------

    async def site_manufacture(self, row: dict[str, Any]) -> None:
        slot_id = str((row.get("slot") or {}).get("slot_id"))
        run = int(row.get("run") or 1)
        site = row["site_id"]
        if ("run", slot_id, run) in self.done:
            return
        if self.plan.lymph_refusal and not self.lymphodepleted and ("lymph-refusal",) not in self.done:
            self.done.add(("lymph-refusal",))
            status, _ = await self.call(
                "POST",
                "order",
                f"/v1/orders/{self.order_id}/lymphodepletion",
                json={"at": iso(self.stamp(self.floor))},
                label="lymphodepletion before release",
                ok=(200,),
                intended=(409,),
            )
            if status == 200:
                self.lymphodepleted = True
                self.sim.stats.error(f"{self.who}: lymphodepletion before release was accepted")

        async def fetch() -> Any:
            _, view = await self.call(
                "GET", "site", f"/v1/sites/{site}/manufacturing/{self.order_id}", label="mes view"
            )
            return view

        view = await self.poll(
            f"run {run} at {site}",
            fetch,
            lambda v: v if int(v.get("run") or 0) == run and v.get("state") in MES_RUNNING else None,
            lambda v: f"the site reports run {v.get('run')} {v.get('state')}",
        )
        if view is None:
            return
        if (slot_id, run) not in self.run_start:  # a remanufacture: the day after the run was lost
            self.run_start[(slot_id, run)] = self.floor + timedelta(days=1)
            self.result.sites_manufactured.append(site)
        start = self.run_start[(slot_id, run)]
        mfg_days = float(self.product.get("manufacturing_days", 17))
        qc_days = float(self.product.get("qc_days", 14))
        base = f"/v1/sites/{site}/manufacturing/{self.order_id}"
        completed = set(view.get("steps_completed") or [])
        for step in STEPS:
            if step in completed:
                continue
            when = start + timedelta(days=mfg_days * STEP_FRACTION[step], hours=self.rng.uniform(0, 3))
            if step == "expansion" and self.cancels_at("manufacturing"):
                await self.at(when)
                await self.cancel("manufacturing")
                return
            if self.injects("manufacturing_failure") and step == self.plan.params["step"]:
                at = await self.at(when)
                await self.call(
                    "POST",
                    "site",
                    f"{base}/steps",
                    json={
                        "step": step,
                        "completed_at": at,
                        "failed": True,
                        "reason": self.plan.params["reason"],
                    },
                    label="manufacturing step failed",
                    ok=(200, 201),
                )
                self.result.applied = True
                self.done.add(("run", slot_id, run))
                return
            at = await self.at(when)
            await self.call(
                "POST",
                "site",
                f"{base}/steps",
                json={"step": step, "completed_at": at},
                label="manufacturing step",
                ok=(200, 201),
            )
        cryo = start + timedelta(days=mfg_days)
        if self.cancels_at("qc_pending"):
            await self.at(cryo + timedelta(days=qc_days / 2))
            await self.cancel("qc_pending")
            return
        oos = self.plan.kind == "persistent_oos" or self.injects("qc_oos")
        at = await self.at(cryo + timedelta(days=qc_days, hours=self.rng.uniform(0, 6)))
        await self.call(
            "POST",
            "site",
            f"{base}/qc",
            json={
                "disposition": "out_of_specification",
                "reason": self.plan.params["reason"],
                "decided_at": at,
            }
            if oos
            else {"disposition": "released", "decided_at": at},
            label="QC out of specification" if oos else "QC released",
            ok=(200, 201),
        )
        self.done.add(("run", slot_id, run))
        if oos:
            self.result.applied = True
        else:
            self.release_at = datetime.fromisoformat(at)

    # -- courier (outbound), hospital ----------------------------------------------------------------------

    async def courier_outbound(self, row: dict[str, Any]) -> None:
        run = int(row.get("run") or 1)
        key = ("outbound", str((row.get("slot") or {}).get("slot_id")), run)
        if key in self.done:
            return
        ship = await self.shipment("outbound_product", run)
        if ship is None:
            return
        r = self.release_at or self.floor
        site, centre = ship["origin"], ship["destination"]
        await self.milestone(ship, "booked", r + timedelta(hours=2), site, None)
        await self.milestone(ship, "picked_up", r + timedelta(hours=6), site, self.reading(ship))
        if self.cancels_at("product_in_transit"):
            await self.cancel("product_in_transit")
            return
        if not self.lymphodepleted:
            at = await self.at(r + timedelta(hours=self.rng.uniform(8, 20)))
            await self.call(
                "POST",
                "order",
                f"/v1/orders/{self.order_id}/lymphodepletion",
                json={"at": at},
                label="lymphodepletion",
                ok=(200,),
            )
            self.lymphodepleted = True
        await self.milestone(ship, "in_transit", r + timedelta(days=1), "HUB", self.reading(ship))
        if self.injects("outbound_excursion"):
            await self.excursion(ship, r + timedelta(days=1, hours=3))
            self.leave = PRODUCT_OUT
            return
        delivered = r + timedelta(days=2)
        await self.milestone(ship, "delivered", delivered, centre, self.reading(ship))
        await self.wait_for(
            "the product on its way", lambda o: o["status"] in {"product_in_transit", "product_delivered"}
        )
        if self.row["status"] in TERMINAL:
            return
        at = await self.at(delivered + timedelta(hours=1))
        await self.call(
            "POST",
            "order",
            f"/v1/orders/{self.order_id}/product-receipt",
            json={"coi": self.coi, "at": at},
            label="product receipt",
            ok=(200,),
        )
        self.done.add(key)

    async def qa_decision(self, row: dict[str, Any]) -> None:
        decision = self.plan.params.get("decision", "release")
        await self.at(self.floor + timedelta(days=1))  # QA reviews the logger data (no timestamp is sent)
        await self.call(
            "POST",
            "order",
            f"/v1/orders/{self.order_id}/quarantine-decision",
            json={
                "decision": decision,
                "reason": "logger fault, product within limits per QA review"
                if decision == "release"
                else "excursion confirmed, product integrity not assured",
            },
            label=f"quarantine {decision}",
            ok=(200,),
        )
        self.result.decision = decision

    async def hospital_infusion(self, row: dict[str, Any]) -> None:
        if not self.lymphodepleted:
            at = await self.at(self.floor + timedelta(hours=1))
            await self.call(
                "POST",
                "order",
                f"/v1/orders/{self.order_id}/lymphodepletion",
                json={"at": at},
                label="lymphodepletion",
                ok=(200,),
            )
            self.lymphodepleted = True
        r = self.release_at or self.floor
        when = max(r + timedelta(days=2 + self.rng.uniform(0.5, 2.5)), self.floor + timedelta(hours=12))
        at = await self.at(when)
        await self.call(
            "POST",
            "order",
            f"/v1/orders/{self.order_id}/infusion",
            json={"coi": self.coi, "at": at},
            label="infusion",
            ok=(200,),
        )
        if self.first_apheresis is not None:
            self.result.simulated_days = days_between(self.first_apheresis, datetime.fromisoformat(at))


# ---- the platform (started if needed) ----------------------------------------------------------------------


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


async def ready(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url + "/ready", timeout=3.0)).status_code == 200
    except httpx.HTTPError:
        return False


class PlatformProcess:
    """`python -m v2v_harness run` as a child process, stopped with SIGINT at the end."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir / "harness.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.setdefault("V2V_PG_PORT", "55432")
        env.setdefault("V2V_KAFKA_PORT", "9092")
        ports = {f"{name} service": port for name, port in DEFAULT_PORTS.items()}
        ports["postgres (V2V_PG_PORT)"] = int(env["V2V_PG_PORT"])
        ports["broker (V2V_KAFKA_PORT)"] = int(env["V2V_KAFKA_PORT"])
        taken = [f"{what} port {port}" for what, port in ports.items() if port_open(port)]
        if taken:
            raise RuntimeError(
                "cannot start the platform: "
                + ", ".join(taken)
                + " already in use (a `make run` that is not ready yet, or another program). Stop it, or "
                "start the platform yourself with `make run` and run the simulator again."
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "v2v_harness", "run", "--state-dir", str(self.state_dir)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the simulator, which stops the platform itself
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def ensure_platform(cfg: Config, out: Callable[[str], None]) -> PlatformProcess | None:
    """Nothing if all five services are ready; else start the platform (default URLs only) and wait."""
    async with httpx.AsyncClient() as client:
        states = {name: await ready(client, url) for name, url in cfg.urls.items()}
        if all(states.values()):
            return None
        if any(states.values()):
            down = ", ".join(n for n, ok in states.items() if not ok)
            raise RuntimeError(f"the platform is only partly up: {down} not ready")
        if not cfg.start_platform:
            raise RuntimeError(f"the order service at {cfg.urls['order']} does not answer (--no-start)")
        if cfg.urls != DEFAULT_URLS:
            raise RuntimeError("the platform does not answer at the given URLs; start it yourself there")
        platform = PlatformProcess((ROOT / cfg.state_dir).resolve())
        platform.start()
        out(f"simulator: starting the platform (python -m v2v_harness run, log {platform.log_path})")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if not platform.alive():
                raise RuntimeError(f"the platform exited while starting:\n{platform.tail()}")
            states = {name: await ready(client, url) for name, url in cfg.urls.items()}
            if all(states.values()):
                out("simulator: all five services are ready")
                return platform
            await asyncio.sleep(1.0)
        platform.stop()
        raise RuntimeError(f"the platform was not ready within 240 s:\n{platform.tail()}")


# ---- the simulation ----------------------------------------------------------------------------------------


class Simulator:
    def __init__(self, cfg: Config, out: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.out = out
        self.stats = Stats()
        self.api = Api(cfg.urls, cfg.concurrency, self.stats)
        self.tracker = Tracker(self.api, cfg.poll_s)
        self.clock = SimClock(datetime.now(UTC).replace(microsecond=0), cfg.day_seconds)
        self.products: dict[str, dict[str, Any]] = {}
        self.sites: list[dict[str, Any]] = []
        self.plan: Plan | None = None
        self.outage = OutageState(None, None)
        self.actors: list[OrderActor] = []
        self.started = time.monotonic()
        self.summary: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------------------------------

    async def load_catalogue(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        _, centres = await self.api.call("GET", "order", "/v1/treatment-centers", label="catalogue")
        _, products = await self.api.call("GET", "order", "/v1/products", label="catalogue")
        _, sites = await self.api.call("GET", "site", "/v1/sites", label="catalogue")
        self.products = {p["code"]: p for p in products}
        self.sites = sites
        return centres, products

    # -- the outage ------------------------------------------------------------------------------------------

    async def run_outage(self) -> None:
        """Once the cohort is booked: declare one outage at its site over its manufacturing dates."""
        outage = self.outage
        try:
            if outage.site is None or outage.gate is None:
                return
            cohort = [a for a in self.actors if a.plan.kind == "site_outage"]
            first = min(a.plan.requested_date for a in cohort)
            await self.clock.until(self.clock.at(first, 0) - timedelta(days=5))
            deadline = time.monotonic() + self.cfg.stall_s
            booked_states = {"inbound_shipment_planned"} | TERMINAL
            while time.monotonic() < deadline:
                rows = [self.tracker.rows.get(a.order_id) for a in cohort]
                if all(r is not None and r["status"] in booked_states for r in rows):
                    break
                await asyncio.sleep(0.3)
            booked: dict[str, list[tuple[OrderActor, date]]] = defaultdict(list)
            for a in cohort:
                r = self.tracker.rows.get(a.order_id)
                mfg = as_date(((r or {}).get("slot") or {}).get("manufacturing_start_date"))
                if r is not None and r["status"] == "inbound_shipment_planned" and mfg is not None:
                    booked[r["site_id"]].append((a, mfg))
            # the site most of the cohort was booked at (the planned one, unless it was full)
            site = max(booked, key=lambda k: (len(booked[k]), k == outage.site)) if booked else outage.site
            hit = booked.get(site, [])
            dates = sorted(d for _, d in hit)
            start, end = (dates[0], dates[-1]) if dates else (outage.gate, outage.gate + timedelta(days=2))
            _, body = await self.api.call(
                "POST",
                "site",
                f"/v1/sites/{site}/outages",
                json={
                    "start_date": start.isoformat(),
                    "end_date": end.isoformat(),
                    "reason": "cleanroom requalification (simulated)",
                },
                label="site outage",
                who="registry",
                ok=(201,),
            )
            outage.site = site
            outage.window = (start, end)
            outage.affected = len(body.get("affected_booking_ids") or [])
            outage.note = (
                f"{site} {start.isoformat()}..{end.isoformat()}, {outage.affected} booking(s) affected"
            )
            for a, _ in hit:
                a.result.applied = True
        except OrderAbort as abort:
            outage.note = f"outage not declared: {abort}"
        finally:
            outage.posted.set()

    # -- progress ------------------------------------------------------------------------------------------

    def progress_line(self) -> str:
        counts: Counter[str] = Counter()
        for actor in self.actors:
            row = self.tracker.rows.get(actor.order_id) if actor.order_id else None
            counts[BUCKET_OF.get(row["status"], "booking") if row else "not placed"] += 1
        parts = [f"{k} {counts[k]}" for k in ("not placed", *BUCKETS) if counts[k]]
        elapsed = time.monotonic() - self.started
        return (
            f"[{elapsed:6.1f}s] sim {self.clock.now():%Y-%m-%d} | {' · '.join(parts)} | "
            f"calls {sum(self.stats.calls.values())} | errors {len(self.stats.errors)}"
        )

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.progress_s)
            self.out(self.progress_line())

    # -- main ------------------------------------------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.cfg
        try:
            centres, products = await self.load_catalogue()
            today = self.clock.start.date()
            self.plan = make_plan(cfg, centres, products, self.sites, today)
            self.outage = OutageState(self.plan.outage_site, self.plan.outage_gate)
            await self.tracker.start()
        except (OrderAbort, RuntimeError, KeyError) as exc:
            self.stats.error(f"set-up failed: {exc}")
            self.print_errors()
            return 1
        kinds = Counter(o.kind for o in self.plan.orders if o.kind)
        self.out(
            f"simulator: {cfg.orders} orders, {sum(kinds.values())} with an exception "
            f"({cfg.exceptions:.0%}), seed {cfg.seed}, 1 simulated day = {cfg.day_seconds:g} s, "
            f"apheresis dates over {self.plan.spread_days} days from {today + timedelta(days=3)}"
        )
        self.out(
            "simulator: exception weights "
            + ", ".join(f"{k} {w}" for k, w in EXCEPTION_WEIGHTS.items())
            + (f"; outage site {self.plan.outage_site}" if self.plan.outage_site else "")
        )
        self.actors = [OrderActor(self, p) for p in self.plan.orders]
        background = [
            asyncio.create_task(self.tracker.run()),
            asyncio.create_task(self.progress()),
        ]
        outage_task = asyncio.create_task(self.run_outage())
        tasks = [asyncio.create_task(a.run()) for a in self.actors]
        try:
            done, pending = await asyncio.wait(tasks, timeout=cfg.timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                self.stats.error(
                    f"timeout: {len(pending)} order(s) still running after {cfg.timeout_s:.0f} s"
                )
                await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    self.stats.error(f"simulator bug: {task.exception()!r}")
        finally:
            outage_task.cancel()
            for bg in background:
                bg.cancel()
            await asyncio.gather(outage_task, *background, return_exceptions=True)
        await self.collect()
        self.out(self.progress_line())
        self.out(self.render_summary())
        self.print_errors()
        return 0 if self.ok() else 1

    def ok(self) -> bool:
        states = self.summary.get("terminal", {})
        return not self.stats.errors and sum(states.values()) == self.cfg.orders

    def print_errors(self) -> None:
        if not self.stats.errors:
            self.out("errors: none")
            return
        groups = group_errors(self.stats.errors)
        self.out(f"errors: {len(self.stats.errors)}, {len(groups)} kind(s)")
        for key, messages in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            self.out(f"  {len(messages):>4} x {key}")
            self.out(f"         e.g. {messages[0]}")
        if len(self.stats.errors) <= 30:
            self.out("all errors:")
            for message in self.stats.errors:
                self.out(f"  - {message}")

    # -- the summary -----------------------------------------------------------------------------------------

    async def collect(self) -> None:
        """Read every order (with its timeline) and its slots once more, for the summary."""
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def one(actor: OrderActor) -> tuple[OrderActor, dict[str, Any] | None, list[dict[str, Any]]]:
            if not actor.order_id:
                return actor, None, []
            async with sem:
                try:
                    _, detail = await self.api.call(
                        "GET", "order", f"/v1/orders/{actor.order_id}", label="get order", who=actor.who
                    )
                    _, slots = await self.api.call(
                        "GET",
                        "scheduling",
                        "/v1/slots",
                        params={"order_id": actor.order_id},
                        label="list slots",
                        who=actor.who,
                    )
                except OrderAbort:
                    return actor, None, []
            return actor, detail, slots

        results = await asyncio.gather(*(one(a) for a in self.actors))
        terminal: Counter[str] = Counter()
        reactions: Counter[str] = Counter()
        consumed: Counter[str] = Counter()
        starts: list[date] = []
        for actor, detail, slots in results:
            res = actor.result
            if detail is None:
                self.stats.error(f"{actor.who}: never placed or not readable")
                continue
            res.final_status = detail["status"]
            res.ended_reason = detail.get("ended_reason")
            if res.final_status in TERMINAL:
                terminal[res.final_status] += 1
            else:
                self.stats.error(
                    f"{actor.who} ({actor.plan.kind or 'no exception'}) not terminal: {res.final_status}"
                )
            res.reactions = reactions_of(detail.get("timeline") or [])
            if res.aborted and res.final_status == "cancelled" and res.reactions["cancelled by the centre"]:
                res.reactions["cancelled by the centre"] -= 1
                res.reactions["cancelled by the simulator after an error"] += 1
            reactions.update(res.reactions)
            for slot in slots:
                if slot.get("status") == "consumed":
                    consumed[slot["site_id"]] += 1
                    if d := as_date(slot.get("manufacturing_start_date")):
                        starts.append(d)
        window = (min(starts), max(starts)) if starts else None
        self.summary = {
            "terminal": dict(terminal),
            "reactions": dict(reactions),
            "utilisation": utilisation(self.sites, consumed, window),
            "window": window,
        }

    def render_summary(self) -> str:
        cfg, plan = self.cfg, self.plan
        assert plan is not None
        results = [a.result for a in self.actors]
        lines = ["", "=" * 100, "vein2vein simulation summary", "=" * 100]
        elapsed = time.monotonic() - self.started
        last = max((a.floor for a in self.actors), default=self.clock.start)
        lines.append(
            f"{cfg.orders} orders, seed {cfg.seed}, {elapsed:.0f} s real; simulated "
            f"{self.clock.start:%Y-%m-%d} .. {last:%Y-%m-%d} (1 day = {cfg.day_seconds:g} s)"
        )
        calls = sum(self.stats.calls.values())
        server = sum(n for s, n in self.stats.statuses.items() if s >= 500)
        lines.append(
            f"HTTP calls {calls}: 5xx {server}; intended refusals "
            + (", ".join(f"{k}: {n}" for k, n in sorted(self.stats.intended.items())) or "none")
        )

        lines += ["", "Orders by terminal state"]
        terminal = self.summary.get("terminal", {})
        for state in ("completed", "cancelled", "failed"):
            lines.append(f"  {state:<12}{terminal.get(state, 0):>6}")
        missing = cfg.orders - sum(terminal.values())
        lines.append(f"  {'not terminal':<12}{missing:>6}")
        gave_up = sum(1 for r in results if r.aborted and r.final_status == "cancelled")
        if gave_up:
            lines.append(f"  ({gave_up} of the cancelled were cancelled by the simulator after an error)")

        lines += [
            "",
            f"Exceptions injected (weights: {', '.join(f'{k} {w}' for k, w in EXCEPTION_WEIGHTS.items())})",
        ]
        planned = Counter(r.plan.kind for r in results if r.plan.kind)
        applied = Counter(r.plan.kind for r in results if r.plan.kind and r.applied)
        lines.append(f"  {'kind':<24}{'planned':>8}{'injected':>10}  detail")
        for kind in EXCEPTION_WEIGHTS:
            if not planned[kind]:
                continue
            detail = ""
            if kind == "cancellation":
                stages = Counter(r.plan.params["stage"] for r in results if r.plan.kind == kind and r.applied)
                detail = ", ".join(f"{s} {n}" for s, n in sorted(stages.items()))
            elif kind == "outbound_excursion":
                decisions = Counter(r.decision for r in results if r.plan.kind == kind and r.decision)
                detail = ", ".join(f"QA {d} {n}" for d, n in sorted(decisions.items()))
            elif kind == "site_outage":
                detail = self.outage.note
            elif kind == "manufacturing_failure":
                steps = Counter(r.plan.params["step"] for r in results if r.plan.kind == kind and r.applied)
                detail = ", ".join(f"{s} {n}" for s, n in sorted(steps.items()))
            lines.append(f"  {kind:<24}{planned[kind]:>8}{applied[kind]:>10}  {detail}")
        lines.append(f"  {'total':<24}{sum(planned.values()):>8}{sum(applied.values()):>10}")
        lines.append("  (planned but not injected: the order ended or moved on before the exception's step)")

        lines += ["", "What the platform did (from the order timelines)"]
        reactions = self.summary.get("reactions", {})
        for what in REACTIONS_ORDER:
            if reactions.get(what):
                lines.append(f"  {what:<56}{reactions[what]:>6}")
        for what, n in sorted(reactions.items()):
            if what not in REACTIONS_ORDER and n:
                lines.append(f"  {what:<56}{n:>6}")

        window = self.summary.get("window")
        span = f"{window[0]} .. {window[1]}, {(window[1] - window[0]).days + 1} days" if window else "none"
        lines += ["", f"Per-site utilisation (manufacturing starts of this run: {span})"]
        runs = Counter(s for r in results for s in r.sites_manufactured)
        orders_at = Counter(s for r in results for s in set(r.sites_manufactured))
        lines.append(
            f"  {'site':<18}{'orders':>7}{'runs':>6}{'slots used':>12}{'capacity':>10}{'utilisation':>13}"
        )
        for u in self.summary.get("utilisation", []):
            lines.append(
                f"  {u['site_id']:<18}{orders_at[u['site_id']]:>7}{runs[u['site_id']]:>6}{u['consumed']:>12}"
                f"{u['capacity']:>10}{u['share']:>12.1%}"
            )
        lines.append(
            "  (orders/runs: manufactured there; slots used: consumed slots; capacity: starts/day x days)"
        )

        lines += ["", "Vein-to-vein days, completed orders (predicted at first booking vs simulated)"]
        lines.append(
            f"  {'product':<12}{'n':>5}{'predicted median':>18}{'p90':>7}{'simulated median':>18}{'p90':>7}"
        )
        done = [r for r in results if r.final_status == "completed" and r.simulated_days is not None]
        for product in [*sorted({r.plan.combo.product for r in done}), "all"]:
            group = [r for r in done if product in ("all", r.plan.combo.product)]
            pred = [float(r.predicted_days) for r in group if r.predicted_days is not None]
            sim = [float(r.simulated_days) for r in group if r.simulated_days is not None]
            lines.append(
                f"  {product:<12}{len(group):>5}{fmt(percentile(pred, 50)):>18}{fmt(percentile(pred, 90)):>7}"
                f"{fmt(percentile(sim, 50)):>18}{fmt(percentile(sim, 90)):>7}"
            )
        clean = [r for r in done if not r.applied]
        if clean and len(clean) != len(done):
            sim = [float(r.simulated_days) for r in clean if r.simulated_days is not None]
            pred = [float(r.predicted_days) for r in clean if r.predicted_days is not None]
            lines.append(
                f"  {'no exception':<12}{len(clean):>5}{fmt(percentile(pred, 50)):>18}"
                f"{fmt(percentile(pred, 90)):>7}{fmt(percentile(sim, 50)):>18}{fmt(percentile(sim, 90)):>7}"
            )
        lines.append("=" * 100)
        return "\n".join(lines)


REACTIONS_ORDER = (
    "remanufactured (new run from retained material)",
    "recollected (new apheresis and slot)",
    "rebooked after the site outage",
    "rebooked after the apheresis date moved",
    "quarantined after an outbound excursion",
    "quarantine released by QA",
    "quarantine rejected by QA",
    "waitlisted (no capacity)",
    "failed: nothing left to try",
    "cancelled by the centre",
)


def reactions_of(timeline: list[dict[str, Any]]) -> Counter[str]:
    """What the platform did to one order, read from its timeline."""
    seen: Counter[str] = Counter()
    for entry in timeline:
        kind, status, reason = entry.get("type", ""), entry.get("status"), entry.get("reason") or ""
        if kind == "order.remanufacture_requested.v1":
            seen["remanufactured (new run from retained material)"] += 1
        if status == "rescheduling" and reason.startswith("recollection:"):
            seen["recollected (new apheresis and slot)"] += 1
        if kind == "site.booking_affected.v1" and status == "rescheduling":
            seen["rebooked after the site outage"] += 1
        if status == "rescheduling" and reason.startswith("apheresis moved"):
            seen["rebooked after the apheresis date moved"] += 1
        if kind == "logistics.shipment_excursion.v1" and status == "quarantined":
            seen["quarantined after an outbound excursion"] += 1
        if kind == "order.quarantine_decided.v1":
            released = reason.startswith("quarantine released")
            seen["quarantine released by QA" if released else "quarantine rejected by QA"] += 1
        if kind == "scheduling.slot_unavailable.v1" and status == "waitlisted":
            seen["waitlisted (no capacity)"] += 1
        if kind == "order.failed.v1":
            seen["failed: nothing left to try"] += 1
        if kind == "order.cancelled.v1":
            seen["cancelled by the centre"] += 1
    return seen


def group_errors(errors: list[str]) -> dict[str, list[str]]:
    """Errors by kind: the message without the order's number, id, product, site and timings."""
    groups: dict[str, list[str]] = defaultdict(list)
    for message in errors:
        key = re.sub(r"order #\d+ [0-9a-f]{0,8}( \([^)]*\))?", "order", message)
        key = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", key)
        key = re.sub(r"\b(run \d+ )?for \d+ s\b", "", key)
        key = re.sub(r"\b(at|to) [A-Z]{2}-[A-Z-]+\b", r"\1 <site>", key)
        groups[" ".join(key.split())].append(message)
    return groups


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


async def main(cfg: Config, out: Callable[[str], None] = print) -> int:
    """Start the platform if needed, simulate, print the summary; the exit status."""
    try:
        platform = await ensure_platform(cfg, out)
    except RuntimeError as exc:
        out(f"simulator: {exc}")
        return 2
    sim = Simulator(cfg, out)
    try:
        return await sim.run()
    finally:
        await sim.api.close()
        if platform is not None:
            out("simulator: stopping the platform it started")
            platform.stop()


def cli(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        return asyncio.run(main(cfg, lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print("simulator: interrupted", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
