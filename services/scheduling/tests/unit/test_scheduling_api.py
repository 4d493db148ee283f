"""Scheduling's HTTP API with bearer tokens (`TestTokens`) on the in-memory repositories: both routes
need `ops:read`; no token is 401, another scope 403; lists are paged with a cap; query parameters are
bounded; a tenant-bound principal holding `ops:read` all the same sees only its own rows."""

from __future__ import annotations

import uuid
from datetime import date
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from scheduling_service.adapters.memory import SchedulingStore, fake_uow
from scheduling_service.domain.selection import Parameters
from scheduling_service.domain.slots import Planning
from scheduling_service.entrypoints.api import router
from scheduling_service.service_layer.handlers import build_handlers
from v2v_contracts import OrderSubmittedV1, SiteApproval, SiteRegisteredV1, new_event
from v2v_contracts.reference import product_catalogue
from v2v_messaging.fakes import FakeInbox
from v2v_servicekit import current_runtime, problems
from v2v_servicekit.auth import SCOPE_ATTR
from v2v_servicekit.testing import TestTokens

PRODUCT = "CILTA-CEL"
HANDLERS = build_handlers(Planning(Parameters(1, 2, horizon_days=3), product_catalogue()))
CENTRES = ("TC-DE-BE-001", "TC-FR-PA-001")


def site(site_id: str) -> Any:
    return new_event(
        SiteRegisteredV1(
            site_id=site_id,
            name=site_id,
            country="DE",
            region="europe",
            timezone="Europe/Berlin",
            operator="own",
            active=True,
            approvals=[SiteApproval(regulator="EMA", use="clinical", product_code=PRODUCT)],
            daily_capacity={PRODUCT: 1},
        )
    )


def order(n: int, centre: str) -> Any:
    return new_event(
        OrderSubmittedV1(
            order_id=uuid.uuid4(),
            coi=f"V2V0031{n:06d}X",
            treatment_center_id=centre,
            product_code=PRODUCT,
            order_type="clinical",
            regulator="EMA",
            country="DE",
            region="europe",
            requested_apheresis_date=date(2031, 3, 3),
        )
    )


@pytest.fixture
async def world() -> Any:
    """Sites A and B (one a day, three days each): 6 orders booked, alternating centres; 2 waiting."""
    store = SchedulingStore()
    uow = fake_uow(store)
    inbox = FakeInbox(uow, HANDLERS)
    await inbox.deliver(site("A"), site("B"))
    await inbox.deliver(*(order(i, CENTRES[i % 2]) for i in range(8)))
    app = FastAPI()
    problems.install(app)
    app.include_router(router)
    app.dependency_overrides[current_runtime] = lambda: SimpleNamespace(uow=uow)
    tokens = TestTokens.install(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://scheduling") as c:
        yield SimpleNamespace(client=c, tokens=tokens, store=store)


def test_every_route_declares_ops_read_and_nothing_else() -> None:
    declared = {}
    for route in router.routes:
        assert isinstance(route, APIRoute)
        scopes, stack = [], list(route.dependant.dependencies)
        while stack:
            dep = stack.pop()
            if getattr(dep.call, SCOPE_ATTR, None):
                scopes.append(getattr(dep.call, SCOPE_ATTR))
            stack.extend(dep.dependencies)
        declared[route.path] = scopes
    assert declared == {"/v1/slots": ["ops:read"], "/v1/waitlist": ["ops:read"]}


@pytest.mark.parametrize("path", ["/v1/slots", "/v1/waitlist"])
async def test_no_token_401_another_scope_403_ops_200(world: Any, path: str) -> None:
    c, tokens = world.client, world.tokens
    for headers in ({}, {"Authorization": "Bearer x.y.z"}, tokens.headers("ops", ttl_s=-120)):
        r = await c.get(path, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["content-type"].startswith("application/problem+json")
    for kind, entity in [
        ("qa", None),
        ("admin", None),
        ("site", "A"),
        ("centre", CENTRES[0]),
        ("carrier", "DHL"),
    ]:
        r = await c.get(path, headers=tokens.headers(kind, entity))  # their default grants lack ops:read
        assert r.status_code == 403 and 'scope="ops:read"' in r.headers["www-authenticate"]
    r = await c.get(path, headers=tokens.headers("ops", scopes=["ops:write", "sites:read", "orders:read"]))
    assert r.status_code == 403
    r = await c.get(path, headers=tokens.headers("ops"))
    assert r.status_code == 200 and len(r.json()) == (6 if path == "/v1/slots" else 2)


async def test_a_tenant_holding_ops_read_sees_only_its_own_rows(world: Any) -> None:
    c, tokens = world.client, world.tokens
    every = (await c.get("/v1/slots", headers=tokens.headers("ops"))).json()

    def as_(kind: str, entity: str) -> dict[str, str]:
        return tokens.headers(kind, entity, scopes=["ops:read"])

    at_a = (await c.get("/v1/slots", headers=as_("site", "A"))).json()
    assert at_a == [s for s in every if s["site_id"] == "A"] and len(at_a) == 3
    assert (await c.get("/v1/slots", params={"site_id": "B"}, headers=as_("site", "A"))).json() == []
    mine = (await c.get("/v1/slots", headers=as_("centre", CENTRES[1]))).json()
    assert mine == [s for s in every if s["treatment_center_id"] == CENTRES[1]] and len(mine) == 3
    assert (await c.get("/v1/slots", headers=as_("carrier", "DHL"))).json() == []

    assert len((await c.get("/v1/waitlist", headers=as_("centre", CENTRES[0]))).json()) == 1
    assert (await c.get("/v1/waitlist", headers=as_("site", "A"))).json() == []
    assert (await c.get("/v1/waitlist", headers=as_("carrier", "DHL"))).json() == []


async def test_the_lists_page(world: Any) -> None:
    c, ops = world.client, world.tokens.headers("ops")
    every = (await c.get("/v1/slots", headers=ops)).json()
    pages = [(await c.get("/v1/slots", params={"limit": 4, "offset": o}, headers=ops)).json() for o in (0, 4)]
    assert pages[0] + pages[1] == every and len(pages[0]) == 4
    waiting = (await c.get("/v1/waitlist", headers=ops)).json()
    assert (await c.get("/v1/waitlist", params={"limit": 1, "offset": 1}, headers=ops)).json() == waiting[1:]
    held = (await c.get("/v1/slots", params=[("status", "held"), ("status", "held")], headers=ops)).json()
    assert held == every


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/slots", {"limit": 201}, "limit"),
        ("/v1/slots", {"limit": 5000}, "limit"),
        ("/v1/slots", {"limit": 0}, "limit"),
        ("/v1/slots", {"offset": -1}, "offset"),
        ("/v1/slots", {"offset": 10_001}, "offset"),
        ("/v1/slots", {"limit": "NaN"}, "limit"),
        ("/v1/slots", {"product_code": "X" * 65}, "product_code"),
        ("/v1/slots", {"product_code": "CILTA CEL"}, "product_code"),
        ("/v1/slots", {"site_id": "A\u0000"}, "site_id"),
        ("/v1/slots", {"site_id": "X" * 10_000}, "site_id"),
        ("/v1/slots", {"status": "lost"}, "status.0"),
        ("/v1/slots", [("status", "held")] * 5, "status"),
        ("/v1/slots", {"order_id": "not-a-uuid"}, "order_id"),
        ("/v1/waitlist", {"limit": 201}, "limit"),
        ("/v1/waitlist", {"offset": 10_001}, "offset"),
    ],
    ids=lambda v: str(v)[:30],
)
async def test_a_hostile_query_is_refused(world: Any, path: str, params: Any, field: str) -> None:
    r = await world.client.get(path, params=params, headers=world.tokens.headers("ops"))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert field in [e["field"] for e in r.json()["errors"]], r.text
    assert "X" * 65 not in r.text
