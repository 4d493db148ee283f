"""Offers, holds, quotas and waitlist priority (issue 11) through scheduling's public HTTP API, against
the real `scheduling` schema (real Postgres); orders and sites arrive as events through the handlers.

Shown: availability (earliest predicted delivery per site, alternatives, fresh apheresis derived), a
centre holding an offer and its order getting exactly that slot, a hold that expires returning its day
to the pool and serving the waitlist, a centre's quota per month, and patients moved by a recollection
waiting ahead of new orders (and an explicit priority set by ops).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

import scheduling_service
from scheduling_service.adapters.repository import postgres_tx
from scheduling_service.config import SchedulingSettings
from scheduling_service.domain.planning import Allocation
from scheduling_service.domain.selection import Parameters
from scheduling_service.domain.slots import Planning
from scheduling_service.entrypoints.api import router
from scheduling_service.entrypoints.offers import PLANNING, offers_router
from scheduling_service.service_layer import commands
from scheduling_service.service_layer.handlers import build_handlers
from v2v_audit.service import migrate as audit_migrate
from v2v_contracts import (
    CloudEvent,
    OrderSubmittedV1,
    RebookRequestedV1,
    SiteApproval,
    SiteRegisteredV1,
    new_event,
)
from v2v_contracts.reference import product_catalogue
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool
from v2v_servicekit import current_runtime, problems
from v2v_servicekit.testing import TestTokens

pytestmark = pytest.mark.integration

SCHEDULING_MIGRATIONS = Path(scheduling_service.__file__).parent / "migrations"
PRODUCT = "CILTA-CEL"  # fresh, 72 h
CENTRE, OTHER = "TC-DE-BE-001", "TC-FR-PA-001"
MONDAY = date(2031, 3, 3)
MARKET = {"product_code": PRODUCT, "order_type": "clinical", "regulator": "EMA", "region": "europe"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2031, 2, 1, 9, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def pool(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    owner_url = test_db.owner_urls["scheduling"]
    applied = await apply_migrations(owner_url, "scheduling", [MIGRATIONS_DIR, SCHEDULING_MIGRATIONS])
    assert applied[-1] == "0006.scheduling-capacity-used"
    await audit_migrate(owner_url, "scheduling")
    p = await create_pool(test_db.urls["scheduling"], min_size=1, max_size=8)
    try:
        yield p
    finally:
        await p.close()


class Api:
    """Scheduling's routers on the real schema, a clock the test moves, and the consumer's handlers."""

    def __init__(self, pool: asyncpg.Pool, quotas: dict[tuple[str, str], int] | None = None) -> None:
        self.clock = Clock()
        self.planning = Planning(
            Parameters(1, 2, horizon_days=5),
            product_catalogue(),
            allocation=Allocation("month", quotas or {}),
            clock=self.clock,
        )
        self.pool = pool
        self.uow = UnitOfWork(pool, "t.v2v.scheduling", notify_channel("scheduling"), postgres_tx)
        self.handlers = build_handlers(self.planning)
        app = FastAPI()
        problems.install(app)
        app.include_router(router)
        app.include_router(offers_router)
        settings = SchedulingSettings(scheduling_hold_ttl_s=600)
        runtime = SimpleNamespace(uow=self.uow, settings=settings, extras={PLANNING: self.planning})
        app.dependency_overrides[current_runtime] = lambda: runtime
        self.tokens = TestTokens.install(app)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://scheduling")

    async def deliver(self, *events: CloudEvent) -> None:
        for event in events:
            async with self.uow.begin() as tx:
                await self.handlers.dispatch(tx, event)

    def as_centre(self, centre: str = CENTRE) -> dict[str, str]:
        return self.tokens.headers("centre", centre)

    async def availability(self, centre: str = CENTRE, **params: Any) -> list[dict[str, Any]]:
        r = await self.http.get(
            "/v1/availability",
            params={**MARKET, "apheresis_from": MONDAY.isoformat(), **params},
            headers=self.as_centre(centre),
        )
        assert r.status_code == 200, r.text
        return list(r.json())

    async def hold(self, offer: dict[str, Any], centre: str = CENTRE) -> httpx.Response:
        body = {k: offer[k] for k in (*MARKET, "site_id", "manufacturing_start_date", "apheresis_date")}
        return await self.http.post("/v1/holds", json=body, headers=self.as_centre(centre))

    async def slots(self) -> list[dict[str, Any]]:
        r = await self.http.get("/v1/slots", headers=self.tokens.headers("ops"))
        return list(r.json())

    async def waitlist(self) -> list[dict[str, Any]]:
        r = await self.http.get("/v1/waitlist", headers=self.tokens.headers("ops"))
        return list(r.json())


@pytest.fixture
async def api(pool: asyncpg.Pool) -> AsyncIterator[Api]:
    a = Api(pool)
    await a.deliver(site("DE-A"), site("FR-B", capacity=2))
    yield a
    await a.http.aclose()


def site(site_id: str, capacity: int = 1) -> CloudEvent:
    return new_event(
        SiteRegisteredV1(
            site_id=site_id,
            name=site_id,
            country=site_id[:2],
            region="europe",
            timezone="Europe/Berlin",
            operator="own",
            active=True,
            approvals=[SiteApproval(regulator="EMA", use="clinical", product_code=PRODUCT)],
            daily_capacity={PRODUCT: capacity},
        ),
        subject=site_id,
    )


def order(
    n: int, centre: str = CENTRE, offer_id: str | None = None, apheresis: date = MONDAY
) -> tuple[uuid.UUID, CloudEvent]:
    oid = uuid.uuid4()
    return oid, new_event(
        OrderSubmittedV1(
            order_id=oid,
            coi=f"V2V0031{n:06d}X",
            treatment_center_id=centre,
            country="DE",
            requested_apheresis_date=apheresis,
            offer_id=uuid.UUID(offer_id) if offer_id else None,
            **MARKET,
        )
    )


def d(n: int) -> str:
    return (MONDAY + timedelta(days=n)).isoformat()


async def test_availability_gives_each_sites_earliest_delivery_and_alternatives(api: Api) -> None:
    offers = await api.availability(per_site=2)
    assert [(o["site_id"], o["manufacturing_start_date"]) for o in offers] == [
        ("DE-A", d(1)),
        ("FR-B", d(1)),
        ("DE-A", d(2)),
        ("FR-B", d(2)),
    ]
    assert all(o["apheresis_date"] == d(0) for o in offers)
    first = offers[0]
    # QC inside the apheresis-to-release days: release = start + (median - the day before the start)
    assert (
        first["predicted_release"] == d(1 + 28)
        and first["predicted_delivery_p90"] > first["predicted_delivery"]
    )
    # a window of one apheresis day: the starts that fresh material collected that day can make (72 h)
    window = await api.availability(apheresis_to=MONDAY.isoformat(), per_site=10)
    assert {o["apheresis_date"] for o in window} == {d(0)}
    assert sorted({o["manufacturing_start_date"] for o in window}) == [d(1), d(2), d(3)]
    # further on, fresh material is collected later: the apheresis date follows the manufacturing day
    later = await api.availability(per_site=10)
    assert {(o["manufacturing_start_date"], o["apheresis_date"]) for o in later} >= {(d(5), d(2))}
    # bounded and validated
    too_early = {"apheresis_to": (MONDAY - timedelta(days=1)).isoformat()}
    for bad in (
        {"per_site": 11},
        {"product_code": "NOPE"},
        {"regulator": "XYZ"},
        {"apheresis_from": "x"},
        too_early,
    ):
        r = await api.http.get(
            "/v1/availability",
            params={**MARKET, "apheresis_from": MONDAY.isoformat(), **bad},
            headers=api.as_centre(),
        )
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    carrier = api.tokens.headers("carrier", "DHL")
    r = await api.http.get(
        "/v1/availability", params={**MARKET, "apheresis_from": MONDAY.isoformat()}, headers=carrier
    )
    assert r.status_code == 403


async def test_a_centre_holds_an_offer_and_its_order_gets_exactly_that_slot(api: Api) -> None:
    offers = await api.availability(per_site=3)
    wanted = next(o for o in offers if o["site_id"] == "DE-A" and o["manufacturing_start_date"] == d(3))
    r = await api.hold(wanted)
    assert r.status_code == 201, r.text
    held = r.json()
    assert (
        held["status"] == "active" and held["site_id"] == "DE-A" and held["manufacturing_start_date"] == d(3)
    )
    assert datetime.fromisoformat(held["expires_at"]) == api.clock.now + timedelta(seconds=600)
    # the held day is no longer offered to anyone (capacity one), and cannot be held twice
    again = await api.availability(OTHER, per_site=5)
    assert ("DE-A", d(3)) not in {(o["site_id"], o["manufacturing_start_date"]) for o in again}
    assert (await api.hold(wanted, OTHER)).status_code == 409
    # another centre cannot read or release it; only a centre holds offers
    assert (
        await api.http.get(f"/v1/holds/{held['offer_id']}", headers=api.as_centre(OTHER))
    ).status_code == 404
    r = await api.http.post(f"/v1/holds/{held['offer_id']}/release", headers=api.as_centre(OTHER))
    assert r.status_code == 404
    assert (await api.hold(wanted, CENTRE)).status_code == 409
    r = await api.http.post(
        "/v1/holds",
        json={**MARKET, "site_id": "DE-A", "manufacturing_start_date": d(4), "apheresis_date": d(1)},
        headers=api.tokens.headers("ops"),
    )
    assert r.status_code == 403  # ops lacks orders:write

    oid, submitted = order(1, offer_id=held["offer_id"])
    await api.deliver(submitted)
    [slot] = [s for s in await api.slots() if s["order_id"] == str(oid)]
    assert (slot["site_id"], slot["manufacturing_start_date"], slot["apheresis_date"]) == ("DE-A", d(3), d(0))
    assert slot["reserved_reason"] == "offer"
    claimed = (await api.http.get(f"/v1/holds/{held['offer_id']}", headers=api.as_centre())).json()
    assert claimed["status"] == "claimed" and claimed["order_id"] == str(oid)
    # an order naming a hold it may not use (another centre's, or claimed) is booked as any other
    oid2, other = order(2, OTHER, offer_id=held["offer_id"])
    await api.deliver(other)
    [slot2] = [s for s in await api.slots() if s["order_id"] == str(oid2)]
    assert slot2["reserved_reason"] == "initial" and (
        slot2["site_id"],
        slot2["manufacturing_start_date"],
    ) != (
        "DE-A",
        d(3),
    )


async def test_a_hold_that_expires_returns_its_day_and_the_waitlist_is_served(pool: asyncpg.Pool) -> None:
    api = Api(pool)
    await api.deliver(site("DE-A"))
    offers = await api.availability(per_site=5)
    assert len(offers) == 5
    holds = [(await api.hold(o)).json() for o in offers]  # the centre holds the whole horizon
    oid, waiting = order(1, OTHER)
    await api.deliver(waiting)
    [entry] = await api.waitlist()
    assert entry["order_id"] == str(oid) and entry["reason"] == "no_capacity"

    assert await commands.expire_holds(api.uow, api.planning) == 0  # not yet
    api.clock.now += timedelta(seconds=601)
    assert await commands.expire_holds(api.uow, api.planning) == 5
    [slot] = [s for s in await api.slots() if s["order_id"] == str(oid)]
    assert slot["manufacturing_start_date"] == d(1) and slot["reserved_reason"] == "waitlist"
    assert await api.waitlist() == []
    statuses = {
        (await api.http.get(f"/v1/holds/{h['offer_id']}", headers=api.as_centre())).json()["status"]
        for h in holds
    }
    assert statuses == {"expired"}
    # an expired hold named by an order: the order is booked as any other
    oid2, late = order(2, offer_id=holds[1]["offer_id"])
    await api.deliver(late)
    [slot2] = [s for s in await api.slots() if s["order_id"] == str(oid2)]
    assert slot2["reserved_reason"] == "initial"
    await api.http.aclose()


async def test_a_centre_released_hold_serves_the_waitlist(api: Api) -> None:
    offers = await api.availability(per_site=5)
    holds = [(await api.hold(o)).json() for o in offers if o["site_id"] == "DE-A"]
    for o in offers:
        if o["site_id"] == "FR-B":
            assert (await api.hold(o)).status_code == 201
            assert (await api.hold(o)).status_code == 201  # FR-B starts two a day
    oid, waiting = order(1, OTHER)
    await api.deliver(waiting)
    assert [w["order_id"] for w in await api.waitlist()] == [str(oid)]
    r = await api.http.post(f"/v1/holds/{holds[0]['offer_id']}/release", headers=api.as_centre())
    assert r.status_code == 200 and r.json()["status"] == "released"
    assert (
        await api.http.post(f"/v1/holds/{holds[0]['offer_id']}/release", headers=api.as_centre())
    ).status_code == 409
    [slot] = [s for s in await api.slots() if s["order_id"] == str(oid)]
    assert (slot["site_id"], slot["manufacturing_start_date"]) == (
        "DE-A",
        holds[0]["manufacturing_start_date"],
    )


async def quota_api(pool: asyncpg.Pool) -> Api:
    """`CENTRE` may take one start of the product a month; a 60-day horizon; DE-A starts five a day."""
    api = Api(pool, quotas={(CENTRE, PRODUCT): 1})
    api.planning = Planning(
        Parameters(1, 2, horizon_days=60),
        product_catalogue(),
        allocation=api.planning.allocation,
        clock=api.clock,
    )
    api.handlers = build_handlers(api.planning)
    api.http._transport.app.dependency_overrides[current_runtime]().extras[PLANNING] = api.planning  # type: ignore[attr-defined]
    await api.deliver(site("DE-A", capacity=5))
    return api


async def test_a_centres_quota_per_month_moves_its_next_order_to_the_next_month(pool: asyncpg.Pool) -> None:
    api = await quota_api(pool)
    first, o1 = order(1)
    await api.deliver(o1)
    offers = await api.availability(per_site=3)
    assert offers and all(o["manufacturing_start_date"] >= "2031-04-01" for o in offers)  # March used up
    others = await api.availability(OTHER, per_site=1)
    assert others[0]["manufacturing_start_date"] == d(1)  # no quota for the other centre
    second, o2 = order(2)
    await api.deliver(o2)
    by_order = {s["order_id"]: s for s in await api.slots()}
    assert by_order[str(first)]["manufacturing_start_date"] == d(1)
    assert by_order[str(second)]["manufacturing_start_date"] == "2031-04-01"
    assert by_order[str(second)]["apheresis_date"] == "2031-03-29"  # fresh: derived from the April start
    await api.http.aclose()


async def test_a_centres_quota_holds_within_one_batch_and_an_offer_is_claimed_in_it(
    pool: asyncpg.Pool,
) -> None:
    """Within one transaction (a consumer's batch) every booking counts those made before it: a
    centre's quota of one a month moves its second order of the batch to the next month, another
    centre's orders are not counted against it, and an order of the batch claims its centre's offer."""
    api = await quota_api(pool)
    offer = next(o for o in await api.availability(OTHER, per_site=1))
    held = await api.hold(offer, OTHER)
    assert held.status_code == 201, held.text
    hold_id = held.json()["offer_id"]
    (first, o1), (second, o2) = order(1), order(2)
    (third, o3), (fourth, o4) = order(3, OTHER), order(4, OTHER, offer_id=hold_id)
    async with api.uow.begin() as tx:
        for event in (o1, o3, o2, o4):
            assert await api.handlers.dispatch(tx, event)
    by_order = {s["order_id"]: s for s in await api.slots()}
    assert by_order[str(first)]["manufacturing_start_date"] == d(1)
    assert by_order[str(second)]["manufacturing_start_date"] == "2031-04-01"  # March used up, in the batch
    assert by_order[str(third)]["manufacturing_start_date"] == d(1)  # no quota for the other centre
    assert by_order[str(fourth)]["manufacturing_start_date"] == offer["manufacturing_start_date"]
    used = await pool.fetch(
        """SELECT manufacturing_start_date AS day, count(*) AS n FROM slots
           WHERE status IN ('held', 'confirmed', 'consumed') GROUP BY 1"""
    )
    assert all(r["n"] <= 5 for r in used)
    await api.http.aclose()


async def test_patients_moved_by_a_recollection_wait_ahead_of_new_orders_and_ops_set_priority(
    pool: asyncpg.Pool,
) -> None:
    api = Api(pool)
    await api.deliver(site("DE-A"))
    placed = [order(i) for i in range(5)]  # the whole horizon
    new = [order(10 + i, OTHER) for i in range(2)]
    await api.deliver(*(e for _, e in placed + new))
    assert [w["order_id"] for w in await api.waitlist()] == [str(oid) for oid, _ in new]
    moved, _ = placed[0]
    await api.deliver(
        new_event(
            RebookRequestedV1(
                order_id=moved,
                coi="V2V0031000000X",
                treatment_center_id=CENTRE,
                kind="recollection",
                reason="material_rejected",
                apheresis_date=MONDAY + timedelta(days=1),
                exclude_site_id="DE-A",  # nowhere else approved: it waits
                **{k: v for k, v in MARKET.items() if k != "product_code"},
                product_code=PRODUCT,
            )
        )
    )
    waiting = await api.waitlist()
    # its day went to the first new order; the moved patient waits ahead of the other new order
    assert [(w["order_id"], w["priority"]) for w in waiting] == [(str(moved), 1), (str(new[1][0]), 0)]
    # ops put the new order first
    r = await api.http.post(
        f"/v1/waitlist/{new[1][0]}/priority", json={"priority": 5}, headers=api.tokens.headers("ops")
    )
    assert r.status_code == 200 and r.json()["previous_priority"] == 0
    assert [w["order_id"] for w in await api.waitlist()] == [str(new[1][0]), str(moved)]
    for bad in ({"priority": 10}, {"priority": -1}, {"priority": "x"}, {}):
        r = await api.http.post(f"/v1/waitlist/{moved}/priority", json=bad, headers=api.tokens.headers("ops"))
        assert r.status_code == 422
    r = await api.http.post(
        f"/v1/waitlist/{uuid.uuid4()}/priority", json={"priority": 1}, headers=api.tokens.headers("ops")
    )
    assert r.status_code == 404
    r = await api.http.post(f"/v1/waitlist/{moved}/priority", json={"priority": 9}, headers=api.as_centre())
    assert r.status_code == 403
    await api.http.aclose()
