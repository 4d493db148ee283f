"""`Api`: the simulator's accounting over the shared `V2VClient` (answers sorted into ok, intended and
errors; 5xx and transport errors retried), against `httpx.MockTransport` (no network)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pytest

from v2v_harness.client import ApiError, ApiResponse, V2VClient
from v2v_simulator.api import ADMIN, OPS, QA, Api, OrderAbort, carrier, centre, site
from v2v_simulator.config import DEFAULT_URLS
from v2v_simulator.report import Stats

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def make_api(handler: Handler, concurrency: int = 20) -> tuple[Api, Stats, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = handler(request)
        return answer if isinstance(answer, httpx.Response) else await answer

    stats = Stats()
    api = Api(DEFAULT_URLS, concurrency, stats, transport=httpx.MockTransport(record), backoff_s=0.0)
    return api, stats, seen


def answers(*responses: httpx.Response | Exception) -> Handler:
    """A handler giving these answers in turn (an exception is raised instead)."""
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handler


def get_order(c: V2VClient) -> Awaitable[ApiResponse]:
    return c.get_order("o-1")


async def test_an_expected_answer_is_returned_and_counted() -> None:
    api, stats, seen = make_api(answers(httpx.Response(200, json={"order_id": "o-1", "status": "submitted"})))
    resp = await api.call("get order", get_order)
    assert (resp.status, resp.body) == (200, {"order_id": "o-1", "status": "submitted"})
    assert (resp.service, resp.method, resp.path) == ("order", "GET", "/v1/orders/o-1")
    assert str(seen[0].url) == "http://127.0.0.1:8001/v1/orders/o-1"
    assert stats.calls == {"get order": 1} and stats.statuses == {200: 1}
    assert not stats.errors and not stats.intended
    await api.close()


async def test_an_intended_refusal_is_counted_apart_and_returned() -> None:
    api, stats, _ = make_api(answers(httpx.Response(409, json={"detail": "not released"})))
    resp = await api.call(
        "lymphodepletion before release",
        lambda c: c.lymphodepletion("o-1", "2026-03-02T09:00:00+00:00"),
        ok=(200,),
        intended=(409,),
    )
    assert resp.status == 409 and resp.body == {"detail": "not released"}
    assert stats.intended == {"lymphodepletion before release -> 409": 1}
    assert not stats.errors and stats.statuses == {409: 1}
    await api.close()


async def test_an_unexpected_4xx_is_an_error_and_is_not_retried() -> None:
    api, stats, seen = make_api(answers(httpx.Response(422, json={"detail": "coi: bad check character"})))
    with pytest.raises(OrderAbort, match="confirm apheresis: HTTP 422"):
        await api.call("confirm apheresis", lambda c: c.apheresis("o-1", "X"), who="order #1 o-1", ok=(200,))
    assert len(seen) == 1
    assert stats.errors == [
        "order #1 o-1 confirm apheresis: POST /v1/orders/o-1/apheresis -> 422 coi: bad check character"
    ]
    assert stats.calls == {"confirm apheresis": 1}
    await api.close()


async def test_a_5xx_is_recorded_and_retried_twice_then_aborts() -> None:
    api, stats, seen = make_api(answers(httpx.Response(503, text="upstream down")))
    with pytest.raises(OrderAbort, match="HTTP 503"):
        await api.call("get order", get_order, who="w")
    assert len(seen) == 3  # the first try and two retries
    assert stats.statuses == {503: 3} and stats.calls == {"get order": 3}
    assert stats.errors == ["w get order: GET /v1/orders/o-1 -> 503 upstream down"] * 3
    await api.close()


async def test_a_5xx_then_an_answer_is_one_error_and_the_answer() -> None:
    api, stats, seen = make_api(
        answers(httpx.Response(500, json={"detail": "boom"}), httpx.Response(200, json={}))
    )
    resp = await api.call("get order", get_order)
    assert resp.status == 200 and len(seen) == 2
    assert stats.statuses == {500: 1, 200: 1}
    assert stats.errors == [" get order: GET /v1/orders/o-1 -> 500 boom"]
    await api.close()


async def test_transport_errors_are_retried_four_times_then_recorded_once() -> None:
    api, stats, seen = make_api(answers(httpx.ConnectError("connection refused")))
    with pytest.raises(OrderAbort, match="get order: connection refused"):
        await api.call("get order", get_order, who="w")
    assert len(seen) == 5
    assert stats.errors == ["w get order: GET /v1/orders/o-1: ConnectError: connection refused"]
    assert not stats.calls and not stats.statuses  # no answer, nothing counted
    await api.close()


async def test_a_transport_error_then_an_answer_is_no_error() -> None:
    api, stats, seen = make_api(answers(httpx.ReadTimeout("slow"), httpx.Response(201, json={"ok": True})))
    resp = await api.call("place order", lambda c: c.place_order({"patient_ref": "P"}), ok=(201,))
    assert resp.status == 201 and len(seen) == 2 and not stats.errors
    assert json.loads(seen[1].content) == {"patient_ref": "P"}  # the same request again
    assert seen[0].headers["idempotency-key"] == seen[1].headers["idempotency-key"]  # with the same key
    await api.close()


async def test_bodies_that_are_not_json_are_kept_as_text() -> None:
    api, stats, _ = make_api(answers(httpx.Response(404, text="x" * 400), httpx.Response(204)))
    with pytest.raises(OrderAbort):
        await api.call("get order", get_order)
    assert stats.errors == [" get order: GET /v1/orders/o-1 -> 404 " + "x" * 300]
    resp = await api.call("remove", lambda c: c.remove_email_recipient("r-1"), ok=(204,))
    assert resp.body is None and resp.content == b""
    await api.close()


async def test_throttled_calls_keep_to_the_concurrency_and_unthrottled_ones_do_not() -> None:
    in_flight, peak = [0], [0]

    async def slow(request: httpx.Request) -> httpx.Response:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.02)
        in_flight[0] -= 1
        return httpx.Response(200, json={})

    api, _, _ = make_api(slow, concurrency=2)
    await asyncio.gather(*(api.call("get order", get_order) for _ in range(6)))
    assert peak[0] == 2
    peak[0] = 0
    await asyncio.gather(
        *(api.call("list orders", lambda c: c.list_orders(limit=1), throttle=False) for _ in range(6))
    )
    assert peak[0] > 2
    await api.close()


# ---- parties: each with its own token, all on one connection pool ------------------------------------------


class FakeTokens:
    """A token source like `v2v_harness.identity.Credentials`: the token names the demo client."""

    def __init__(self, known: set[tuple[str, str | None]] | None = None, refuse: bool = False) -> None:
        self.known = known
        self.refuse = refuse
        self.asked: list[str] = []

    def client_id(self, kind: str, entity_id: str | None = None) -> str:
        if self.known is not None and (kind, entity_id) not in self.known:
            raise KeyError(f"no demo client of kind {kind} for {entity_id}")
        return f"{kind}-{entity_id.lower()}" if entity_id else kind

    async def headers(self, client_id: str, scope: str | None = None) -> dict[str, str]:
        self.asked.append(client_id)
        if self.refuse:
            request = httpx.Request("POST", "http://issuer/token")
            raise httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))
        return {"Authorization": f"Bearer {client_id}"}


def make_party_api(handler: Handler, tokens: FakeTokens) -> tuple[Api, Stats, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = handler(request)
        assert isinstance(answer, httpx.Response)
        return answer

    stats = Stats()
    api = Api(
        DEFAULT_URLS, 5, stats, credentials=tokens, transport=httpx.MockTransport(record), backoff_s=0.0
    )
    return api, stats, seen


async def test_each_party_calls_with_its_own_token_over_one_connection_pool() -> None:
    tokens = FakeTokens()
    api, stats, seen = make_party_api(answers(httpx.Response(200, json={})), tokens)
    await api.call("get order", get_order, party=centre("TC-DE-BE-001"))
    await api.call("list shipments", lambda c: c.shipments(order_id="o-1"))  # ops by default
    await api.call("milestone", lambda c: c.cancel("o-1", "other"), party=carrier("CRYO-EU"))
    await api.call("mes view", lambda c: c.manufacturing("CH-STEIN", "o-1"), party=site("CH-STEIN"))
    await api.call("QC", lambda c: c.qc("CH-STEIN", "o-1", "released"), party=QA)
    await api.call("outage", lambda c: c.sites(), party=ADMIN)
    await api.call("get order", get_order, party=centre("TC-DE-BE-001"))
    assert [r.headers["authorization"] for r in seen] == [
        "Bearer centre-tc-de-be-001",
        "Bearer ops",
        "Bearer carrier-cryo-eu",
        "Bearer site-ch-stein",
        "Bearer qa",
        "Bearer admin",
        "Bearer centre-tc-de-be-001",
    ]
    parties = [centre("TC-DE-BE-001"), OPS, carrier("CRYO-EU"), site("CH-STEIN"), QA, ADMIN]
    assert all(api.client_for(p).http is api.http for p in parties)
    assert api.client_for(OPS) is api.client and api.client_for(QA) is api.client_for(("qa", None))
    assert stats.calls["get order"] == 2 and not stats.errors
    await api.close()
    assert api.http.is_closed


async def test_without_credentials_no_token_is_sent() -> None:
    api, _, seen = make_api(answers(httpx.Response(200, json={})))
    await api.call("get order", get_order, party=centre("TC-DE-BE-001"))
    assert "authorization" not in seen[0].headers
    await api.close()


async def test_a_party_without_a_demo_client_or_a_token_is_an_error_not_a_request() -> None:
    api, stats, seen = make_party_api(answers(httpx.Response(200, json={})), FakeTokens(known={OPS}))
    with pytest.raises(OrderAbort, match="no credentials for carrier CRYO-XX"):
        await api.call("milestone", get_order, who="order #1", party=carrier("CRYO-XX"))
    assert stats.errors and stats.errors[0].startswith(
        "order #1 milestone: no credentials for carrier CRYO-XX"
    )
    api2, stats2, seen2 = make_party_api(answers(httpx.Response(200, json={})), FakeTokens(refuse=True))
    with pytest.raises(OrderAbort, match="no token for qa"):
        await api2.call("QC", get_order, party=QA)
    assert len(stats2.errors) == 1 and "no token for qa" in stats2.errors[0]
    assert not seen and not seen2 and not stats.calls and not stats2.calls
    await api.close()
    await api2.close()


async def test_one_idempotency_key_per_call_reused_on_its_retries() -> None:
    api, stats, seen = make_api(
        answers(
            httpx.Response(503, text="down"),
            httpx.Response(200, json={}),
            httpx.Response(200, json={}),
        )
    )
    await api.call("cancel", lambda c: c.cancel("o-1", "other"))  # a 503, then the retry
    await api.call("cancel", lambda c: c.cancel("o-1", "other"))  # another call
    await api.call("get order", get_order)
    keys = [r.headers.get("idempotency-key") for r in seen]
    assert keys[0] and keys[0] == keys[1]  # the retry carries the first try's key
    assert keys[2] and keys[2] != keys[0]  # the next call its own
    assert keys[3] is None  # a GET none
    assert stats.errors == [" cancel: POST /v1/orders/o-1/cancel -> 503 down"]
    await api.close()


async def test_a_rate_limit_is_waited_out_and_is_no_error() -> None:
    limited = httpx.Response(429, headers={"Retry-After": "0"}, json={"type": "x/rate-limited"})
    api, stats, seen = make_party_api(answers(limited, limited, httpx.Response(200, json={})), FakeTokens())
    resp = await api.call("list orders", lambda c: c.list_orders(limit=1))
    assert resp.status == 200 and len(seen) == 3
    assert stats.throttled == {"ops": 2} and not stats.errors
    assert stats.statuses == {429: 2, 200: 1} and stats.calls == {"list orders": 3}
    await api.close()


async def test_a_key_still_in_flight_is_retried_and_another_conflict_is_an_error() -> None:
    in_flight = httpx.Response(
        409,
        headers={"content-type": "application/problem+json"},
        json={"type": "https://vein2vein.dev/problems/idempotency-key-in-flight", "detail": "running"},
    )
    api, stats, seen = make_api(answers(in_flight, httpx.Response(200, json={})))
    resp = await api.call("cancel", lambda c: c.cancel("o-1", "other"), ok=(200,))
    assert resp.status == 200 and len(seen) == 2 and not stats.errors
    assert seen[0].headers["idempotency-key"] == seen[1].headers["idempotency-key"]
    await api.close()
    conflict = httpx.Response(409, json={"type": "https://vein2vein.dev/problems/not-now", "detail": "no"})
    api, stats, seen = make_api(answers(conflict))
    with pytest.raises(OrderAbort, match="HTTP 409"):
        await api.call("cancel", lambda c: c.cancel("o-1", "other"), ok=(200,))
    assert len(seen) == 1 and stats.errors == [" cancel: POST /v1/orders/o-1/cancel -> 409 no"]
    await api.close()


# ---- the shared client itself ------------------------------------------------------------------------------


def client_for(handler: Handler, **kw: Any) -> V2VClient:
    return V2VClient(DEFAULT_URLS, transport=httpx.MockTransport(handler), **kw)


async def test_headers_come_from_the_provider_per_service_and_per_call() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"order_id": "o-1"})

    async def bearer(service: str) -> dict[str, str]:
        return {"Authorization": f"Bearer token-for-{service}"}

    async with client_for(handler, header_provider=bearer) as api:
        await api.place_order({"patient_ref": "P"}, idempotency_key="k-1")
        await api.sites(headers={"X-Trace": "t"})
    assert seen[0].headers["authorization"] == "Bearer token-for-order"
    assert seen[0].headers["idempotency-key"] == "k-1"
    assert seen[1].headers["authorization"] == "Bearer token-for-site" and seen[1].headers["x-trace"] == "t"
    assert "idempotency-key" not in seen[1].headers

    with_sync = client_for(handler, header_provider=lambda service: {"X-Service": service})
    await with_sync.shipments(order_id="o-1")
    assert seen[2].headers["x-service"] == "logistics"
    await with_sync.aclose()


async def test_typed_methods_send_the_documented_paths_and_bodies() -> None:
    seen: list[tuple[str, str, str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.host + ":" + str(request.url.port), request.url.path, body))
        return httpx.Response(200, json={})

    at = datetime(2026, 3, 2, 9, tzinfo=UTC)
    async with client_for(handler) as api:
        await api.reschedule("o", date(2026, 3, 20), "patient_unwell")
        await api.reschedule("o", date(2026, 3, 21), "other", "fever on the day")
        await api.cancel("o", "consent_withdrawn")
        await api.site_receipt(
            "S", "o", "C", False, reason="damaged_container", reference="DEV-0042", received_at=at
        )
        await api.site_receipt("S", "o", "C")
        await api.manufacturing_step("S", "o", "harvest", completed_at="2026-03-03T00:00:00+00:00")
        await api.manufacturing_step(
            "S", "o", "expansion", failed=True, reason="insufficient_cell_growth", reference="DEV-7"
        )
        await api.qc("S", "o", "released")
        await api.qc("S", "o", "out_of_specification", reason="viability", reference="QC-1", decided_at=at)
        await api.milestone(
            "sh", "picked_up", occurred_at=at, location="L", handled_by="h", coi="C", received_from="S"
        )
        await api.temperature_reading("sh", 4.5, measured_at=at)
        await api.add_outage("S", date(2026, 4, 1), date(2026, 4, 2), "maintenance")
        await api.quarantine_decision("o", "release", "within_stability_data")
        await api.quarantine_decision("o", "reject", "other", "shipper lid found open")
        await api.subscribe("TC", "http://h/x", ["order.completed.v1"])
        await api.subscribe(None, "http://h/y")
    assert seen == [
        (
            "POST",
            "127.0.0.1:8001",
            "/v1/orders/o/apheresis-date",
            {"requested_apheresis_date": "2026-03-20", "reason_code": "patient_unwell"},
        ),
        (
            "POST",
            "127.0.0.1:8001",
            "/v1/orders/o/apheresis-date",
            {"requested_apheresis_date": "2026-03-21", "reason_code": "other", "note": "fever on the day"},
        ),
        ("POST", "127.0.0.1:8001", "/v1/orders/o/cancel", {"reason_code": "consent_withdrawn"}),
        (
            "POST",
            "127.0.0.1:8003",
            "/v1/sites/S/receipts",
            {
                "order_id": "o",
                "coi": "C",
                "accepted": False,
                "reason": "damaged_container",
                "received_at": at.isoformat(),
                "reference": "DEV-0042",
            },
        ),
        ("POST", "127.0.0.1:8003", "/v1/sites/S/receipts", {"order_id": "o", "coi": "C", "accepted": True}),
        (
            "POST",
            "127.0.0.1:8003",
            "/v1/sites/S/manufacturing/o/steps",
            {"step": "harvest", "completed_at": "2026-03-03T00:00:00+00:00"},
        ),
        (
            "POST",
            "127.0.0.1:8003",
            "/v1/sites/S/manufacturing/o/steps",
            {"step": "expansion", "failed": True, "reason": "insufficient_cell_growth", "reference": "DEV-7"},
        ),
        ("POST", "127.0.0.1:8003", "/v1/sites/S/manufacturing/o/qc", {"disposition": "released"}),
        (
            "POST",
            "127.0.0.1:8003",
            "/v1/sites/S/manufacturing/o/qc",
            {
                "disposition": "out_of_specification",
                "reason": "viability",
                "decided_at": at.isoformat(),
                "reference": "QC-1",
            },
        ),
        (
            "POST",
            "127.0.0.1:8004",
            "/v1/shipments/sh/milestones",
            {
                "milestone": "picked_up",
                "occurred_at": at.isoformat(),
                "location": "L",
                "handled_by": "h",
                "coi": "C",
                "received_from": "S",
            },
        ),
        (
            "POST",
            "127.0.0.1:8004",
            "/v1/shipments/sh/temperature",
            {"reading_c": 4.5, "measured_at": at.isoformat()},
        ),
        (
            "POST",
            "127.0.0.1:8003",
            "/v1/sites/S/outages",
            {"start_date": "2026-04-01", "end_date": "2026-04-02", "reason": "maintenance"},
        ),
        (
            "POST",
            "127.0.0.1:8001",
            "/v1/orders/o/quarantine-decision",
            {"decision": "release", "reason_code": "within_stability_data"},
        ),
        (
            "POST",
            "127.0.0.1:8001",
            "/v1/orders/o/quarantine-decision",
            {"decision": "reject", "reason_code": "other", "note": "shipper lid found open"},
        ),
        (
            "POST",
            "127.0.0.1:8005",
            "/v1/subscriptions",
            {"treatment_center_id": "TC", "url": "http://h/x", "event_types": ["order.completed.v1"]},
        ),
        ("POST", "127.0.0.1:8005", "/v1/subscriptions", {"url": "http://h/y"}),
    ]


async def test_query_parameters_leave_out_what_is_not_given() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=[])

    async with client_for(handler) as api:
        await api.list_orders(limit=200, offset=400)
        await api.slots(order_id="o", status=["held", "consumed"])
        await api.deliveries(channel="email")
        await api.shipments()
        await api.slots(limit=50, offset=100)
        await api.waitlist(limit=10, offset=20)
        await api.waitlist()
        await api.sites(limit=5, offset=5)
        await api.sites()
        await api.shipments(order_id="o", limit=7, offset=14)
        await api.custody("sh", limit=3, offset=6)
        await api.temperature_readings("sh", offset=9)
        await api.deliveries(treatment_center_id="TC", limit=1)
    assert [(r.url.path, str(r.url.query, "ascii")) for r in seen] == [
        ("/v1/orders", "limit=200&offset=400"),
        ("/v1/slots", "order_id=o&status=held&status=consumed"),
        ("/v1/deliveries", "channel=email"),
        ("/v1/shipments", ""),
        ("/v1/slots", "limit=50&offset=100"),
        ("/v1/waitlist", "limit=10&offset=20"),
        ("/v1/waitlist", ""),
        ("/v1/sites", "limit=5&offset=5"),
        ("/v1/sites", ""),
        ("/v1/shipments", "order_id=o&limit=7&offset=14"),
        ("/v1/shipments/sh/custody", "limit=3&offset=6"),
        ("/v1/shipments/sh/temperature", "offset=9"),
        ("/v1/deliveries", "treatment_center_id=TC&limit=1"),
    ]


async def test_a_bound_client_sends_one_idempotency_key_with_each_post_only() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    async with client_for(handler, header_provider=lambda s: {"Authorization": "Bearer t"}) as api:
        bound = api.with_idempotency_key("k-7")
        assert bound.http is api.http and bound.base_url("order") == api.base_url("order")
        await bound.cancel("o", "other")
        await bound.cancel("o", "other")
        await bound.get_order("o")
        await bound.place_order({"patient_ref": "P"})
        await bound.place_order({"patient_ref": "P"}, idempotency_key="k-own")
        await bound.post("order", "/v1/x", {}, headers={"Idempotency-Key": "k-header"})
        await api.cancel("o", "other")  # the unbound client: no key of its own
        await api.place_order({"patient_ref": "P"})
        await api.place_order({"patient_ref": "P"})
        await bound.aclose()  # does not close the pool it shares
        assert not api.http.is_closed
    keys = [r.headers.get("idempotency-key") for r in seen]
    assert keys[:6] == ["k-7", "k-7", None, "k-7", "k-own", "k-header"]
    assert keys[6] is None and keys[7] and keys[8] and keys[7] != keys[8]  # a fresh key per placement
    assert all(r.headers["authorization"] == "Bearer t" for r in seen)


async def test_expect_and_raise_for_status() -> None:
    async with client_for(lambda r: httpx.Response(409, json={"detail": "twice"})) as api:
        resp = await api.cancel("o", "again")
    assert not resp.ok and resp.detail == "twice"
    assert resp.expect(409) == {"detail": "twice"}
    with pytest.raises(ApiError, match=r"POST /v1/orders/o/cancel: 409 \(expected 200\)"):
        resp.expect(200)
    with pytest.raises(httpx.HTTPStatusError):
        resp.raise_for_status()


async def test_ready_is_false_when_the_service_does_not_answer() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.port == 8001:
            raise httpx.ConnectError("refused")
        return httpx.Response(200 if request.url.port == 8002 else 503)

    async with client_for(handler) as api:
        assert [await api.ready(s) for s in ("order", "scheduling", "site")] == [False, True, False]


async def test_an_httpx_client_given_is_used_and_left_open() -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, json=[1])))
    api = V2VClient(lambda service: f"http://{service}.test/", client=http)
    resp = await api.sites()
    assert resp.body == [1] and str(resp.raw.request.url) == "http://site.test/v1/sites"  # type: ignore[union-attr]
    await api.aclose()
    assert not http.is_closed
    await http.aclose()
