"""Two scheduling replicas on one database and one consumer group never oversell a site's capacity.

The platform runs a second `scheduling_service` process on the same database and topic namespace; both
join the `scheduling.slots` consumer group, so the topics' partitions are shared and both book slots at
the same time. Contention is made real by a scarce product: CILTA-CEL for clinical use, made for each
market at one site (EMA: Ghent; FDA: Raritan, the registry admin setting the contract manufacturer Morris
Plains' CILTA-CEL capacity to 0) at one start a day (set over the registry API: the seed's capacities are
illustrative), and a short booking horizon (a scheduling parameters file, `V2V_SCHEDULING_PARAMETERS`)
leaves most orders waiting.

Then, still with both replicas, centres cancel and move apheresis dates while the registry raises a
site's capacity: releases, rebooks and waitlist serving race each other, and still no day is oversold,
every order ends with exactly one live slot or waits, and nobody waits for a day that has room.

Each centre places, cancels and moves its own orders with its own credentials, the registry admin
raises the capacity, and ops reads the slots, the waitlist and the registry (paged: at most 200 a page).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from v2v_contracts import topic_for
from v2v_contracts.reference import product_catalogue
from v2v_harness.catalog import BY_NAME
from v2v_harness.e2e import Parties, eventually
from v2v_harness.infra import Infrastructure
from v2v_harness.platform import Platform, RunningService, tail
from v2v_harness.processes import free_port, spawn, stop
from v2v_harness.pytest_plugin import _start_platform

pytestmark = pytest.mark.e2e

PRODUCT = "CILTA-CEL"
# fresh material: the latest manufacturing start after the collection, in whole days (the catalogue's
# maximum hours from collection to start)
_PLANNING = product_catalogue().get(PRODUCT).planning  # type: ignore[union-attr]
assert _PLANNING is not None and _PLANNING.max_fresh_hours is not None
FRESH_DAYS = _PLANNING.max_fresh_hours // 24
HORIZON_DAYS = 7
TRANSIT_DAYS = 1  # every centre here is in its site's region
DAYS_AHEAD = 14
MOVED_BY = 3  # days an apheresis date is moved by
# centre -> how many orders; the Japanese centre's regulator (PMDA) approves no CILTA-CEL site at all:
# the order service refuses those at intake (422 naming product, use and market)
CENTRES = {"TC-DE-BE-001": 18, "TC-US-NJ-001": 18}
UNSERVED = {"TC-JP-TK-001": 4}
SITE_OF = {"TC-DE-BE-001": "BE-GHENT", "TC-US-NJ-001": "US-RARITAN"}
# issue 11's network: CILTA-CEL at the Janssen/Legend plants and at Morris Plains (a contract manufacturer,
# also FDA-approved for clinical supply): one start a day at each market's one site, none at Morris Plains
SCARCE = {"BE-GHENT": 1, "US-RARITAN": 1, "US-MORRIS-PLAINS": 0}
LIVE = ("held", "confirmed")
IN_USE = ("held", "confirmed", "consumed")
PARTITION = re.compile(r'partition="(\d+)"')


@pytest.fixture(scope="module")
def two_replicas(infra: Infrastructure, state_dir: Path) -> Iterator[tuple[Platform, RunningService]]:
    params = state_dir / "scheduling-two-replicas.yaml"
    params.write_text(
        f"inbound_transit_days: {{same_region: {TRANSIT_DAYS}, cross_region: 2}}\n"
        f"booking_horizon_days: {HORIZON_DAYS}\n"
    )
    # every day a working day: this test is about replicas sharing the work, not about site calendars
    # (services/scheduling/tests/unit/test_scheduling_planning.py has those)
    calendars = state_dir / "scheduling-two-replicas-calendars.yaml"
    calendars.write_text("sites: {}\n")
    scheduling_env = {
        "V2V_SCHEDULING_PARAMETERS": str(params),
        "V2V_SCHEDULING_CALENDARS": str(calendars),
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
    }
    platform = _start_platform(infra, state_dir, {"scheduling": scheduling_env})
    second: RunningService | None = None
    try:
        spec = BY_NAME["scheduling"]
        port = free_port()
        first = platform.services["scheduling"]
        database_url = first.database_url
        owner_url = first.env.get("V2V_MIGRATION_DATABASE_URL")  # as the first replica: the schema's owner
        log_path = platform.state_dir / "logs" / "scheduling-2.log"
        proc = spawn(
            [sys.executable, "-m", spec.package],
            env=platform.service_env(spec, port, database_url, scheduling_env, owner_url),
            log_path=log_path,
        )
        second = RunningService(spec, port, database_url, proc, log_path)
        wait_ready(second, timeout=60)
        yield platform, second
    finally:
        if second is not None:
            stop(second.proc)
        platform.stop()


def wait_ready(svc: RunningService, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if svc.proc.poll() is not None:
                raise RuntimeError(f"second scheduling replica exited:\n{tail(svc.log_path)}")
            try:
                if client.get(f"{svc.url}/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"second scheduling replica not ready in {timeout}s:\n{tail(svc.log_path)}")


async def scheduling_capacity(dsn: str) -> dict[str, int]:
    """Scheduling's own copy of each site's PRODUCT capacity (kept from `site.registered`)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT site_id, daily_capacity FROM scheduling.sites")
    finally:
        await conn.close()
    out: dict[str, int] = {}
    for row in rows:
        raw = row["daily_capacity"]
        capacity = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
        out[row["site_id"]] = int(capacity.get(PRODUCT, 0))
    return out


async def assigned_partitions(client: httpx.AsyncClient, url: str, topic: str) -> set[int]:
    """The partitions of `topic` this replica's consumer holds (its consumer-lag gauge's series)."""
    text = (await client.get(f"{url}/metrics")).text
    return {
        int(m.group(1))
        for line in text.splitlines()
        if line.startswith("v2v_consumer_lag{") and f'topic="{topic}"' in line
        if (m := PARTITION.search(line))
    }


def order_bodies(apheresis: date) -> list[dict[str, Any]]:
    bodies = [
        {
            "treatment_center_id": centre,
            "product_code": PRODUCT,
            "order_type": "clinical",
            "patient_ref": f"PAT-2REP-{centre[3:5]}-{i:03d}",
            "requested_apheresis_date": apheresis.isoformat(),
        }
        for centre, n in CENTRES.items()
        for i in range(n)
    ]
    # interleave the centres so both sites are booked at the same time
    return sorted(bodies, key=lambda b: (int(b["patient_ref"][-3:]), b["treatment_center_id"]))


@dataclass
class View:
    """What scheduling and the registry say right now (read from both replicas)."""

    slots: list[dict[str, Any]]
    waiting: dict[str, dict[str, Any]]  # order id -> waitlist entry
    sites: dict[str, dict[str, Any]]

    def live(self) -> Counter[str]:
        return Counter(s["order_id"] for s in self.slots if s["status"] in LIVE)

    def live_slot(self, oid: str) -> dict[str, Any] | None:
        return next((s for s in self.slots if s["order_id"] == oid and s["status"] in LIVE), None)

    def per_day(self) -> Counter[tuple[str, str, str]]:
        return Counter(
            (s["site_id"], s["product_code"], s["manufacturing_start_date"])
            for s in self.slots
            if s["status"] in IN_USE
        )

    def capacity(self, site_id: str) -> int:
        return int(self.sites[site_id]["daily_capacity"].get(PRODUCT, 0))


PAGE = 200  # the most a list gives at once


async def every_page(client: httpx.AsyncClient, url: str, **params: Any) -> list[dict[str, Any]]:
    """All items of a paged list (`limit`/`offset`)."""
    items: list[dict[str, Any]] = []
    while True:
        resp = await client.get(url, params={**params, "limit": PAGE, "offset": len(items)})
        assert resp.status_code == 200, resp.text
        page = resp.json()
        items += page
        if len(page) < PAGE:
            return items


async def view(ops: httpx.AsyncClient, slots_url: str, waitlist_url: str, site_url: str) -> View:
    """As ops (slots and the waitlist are operations data; every centre's orders are in them)."""
    slots, waiting, sites = await asyncio.gather(
        every_page(ops, f"{slots_url}/v1/slots", product_code=PRODUCT),
        every_page(ops, f"{waitlist_url}/v1/waitlist"),
        every_page(ops, f"{site_url}/v1/sites"),
    )
    return View(slots, {w["order_id"]: w for w in waiting}, {s["site_id"]: s for s in sites})


def problems(v: View, centre_of: dict[str, str], cancelled: set[str], moved: dict[str, date]) -> list[str]:
    """Every way the view breaks the rules (empty: all good)."""
    out: list[str] = []
    # never oversold: per (site, product, day) at most that site's daily capacity in use
    for (site_id, product, day), n in v.per_day().items():
        if n > int(v.sites[site_id]["daily_capacity"].get(product, 0)):
            out.append(f"{site_id} {product} {day}: {n} in use")
    live = v.live()
    for oid, centre in centre_of.items():
        n, waits = live[oid], oid in v.waiting
        if oid in cancelled:
            if n or waits:
                out.append(f"cancelled {oid}: {n} live, waiting={waits}")
            continue
        # exactly one live slot, or waiting: never both, never neither
        if (n, waits) not in {(1, False), (0, True)}:
            out.append(f"{oid}: {n} live, waiting={waits}")
            continue
        if oid in moved:
            # fresh material (issue 11): the manufacturing day is chosen first and the collection derived
            # from it, never before the date the centre asked for, and the start within the product's
            # window after the collection
            got = v.live_slot(oid)["apheresis_date"] if n else v.waiting[oid]["apheresis_date"]  # type: ignore[index]
            if date.fromisoformat(got) < moved[oid]:
                out.append(f"moved {oid}: booked for {got}, before {moved[oid]}")
            if n:
                start = date.fromisoformat(v.live_slot(oid)["manufacturing_start_date"])  # type: ignore[index]
                if not 0 <= (start - date.fromisoformat(got)).days <= FRESH_DAYS:
                    out.append(f"moved {oid}: collected {got}, manufactured from {start}")
        home = SITE_OF.get(centre)
        if home is None:  # no approved site: waits, for that reason
            if not waits or v.waiting[oid]["reason"] != "no_approved_site":
                out.append(f"{oid} from {centre} should wait (no approved site)")
            continue
        if n:
            slot = v.live_slot(oid)
            assert slot is not None
            if slot["site_id"] != home:
                out.append(f"{oid} from {centre} booked at {slot['site_id']}")
            continue
        # waiting for capacity: only if every day of its window at its site is full
        first = date.fromisoformat(v.waiting[oid]["apheresis_date"]) + timedelta(days=TRANSIT_DAYS)
        for k in range(HORIZON_DAYS):
            day = (first + timedelta(days=k)).isoformat()
            if v.per_day()[(home, PRODUCT, day)] < v.capacity(home):
                out.append(f"{oid} waits although {home} has room on {day}")
                break
    return out


async def test_two_scheduling_replicas_share_the_work_and_never_oversell(
    two_replicas: tuple[Platform, RunningService], parties: Parties
) -> None:
    platform, second = two_replicas
    first_url, second_url = platform.url("scheduling"), second.url
    order_url, site_url = platform.url("order"), platform.url("site")
    order_topic = topic_for("order", platform.namespace)
    apheresis = date.today() + timedelta(days=DAYS_AHEAD)
    ops, admin = parties.ops, parties.admin
    async with httpx.AsyncClient(timeout=30) as client:  # /metrics: public
        # both replicas hold part of the order topic before any order is placed
        async def shared() -> tuple[set[int], set[int]] | None:
            a = await assigned_partitions(client, first_url, order_topic)
            b = await assigned_partitions(client, second_url, order_topic)
            return (a, b) if a and b and not a & b else None

        await eventually(shared, timeout=60, interval=0.5, what="order partitions shared by both replicas")

        # ---- 0: the scarce network (as the registry admin), seen by scheduling before any order -------
        for site_id, n in SCARCE.items():
            r = await admin.patch(f"{site_url}/v1/sites/{site_id}", json={"daily_capacity": {PRODUCT: n}})
            assert r.status_code == 200, r.text
        dsn = platform.services["scheduling"].database_url

        async def scarce_seen() -> bool:
            seen = await scheduling_capacity(dsn)
            return all(seen.get(site_id) == n for site_id, n in SCARCE.items())

        await eventually(scarce_seen, timeout=30, interval=0.3, what="scheduling's copy of the capacity")

        # ---- 1: forty orders at once ----------------------------------------------------------------
        bodies = order_bodies(apheresis)
        unserved = [
            {**bodies[0], "treatment_center_id": centre, "patient_ref": f"PAT-2REP-JP-{i:03d}"}
            for centre, n in UNSERVED.items()
            for i in range(n)
        ]
        responses = await asyncio.gather(
            *(
                parties.centre(b["treatment_center_id"]).post(f"{order_url}/v1/orders", json=b)
                for b in bodies + unserved
            )
        )
        responses, refusals = responses[: len(bodies)], responses[len(bodies) :]
        assert [r.status_code for r in responses] == [201] * len(bodies), [r.text for r in responses]
        assert [r.status_code for r in refusals] == [422] * len(unserved), [r.text for r in refusals]
        assert all("PMDA market (JP)" in r.json()["errors"][0]["reason"] for r in refusals)
        centre_of = {
            r.json()["order_id"]: b["treatment_center_id"] for r, b in zip(responses, bodies, strict=True)
        }
        assert len(centre_of) == sum(CENTRES.values()) == 36

        async def settled(cancelled: set[str], moved: dict[str, date]) -> View | None:
            # slots from one replica, the waitlist from the other: they share one database
            v = await view(ops, first_url, second_url, site_url)
            return v if not problems(v, centre_of, cancelled, moved) else None

        await eventually(
            lambda: settled(set(), {}), timeout=60, interval=0.5, what="every order booked or waiting"
        )
        await asyncio.sleep(1.0)  # anything booked twice would show by now
        v = await view(ops, second_url, first_url, site_url)
        assert problems(v, centre_of, set(), {}) == []
        for centre, site_id in SITE_OF.items():  # each site's window is full, at one start a day
            booked = [s for s in v.slots if s["status"] in LIVE and centre_of[s["order_id"]] == centre]
            assert len(booked) == min(CENTRES[centre], v.capacity(site_id) * HORIZON_DAYS)
        assert len(v.waiting) == 36 - sum(v.capacity(s) for s in SITE_OF.values()) * HORIZON_DAYS

        # ---- 2: cancels, moved apheresis dates and more capacity, all at once ------------------------
        def pick(centre: str, booked: bool, n: int) -> list[str]:
            ids = sorted(oid for oid, c in centre_of.items() if c == centre and (oid in v.live()) == booked)
            return ids[:n]

        cancelled = {
            *pick("TC-DE-BE-001", True, 3),
            *pick("TC-DE-BE-001", False, 2),
            *pick("TC-US-NJ-001", True, 2),
        }
        new_date = apheresis + timedelta(days=MOVED_BY)
        moved = {
            oid: new_date for oid in [*pick("TC-US-NJ-001", True, 5)[2:], *pick("TC-US-NJ-001", False, 2)]
        }
        ghent = v.capacity("BE-GHENT")
        booked_before = set(v.live())
        calls = [
            parties.centre(centre_of[oid]).post(
                f"{order_url}/v1/orders/{oid}/cancel",
                json={"reason_code": "consent_withdrawn", "note": "patient withdrew"},
            )
            for oid in cancelled
        ]
        calls += [
            parties.centre(centre_of[oid]).post(
                f"{order_url}/v1/orders/{oid}/apheresis-date",
                json={
                    "requested_apheresis_date": day.isoformat(),
                    "reason_code": "patient_unwell",
                    "note": "patient not fit on the day",
                },
            )
            for oid, day in moved.items()
        ]
        calls.append(
            admin.patch(f"{site_url}/v1/sites/BE-GHENT", json={"daily_capacity": {PRODUCT: ghent + 1}})
        )
        results = await asyncio.gather(*calls)
        assert [r.status_code for r in results] == [200] * len(results), [r.text for r in results]

        await eventually(
            lambda: settled(cancelled, moved),
            timeout=60,
            interval=0.5,
            what="releases, rebooks and waitlist served",
        )
        await asyncio.sleep(1.0)
        v = await view(ops, second_url, first_url, site_url)
        assert problems(v, centre_of, cancelled, moved) == []
        assert v.capacity("BE-GHENT") == ghent + 1
        # more capacity and fewer orders in Ghent: every remaining German order has its slot now
        de_left = [oid for oid, c in centre_of.items() if c == "TC-DE-BE-001" and oid not in cancelled]
        assert len(de_left) <= (ghent + 1) * HORIZON_DAYS
        assert all(oid in v.live() for oid in de_left)
        # the released slots are there, with their reasons (an order that was waiting may have been
        # served before its cancel or move arrived: then its slot was released too)
        released = [s for s in v.slots if s["status"] == "released"]
        by_cancel = {s["order_id"] for s in released if s["release_reason"] == "cancelled"}
        # a move's release carries the centre's reason code (its note stays in the order service)
        by_move = {s["order_id"] for s in released if s["release_reason"] == "patient_unwell"}
        assert booked_before & cancelled <= by_cancel <= cancelled
        assert booked_before & set(moved) <= by_move <= set(moved)
        assert len(released) == len(by_cancel) + len(by_move)
        rebooked = [s for s in v.slots if s["status"] in LIVE and s["order_id"] in moved]
        assert rebooked and all(s["reserved_reason"] == "rebook:reschedule" for s in rebooked)

        # both replicas did scheduling work (the partitions were shared)
        for name, log_path in (
            ("scheduling", platform.services["scheduling"].log_path),
            ("scheduling-2", second.log_path),
        ):
            text = log_path.read_text()
            assert "slot reserved" in text, f"{name} booked nothing"

        # the order service agrees: waiting orders are waitlisted, cancelled ones cancelled
        async def statuses() -> dict[str, str] | None:
            got = {
                oid: (await parties.centre(c).get(f"{order_url}/v1/orders/{oid}")).json()["status"]
                for oid, c in centre_of.items()
            }
            ok = all(
                (s == "cancelled") == (oid in cancelled) and (s == "waitlisted") == (oid in v.waiting)
                for oid, s in got.items()
            )
            return got if ok else None

        await eventually(statuses, timeout=30, interval=0.5, what="order statuses agree with scheduling")
