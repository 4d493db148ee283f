"""The order service's HTTP API over its in-memory repositories, with bearer tokens (`TestTokens`): every
route declares its scope (401 without a token, 403 without the scope); a centre sees and acts on its own
orders only (another centre's is 404, exactly as an unknown one) and lists only its own; every hostile
input is a 4xx that names the field, never echoes the value, and writes nothing; a second open order for a
patient and product is 409 `open-order-exists`, also when the two requests race; actions carry reason
codes into events, and the staff's notes stay on the order's timeline (never in an event, log or span)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from fastapi.routing import APIRoute
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from order_service.adapters.memory import MemoryUnitOfWork, fake_uow
from order_service.config import OrderSettings
from order_service.entrypoints.api import router
from order_service.service_layer.handlers import handlers
from v2v_audit import verify
from v2v_audit.http import audited_router
from v2v_contracts import SiteApproval, SiteRegisteredV1, new_event
from v2v_messaging.fakes import FakeInbox
from v2v_servicekit.auth import declared_scope
from v2v_servicekit.problems import PROBLEM_BASE, PROBLEM_JSON
from v2v_servicekit.problems import install as install_problems
from v2v_servicekit.signatures import declared_signature
from v2v_servicekit.testing import FromNow, TestTokens, resolve_times

PARIS = "TC-FR-PA-001"
BERLIN = "TC-DE-BE-001"
TODAY = datetime.now(UTC).date()
SOON = TODAY + timedelta(days=14)
PATIENT = "PAT-API-0001"
MARKER = "CANARY-7f3a9c"  # typed by staff: may appear on the order's timeline, nowhere else

NETWORK = {
    "US-MORRIS-PLAINS": [("FDA", "commercial", "TISA-CEL"), ("FDA", "commercial", "AXI-CEL")],
    "FR-LES-ULIS": [("EMA", "commercial", "TISA-CEL"), ("EMA", "commercial", "AXI-CEL")],
}

# every route of the order service and the one scope it must declare
SCOPES = {
    ("POST", "/v1/orders"): "orders:write",
    ("GET", "/v1/orders"): "orders:read",
    ("GET", "/v1/orders/{order_id}"): "orders:read",
    ("GET", "/v1/treatment-centers"): "orders:read",
    ("GET", "/v1/products"): "orders:read",
    ("POST", "/v1/orders/{order_id}/cancel"): "orders:write",
    ("POST", "/v1/orders/{order_id}/apheresis-date"): "orders:write",
    ("POST", "/v1/orders/{order_id}/apheresis"): "orders:write",
    ("POST", "/v1/orders/{order_id}/lymphodepletion"): "orders:write",
    ("POST", "/v1/orders/{order_id}/product-receipt"): "orders:write",
    ("POST", "/v1/orders/{order_id}/infusion"): "orders:write",
    ("POST", "/v1/orders/{order_id}/quarantine-decision"): "quarantine:decide",
    ("POST", "/v1/orders/{order_id}/disposition"): "quarantine:decide",
    ("POST", "/v1/orders/{order_id}/physician-decision"): "orders:write",
    ("GET", "/v1/tasks"): "quarantine:decide",
    ("POST", "/v1/tasks/{task_id}/done"): "quarantine:decide",
    ("GET", "/v1/orders/{order_id}/audit"): "orders:read",
    # issue 11: the patient's journey
    ("POST", "/v1/orders/{order_id}/hold"): "orders:write",
    ("POST", "/v1/orders/{order_id}/resume"): "orders:write",
    ("POST", "/v1/orders/{order_id}/material-disposition"): "orders:write",
    ("POST", "/v1/orders/{order_id}/site-material-disposition"): "quarantine:decide",
}
# the signed routes: meaning and the roles that may sign (21 CFR 11.50, 11.100)
SIGNED = {
    ("POST", "/v1/orders/{order_id}/cancel"): ("cancellation", ("physician",)),
    ("POST", "/v1/orders/{order_id}/quarantine-decision"): (
        "disposition",
        ("qa_reviewer", "quality_unit", "qualified_person"),
    ),
    ("POST", "/v1/orders/{order_id}/disposition"): (
        "disposition",
        ("qa_reviewer", "quality_unit", "qualified_person"),
    ),
    ("POST", "/v1/orders/{order_id}/physician-decision"): ("physician-acceptance", ("physician",)),
}
AT_RISK_OUTBOUND = {
    "site_id": "FR-LES-ULIS",
    "status_before_quarantine": "product_in_transit",
    "at_risk": {"cause": "excursion", "reason": "temperature_excursion", "leg": "outbound_product"},
}


def site_registered(site_id: str, approvals: list[tuple[str, str, str]]) -> Any:
    return new_event(
        SiteRegisteredV1(
            site_id=site_id,
            name=site_id,
            country=site_id[:2],
            region="europe",
            timezone="Europe/Paris",
            operator="own",
            active=True,
            approvals=[SiteApproval(regulator=r, use=u, product_code=p) for r, u, p in approvals],  # type: ignore[arg-type]
            daily_capacity={p: 2 for _, _, p in approvals},
        ),
        subject=site_id,
    )


@dataclasses.dataclass
class Api:
    http: httpx.AsyncClient
    tokens: TestTokens
    uow: MemoryUnitOfWork
    spans: InMemorySpanExporter

    def centre(self, centre: str = PARIS, **kw: Any) -> dict[str, str]:
        return self.tokens.headers("centre", centre, **kw)

    def qa(self, **kw: Any) -> dict[str, str]:
        return self.tokens.headers("qa", **kw)

    def qa_signed(self, **kw: Any) -> dict[str, str]:
        """QA's system with a QA reviewer's fresh signing token (a disposition)."""
        return {
            **self.tokens.headers("qa", client_id="qa-system"),
            **self.tokens.signature_headers("qa.les-ulis", client_id="qa-system", org_id="FR-LES-ULIS", **kw),
        }

    def physician(self, centre: str = PARIS, **kw: Any) -> dict[str, str]:
        """The centre's system with its physician's fresh signing token."""
        client = f"centre-{centre.lower()}"
        return {
            **self.tokens.headers("centre", centre),
            **self.tokens.signature_headers(
                f"dr.{centre.lower()}",
                client_id=client,
                roles=["physician"],
                org_kind="centre",
                org_id=centre,
                **kw,
            ),
        }

    async def post(self, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
        """`body` as JSON text with non-ASCII escaped, so that a lone surrogate travels as `\\ud800`."""
        return await self.http.post(
            path, content=json.dumps(body), headers={**headers, "content-type": "application/json"}
        )

    async def place(self, headers: dict[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
        resp = await self.post("/v1/orders", order_body(**overrides), headers or self.centre())
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def put(self, order_id: str, status: str, **fields: Any) -> None:
        """Move the stored order to `status` (a state reached by facts, tested elsewhere)."""
        oid = uuid.UUID(order_id)
        self.uow.store.orders[oid] = dataclasses.replace(self.uow.store.orders[oid], status=status, **fields)

    def snapshot(self) -> tuple[Any, ...]:
        store = self.uow.store
        return (
            dict(store.orders),
            list(store.timeline),
            dict(store.coi_sequences),
            list(self.uow.committed),
            list(store.audit),
        )


def order_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "product_code": "TISA-CEL",
        "order_type": "commercial",
        "patient_ref": PATIENT,
        "requested_apheresis_date": SOON.isoformat(),
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


def _span_exporter() -> InMemorySpanExporter:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    uow = fake_uow()
    await FakeInbox(uow, handlers).deliver(*(site_registered(s, a) for s, a in NETWORK.items()))
    uow.take()
    app = FastAPI()
    install_problems(app)
    app.include_router(audited_router(router))  # as the service does (v2v_audit.service.audited)
    app.state.runtime = SimpleNamespace(uow=uow, settings=OrderSettings())
    tokens = TestTokens.install(app)
    tokens.install_signatures(app)  # require_signature without a database
    spans = _span_exporter()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=trace.get_tracer_provider())

    async def idempotency_key(request: httpx.Request) -> None:  # POST /v1/orders requires one
        if request.method == "POST":
            request.headers.setdefault("Idempotency-Key", str(uuid.uuid4()))

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://order",
        event_hooks={"request": [idempotency_key]},
    ) as http:
        yield Api(http, tokens, uow, spans)
    spans.shutdown()


def route_path(path: str) -> str:
    return path.replace("{order_id}", str(uuid.uuid4())).replace("{task_id}", str(uuid.uuid4()))


MINIMAL_BODIES: dict[str, dict[str, Any]] = {
    "/v1/orders": order_body(),
    "cancel": {"reason_code": "other"},
    "apheresis-date": {"requested_apheresis_date": SOON.isoformat(), "reason_code": "other"},
    "apheresis": {"coi": "V2V0026000001X"},
    "lymphodepletion": {},
    "product-receipt": {"coi": "V2V0026000001X"},
    "infusion": {"coi": "V2V0026000001X"},
    "quarantine-decision": {"decision": "release", "reason_code": "other"},
    "disposition": {"outcome": "release", "reason_code": "other", "document_reference": "QA-DOC-1"},
    "physician-decision": {"accept": True},
    "done": {"reference": "AUTH-NOTIF-1"},
    "/v1/tasks": {},
    "hold": {"reason_code": "patient_unwell"},
    "resume": {"reason_code": "patient_cleared"},
    "material-disposition": {"material": "product", "outcome": "destroyed", "reason_code": "order_cancelled"},
    "site-material-disposition": {"material": "product", "outcome": "destroyed", "reason_code": "other"},
}


def minimal_body(path: str) -> dict[str, Any]:
    return MINIMAL_BODIES[path if path in {"/v1/orders", "/v1/tasks"} else path.rsplit("/", 1)[-1]]


# ---- scopes -------------------------------------------------------------------------------------------


def test_every_route_declares_its_one_scope() -> None:
    declared = {
        (method, route.path): declared_scope(route)
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert declared == SCOPES
    signed = {
        (method, route.path): declared_signature(route)
        for route in router.routes
        if isinstance(route, APIRoute) and declared_signature(route)
        for method in route.methods
    }
    assert signed == SIGNED


@pytest.mark.parametrize(("method", "path"), sorted(SCOPES), ids=[f"{m} {p}" for m, p in sorted(SCOPES)])
async def test_no_token_is_401_and_a_token_without_the_scope_is_403(api: Api, method: str, path: str) -> None:
    url = route_path(path)
    body = json.dumps(minimal_body(path)) if method == "POST" else None
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer not-a-jwt"}, 401),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
        (api.tokens.headers("centre", PARIS, ttl_s=-120), 401),  # expired
        (api.centre(scopes=[s for s in ("orders:read", "orders:write") if s != SCOPES[method, path]]), 403),
        (api.tokens.headers("carrier", "UPS"), 403),
    ):
        resp = await api.http.request(
            method, url, content=body, headers={**headers, "content-type": "application/json"}
        )
        assert resp.status_code == status, (headers, resp.text)
        assert resp.headers["content-type"] == PROBLEM_JSON
        assert resp.headers["www-authenticate"].startswith("Bearer ")
    assert api.uow.store.orders == {} and api.uow.committed == []


async def test_only_a_treatment_centre_places_orders_and_reports_hospital_actions(api: Api) -> None:
    order = await api.place()
    for kind in ("qa", "ops", "carrier", "site", "admin"):
        headers = api.tokens.headers(
            kind, "X" if kind in {"carrier", "site"} else None, scopes=["orders:write"]
        )
        resp = await api.post("/v1/orders", order_body(patient_ref="PAT-OTHER"), headers)
        assert resp.status_code == 403, resp.text
        resp = await api.post(f"/v1/orders/{order['order_id']}/cancel", {"reason_code": "other"}, headers)
        assert resp.status_code == 403, resp.text
    # couriers, sites and admins have no business with orders even with a read scope
    for kind in ("carrier", "site", "admin"):
        headers = api.tokens.headers(kind, "X" if kind != "admin" else None, scopes=["orders:read"])
        assert (await api.http.get("/v1/orders", headers=headers)).status_code == 403
        assert (await api.http.get(f"/v1/orders/{order['order_id']}", headers=headers)).status_code == 403
    assert len(api.uow.store.orders) == 1


# ---- tenancy ------------------------------------------------------------------------------------------


async def test_the_centre_comes_from_the_token_and_a_body_may_only_repeat_it(api: Api) -> None:
    placed = await api.place(api.centre(BERLIN))
    assert placed["treatment_center_id"] == BERLIN and placed["patient_ref"] == PATIENT
    again = await api.place(api.centre(BERLIN), treatment_center_id=BERLIN, patient_ref="PAT-API-0002")
    assert again["treatment_center_id"] == BERLIN

    before = api.snapshot()
    resp = await api.post(
        "/v1/orders", order_body(treatment_center_id=PARIS, patient_ref="P3"), api.centre(BERLIN)
    )
    assert resp.status_code == 422
    problem = resp.json()
    assert problem["errors"] == [
        {"field": "treatment_center_id", "reason": "must be the calling centre's own id, or left out"}
    ]
    assert PARIS not in resp.text and BERLIN not in resp.text
    assert api.snapshot() == before


async def test_another_centres_order_is_404_like_an_unknown_one_for_reads_and_every_action(api: Api) -> None:
    order = await api.place(api.centre(PARIS))
    oid = order["order_id"]
    api.put(oid, "material_at_risk", **AT_RISK_OUTBOUND)
    berlin = api.centre(BERLIN)

    def berlin_qa() -> dict[str, str]:  # not a default grant; a fresh signature each time
        return {
            **api.tokens.headers("centre", BERLIN, scopes=["quarantine:decide"]),
            **api.tokens.signature_headers(
                "qa.berlin", client_id=f"centre-{BERLIN.lower()}", org_kind="centre", org_id=BERLIN
            ),
        }

    unknown = await api.http.get(f"/v1/orders/{uuid.uuid4()}", headers=berlin)
    assert unknown.status_code == 404
    before = api.snapshot()

    resp = await api.http.get(f"/v1/orders/{oid}", headers=berlin)
    assert resp.status_code == 404 and PATIENT not in resp.text
    assert {k: v for k, v in resp.json().items() if k not in {"detail", "instance"}} == {
        k: v for k, v in unknown.json().items() if k not in {"detail", "instance"}
    }
    for action in ("cancel", "apheresis-date", "apheresis", "lymphodepletion", "product-receipt", "infusion"):
        body = minimal_body(f"x/{action}")
        if "coi" in body:
            body = {"coi": order["coi"]}
        resp = await api.post(f"/v1/orders/{oid}/{action}", body, berlin)
        assert resp.status_code == 404, (action, resp.text)
    for action in ("quarantine-decision", "disposition"):
        resp = await api.post(f"/v1/orders/{oid}/{action}", minimal_body(f"x/{action}"), berlin_qa())
        assert resp.status_code == 404, resp.text
    resp = await api.post(f"/v1/orders/{oid}/physician-decision", {"accept": True}, api.physician(BERLIN))
    assert resp.status_code == 404, resp.text
    assert api.snapshot() == before

    # the centre itself and the manufacturer's QA see it; QA decides on the quarantine
    assert (await api.http.get(f"/v1/orders/{oid}", headers=api.centre(PARIS))).status_code == 200
    assert (await api.http.get(f"/v1/orders/{oid}", headers=api.qa())).status_code == 200
    assert (await api.http.get(f"/v1/orders/{oid}", headers=api.tokens.headers("ops"))).status_code == 200
    resp = await api.post(
        f"/v1/orders/{oid}/quarantine-decision", minimal_body("x/quarantine-decision"), api.qa_signed()
    )
    assert resp.status_code == 200 and resp.json()["status"] == "product_in_transit"


async def test_a_centre_lists_only_its_own_orders_and_the_filter_only_narrows(api: Api) -> None:
    paris = [await api.place(api.centre(PARIS), patient_ref=f"PAT-P{i}") for i in range(3)]
    berlin = [await api.place(api.centre(BERLIN), patient_ref="PAT-B0")]

    async def listed(headers: dict[str, str], **params: Any) -> tuple[list[str], int]:
        resp = await api.http.get("/v1/orders", headers=headers, params=params)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        return [o["order_id"] for o in page["items"]], page["total"]

    ids = lambda orders: [o["order_id"] for o in orders]  # noqa: E731
    assert await listed(api.centre(PARIS)) == (ids(paris), 3)
    assert await listed(api.centre(PARIS), treatment_center_id=PARIS) == (ids(paris), 3)
    assert await listed(api.centre(PARIS), treatment_center_id=BERLIN) == ([], 0)  # an empty page, no more
    assert await listed(api.centre(BERLIN)) == (ids(berlin), 1)
    assert await listed(api.qa()) == (ids(paris + berlin), 4)
    assert await listed(api.qa(), treatment_center_id=BERLIN) == (ids(berlin), 1)
    assert await listed(api.centre(PARIS), limit=2, offset=2) == (ids(paris)[2:], 3)


async def test_the_catalogue_is_for_any_caller_with_orders_read(api: Api) -> None:
    for headers in (api.centre(), api.qa()):
        centres = await api.http.get("/v1/treatment-centers", headers=headers)
        products = await api.http.get("/v1/products", headers=headers)
        assert centres.status_code == products.status_code == 200
        assert PARIS in {c["id"] for c in centres.json()} and "TISA-CEL" in {
            p["code"] for p in products.json()
        }


# ---- hostile input ------------------------------------------------------------------------------------

IN_181_DAYS = FromNow(days=181, date_only=True)  # resolved when the test runs, not at import

HOSTILE_ORDERS: list[tuple[str, dict[str, Any], str]] = [
    ("patient-ref-lone-surrogate", {"patient_ref": "PAT-\ud800-X"}, "patient_ref"),
    ("patient-ref-nul", {"patient_ref": "PAT-\x00-X"}, "patient_ref"),
    ("patient-ref-newline", {"patient_ref": "PAT-\n-X"}, "patient_ref"),
    ("patient-ref-bidi-c1", {"patient_ref": "PAT-\x85-X"}, "patient_ref"),
    ("patient-ref-noncharacter", {"patient_ref": "PAT-\ufffe-X"}, "patient_ref"),
    ("patient-ref-65-chars", {"patient_ref": "P" * 65}, "patient_ref"),
    ("patient-ref-2-mb", {"patient_ref": "P" * 2_000_000}, "patient_ref"),
    ("patient-ref-blank", {"patient_ref": "   "}, "patient_ref"),
    ("patient-ref-number", {"patient_ref": 12345}, "patient_ref"),
    ("patient-ref-missing", {"patient_ref": ...}, "patient_ref"),
    ("date-today", {"requested_apheresis_date": TODAY.isoformat()}, "requested_apheresis_date"),
    ("date-past", {"requested_apheresis_date": "2020-01-01"}, "requested_apheresis_date"),
    ("date-181-days", {"requested_apheresis_date": IN_181_DAYS}, "requested_apheresis_date"),
    ("date-9999", {"requested_apheresis_date": "9999-12-31"}, "requested_apheresis_date"),
    ("date-garbage", {"requested_apheresis_date": "soon\ud800"}, "requested_apheresis_date"),
    ("product-code-space", {"product_code": "TISA CEL"}, "product_code"),
    ("product-code-control", {"product_code": "TISA\x07CEL"}, "product_code"),
    ("product-code-long", {"product_code": "T" * 33}, "product_code"),
    ("product-code-unknown", {"product_code": "NOT-A-PRODUCT"}, "product_code"),
    ("centre-newline", {"treatment_center_id": f"{PARIS}\n"}, "treatment_center_id"),
    ("centre-surrogate", {"treatment_center_id": "TC-\udfff"}, "treatment_center_id"),
    ("order-type", {"order_type": "compassionate"}, "order_type"),
    ("extra-field", {"status": "completed"}, "status"),
]


@pytest.mark.parametrize(
    ("overrides", "field"), [h[1:] for h in HOSTILE_ORDERS], ids=[h[0] for h in HOSTILE_ORDERS]
)
async def test_a_hostile_order_is_422_naming_the_field_never_echoing_it_and_writes_nothing(
    api: Api, overrides: dict[str, Any], field: str
) -> None:
    overrides = resolve_times(overrides)
    before = api.snapshot()
    resp = await api.post("/v1/orders", order_body(**overrides), api.centre())
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["type"] == PROBLEM_BASE + "validation"
    assert field in {e["field"] for e in problem["errors"]}
    for value in overrides.values():
        if isinstance(value, str) and value.strip():
            assert value not in resp.text and json.dumps(value)[1:-1] not in resp.text
    assert api.snapshot() == before


@pytest.mark.parametrize(
    "content",
    [
        b'{"patient_ref": "\xff\xfe"}',
        b'{"patient_ref": ',
        b"[]",
        b'"x"',
        b'{"patient_ref": NaN}',
        b"\x00" * 10,
    ],
    ids=["invalid-utf8", "truncated", "array", "string", "nan", "nul-bytes"],
)
async def test_a_body_that_is_not_an_order_object_is_4xx(api: Api, content: bytes) -> None:
    resp = await api.http.post(
        "/v1/orders", content=content, headers={**api.centre(), "content-type": "application/json"}
    )
    assert 400 <= resp.status_code < 500 and resp.headers["content-type"] == PROBLEM_JSON
    assert api.uow.store.orders == {}


def _at(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


HOSTILE_ACTIONS: list[tuple[str, str, dict[str, Any], str]] = [
    ("cancel-free-text-reason", "cancel", {"reason": "patient withdrew"}, "reason"),
    ("cancel-no-code", "cancel", {"note": "why"}, "reason_code"),
    ("cancel-unknown-code", "cancel", {"reason_code": "bored"}, "reason_code"),
    ("cancel-code-with-words", "cancel", {"reason_code": "other: patient said so"}, "reason_code"),
    ("cancel-note-501", "cancel", {"reason_code": "other", "note": "n" * 501}, "note"),
    ("cancel-note-surrogate", "cancel", {"reason_code": "other", "note": "n\udc00n"}, "note"),
    ("cancel-note-control", "cancel", {"reason_code": "other", "note": "n\x1bn"}, "note"),
    ("cancel-note-blank", "cancel", {"reason_code": "other", "note": " \t "}, "note"),
    (
        "reschedule-today",
        "apheresis-date",
        {"requested_apheresis_date": TODAY.isoformat(), "reason_code": "other"},
        "requested_apheresis_date",
    ),
    (
        "reschedule-181",
        "apheresis-date",
        {"requested_apheresis_date": IN_181_DAYS, "reason_code": "other"},
        "requested_apheresis_date",
    ),
    (
        "reschedule-9999",
        "apheresis-date",
        {"requested_apheresis_date": "9999-12-31", "reason_code": "other"},
        "requested_apheresis_date",
    ),
    (
        "reschedule-cancel-code",
        "apheresis-date",
        {"requested_apheresis_date": SOON.isoformat(), "reason_code": "duplicate_order"},
        "reason_code",
    ),
    (
        "reschedule-free-text",
        "apheresis-date",
        {"requested_apheresis_date": SOON.isoformat(), "reason": "x"},
        "reason",
    ),
    ("coi-long", "apheresis", {"coi": "V" * 21}, "coi"),
    ("coi-control", "apheresis", {"coi": "V2V00\x0026000001X"}, "coi"),
    ("coi-surrogate", "product-receipt", {"coi": "V2V00\ud83426000001X"}, "coi"),
    ("coi-malformed", "infusion", {"coi": "NOT-A-COI"}, "coi"),
    ("at-31-days-ago", "apheresis", {"coi": "{coi}", "at": _at(-timedelta(days=31))}, "at"),
    ("at-future", "product-receipt", {"coi": "{coi}", "at": _at(timedelta(hours=1))}, "at"),
    ("at-naive", "infusion", {"coi": "{coi}", "at": "2026-01-01T10:00:00"}, "at"),
    ("at-9999", "lymphodepletion", {"at": "9999-12-31T00:00:00Z"}, "at"),
    ("quarantine-decision", "quarantine-decision", {"decision": "hold", "reason_code": "other"}, "decision"),
    (
        "quarantine-release-reject-code",
        "quarantine-decision",
        {"decision": "release", "reason_code": "integrity_compromised"},
        "reason_code",
    ),
    ("quarantine-free-text", "quarantine-decision", {"decision": "release", "reason": "fine"}, "reason"),
    (
        "quarantine-note-long",
        "quarantine-decision",
        {"decision": "reject", "reason_code": "other", "note": "n" * 501},
        "note",
    ),
    ("disposition-outcome", "disposition", {**MINIMAL_BODIES["disposition"], "outcome": "hold"}, "outcome"),
    (
        "disposition-no-document",
        "disposition",
        {"outcome": "release", "reason_code": "other"},
        "document_reference",
    ),
    (
        "disposition-document-words",
        "disposition",
        {**MINIMAL_BODIES["disposition"], "document_reference": "see the deviation report"},
        "document_reference",
    ),
    (
        "disposition-physician-code-for-a-reject",
        "disposition",
        {**MINIMAL_BODIES["disposition"], "outcome": "reject", "reason_code": "no_alternative_treatment"},
        "reason_code",
    ),
    ("physician-accept-text", "physician-decision", {"accept": "maybe"}, "accept"),
    ("physician-free-text", "physician-decision", {"accept": True, "reason": "fine"}, "reason"),
    ("lot-lowercase", "product-receipt", {"coi": "{coi}", "lot": "lot-0001"}, "lot"),
    ("lot-long", "infusion", {"coi": "{coi}", "lot": "L" * 40}, "lot"),
]


@pytest.mark.parametrize(
    ("action", "body", "field"), [h[1:] for h in HOSTILE_ACTIONS], ids=[h[0] for h in HOSTILE_ACTIONS]
)
async def test_a_hostile_action_is_422_naming_the_field_and_writes_nothing(
    api: Api, action: str, body: dict[str, Any], field: str
) -> None:
    order = await api.place()
    api.put(order["order_id"], "material_at_risk", **AT_RISK_OUTBOUND)
    body = {k: (order["coi"] if v == "{coi}" else v) for k, v in resolve_times(body).items()}
    headers = api.qa_signed() if action in {"quarantine-decision", "disposition"} else api.centre()
    if action == "physician-decision":
        headers = api.physician()
    before = api.snapshot()
    resp = await api.post(f"/v1/orders/{order['order_id']}/{action}", body, headers)
    assert resp.status_code == 422, resp.text
    assert field in {e["field"] for e in resp.json()["errors"]}
    for key, value in body.items():  # (a decision/outcome is an enumeration member: the reason may name it)
        if (
            isinstance(value, str)
            and len(value) > 3
            and value != order["coi"]
            and key not in {"decision", "outcome"}
        ):
            assert value not in resp.text and json.dumps(value)[1:-1] not in resp.text
    assert api.snapshot() == before


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/orders", {"limit": 0}),
        ("/v1/orders", {"limit": 201}),
        ("/v1/orders", {"limit": "1e309"}),
        ("/v1/orders", {"offset": -1}),
        ("/v1/orders", {"offset": 10**30}),
        ("/v1/orders", {"treatment_center_id": "TC\x00"}),
        ("/v1/orders", {"treatment_center_id": "T" * 65}),
        ("/v1/orders", {"treatment_center_id": "TC FR"}),
        ("/v1/orders/not-a-uuid", {}),
        ("/v1/orders/%ED%A0%80", {}),
    ],
    ids=[
        "limit-0",
        "limit-201",
        "limit-huge",
        "offset-negative",
        "offset-huge",
        "centre-nul",
        "centre-long",
        "centre-space",
        "id-not-uuid",
        "id-surrogate",
    ],
)
async def test_hostile_query_and_path_parameters_are_4xx(api: Api, path: str, params: dict[str, Any]) -> None:
    resp = await api.http.get(path, params=params, headers=api.qa())
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.headers["content-type"] == PROBLEM_JSON


# ---- one open order per patient and product -----------------------------------------------------------


async def test_a_second_open_order_for_the_patient_and_product_is_409_open_order_exists(api: Api) -> None:
    first = await api.place()
    before = api.snapshot()
    resp = await api.post(
        "/v1/orders",
        order_body(requested_apheresis_date=(SOON + timedelta(days=2)).isoformat()),
        api.centre(),
    )
    assert resp.status_code == 409
    problem = resp.json()
    assert problem["type"] == PROBLEM_BASE + "open-order-exists"
    assert problem["errors"][0]["field"] == "patient_ref" and PATIENT not in resp.text
    assert api.snapshot() == before

    await api.place(product_code="AXI-CEL")  # another product
    await api.place(api.centre(BERLIN))  # another centre's patient with the same reference
    resp = await api.post(
        f"/v1/orders/{first['order_id']}/cancel", {"reason_code": "duplicate_order"}, api.centre()
    )
    assert resp.status_code == 200
    assert (await api.place())["order_id"] != first["order_id"]  # the first one ended: a new one is fine


async def test_two_racing_orders_for_one_patient_make_one_order(api: Api) -> None:
    responses = await asyncio.gather(
        *(api.post("/v1/orders", order_body(patient_ref="PAT-RACE"), api.centre()) for _ in range(2))
    )
    assert sorted(r.status_code for r in responses) == [201, 409]
    assert [r.json()["type"] for r in responses if r.status_code == 409] == [
        PROBLEM_BASE + "open-order-exists"
    ]
    assert len(api.uow.store.orders) == 1 and api.uow.types() == ["order.submitted.v1"]


# ---- reason codes out, notes in -----------------------------------------------------------------------


async def test_actions_publish_reason_codes_and_the_notes_stay_on_the_timeline(api: Api) -> None:
    patient = f"PAT-{MARKER}"
    with structlog.testing.capture_logs() as logs:
        cancelled = await api.place(patient_ref=patient)
        moved = await api.place(patient_ref=patient, product_code="AXI-CEL")
        decided = await api.place(patient_ref=f"{patient}-2", treatment_center_id=PARIS)
        api.put(moved["order_id"], "slot_reserved")
        api.put(decided["order_id"], "material_at_risk", **AT_RISK_OUTBOUND)
        calls = [
            (
                cancelled,
                "cancel",
                {"reason_code": "patient_deceased", "note": f"{MARKER} cancel"},
                api.centre(),
            ),
            (
                moved,
                "apheresis-date",
                {
                    "requested_apheresis_date": (SOON + timedelta(days=3)).isoformat(),
                    "reason_code": "patient_unwell",
                    "note": f"{MARKER} reschedule",
                },
                api.centre(),
            ),
            (
                decided,
                "quarantine-decision",
                {
                    "decision": "release",
                    "reason_code": "within_stability_data",
                    "note": f"{MARKER} quarantine",
                },
                api.qa_signed(),
            ),
        ]
        for order, action, body, headers in calls:
            resp = await api.post(f"/v1/orders/{order['order_id']}/{action}", body, headers)
            assert resp.status_code == 200, resp.text
            [entry] = [t for t in resp.json()["timeline"] if t["note"]]
            assert entry["note"] == body["note"] and MARKER not in entry["reason"]

    reasons = {e.type: e.data["reason"] for e in api.uow.committed if "reason" in e.data}
    assert reasons == {
        "order.cancelled.v1": "patient_deceased",
        "order.rebook_requested.v1": "patient_unwell",
        "order.disposition_decided.v1": "within_stability_data",
    }
    assert all(MARKER not in e.to_json().decode() for e in api.uow.committed)
    assert {t.note for t in api.uow.store.timeline if t.note} == {
        f"{MARKER} {a}" for a in ("cancel", "reschedule", "quarantine")
    }
    # logs and spans name the action and the order, never the note or the patient
    assert {"order placed", "hospital action applied"} <= {entry["event"] for entry in logs}
    assert all(MARKER not in repr(entry) for entry in logs)
    spans = api.spans.get_finished_spans()
    assert {s.name for s in spans} >= {"hospital cancel", "hospital reschedule", "hospital disposition"}
    assert all(MARKER not in json.dumps(dict(s.attributes or {})) + s.name for s in spans)
    assert all(MARKER not in str(ev.attributes) for s in spans for ev in s.events)


async def test_the_order_shows_its_own_centre_its_timeline_notes(api: Api) -> None:
    order = await api.place()
    await api.post(
        f"/v1/orders/{order['order_id']}/cancel", {"reason_code": "other", "note": "  kept  "}, api.centre()
    )
    resp = await api.http.get(f"/v1/orders/{order['order_id']}", headers=api.centre())
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "cancelled" and body["ended_reason"] == "cancelled by the centre: other"
    assert [t["note"] for t in body["timeline"]] == [None, "kept"]
    assert date.fromisoformat(body["requested_apheresis_date"]) == SOON


# ---- the audit trail ----------------------------------------------------------------------------------


async def test_the_audit_trail_names_who_did_what_when_and_why_to_its_centre_and_qa(api: Api) -> None:
    order = await api.place()
    oid = order["order_id"]
    resp = await api.post(
        f"/v1/orders/{oid}/cancel",
        {"reason_code": "patient_deceased", "note": "family informed"},
        api.centre(),
    )
    assert resp.status_code == 200, resp.text

    resp = await api.http.get(f"/v1/orders/{oid}/audit", headers=api.centre())
    assert resp.status_code == 200, resp.text
    page = resp.json()
    assert (page["total"], page["limit"], page["offset"], page["next_offset"]) == (2, 50, 0, None)
    placed, cancelled = page["items"]
    centre_actor = {"client_id": "centre-tc-fr-pa-001", "user_id": None, "kind": "centre", "entity_id": PARIS}
    assert (placed["action"], placed["actor"], placed["object_type"], placed["object_id"]) == (
        "order.placed",
        centre_actor,
        "order",
        oid,
    )
    assert placed["old"] is None
    assert {k: placed["new"][k] for k in ("status", "coi", "patient_ref", "treatment_center_id")} == {
        "status": "submitted",
        "coi": order["coi"],
        "patient_ref": PATIENT,
        "treatment_center_id": PARIS,
    }
    assert cancelled["action"] == "order.cancel" and cancelled["reason"] == "patient_deceased"
    assert cancelled["actor"] == centre_actor
    assert cancelled["old"]["status"] == "submitted" and cancelled["new"]["status"] == "cancelled"
    assert cancelled["new"]["note"] == "family informed"
    assert cancelled["new"]["event"]["type"] == "order.cancelled.v1"
    assert cancelled["cause"].startswith("trace:")  # the request's trace
    assert cancelled["prev_hash"] == placed["entry_hash"]
    assert datetime.fromisoformat(placed["recorded_at"]) <= datetime.fromisoformat(cancelled["recorded_at"])

    # QA and ops see every centre's orders' trails; another centre sees nothing of it
    assert (await api.http.get(f"/v1/orders/{oid}/audit", headers=api.qa())).json() == page
    assert (await api.http.get(f"/v1/orders/{oid}/audit", headers=api.tokens.headers("ops"))).json() == page
    other = await api.http.get(f"/v1/orders/{oid}/audit", headers=api.centre(BERLIN))
    unknown = await api.http.get(f"/v1/orders/{uuid.uuid4()}/audit", headers=api.centre(PARIS))
    assert other.status_code == unknown.status_code == 404 and PATIENT not in other.text
    courier = api.tokens.headers("carrier", "UPS", scopes=["orders:read"])
    assert (await api.http.get(f"/v1/orders/{oid}/audit", headers=courier)).status_code == 403

    # paged like every list
    resp = await api.http.get(f"/v1/orders/{oid}/audit", headers=api.qa(), params={"limit": 1, "offset": 1})
    assert [e["seq"] for e in resp.json()["items"]] == [cancelled["seq"]] and resp.json()[
        "next_offset"
    ] is None
    resp = await api.http.get(f"/v1/orders/{oid}/audit", headers=api.qa(), params={"limit": 1})
    assert resp.json()["next_offset"] == 1
    for bad in ({"limit": 0}, {"limit": 201}, {"offset": -1}):
        assert (
            await api.http.get(f"/v1/orders/{oid}/audit", headers=api.qa(), params=bad)
        ).status_code == 422

    # the whole trail (the network's registrations by the consumer included) is one intact chain
    store = api.uow.store
    assert verify("ordering", store.audit).broken is None
    registered = [r for r in store.audit if r.action == "network.site_replaced"]
    assert {r.object_id for r in registered} == set(NETWORK)
    assert all(r.actor.client_id == "order.saga" and (r.cause or "").startswith("event:") for r in registered)


async def test_a_refused_request_writes_no_audit_entry(api: Api) -> None:
    order = await api.place()
    before = list(api.uow.store.audit)
    resp = await api.post(f"/v1/orders/{order['order_id']}/lymphodepletion", {}, api.centre())
    assert resp.status_code == 409, resp.text  # not yet: the state machine refuses
    assert api.uow.store.audit == before


# ---- issue 10: signed decisions over HTTP ---------------------------------------------------------------


async def test_a_disposition_without_a_valid_signature_is_refused_and_audited(api: Api) -> None:
    order = await api.place()
    oid = order["order_id"]
    api.put(oid, "material_at_risk", **AT_RISK_OUTBOUND)
    body = MINIMAL_BODIES["disposition"]
    refusals = [
        (api.qa(client_id="qa-system"), 401, "signature-required"),
        (
            {
                **api.qa(client_id="qa-system"),
                **api.tokens.signature_headers("qa.les-ulis", client_id="qa-system", auth_age_s=600),
            },
            401,
            "signature-expired",
        ),
        (  # a user without a disposition role
            {
                **api.qa(client_id="qa-system"),
                **api.tokens.signature_headers("qp.x", client_id="qa-system", roles=["physician"]),
            },
            403,
            "signature-role",
        ),
        (  # a signing token issued to another client
            {**api.qa(client_id="qa-system"), **api.tokens.signature_headers("qa.les-ulis", client_id="x")},
            403,
            "signature-client",
        ),
    ]
    for headers, status, reason in refusals:
        resp = await api.post(f"/v1/orders/{oid}/disposition", body, headers)
        assert resp.status_code == status and resp.json()["reason"] == reason, resp.text
    assert api.uow.store.orders[uuid.UUID(oid)].status == "material_at_risk"
    assert api.uow.store.signatures == [] and api.uow.committed[-1].type == "order.submitted.v1"
    audited = [r for r in api.uow.store.audit if r.action == "signature.refused"]
    assert [r.reason for r in audited] == [reason for _, _, reason in refusals]
    assert all(r.object_id == f"order:{oid}" and r.actor.client_id == "qa-system" for r in audited)
    assert audited[2].new["user_id"] == "qp.x"  # type: ignore[index, call-overload]
    assert verify("ordering", api.uow.store.audit).broken is None
    # signed: released, and shown with its signature
    resp = await api.post(f"/v1/orders/{oid}/disposition", body, api.qa_signed())
    assert resp.status_code == 200, resp.text
    done = resp.json()
    assert done["status"] == "product_in_transit" and done["at_risk"] is None
    [decision] = done["decisions"]
    assert decision["meaning"] == "disposition" and decision["signed"]
    assert "Test Signer qa.les-ulis" in decision["signatures"][0]


async def test_cancelling_during_manufacture_needs_the_physicians_signature(api: Api) -> None:
    order = await api.place()
    oid = order["order_id"]
    api.put(oid, "manufacturing", site_id="FR-LES-ULIS")
    body = {"reason_code": "consent_withdrawn"}
    resp = await api.post(f"/v1/orders/{oid}/cancel", body, api.centre())
    assert resp.status_code == 401 and resp.json()["reason"] == "signature-required", resp.text
    # a signing token of another centre's physician does not fit the caller's organisation
    other = {
        **api.centre(),
        **api.tokens.signature_headers(
            "dr.b", client_id=f"centre-{PARIS.lower()}", roles=["physician"], org_kind="centre", org_id=BERLIN
        ),
    }
    resp = await api.post(f"/v1/orders/{oid}/cancel", body, other)
    assert resp.status_code == 403 and resp.json()["reason"] == "signature-organisation"
    assert api.uow.store.orders[uuid.UUID(oid)].status == "manufacturing"
    refused = [r.reason for r in api.uow.store.audit if r.action.endswith("refused")]
    assert refused == ["signature-required", "signature-organisation"]
    resp = await api.post(f"/v1/orders/{oid}/cancel", body, api.physician())
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    assert [d["meaning"] for d in resp.json()["decisions"]] == ["cancellation"]
    # before manufacture, no signature is needed
    early = await api.place(patient_ref="PAT-EARLY")
    resp = await api.post(f"/v1/orders/{early['order_id']}/cancel", body, api.centre())
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"


async def test_the_physician_decides_on_an_oos_product_and_qa_tracks_the_notification(api: Api) -> None:
    order = await api.place()
    oid = order["order_id"]
    risk = {"cause": "out_of_specification", "reason": "potency", "site_id": "FR-LES-ULIS", "run": 1}
    api.put(
        oid, "material_at_risk", site_id="FR-LES-ULIS", status_before_quarantine="qc_pending", at_risk=risk
    )
    asked = {
        "outcome": "release_on_physician_request",
        "reason_code": "no_alternative_treatment",
        "document_reference": "QA-RA-1",
    }
    resp = await api.post(f"/v1/orders/{oid}/disposition", asked, api.qa_signed())
    assert resp.status_code == 200 and resp.json()["status"] == "awaiting_physician", resp.text
    assert resp.json()["at_risk"]["requested"] == "no_alternative_treatment"
    # QA's own signature is not a physician's
    qa_as_physician = {**api.centre(), **api.tokens.signature_headers("qa.les-ulis", client_id="qa-system")}
    resp = await api.post(f"/v1/orders/{oid}/physician-decision", {"accept": True}, qa_as_physician)
    assert resp.status_code == 403
    resp = await api.post(
        f"/v1/orders/{oid}/physician-decision",
        {"accept": True, "reason_code": "benefit_outweighs_risk"},
        api.physician(),
    )
    assert resp.status_code == 200, resp.text
    accepted = resp.json()
    assert accepted["status"] == "qc_pending" and accepted["order_type"] == "commercial"  # EMA: no EA
    [task] = accepted["tasks"]
    assert (task["state"], task["due_at"], task["overdue"], task["regulator"]) == ("open", None, False, "EMA")
    # QA lists and completes it; a centre may not
    assert (
        await api.http.get("/v1/tasks", headers=api.centre(scopes=["quarantine:decide"]))
    ).status_code == 403
    listed = (await api.http.get("/v1/tasks", params={"state": "open"}, headers=api.qa())).json()
    assert [t["task_id"] for t in listed["items"]] == [task["task_id"]] and listed["total"] == 1
    overdue = (await api.http.get("/v1/tasks", params={"overdue": "true"}, headers=api.qa())).json()
    assert overdue["items"] == []
    resp = await api.post(f"/v1/tasks/{task['task_id']}/done", {"reference": "EMA-NOTIF-9"}, api.qa())
    assert resp.status_code == 200 and resp.json()["tasks"][0]["state"] == "done", resp.text
    resp = await api.post(f"/v1/tasks/{task['task_id']}/done", {"reference": "EMA-NOTIF-9"}, api.qa())
    assert resp.status_code == 409


# ---- issue 11: treatment gates at the centre and the patient's journey -----------------------------------


async def test_an_order_names_an_indication_of_its_product_and_the_weight_its_dose_needs(api: Api) -> None:
    for body, field in [
        ({"indication": "mm"}, "indication"),  # a cilta-cel indication, not tisa-cel's
        ({"indication": "B_ALL"}, "indication"),  # not a code
        ({"indication": "b_all"}, "weight_kg"),  # the B-ALL dose is per kg
        ({"indication": "b_all", "weight_kg": 0}, "weight_kg"),
        ({"indication": "b_all", "weight_kg": 401}, "weight_kg"),
        ({"product_code": "AXI-CEL", "indication": "lbcl"}, "weight_kg"),
    ]:
        before = api.snapshot()
        resp = await api.post("/v1/orders", order_body(**body), api.centre())
        assert resp.status_code == 422, (body, resp.text)
        assert resp.headers["content-type"].startswith(PROBLEM_JSON)
        assert [e["field"] for e in resp.json()["errors"]] == [field], body
        assert api.snapshot() == before
    refused = await api.post("/v1/orders", order_body(indication="mm"), api.centre())
    assert "b_all, dlbcl, fl" in refused.json()["errors"][0]["reason"]  # the product's own codes
    placed = await api.place(indication="b_all", weight_kg=38.5)
    assert placed["treatment"] == {
        "indication": "b_all",
        "weight_kg": 38.5,
        "delivery_confirmed": False,
        "lymphodepletion_started_on": None,
        "lymphodepletions": 0,
        "infusion_window": None,
    }
    flat = await api.place(patient_ref="PAT-API-0002", indication="dlbcl")  # a flat dose: no weight
    assert flat["treatment"]["indication"] == "dlbcl"
    # clinical data stay in the order service: order.submitted carries neither
    submitted = [e for e in api.uow.committed if e.type == "order.submitted.v1"]
    assert submitted and all("indication" not in e.data and "weight_kg" not in e.data for e in submitted)
    products = (await api.http.get("/v1/products", headers=api.centre())).json()
    tisa = next(p for p in products if p["code"] == "TISA-CEL")
    assert sorted(tisa["treatment"]["indications"]) == ["b_all", "dlbcl", "fl"]


async def test_lymphodepletion_waits_for_a_confirmed_delivery_and_infusion_for_its_window(api: Api) -> None:
    order = await api.place(indication="fl")
    oid = order["order_id"]
    api.put(oid, "released")
    early = await api.post(f"/v1/orders/{oid}/lymphodepletion", {}, api.centre())
    assert early.status_code == 409 and early.headers["content-type"].startswith(PROBLEM_JSON)
    assert "delivery date is confirmed" in early.json()["detail"]
    api.put(oid, "product_in_transit")
    ld_at = datetime.now(UTC) - timedelta(days=20)  # FL: 3-day regimen, infusion 2-6 days after
    resp = await api.post(f"/v1/orders/{oid}/lymphodepletion", {"at": ld_at.isoformat()}, api.centre())
    assert resp.status_code == 200, resp.text
    window = resp.json()["treatment"]["infusion_window"]
    started = ld_at.astimezone(UTC).date()  # the Paris centre's day (UTC+1, far from midnight rarely)
    assert window["indication"] == "fl"
    assert date.fromisoformat(window["latest_infusion"]) - date.fromisoformat(
        window["lymphodepletion_started_on"]
    ) == timedelta(days=9)
    assert abs((date.fromisoformat(window["lymphodepletion_started_on"]) - started).days) <= 1
    now = datetime.now(UTC)
    api.put(
        oid, "product_received", released_at=now - timedelta(days=24), delivered_at=now - timedelta(days=22)
    )
    late = await api.post(f"/v1/orders/{oid}/infusion", {"coi": order["coi"]}, api.centre())
    assert late.status_code == 409 and late.headers["content-type"].startswith(PROBLEM_JSON)
    problem = late.json()
    assert problem["type"] == PROBLEM_BASE + "infusion-window"
    assert problem["errors"][0]["field"] == "at"
    assert f"{window['earliest_infusion']} .. {window['latest_infusion']}" in problem["errors"][0]["reason"]
    assert problem["window"] == window  # the window, as a member of the problem
    # a repeat LD may start once the first can no longer lead to an infusion (not before)
    too_soon = await api.post(
        f"/v1/orders/{oid}/lymphodepletion",
        {"at": (datetime.now(UTC) - timedelta(days=14)).isoformat()},
        api.centre(),
    )
    assert too_soon.status_code == 409 and "a repeat may start from" in too_soon.json()["detail"]
    again = await api.post(  # started 8 days ago: its window is 3 days ago .. tomorrow
        f"/v1/orders/{oid}/lymphodepletion",
        {"at": (datetime.now(UTC) - timedelta(days=8)).isoformat()},
        api.centre(),
    )
    assert again.status_code == 200, again.text
    assert again.json()["treatment"]["lymphodepletions"] == 2
    # the predicted infusion is not before the recorded LD's window opens (the delivery was long before)
    repeat_window = again.json()["treatment"]["infusion_window"]
    assert again.json()["predicted"]["earliest_infusion"] == repeat_window["earliest_infusion"]
    done = await api.post(f"/v1/orders/{oid}/infusion", {"coi": order["coi"]}, api.centre())
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "completed"
    audit = [r.action for r in api.uow.store.audit if r.object_id == oid]
    assert audit.count("order.lymphodepletion") == 2 and "order.infusion" in audit


async def test_an_order_without_an_indication_names_it_with_its_first_lymphodepletion(api: Api) -> None:
    order = await api.place()  # a caller that does not send one (issue 11 keeps them working)
    oid = order["order_id"]
    api.put(oid, "product_delivered")
    missing = await api.post(f"/v1/orders/{oid}/lymphodepletion", {}, api.centre())
    assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "indication"
    no_weight = await api.post(f"/v1/orders/{oid}/lymphodepletion", {"indication": "b_all"}, api.centre())
    assert no_weight.status_code == 422 and no_weight.json()["errors"][0]["field"] == "weight_kg"
    resp = await api.post(
        f"/v1/orders/{oid}/lymphodepletion", {"indication": "b_all", "weight_kg": 41}, api.centre()
    )
    assert resp.status_code == 200, resp.text
    treatment = resp.json()["treatment"]
    assert (treatment["indication"], treatment["weight_kg"], treatment["lymphodepletions"]) == (
        "b_all",
        41,
        1,
    )


async def test_on_hold_and_resume_with_reason_codes_and_notes_kept_here(api: Api) -> None:
    order = await api.place()
    oid = order["order_id"]
    api.put(oid, "qc_pending")
    held = await api.post(
        f"/v1/orders/{oid}/hold", {"reason_code": "patient_unwell", "note": f"{MARKER} fever"}, api.centre()
    )
    assert held.status_code == 200, held.text
    body = held.json()
    assert body["status"] == "on_hold"
    assert body["on_hold"] == {"reason_code": "patient_unwell", "resumes_in": "qc_pending"}
    bad = await api.post(f"/v1/orders/{oid}/hold", {"reason_code": "patient_deceased"}, api.centre())
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "reason_code"
    twice = await api.post(f"/v1/orders/{oid}/hold", {"reason_code": "other"}, api.centre())
    assert twice.status_code == 409
    resumed = await api.post(f"/v1/orders/{oid}/resume", {"reason_code": "patient_cleared"}, api.centre())
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["status"] == "qc_pending" and resumed.json()["on_hold"] is None
    events = [(e.type, e.data.get("reason")) for e in api.uow.committed if e.subject == oid]
    assert ("order.put_on_hold.v1", "patient_unwell") in events
    assert ("order.resumed.v1", "patient_cleared") in events
    assert all(MARKER not in e.to_json().decode() for e in api.uow.committed)
    actions = [r.action for r in api.uow.store.audit if r.object_id == oid]
    assert "order.hold" in actions and "order.resume" in actions


async def test_a_late_cancellation_leaves_a_product_whose_disposition_is_recorded_once(api: Api) -> None:
    order = await api.place()
    oid = order["order_id"]
    api.put(oid, "released", site_id="FR-LES-ULIS")
    too_early = await api.post(
        f"/v1/orders/{oid}/material-disposition",
        {"material": "product", "outcome": "destroyed", "reason_code": "order_cancelled"},
        api.centre(),
    )
    assert too_early.status_code == 409
    cancelled = await api.post(
        f"/v1/orders/{oid}/cancel", {"reason_code": "disease_progression"}, api.physician()
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["end_material"] == {
        "material": "product",
        "location": "site",
        "disposition_recorded": False,
    }
    wrong = await api.post(
        f"/v1/orders/{oid}/material-disposition",
        {"material": "apheresis_material", "outcome": "destroyed", "reason_code": "order_cancelled"},
        api.centre(),
    )
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "material"
    body = {
        "material": "product",
        "outcome": "destroyed",
        "reason_code": "order_cancelled",
        "document_reference": "DEST-2026-0042",
        "note": f"{MARKER} destroyed at the site",
    }
    recorded = await api.post(f"/v1/orders/{oid}/material-disposition", body, api.centre())
    assert recorded.status_code == 200, recorded.text
    view = recorded.json()
    assert view["end_material"]["disposition_recorded"] is True
    [record] = view["material_dispositions"]
    assert (record["material"], record["outcome"], record["location"]) == ("product", "destroyed", "site")
    assert record["document_reference"] == "DEST-2026-0042"
    entry = view["timeline"][-1]
    assert entry["type"] == "order.material_disposition_recorded.v1" and entry["note"] == body["note"]
    assert "product destroyed" in entry["reason"]
    again = await api.post(f"/v1/orders/{oid}/material-disposition", body, api.centre())
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "material"
    [event] = [e for e in api.uow.committed if e.type == "order.material_disposition_recorded.v1"]
    assert (event.data["material"], event.data["outcome"], event.data["reason"]) == (
        "product",
        "destroyed",
        "order_cancelled",
    )
    assert MARKER not in event.to_json().decode()
    audit = (await api.http.get(f"/v1/orders/{oid}/audit", headers=api.centre())).json()["items"]
    actions = [a["action"] for a in audit]
    assert "order.material_disposition.recorded" in actions and "order.material" in actions
    ended = next(a for a in audit if a["action"] == "order.cancel")
    assert ended["new"]["end_material"] == {"material": "product", "location": "site"}


async def test_the_manufacturers_qa_records_what_the_site_did_with_material_a_failed_order_left(
    api: Api,
) -> None:
    order = await api.place()
    oid = order["order_id"]
    api.put(oid, "material_received", site_id="FR-LES-ULIS")
    await api.post(f"/v1/orders/{oid}/cancel", {"reason_code": "patient_deceased"}, api.centre())
    body = {"material": "apheresis_material", "outcome": "returned", "reason_code": "patient_deceased"}
    not_the_centres = await api.post(f"/v1/orders/{oid}/site-material-disposition", body, api.centre())
    assert not_the_centres.status_code == 403
    resp = await api.post(f"/v1/orders/{oid}/site-material-disposition", body, api.qa(client_id="qa-system"))
    assert resp.status_code == 200, resp.text
    [record] = resp.json()["material_dispositions"]
    assert (record["material"], record["location"], record["outcome"]) == (
        "apheresis_material",
        "site",
        "returned",
    )
    assert record["recorded_by"] == "qa-system"
    again = await api.post(f"/v1/orders/{oid}/material-disposition", body, api.centre())
    assert again.status_code == 409  # once per material, whoever records it


async def test_an_order_cancelled_before_apheresis_leaves_nothing_to_dispose_of(api: Api) -> None:
    order = await api.place()
    oid = order["order_id"]
    await api.post(f"/v1/orders/{oid}/cancel", {"reason_code": "payer_denied"}, api.centre())
    resp = await api.post(
        f"/v1/orders/{oid}/material-disposition",
        {"material": "apheresis_material", "outcome": "destroyed", "reason_code": "order_cancelled"},
        api.centre(),
    )
    assert resp.status_code == 409 and "no material" in resp.json()["detail"]


async def test_every_structured_cancel_and_hold_reason_is_accepted_and_published_as_its_code(
    api: Api,
) -> None:
    """Death, progression, ineligible, payer denied, consent withdrawn, other (and the rest of the
    enumerations): each a code in the event; the words stay here."""
    from typing import get_args

    from order_service.domain.reasons import CancelReason, HoldReason

    for n, code in enumerate(get_args(HoldReason)):
        order = await api.place(patient_ref=f"PAT-HOLD-{n}")
        resp = await api.post(f"/v1/orders/{order['order_id']}/hold", {"reason_code": code}, api.centre())
        assert resp.status_code == 200 and resp.json()["on_hold"]["reason_code"] == code, resp.text
    for n, code in enumerate(get_args(CancelReason)):
        order = await api.place(patient_ref=f"PAT-CANCEL-{n}")
        resp = await api.post(f"/v1/orders/{order['order_id']}/cancel", {"reason_code": code}, api.centre())
        assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    published = {(e.type, e.data["reason"]) for e in api.uow.committed if "reason" in e.data}
    assert {("order.put_on_hold.v1", c) for c in get_args(HoldReason)} <= published
    assert {("order.cancelled.v1", c) for c in get_args(CancelReason)} <= published
    for required in ("patient_deceased", "disease_progression", "patient_ineligible", "payer_denied"):
        assert required in get_args(CancelReason)
    assert "consent_withdrawn" in get_args(CancelReason) and "other" in get_args(CancelReason)
