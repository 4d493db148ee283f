"""The site's HTTP API with bearer tokens (`TestTokens`) over its routes, on in-memory repositories:
every route declares one scope; no token is 401, a missing scope 403; a site's MES is confined to its
own site (another site answers 404, nothing written); QA and the admin act on any site; hostile input
is refused with 422 before anything is written, and the refusal never echoes it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from site_service.adapters.memory import MemoryStore, fake_uow
from site_service.adapters.repository import SiteTx
from site_service.entrypoints.api import router
from site_service.service_layer import commands
from site_service.service_layer.handlers import handlers
from v2v_contracts import ApheresisCompletedV1, SlotReservedV1, new_event
from v2v_contracts.coi import make_coi
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork
from v2v_servicekit import current_runtime, problems
from v2v_servicekit.auth import SCOPE_ATTR
from v2v_servicekit.testing import FromNow, TestTokens, resolve_times

SITE = "FR-LES-ULIS"  # Novartis: TISA-CEL 3/day
KITE_SITE = "NL-HOOFDDORP"  # Kite: AXI-CEL 4/day (issue 11: axi-cel is made at Kite's plants only)
OTHER_SITE = "CH-STEIN"
CENTRE = "TC-FR-PA-001"
TODAY = datetime.now(UTC).date()
DAY = TODAY + timedelta(days=20)
STEPS = ["activation", "transduction", "expansion", "harvest", "cryopreservation"]
MB2 = "A" * (2 * 1024 * 1024)
_seq = itertools.count(1)

ROUTE_SCOPES = {
    ("GET", "/v1/sites"): "sites:read",
    ("GET", "/v1/sites/{site_id}"): "sites:read",
    ("PATCH", "/v1/sites/{site_id}"): "registry:admin",
    ("POST", "/v1/sites/{site_id}/outages"): "registry:admin",
    ("POST", "/v1/sites/{site_id}/receipts"): "mes:report",
    ("POST", "/v1/sites/{site_id}/manufacturing/{order_id}/steps"): "mes:report",
    ("POST", "/v1/sites/{site_id}/manufacturing/{order_id}/qc"): "qc:release",
    ("GET", "/v1/sites/{site_id}/manufacturing/{order_id}"): "sites:read",
    ("POST", "/v1/sites/{site_id}/manufacturing/{order_id}/release"): "qc:release",
    ("POST", "/v1/sites/{site_id}/manufacturing/{order_id}/import-certification"): "qc:release",
}
# a QC that passed: its results summary and its certificate of analysis (issue 10)
PASSED = {
    "disposition": "passed",
    "results": {"viability_pct": 92.5, "car_positive_pct": 31.0, "sterility": "negative"},
    "coa_reference": "COA-2031-0042",
}


@pytest.fixture(scope="module")
async def seeded() -> MemoryStore:
    store = MemoryStore()
    assert await commands.load_seed(fake_uow(store)) == 13
    return store


@dataclass
class Api:
    client: httpx.AsyncClient
    tokens: TestTokens
    store: MemoryStore
    uow: FakeUnitOfWork[SiteTx]

    def site(self, site_id: str = SITE, **kw: Any) -> dict[str, str]:
        """The site's MES: sites:read and mes:report, confined to `site_id`."""
        return self.tokens.headers("site", site_id, **kw)

    def qa(self, **kw: Any) -> dict[str, str]:
        return self.tokens.headers("qa", **kw)

    def admin(self, **kw: Any) -> dict[str, str]:
        return self.tokens.headers("admin", **kw)

    def qp(self, site_id: str = SITE, *, role: str = "qualified_person", **kw: Any) -> dict[str, str]:
        """A signing token of the site's release signer (QP or quality unit), collected by QA's client."""
        kw.setdefault("client_id", "qa-x")
        prefix = "qp" if role == "qualified_person" else "qu"
        return self.tokens.signature_headers(
            f"{prefix}.{site_id.lower()}", roles=(role,), org_kind="site", org_id=site_id, **kw
        )

    def market(self, order_id: str, regulator: str, order_type: str = "commercial") -> None:
        """What `order.submitted` tells the site: the order's market."""
        from site_service.domain.registry import OrderFacts

        oid = uuid.UUID(order_id)
        known = self.store.orders.get(oid) or OrderFacts(oid)
        self.store.orders[oid] = replace(
            known, regulator=regulator, order_type=order_type, country="FR", region="europe"
        )

    async def reserve(self, site_id: str = SITE, product: str = "TISA-CEL") -> tuple[str, str]:
        order_id, coi = uuid.uuid4(), make_coi("V2V00", 26, next(_seq))
        slot = SlotReservedV1(
            order_id=order_id,
            coi=coi,
            treatment_center_id=CENTRE,
            slot_id=uuid.uuid4(),
            site_id=site_id,
            product_code=product,
            order_type="commercial",
            apheresis_date=DAY - timedelta(days=2),
            manufacturing_start_date=DAY,
        )
        await FakeInbox(self.uow, handlers).deliver(new_event(slot))
        # the bag is collected (no DIN: unchecked) before any receipt
        collected = ApheresisCompletedV1(
            order_id=order_id, coi=coi, treatment_center_id=CENTRE, collected_at=datetime.now(UTC)
        )
        await FakeInbox(self.uow, handlers).deliver(new_event(collected))
        self.uow.take()
        return str(order_id), coi

    async def received(self, site_id: str = SITE, product: str = "TISA-CEL") -> tuple[str, str]:
        order_id, coi = await self.reserve(site_id, product)
        r = await self.client.post(
            f"/v1/sites/{site_id}/receipts",
            json={"order_id": order_id, "coi": coi, "accepted": True},
            headers=self.site(site_id),
        )
        assert r.status_code == 200, r.text
        self.uow.take()
        return order_id, coi

    async def qc_pending(self, site_id: str = SITE, product: str = "TISA-CEL") -> str:
        order_id, _ = await self.received(site_id, product)
        for step in STEPS:
            r = await self.client.post(
                f"/v1/sites/{site_id}/manufacturing/{order_id}/steps",
                json={"step": step},
                headers=self.site(site_id),
            )
            assert r.status_code == 200, r.text
        self.uow.take()
        return order_id

    def snapshot(self) -> Any:
        return self.store.snapshot()

    async def send(self, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
        """The body as JSON with `\\uXXXX` escapes (a lone surrogate travels as `\\ud800`)."""
        return await self.client.request(
            method, path, content=json.dumps(body), headers={**headers, "content-type": "application/json"}
        )


@pytest.fixture
async def api(seeded: MemoryStore) -> Any:
    store = seeded.copy()
    uow = fake_uow(store)
    app = FastAPI()
    problems.install(app)
    app.include_router(router)
    app.dependency_overrides[current_runtime] = lambda: SimpleNamespace(uow=uow)
    tokens = TestTokens.install(app)
    tokens.install_signatures(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://site") as c:
        yield Api(c, tokens, store, uow)


def scopes_of(route: APIRoute) -> list[str]:
    """Every scope the route's dependencies declare (exactly one is expected)."""
    found, stack = [], list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if getattr(dep.call, SCOPE_ATTR, None):
            found.append(getattr(dep.call, SCOPE_ATTR))
        stack.extend(dep.dependencies)
    return found


def requests_for(order_id: str = str(uuid.UUID(int=1))) -> list[tuple[str, str, str, dict[str, Any] | None]]:
    """One well-formed request per route: (its scope, method, path, body)."""
    return [
        ("sites:read", "GET", "/v1/sites", None),
        ("sites:read", "GET", f"/v1/sites/{SITE}", None),
        ("registry:admin", "PATCH", f"/v1/sites/{SITE}", {"active": True}),
        (
            "registry:admin",
            "POST",
            f"/v1/sites/{SITE}/outages",
            {"start_date": DAY.isoformat(), "end_date": DAY.isoformat(), "reason": "maintenance"},
        ),
        (
            "mes:report",
            "POST",
            f"/v1/sites/{SITE}/receipts",
            {"order_id": order_id, "coi": make_coi("V2V00", 26, 1), "accepted": True},
        ),
        ("mes:report", "POST", f"/v1/sites/{SITE}/manufacturing/{order_id}/steps", {"step": "activation"}),
        ("qc:release", "POST", f"/v1/sites/{SITE}/manufacturing/{order_id}/qc", PASSED),
        ("sites:read", "GET", f"/v1/sites/{SITE}/manufacturing/{order_id}", None),
        ("qc:release", "POST", f"/v1/sites/{SITE}/manufacturing/{order_id}/release", {}),
        ("qc:release", "POST", f"/v1/sites/{SITE}/manufacturing/{order_id}/import-certification", {}),
    ]


def assert_refused(r: httpx.Response, status: int, field: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    if field is not None:
        assert field in [e["field"] for e in r.json()["errors"]], r.text


# ---- scopes ------------------------------------------------------------------------------------------


def test_every_route_declares_exactly_one_scope() -> None:
    declared = {
        (method, route.path): scopes_of(route)
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    assert declared == {k: [v] for k, v in ROUTE_SCOPES.items()}


def test_the_requests_below_cover_every_route() -> None:
    assert len(requests_for()) == len(ROUTE_SCOPES)
    assert sorted(scope for scope, *_ in requests_for()) == sorted(ROUTE_SCOPES.values())


@pytest.mark.parametrize(("scope", "method", "path", "body"), requests_for(), ids=lambda v: str(v)[:40])
async def test_no_token_or_a_bad_one_is_401_and_nothing_is_written(
    api: Api, scope: str, method: str, path: str, body: dict[str, Any] | None
) -> None:
    before = api.snapshot()
    for headers in (
        {},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        api.site(ttl_s=-120),  # expired
        {"Authorization": "Bearer " + TestTokens().token("site", SITE)},  # signed by another key
    ):
        r = await api.client.request(method, path, json=body, headers=headers)
        assert_refused(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert api.snapshot() == before and api.uow.committed == []


@pytest.mark.parametrize(("scope", "method", "path", "body"), requests_for(), ids=lambda v: str(v)[:40])
async def test_a_token_without_the_routes_scope_is_403(
    api: Api, scope: str, method: str, path: str, body: dict[str, Any] | None
) -> None:
    others = sorted({s for s in ROUTE_SCOPES.values() if s != scope} | {"orders:read", "ops:read"})
    before = api.snapshot()
    for kind, entity in [("qa", None), ("admin", None), ("site", SITE), ("centre", CENTRE)]:
        r = await api.client.request(
            method, path, json=body, headers=api.tokens.headers(kind, entity, scopes=others)
        )
        assert_refused(r, 403)
        assert f'scope="{scope}"' in r.headers["www-authenticate"]
    assert api.snapshot() == before and api.uow.committed == []


async def test_default_grants_who_may_do_what(api: Api) -> None:
    order_id = await api.qc_pending()
    api.market(order_id, "EMA")
    qc = f"/v1/sites/{SITE}/manufacturing/{order_id}/qc"
    # a site's MES reports steps but does not release: QC is QA's
    r = await api.client.post(qc, json=PASSED, headers=api.site())
    assert_refused(r, 403)
    # QA does not report MES steps or change the registry
    r = await api.client.patch(f"/v1/sites/{SITE}", json={"active": False}, headers=api.qa())
    assert_refused(r, 403)
    r = await api.client.post(qc, json=PASSED, headers=api.qa())
    assert r.status_code == 200 and r.json()["state"] == "qc_passed"
    # the release is QA's too, signed by the batch-release site's QP (here the site itself)
    release = f"/v1/sites/{SITE}/manufacturing/{order_id}/release"
    r = await api.client.post(release, headers={**api.site(), **api.qp(client_id=f"site-{SITE.lower()}")})
    assert_refused(r, 403)
    r = await api.client.post(release, headers={**api.qa(), **api.qp()})
    assert r.status_code == 200 and r.json()["state"] == "released", r.text
    # the admin changes the registry, but reports nothing from a site
    r = await api.client.post(
        f"/v1/sites/{SITE}/manufacturing/{order_id}/steps", json={"step": "activation"}, headers=api.admin()
    )
    assert_refused(r, 403)


# ---- tenancy -----------------------------------------------------------------------------------------


async def test_a_sites_reads_are_confined_to_its_own_site(api: Api) -> None:
    listed = await api.client.get("/v1/sites", headers=api.site())
    assert listed.status_code == 200 and [s["site_id"] for s in listed.json()] == [SITE]
    assert (await api.client.get(f"/v1/sites/{SITE}", headers=api.site())).status_code == 200
    other = await api.client.get(f"/v1/sites/{OTHER_SITE}", headers=api.site())
    nowhere = await api.client.get("/v1/sites/XX-NOWHERE", headers=api.site())
    assert_refused(other, 404)
    assert_refused(nowhere, 404)
    assert other.json()["title"] == nowhere.json()["title"]  # another site looks like no site at all

    order_id, _ = await api.reserve(OTHER_SITE)
    r = await api.client.get(f"/v1/sites/{OTHER_SITE}/manufacturing/{order_id}", headers=api.site())
    assert_refused(r, 404)
    r = await api.client.get(f"/v1/sites/{OTHER_SITE}/manufacturing/{order_id}", headers=api.site(OTHER_SITE))
    assert r.status_code == 200 and r.json()["state"] == "awaiting_material"

    for kind in ("qa", "admin", "ops"):  # not confined
        everyone = await api.client.get("/v1/sites", headers=api.tokens.headers(kind))
        assert len(everyone.json()) == 13
        one = await api.client.get(f"/v1/sites/{OTHER_SITE}", headers=api.tokens.headers(kind))
        assert one.status_code == 200


async def test_a_sites_mes_cannot_report_for_another_site(api: Api) -> None:
    order_id, coi = await api.reserve(OTHER_SITE)
    before = api.snapshot()
    mine = api.site(SITE)
    for path, body in [
        (f"/v1/sites/{OTHER_SITE}/receipts", {"order_id": order_id, "coi": coi, "accepted": True}),
        (
            f"/v1/sites/{OTHER_SITE}/receipts",
            {"order_id": order_id, "coi": coi, "accepted": False, "reason": "damaged_container"},
        ),
        (f"/v1/sites/{OTHER_SITE}/manufacturing/{order_id}/steps", {"step": "activation"}),
        (
            f"/v1/sites/{OTHER_SITE}/manufacturing/{order_id}/steps",
            {"step": "activation", "failed": True, "reason": "contamination"},
        ),
    ]:
        assert_refused(await api.client.post(path, json=body, headers=mine), 404)
    assert api.snapshot() == before and api.uow.committed == []
    # its own site's booking of that order does not exist: its own path answers as for any unknown order
    r = await api.client.post(
        f"/v1/sites/{SITE}/receipts", json={"order_id": order_id, "coi": coi, "accepted": True}, headers=mine
    )
    assert_refused(r, 409, "order_id")
    # the right site's MES can
    r = await api.client.post(
        f"/v1/sites/{OTHER_SITE}/receipts",
        json={"order_id": order_id, "coi": coi, "accepted": True},
        headers=api.site(OTHER_SITE),
    )
    assert r.status_code == 200 and r.json()["state"] == "material_received"


async def test_a_site_principal_stays_confined_whatever_scopes_it_holds(api: Api) -> None:
    """Tenancy comes from the token's kind and entity, not from the scopes it was given."""
    order_id = await api.qc_pending(OTHER_SITE)
    before = api.snapshot()
    broad = api.site(SITE, scopes=["sites:read", "registry:admin", "mes:report", "qc:release"])
    for method, path, body in [
        ("PATCH", f"/v1/sites/{OTHER_SITE}", {"active": False}),
        (
            "POST",
            f"/v1/sites/{OTHER_SITE}/outages",
            {"start_date": DAY.isoformat(), "end_date": DAY.isoformat(), "reason": "maintenance"},
        ),
        ("POST", f"/v1/sites/{OTHER_SITE}/manufacturing/{order_id}/qc", PASSED),
        ("POST", f"/v1/sites/{OTHER_SITE}/manufacturing/{order_id}/release", {}),
        ("POST", f"/v1/sites/{OTHER_SITE}/manufacturing/{order_id}/import-certification", {}),
    ]:
        assert_refused(await api.client.request(method, path, json=body, headers=broad), 404)
    assert api.snapshot() == before and api.uow.committed == []
    r = await api.client.patch(f"/v1/sites/{SITE}", json={"active": True}, headers=broad)
    assert r.status_code == 200


@pytest.mark.parametrize(("kind", "entity"), [("centre", CENTRE), ("carrier", "DHL-MEDICAL")])
async def test_another_tenant_holding_site_scopes_is_confined_to_no_site(
    api: Api, kind: str, entity: str
) -> None:
    """A centre or a carrier given these scopes all the same finds no site and acts on none."""
    order_id, coi = await api.reserve()
    qc_order = await api.qc_pending(OTHER_SITE)
    before = api.snapshot()
    headers = api.tokens.headers(kind, entity, scopes=sorted(set(ROUTE_SCOPES.values())))
    assert (await api.client.get("/v1/sites", headers=headers)).json() == []
    for method, path, body in [
        ("GET", f"/v1/sites/{SITE}", None),
        ("GET", f"/v1/sites/{SITE}/manufacturing/{order_id}", None),
        ("PATCH", f"/v1/sites/{SITE}", {"active": False}),
        (
            "POST",
            f"/v1/sites/{SITE}/outages",
            {"start_date": DAY.isoformat(), "end_date": DAY.isoformat(), "reason": "maintenance"},
        ),
        ("POST", f"/v1/sites/{SITE}/receipts", {"order_id": order_id, "coi": coi, "accepted": True}),
        ("POST", f"/v1/sites/{OTHER_SITE}/manufacturing/{qc_order}/qc", PASSED),
        ("POST", f"/v1/sites/{OTHER_SITE}/manufacturing/{qc_order}/release", {}),
    ]:
        assert_refused(await api.client.request(method, path, json=body, headers=headers), 404)
    assert api.snapshot() == before and api.uow.committed == []


async def test_qa_and_the_admin_act_on_any_site(api: Api) -> None:
    for site_id in (SITE, OTHER_SITE):
        order_id = await api.qc_pending(site_id)
        r = await api.client.post(
            f"/v1/sites/{site_id}/manufacturing/{order_id}/qc",
            json={"disposition": "out_of_specification", "reason": "potency", "reference": "QC-2026-17"},
            headers=api.qa(),
        )
        assert r.status_code == 200 and r.json()["state"] == "out_of_specification"
        [event] = api.uow.take()
        assert (event.type, event.data["reason"]) == ("site.product_out_of_specification.v1", "potency")
        assert r.json()["history"][-1]["reference"] == "QC-2026-17"
        r = await api.client.patch(
            f"/v1/sites/{site_id}", json={"daily_capacity": {"TISA-CEL": 4}}, headers=api.admin()
        )
        assert r.status_code == 200 and r.json()["daily_capacity"]["TISA-CEL"] == 4


# ---- the registry: reasons are codes, hostile input refused --------------------------------------------


async def test_an_outage_takes_a_reason_code_and_the_affected_bookings_carry_it(api: Api) -> None:
    order_id, _ = await api.reserve()
    r = await api.client.post(
        f"/v1/sites/{SITE}/outages",
        json={"start_date": DAY.isoformat(), "end_date": DAY.isoformat(), "reason": "regulatory_hold"},
        headers=api.admin(),
    )
    assert r.status_code == 201, r.text
    assert r.json()["reason"] == "regulatory_hold" and len(r.json()["affected_booking_ids"]) == 1
    registered, affected = api.uow.take()
    assert registered.data["outages"][0]["reason"] == "regulatory_hold"
    assert (affected.type, affected.data["order_id"], affected.data["reason"]) == (
        "site.booking_affected.v1",
        order_id,
        "outage:regulatory_hold",
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"reason": "cleanroom requalification"}, "reason"),  # free text
        ({"reason": "MAINTENANCE"}, "reason"),
        ({"reason": "maintenance\u0000"}, "reason"),
        ({"reason": "\ud800"}, "reason"),  # a lone surrogate
        ({"reason": MB2}, "reason"),
        ({"start_date": "9999-12-31", "end_date": "9999-12-31"}, "start_date"),  # far beyond the horizon
        ({"end_date": "9999-12-31"}, "end_date"),
        ({"start_date": (TODAY - timedelta(days=31)).isoformat()}, "start_date"),
        ({"end_date": (DAY + timedelta(days=366)).isoformat()}, "end_date"),  # 367 days long
        ({"end_date": (DAY - timedelta(days=1)).isoformat()}, "end_date"),
        ({"start_date": "tomorrow"}, "start_date"),
        ({"note": "free text"}, "note"),
        ({"reason": None}, "reason"),
    ],
    ids=lambda v: str(v)[:30],
)
async def test_a_hostile_outage_is_refused_and_nothing_is_written(
    api: Api, body: dict[str, Any], field: str
) -> None:
    await api.reserve()
    before = api.snapshot()
    full = {"start_date": DAY.isoformat(), "end_date": DAY.isoformat(), "reason": "maintenance", **body}
    r = await api.send("POST", f"/v1/sites/{SITE}/outages", full, api.admin())
    assert_refused(r, 422, field)
    assert MB2 not in r.text and len(r.content) < 4096
    assert api.snapshot() == before and api.uow.committed == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"approvals": [{"regulator": "EMA", "use": "commercial", "product_code": MB2}]},
            "approvals.0.product_code",
        ),
        (
            {"approvals": [{"regulator": MB2, "use": "commercial", "product_code": "TISA-CEL"}]},
            "approvals.0.regulator",
        ),
        ({"daily_capacity": {MB2: 1}}, "daily_capacity"),
        ({"daily_capacity": {"TISA CEL\u0000": 1}}, "daily_capacity"),
        ({"daily_capacity": {"TISA-CEL\ud800": 1}}, "daily_capacity"),
        (
            {"approvals": [{"regulator": "FDA ", "use": "commercial", "product_code": "TISA-CEL"}]},
            "approvals.0.regulator",
        ),
        (
            {"approvals": [{"regulator": "ANVISA", "use": "commercial", "product_code": "TISA-CEL"}]},
            "approvals.0.regulator",
        ),
        (
            {"approvals": [{"regulator": "EMA", "use": "compassionate", "product_code": "TISA-CEL"}]},
            "approvals.0.use",
        ),
        (
            {
                "approvals": [
                    {"regulator": "EMA", "use": "commercial", "product_code": "TISA-CEL", "note": "x"}
                ]
            },
            "approvals.0.note",
        ),
        (
            {"approvals": [{"regulator": "EMA", "use": "clinical", "product_code": "TISA-CEL"}] * 201},
            "approvals",
        ),
        (
            {"approvals": [{"regulator": "EMA", "use": "clinical", "product_code": "NOPE"}]},
            "approvals.0.product_code",
        ),
        ({"daily_capacity": {"TISA-CEL": -1}}, "daily_capacity.TISA-CEL"),
        ({"daily_capacity": {"TISA-CEL": 100_001}}, "daily_capacity.TISA-CEL"),
        ({"daily_capacity": {"TISA-CEL": 10**30}}, "daily_capacity.TISA-CEL"),
        ({"daily_capacity": {"TISA-CEL": 1.5}}, "daily_capacity.TISA-CEL"),
        ({"daily_capacity": {"TISA-CEL": "2"}}, "daily_capacity.TISA-CEL"),
        ({"daily_capacity": {"TISA-CEL": True}}, "daily_capacity.TISA-CEL"),
        ({"daily_capacity": {f"P{i}": 1 for i in range(51)}}, "daily_capacity"),
        ({"daily_capacity": {"NOT-A-PRODUCT": 1}}, "daily_capacity.NOT-A-PRODUCT"),
        ({"daily_capacity": [1, 2]}, "daily_capacity"),
        ({"active": "yes"}, "active"),
        ({"active": 1}, "active"),
        ({"name": MB2}, "name"),
    ],
    ids=lambda v: str(v)[:30],
)
async def test_a_hostile_site_patch_is_refused_and_nothing_is_written(
    api: Api, body: dict[str, Any], field: str
) -> None:
    before = api.snapshot()
    r = await api.send("PATCH", f"/v1/sites/{SITE}", body, api.admin())
    assert_refused(r, 422)
    errors = r.json()["errors"]
    assert field in [e["field"] for e in errors], errors
    assert MB2 not in r.text and len(r.content) < 8192
    assert api.snapshot() == before and api.uow.committed == []


async def test_nan_and_infinity_are_refused_as_capacity(api: Api) -> None:
    before = api.snapshot()
    for raw in ('{"daily_capacity": {"TISA-CEL": NaN}}', '{"daily_capacity": {"TISA-CEL": Infinity}}'):
        r = await api.client.patch(
            f"/v1/sites/{SITE}", content=raw, headers={**api.admin(), "content-type": "application/json"}
        )
        assert_refused(r, 422)
    assert api.snapshot() == before


async def test_a_two_megabyte_string_in_a_site_patch_is_refused_and_the_site_stays_publishable(
    api: Api,
) -> None:
    """The issue's wedge: a 2 MB string in a PATCH once became a site event over the broker's limit."""
    body = {"approvals": [{"regulator": "EMA", "use": "commercial", "product_code": "TISA-CEL" + MB2}]}
    r = await api.client.patch(f"/v1/sites/{SITE}", json=body, headers=api.admin())
    assert_refused(r, 422, "approvals.0.product_code")
    assert api.uow.committed == []
    r = await api.client.patch(f"/v1/sites/{SITE}", json={"active": False}, headers=api.admin())
    assert r.status_code == 200
    [event] = api.uow.take()
    assert event.type == "site.registered.v1" and len(event.to_json()) < 4096


@pytest.mark.parametrize(
    "path",
    ["/v1/sites/" + "A" * 65, "/v1/sites/FR%20LES", "/v1/sites/%F0%9F%92%A5", "/v1/sites/-X"],
)
async def test_a_malformed_site_id_is_refused(api: Api, path: str) -> None:
    r = await api.client.get(path, headers=api.admin())
    assert_refused(r, 422, "site_id")


@pytest.mark.parametrize("query", ["limit=201", "limit=0", "offset=-1", "offset=10001", "limit=NaN"])
async def test_the_site_list_is_paged_with_a_cap(api: Api, query: str) -> None:
    assert_refused(await api.client.get(f"/v1/sites?{query}", headers=api.admin()), 422)


async def test_the_site_list_pages(api: Api) -> None:
    first = (await api.client.get("/v1/sites?limit=3", headers=api.admin())).json()
    rest = (await api.client.get("/v1/sites?limit=200&offset=3", headers=api.admin())).json()
    everyone = (await api.client.get("/v1/sites", headers=api.admin())).json()
    assert len(first) == 3 and [s["site_id"] for s in first + rest] == [s["site_id"] for s in everyone]
    assert len(everyone) == 13


# ---- the MES: reasons are codes, reported times in their window, hostile input refused ------------------


def _now(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).isoformat()


async def test_mes_reports_carry_reason_codes_into_their_events(api: Api) -> None:
    order_id, coi = await api.reserve()
    r = await api.client.post(
        f"/v1/sites/{SITE}/receipts",
        json={
            "order_id": order_id,
            "coi": coi,
            "accepted": False,
            "reason": "temperature_excursion",
            "received_at": _now(-timedelta(hours=2)),
            "reference": "DEV-2026-0042",
        },
        headers=api.site(),
    )
    assert r.status_code == 200 and r.json()["state"] == "held_at_receipt"  # held for QA (issue 10)
    [event] = api.uow.take()
    assert (event.type, event.data["reason"]) == ("site.material_rejected.v1", "temperature_excursion")

    order_id, _ = await api.received(KITE_SITE, product="AXI-CEL")
    r = await api.client.post(
        f"/v1/sites/{KITE_SITE}/manufacturing/{order_id}/steps",
        json={"step": "activation", "failed": True, "reason": "contamination", "completed_at": _now()},
        headers=api.site(KITE_SITE),
    )
    assert r.status_code == 200 and r.json()["state"] == "failed"
    [event] = api.uow.take()
    assert (event.type, event.data["reason"]) == (
        "site.manufacturing_failed.v1",
        "step_failed:activation:contamination",
    )

    order_id = await api.qc_pending()
    r = await api.client.post(
        f"/v1/sites/{SITE}/manufacturing/{order_id}/qc",
        json={"disposition": "failed", "reason": "sterility", "decided_at": _now(-timedelta(days=29))},
        headers=api.qa(),
    )
    assert r.status_code == 200 and r.json()["state"] == "failed"
    [event] = api.uow.take()
    assert (event.type, event.data["reason"]) == ("site.manufacturing_failed.v1", "qc_failed:sterility")


RECEIPT_HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"accepted": False, "reason": "bag damaged in transit"}, "reason"),  # free text
    ({"accepted": False}, "reason"),
    ({"accepted": True, "reason": "damaged_container"}, "reason"),
    ({"accepted": False, "reason": MB2}, "reason"),
    ({"accepted": "true"}, "accepted"),
    ({"coi": MB2}, "coi"),
    ({"coi": "V2V00 26 000001"}, "coi"),
    ({"coi": "\ud800"}, "coi"),
    ({"coi": "NOPE"}, "coi"),  # well-formed, but not a chain-of-identity id
    ({"order_id": "not-a-uuid"}, "order_id"),
    ({"received_at": "9999-12-31T00:00:00Z"}, "received_at"),
    ({"received_at": "2000-01-01T00:00:00Z"}, "received_at"),
    ({"received_at": FromNow(minutes=10)}, "received_at"),
    ({"received_at": FromNow(days=-31)}, "received_at"),
    ({"received_at": FromNow(naive=True)}, "received_at"),  # no time zone
    ({"reference": "deviation report 42"}, "reference"),
    ({"reference": "R" * 65}, "reference"),
    ({"comment": "free text"}, "comment"),
]


@pytest.mark.parametrize(("body", "field"), RECEIPT_HOSTILE, ids=lambda v: str(v)[:30])
async def test_a_hostile_receipt_is_refused_and_nothing_is_written(
    api: Api, body: dict[str, Any], field: str
) -> None:
    order_id, coi = await api.reserve()
    before = api.snapshot()
    full = {"order_id": order_id, "coi": coi, "accepted": True, **resolve_times(body)}
    r = await api.send("POST", f"/v1/sites/{SITE}/receipts", full, api.site())
    assert_refused(r, 422, field)
    assert MB2 not in r.text and len(r.content) < 4096
    assert api.snapshot() == before and api.uow.committed == []


STEP_HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"failed": True, "reason": "bag leaked"}, "reason"),
    ({"failed": True}, "reason"),
    ({"reason": "contamination"}, "reason"),
    ({"failed": True, "reason": MB2}, "reason"),
    ({"step": "formulation"}, "step"),
    ({"step": MB2}, "step"),
    ({"step": "activation\udfff"}, "step"),
    ({"reference": "DEV\ud800"}, "reference"),
    ({"completed_at": "9999-12-31T00:00:00+00:00"}, "completed_at"),
    ({"completed_at": FromNow(days=-31)}, "completed_at"),
    ({"completed_at": "2026-13-01T00:00:00Z"}, "completed_at"),
    ({"failed": "no"}, "failed"),
    ({"reference": MB2}, "reference"),
    ({"operator": "Jane Doe"}, "operator"),
]


@pytest.mark.parametrize(("body", "field"), STEP_HOSTILE, ids=lambda v: str(v)[:30])
async def test_a_hostile_step_report_is_refused_and_nothing_is_written(
    api: Api, body: dict[str, Any], field: str
) -> None:
    order_id, _ = await api.received()
    before = api.snapshot()
    r = await api.send(
        "POST",
        f"/v1/sites/{SITE}/manufacturing/{order_id}/steps",
        {"step": "activation", **resolve_times(body)},
        api.site(),
    )
    assert_refused(r, 422, field)
    assert MB2 not in r.text and len(r.content) < 4096
    assert api.snapshot() == before and api.uow.committed == []


QC_HOSTILE: list[tuple[dict[str, Any], str]] = [
    ({"disposition": "out_of_specification", "reason": "CAR+ 8%"}, "reason"),
    ({"disposition": "out_of_specification"}, "reason"),
    ({"disposition": "failed", "reason": "Sterility"}, "reason"),
    ({"disposition": "passed", "reason": "potency"}, "reason"),
    ({"disposition": "released"}, "disposition"),  # release is a signed step (issue 10)
    ({"disposition": "accepted"}, "disposition"),
    ({"results": None}, "results"),  # a pass carries its results and certificate
    ({"coa_reference": None}, "coa_reference"),
    ({"coa_reference": "CoA of 3 May"}, "coa_reference"),
    ({"results": {"viability_pct": 120}}, "results.viability_pct"),
    ({"results": {"viability_pct": "NaN"}}, "results.viability_pct"),
    ({"results": {"sterility": "positive"}}, "results.sterility"),
    ({"results": {"sterility": "negative", "note": "clean"}}, "results.note"),
    ({"results": {}}, "results"),
    ({"decided_at": "9999-12-31T00:00:00Z"}, "decided_at"),
    ({"decided_at": FromNow(hours=1)}, "decided_at"),
    ({"reference": "QC report 2026/17"}, "reference"),
    ({"comment": MB2}, "comment"),
]


@pytest.mark.parametrize(("body", "field"), QC_HOSTILE, ids=lambda v: str(v)[:30])
async def test_a_hostile_qc_disposition_is_refused_and_nothing_is_written(
    api: Api, body: dict[str, Any], field: str
) -> None:
    order_id = await api.qc_pending()
    before = api.snapshot()
    r = await api.send(
        "POST",
        f"/v1/sites/{SITE}/manufacturing/{order_id}/qc",
        {**PASSED, **resolve_times(body)},
        api.qa(),
    )
    assert_refused(r, 422, field)
    assert MB2 not in r.text and len(r.content) < 4096
    assert api.snapshot() == before and api.uow.committed == []


async def test_a_malformed_json_body_is_refused(api: Api) -> None:
    order_id, _ = await api.received()
    before = api.snapshot()
    for raw in ("{", '{"step": "activation"', "[]", '"activation"', json.dumps({"step": None})):
        r = await api.client.post(
            f"/v1/sites/{SITE}/manufacturing/{order_id}/steps",
            content=raw,
            headers={**api.site(), "content-type": "application/json"},
        )
        assert_refused(r, 422)
    assert api.snapshot() == before and api.uow.committed == []
    r = await api.client.post(
        f"/v1/sites/{SITE}/manufacturing/not-a-uuid/steps", json={"step": "activation"}, headers=api.site()
    )
    assert_refused(r, 422, "order_id")


# ---- no malformed body gives a 5xx ---------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
MEMBERS = [
    "start_date",
    "end_date",
    "reason",
    "order_id",
    "coi",
    "accepted",
    "received_at",
    "reference",
    "step",
    "completed_at",
    "failed",
    "disposition",
    "decided_at",
    "daily_capacity",
    "active",
    "approvals",
]


@pytest.fixture(scope="module")
def fuzz() -> Any:
    """A synchronous client on its own seeded store (hypothesis drives it many times per test)."""
    from fastapi.testclient import TestClient

    store = MemoryStore()
    uow = fake_uow(store)
    asyncio.run(commands.load_seed(uow))
    app = FastAPI()
    problems.install(app)
    app.include_router(router)
    app.dependency_overrides[current_runtime] = lambda: SimpleNamespace(uow=uow)
    tokens = TestTokens.install(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield SimpleNamespace(client=client, tokens=tokens, store=store, uow=uow)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(
        [
            ("PATCH", f"/v1/sites/{SITE}", "admin"),
            ("POST", f"/v1/sites/{SITE}/outages", "admin"),
            ("POST", f"/v1/sites/{SITE}/receipts", "site"),
            ("POST", f"/v1/sites/{SITE}/manufacturing/{uuid.UUID(int=7)}/steps", "site"),
            ("POST", f"/v1/sites/{SITE}/manufacturing/{uuid.UUID(int=7)}/qc", "qa"),
        ]
    ),
    body=st.one_of(
        st.dictionaries(st.sampled_from(MEMBERS) | st.text(max_size=8), JSON_VALUES, max_size=6), JSON_VALUES
    ),
)
def test_no_body_gives_a_5xx_or_writes_when_refused(
    fuzz: Any, route: tuple[str, str, str], body: Any
) -> None:
    method, path, kind = route
    before, committed = fuzz.store.snapshot(), len(fuzz.uow.committed)
    headers = fuzz.tokens.headers(kind, SITE if kind == "site" else None)
    r = fuzz.client.request(
        method, path, content=json.dumps(body), headers={**headers, "content-type": "application/json"}
    )
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/problem+json")
        assert fuzz.store.snapshot() == before and len(fuzz.uow.committed) == committed


async def test_capacity_at_its_bound_is_accepted(api: Api) -> None:
    """The load bench raises every site to 100 000 starts a day: the bound, still accepted."""
    r = await api.client.patch(
        f"/v1/sites/{SITE}", json={"daily_capacity": {"TISA-CEL": 100_000}}, headers=api.admin()
    )
    assert r.status_code == 200 and r.json()["daily_capacity"] == {"TISA-CEL": 100_000}


async def test_a_site_is_approved_only_for_its_manufacturers_products(api: Api) -> None:
    """Issue 11: the site view names the site's manufacturer; an approval or capacity for a product of
    another manufacturer (AXI-CEL is Kite's, Les Ulis is Novartis's) is refused, naming the field."""
    r = await api.client.get(f"/v1/sites/{SITE}", headers=api.admin())
    assert r.status_code == 200 and (r.json()["manufacturer"], r.json()["operator"]) == ("novartis", "own")
    r = await api.client.get(f"/v1/sites/{KITE_SITE}", headers=api.admin())
    assert r.status_code == 200 and r.json()["manufacturer"] == "kite"
    for body, field in (
        ({"daily_capacity": {"AXI-CEL": 1}}, "daily_capacity.AXI-CEL"),
        (
            {"approvals": [{"regulator": "EMA", "use": "commercial", "product_code": "AXI-CEL"}]},
            "approvals.0.product_code",
        ),
    ):
        r = await api.client.patch(f"/v1/sites/{SITE}", json=body, headers=api.admin())
        assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
        assert [e["field"] for e in r.json()["errors"]] == [field]
        assert "kite" in r.json()["errors"][0]["reason"]
