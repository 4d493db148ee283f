"""The logistics HTTP API with bearer tokens (`TestTokens`) over the service's router, on in-memory
repositories: every route's scope, 401/403, carrier tenancy (lists, and 404 for another carrier's shipment
on reads and reports), and hostile input refused with a 4xx that writes nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from logistics_service.adapters.memory import MemoryStore, fake_uow
from logistics_service.adapters.repository import LogisticsTx
from logistics_service.config import load_shipping_lanes
from logistics_service.entrypoints.api import router
from logistics_service.service_layer.handlers import build_handlers
from v2v_contracts import (
    BookingConfirmedV1,
    OrderSubmittedV1,
    ProductReleasedV1,
    SiteRegisteredV1,
    new_event,
)
from v2v_contracts.coi import make_coi
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork
from v2v_servicekit.auth import SCOPE_ATTR
from v2v_servicekit.problems import install as install_problems
from v2v_servicekit.testing import FromNow, TestTokens, resolve_times

HANDLERS = build_handlers(load_shipping_lanes())
_seq = iter(range(1, 999_999))

EU = ("TC-DE-BE-001", "DE-LEIPZIG-IZI", "europe", "CRYO-EU")
NA = ("TC-US-NJ-001", "US-MORRIS-PLAINS", "north_america", "CRYO-NA")


def now() -> datetime:
    return datetime.now(UTC)


class Platform:
    """The logistics API on an in-memory store, with two orders whose legs two carriers carry."""

    def __init__(self) -> None:
        self.uow: FakeUnitOfWork[LogisticsTx]
        self.uow, self.store = fake_uow(MemoryStore())
        self.inbox = FakeInbox(self.uow, HANDLERS)
        self.app = FastAPI()
        install_problems(self.app)
        self.app.include_router(router)
        self.app.state.runtime = SimpleNamespace(uow=self.uow)
        self.tokens = TestTokens.install(self.app)
        self.orders: dict[str, dict[str, Any]] = {}

    async def plan(self, lane: tuple[str, str, str, str]) -> dict[str, Any]:
        centre, site, region, carrier = lane
        order = {
            "order_id": uuid.uuid4(),
            "coi": make_coi("V2V00", 30, next(_seq)),
            "treatment_center_id": centre,
        }
        await self.inbox.deliver(
            new_event(
                SiteRegisteredV1(
                    site_id=site,
                    name=site,
                    country=site[:2],
                    region=region,
                    timezone="UTC",
                    operator="own",
                    active=True,
                    approvals=[],
                    daily_capacity={},
                )
            ),
            new_event(
                OrderSubmittedV1(
                    **order,
                    product_code="TISA-CEL",
                    order_type="commercial",
                    regulator="EMA",
                    country=centre[3:5],
                    region=region,
                    requested_apheresis_date=date(2030, 5, 18),
                )
            ),
            new_event(
                BookingConfirmedV1(
                    **order,
                    booking_id=uuid.uuid4(),
                    slot_id=uuid.uuid4(),
                    site_id=site,
                    product_code="TISA-CEL",
                    manufacturing_start_date=date(2030, 5, 20),
                    apheresis_date=date(2030, 5, 18),
                )
            ),
            new_event(ProductReleasedV1(**order, site_id=site, run=1, released_at=now())),
        )
        ships = [s for s in self.store.shipments.values() if s.order_id == order["order_id"]]
        assert [s.carrier_id for s in ships] == [carrier, carrier]
        return {**order, "carrier": carrier, "inbound": ships[0], "outbound": ships[1]}

    def carrier(self, carrier_id: str | None, **kw: Any) -> dict[str, str]:
        return self.tokens.headers("carrier", carrier_id, **kw)

    def state(self) -> tuple[Any, int]:
        """Everything the service has written: the store and the committed events."""
        return self.store.snapshot(), len(self.uow.committed)


@pytest.fixture
async def platform() -> Platform:
    p = Platform()
    p.orders["eu"] = await p.plan(EU)
    p.orders["na"] = await p.plan(NA)
    return p


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=platform.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://logistics") as c:
        yield c


def milestone_body(coi: str, name: str = "picked_up", **extra: Any) -> dict[str, Any]:
    return {
        "milestone": name,
        "occurred_at": now().isoformat(),
        "location": "FRA-HUB-2",
        "handled_by": "courier-7731",
        "received_from": "TC-DE-BE-001",
        "coi": coi,
        **extra,
    }


def reading_body(reading_c: float = -175.0, **extra: Any) -> dict[str, Any]:
    return {"reading_c": reading_c, "measured_at": now().isoformat(), **extra}


def routes(sid: uuid.UUID, coi: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every route of the service, as a request on shipment `sid`."""
    return [
        ("GET", "/v1/shipments", None),
        ("GET", f"/v1/shipments/{sid}", None),
        ("GET", f"/v1/shipments/{sid}/custody", None),
        ("GET", f"/v1/shipments/{sid}/temperature", None),
        ("POST", f"/v1/shipments/{sid}/milestones", milestone_body(coi)),
        ("POST", f"/v1/shipments/{sid}/temperature", reading_body(coi=coi)),
    ]


async def send(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
) -> httpx.Response:
    return await client.request(method, path, json=body, headers=headers)


# ---- scopes, 401 and 403 ---------------------------------------------------------------------------


def test_every_route_declares_exactly_one_scope_reads_read_and_reports_report() -> None:
    api_routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert len(api_routes) == 6
    for route in api_routes:
        found: list[str] = []
        stack = list(route.dependant.dependencies)
        while stack:
            dep = stack.pop()
            if getattr(dep.call, SCOPE_ATTR, None):
                found.append(getattr(dep.call, SCOPE_ATTR))
            stack.extend(dep.dependencies)
        expected = "shipments:report" if route.methods == {"POST"} else "shipments:read"
        assert found == [expected], route.path


async def test_no_token_or_a_bad_one_is_401_with_a_bearer_challenge_and_writes_nothing(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    eu = platform.orders["eu"]
    stranger = TestTokens()  # a key the service does not trust
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        stranger.headers("carrier", eu["carrier"]),
        platform.carrier(eu["carrier"], ttl_s=-120),  # expired
        platform.tokens.headers("carrier", eu["carrier"], aud="another-platform"),
    ]
    before = platform.state()
    for method, path, body in routes(eu["inbound"].shipment_id, eu["coi"]):
        for headers in bad_headers:
            resp = await send(client, method, path, body, headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert resp.headers["content-type"].startswith("application/problem+json")
    assert platform.state() == before


async def test_a_token_without_the_routes_scope_is_403_and_writes_nothing(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    eu = platform.orders["eu"]
    sid, coi = eu["inbound"].shipment_id, eu["coi"]
    centre = platform.tokens.headers("centre", "TC-DE-BE-001")  # orders and notifications only
    site = platform.tokens.headers("site", "DE-LEIPZIG-IZI")
    qa = platform.tokens.headers("qa")  # reads shipments, reports nothing
    read_only = platform.carrier(eu["carrier"], scopes=["shipments:read"])
    report_only = platform.carrier(eu["carrier"], scopes=["shipments:report"])
    before = platform.state()
    for method, path, body in routes(sid, coi):
        post = method == "POST"
        for headers, allowed in [
            (centre, False),
            (site, False),
            (qa, not post),
            (read_only, not post),
            (report_only, post),
        ]:
            if allowed:
                continue
            resp = await send(client, method, path, body, headers)
            assert resp.status_code == 403, (method, path, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
    assert platform.state() == before


async def test_a_carrier_token_without_its_carrier_id_sees_nothing(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    eu = platform.orders["eu"]
    for method, path, body in routes(eu["inbound"].shipment_id, eu["coi"]):
        resp = await send(client, method, path, body, platform.carrier(None))
        assert resp.status_code == 403, (method, path, resp.text)


# ---- tenancy ---------------------------------------------------------------------------------------


async def test_a_carrier_lists_only_the_shipments_it_carries_qa_and_ops_list_all(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    eu, na = platform.orders["eu"], platform.orders["na"]

    async def listed(headers: dict[str, str], **params: Any) -> list[tuple[str, str]]:
        resp = await client.get("/v1/shipments", params=params, headers=headers)
        assert resp.status_code == 200, resp.text
        return [(s["shipment_id"], s["carrier_id"]) for s in resp.json()]

    def ids(order: dict[str, Any]) -> list[tuple[str, str]]:
        return [(str(order[leg].shipment_id), order["carrier"]) for leg in ("inbound", "outbound")]

    assert await listed(platform.carrier("CRYO-EU")) == ids(eu)
    assert await listed(platform.carrier("CRYO-NA")) == ids(na)
    assert await listed(platform.carrier("CRYO-NA"), order_id=str(eu["order_id"])) == []
    assert await listed(platform.carrier("CGT-GLOBAL")) == []
    for kind in ("qa", "ops"):
        assert await listed(platform.tokens.headers(kind)) == ids(eu) + ids(na)
        assert await listed(platform.tokens.headers(kind), order_id=str(na["order_id"])) == ids(na)


async def test_another_carriers_shipment_is_404_on_every_read_and_report_like_an_unknown_one(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    eu, na = platform.orders["eu"], platform.orders["na"]
    foreign = eu["inbound"].shipment_id
    intruder = platform.carrier(na["carrier"])
    before = platform.state()
    for method, path, body in routes(foreign, eu["coi"]):
        if path == "/v1/shipments":
            continue
        resp = await send(client, method, path, body, intruder)
        unknown = await send(client, method, path.replace(str(foreign), str(uuid.uuid4())), body, intruder)
        assert resp.status_code == unknown.status_code == 404, (method, path, resp.text)
        assert resp.json()["title"] == unknown.json()["title"] == "Shipment not found"
        assert resp.json()["type"] == unknown.json()["type"]
    # another carrier presenting a wrong COI neither stops the shipment nor raises an alert
    wrong = make_coi("V2V00", 30, 999_999)
    for path, body in [
        (f"/v1/shipments/{foreign}/milestones", milestone_body(wrong)),
        (f"/v1/shipments/{foreign}/temperature", reading_body(-100.0, coi=wrong)),
    ]:
        resp = await client.post(path, json=body, headers=intruder)
        assert resp.status_code == 404, resp.text
    assert platform.state() == before
    assert platform.store.shipments[foreign].status == "planned"


async def test_the_carrier_of_a_shipment_reports_and_reads_it_and_its_json_names_the_carrier(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    eu = platform.orders["eu"]
    ship = eu["inbound"]
    mine = platform.carrier(eu["carrier"])
    base = f"/v1/shipments/{ship.shipment_id}"
    resp = await client.post(
        f"{base}/milestones", json=milestone_body(eu["coi"], temperature_c=-180.5), headers=mine
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "picked_up" and resp.json()["temperature_in_range"] is True
    resp = await client.post(f"{base}/temperature", json=reading_body(-176.25, coi=eu["coi"]), headers=mine)
    assert resp.status_code == 201, resp.text
    assert resp.json()["in_range"] is True and resp.json()["shipment_status"] == "picked_up"

    for headers in (mine, platform.tokens.headers("qa"), platform.tokens.headers("ops")):
        body = (await client.get(base, headers=headers)).json()
        assert body["carrier_id"] == "CRYO-EU" and body["status"] == "picked_up"
        assert [h["reason"] for h in body["status_history"]] == ["booking_confirmed", "milestone:picked_up"]
        custody = (await client.get(f"{base}/custody", headers=headers)).json()
        assert [(c["milestone"], c["location"], c["handled_by"], c["received_from"]) for c in custody] == [
            ("picked_up", "FRA-HUB-2", "courier-7731", "TC-DE-BE-001")
        ]
        readings = (await client.get(f"{base}/temperature", headers=headers)).json()
        assert [(r["reading_c"], r["source"]) for r in readings] == [
            (-180.5, "milestone"),
            (-176.25, "courier"),
        ]
    [milestone] = [e for e in platform.uow.committed if e.type == "logistics.shipment_milestone.v1"]
    assert (milestone.data["location"], milestone.data["handled_by"]) == ("FRA-HUB-2", "courier-7731")


async def test_a_centre_or_site_holding_a_shipments_scope_sees_only_the_legs_at_its_end(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    eu, na = platform.orders["eu"], platform.orders["na"]
    for kind, entity in (("centre", "TC-DE-BE-001"), ("site", "DE-LEIPZIG-IZI")):
        headers = platform.tokens.headers(kind, entity, scopes=["shipments:read"])
        listed = (await client.get("/v1/shipments", headers=headers)).json()
        assert {s["shipment_id"] for s in listed} == {
            str(eu["inbound"].shipment_id),
            str(eu["outbound"].shipment_id),
        }
        resp = await client.get(f"/v1/shipments/{na['inbound'].shipment_id}", headers=headers)
        assert resp.status_code == 404


# ---- hostile input ---------------------------------------------------------------------------------

MONTH_AGO = FromNow(days=-31)
AHEAD = FromNow(minutes=10)
NAN, INF = float("nan"), float("inf")


def stable_ids(cases: list[tuple[str, Any]]) -> list[str]:
    """Test ids that do not embed a value computed from the clock (pytest-xdist workers must agree)."""
    return [f"{field}-{i}" for i, (field, _) in enumerate(cases)]


HOSTILE_MILESTONES: list[tuple[str, Any]] = [
    ("occurred_at", MONTH_AGO),
    ("occurred_at", AHEAD),
    ("occurred_at", "9999-12-31T23:59:59Z"),
    ("occurred_at", "2026-05-06T09:30:00"),  # no time zone
    ("occurred_at", "yesterday"),
    ("location", "Frankfurt hub, gate 3"),  # free text
    ("location", "FRA\nHUB"),
    ("location", "FRA\u0000"),
    ("location", "\ud800"),  # a lone surrogate
    ("location", "X" * 65),
    ("location", "x" * 100_000),
    ("location", ""),
    ("handled_by", "Jane Doe"),  # a person's name
    ("handled_by", "courier\u202e42"),
    ("received_from", "from the night nurse"),
    ("coi", "V2V 0030 000001"),
    ("coi", "V" * 65),
    ("milestone", "lost"),
    ("milestone", "Delivered"),
    ("temperature_c", NAN),
    ("temperature_c", INF),
    ("temperature_c", -INF),
    ("temperature_c", -300.0),
    ("temperature_c", 1000.0),
    ("temperature_c", "cold"),
    ("note", "free text the service has no field for"),
]

HOSTILE_READINGS: list[tuple[str, Any]] = [
    ("reading_c", NAN),
    ("reading_c", INF),
    ("reading_c", -INF),
    ("reading_c", -273.5),
    ("reading_c", 100.5),
    ("reading_c", "1e309"),
    ("reading_c", None),
    ("measured_at", MONTH_AGO),
    ("measured_at", AHEAD),
    ("measured_at", "0001-01-01T00:00:00Z"),
    ("measured_at", "2026-05-06T09:30:00"),
    ("coi", "coi of the patient in bed 4"),
    ("coi", "\ud800"),
    ("source", "courier"),  # not the caller's to set
    ("logger_download", "sometimes"),
]


def raw_json(body: dict[str, Any]) -> bytes:
    """JSON as a hostile client may send it: NaN and Infinity literals, lone surrogates escaped."""
    return json.dumps(body, allow_nan=True).encode()


@pytest.mark.parametrize(("field", "value"), HOSTILE_MILESTONES, ids=stable_ids(HOSTILE_MILESTONES))
async def test_a_hostile_milestone_is_422_naming_the_field_without_echoing_it_and_writes_nothing(
    platform: Platform, client: httpx.AsyncClient, field: str, value: Any
) -> None:
    eu = platform.orders["eu"]
    body = {**milestone_body(eu["coi"]), field: resolve_times(value)}
    before = platform.state()
    resp = await client.post(
        f"/v1/shipments/{eu['inbound'].shipment_id}/milestones",
        content=raw_json(body),
        headers={**platform.carrier(eu["carrier"]), "content-type": "application/json"},
    )
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["errors"][0]["field"].split(".")[0] == field
    if isinstance(value, str) and len(value) > 3:
        assert value not in resp.text
    assert platform.state() == before


@pytest.mark.parametrize(("field", "value"), HOSTILE_READINGS, ids=stable_ids(HOSTILE_READINGS))
async def test_a_hostile_reading_is_422_naming_the_field_without_echoing_it_and_writes_nothing(
    platform: Platform, client: httpx.AsyncClient, field: str, value: Any
) -> None:
    eu = platform.orders["eu"]
    body = {**reading_body(coi=eu["coi"]), field: resolve_times(value)}
    payload = raw_json(body)
    if value == "1e309":  # a number that overflows to Infinity when parsed
        payload = payload.replace(b'"1e309"', b"1e309")
    before = platform.state()
    resp = await client.post(
        f"/v1/shipments/{eu['outbound'].shipment_id}/temperature",
        content=payload,
        headers={**platform.carrier(eu["carrier"]), "content-type": "application/json"},
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["field"].split(".")[0] == field
    if isinstance(value, str) and len(value) > 3:
        assert value not in resp.text
    assert platform.state() == before


async def test_a_malformed_shipment_id_or_body_is_a_4xx_never_a_5xx(
    platform: Platform, client: httpx.AsyncClient
) -> None:
    eu = platform.orders["eu"]
    mine = platform.carrier(eu["carrier"])
    before = platform.state()
    for path in ("/v1/shipments/not-a-uuid", "/v1/shipments/%00/custody", "/v1/shipments/1/temperature"):
        assert (await client.get(path, headers=mine)).status_code == 422
    sid = eu["inbound"].shipment_id
    for content in (b"", b"{", b"[]", b'"text"', b"null", b'{"milestone": {"$gt": ""}}'):
        resp = await client.post(
            f"/v1/shipments/{sid}/milestones",
            content=content,
            headers={**mine, "content-type": "application/json"},
        )
        assert 400 <= resp.status_code < 500, (content, resp.text)
    assert platform.state() == before


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 201}, {"limit": -1}, {"offset": -1}, {"offset": 10_001}, {"limit": "all"}],
)
async def test_pages_are_capped(
    platform: Platform, client: httpx.AsyncClient, params: dict[str, Any]
) -> None:
    eu = platform.orders["eu"]
    qa = platform.tokens.headers("qa")
    for path in (
        "/v1/shipments",
        f"/v1/shipments/{eu['inbound'].shipment_id}/custody",
        f"/v1/shipments/{eu['inbound'].shipment_id}/temperature",
    ):
        resp = await client.get(path, params=params, headers=qa)
        assert resp.status_code == 422, (path, params)
        assert resp.json()["errors"][0]["field"] == next(iter(params))


async def test_a_page_of_shipments_and_of_readings(platform: Platform, client: httpx.AsyncClient) -> None:
    qa = platform.tokens.headers("qa")
    everything = (await client.get("/v1/shipments", headers=qa)).json()
    assert len(everything) == 4
    page = (await client.get("/v1/shipments", params={"limit": 2, "offset": 1}, headers=qa)).json()
    assert page == everything[1:3]
    eu = platform.orders["eu"]
    url = f"/v1/shipments/{eu['outbound'].shipment_id}/temperature"
    mine = platform.carrier(eu["carrier"])
    pickup = milestone_body(eu["coi"], occurred_at=(now() - timedelta(minutes=15)).isoformat())
    milestones = f"/v1/shipments/{eu['outbound'].shipment_id}/milestones"
    assert (await client.post(milestones, json=pickup, headers=mine)).status_code == 201
    for i in range(3):
        body = {"reading_c": -170.0 - i, "measured_at": (now() - timedelta(minutes=10 - i)).isoformat()}
        assert (await client.post(url, json=body, headers=mine)).status_code == 201
    second = (await client.get(url, params={"limit": 1, "offset": 1}, headers=mine)).json()
    assert [r["reading_c"] for r in second] == [-171.0]


async def test_a_coi_whose_check_character_is_a_star_is_read_from_the_label() -> None:
    """ISO 7064 MOD 37-2's check character can be `*`: such a COI is a valid one to report with."""
    from pydantic import TypeAdapter

    from v2v_contracts.fields import CoiRef

    assert TypeAdapter(CoiRef).validate_python("V2V0026000019*") == "V2V0026000019*"
