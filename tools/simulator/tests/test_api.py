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
from v2v_simulator.api import Api, OrderAbort
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
        await api.reschedule("o", date(2026, 3, 20), "ill")
        await api.site_receipt("S", "o", "C", False, reason="bag", received_at=at)
        await api.manufacturing_step("S", "o", "harvest", completed_at="2026-03-03T00:00:00+00:00")
        await api.qc("S", "o", "released")
        await api.milestone(
            "sh", "picked_up", occurred_at=at, location="L", handled_by="h", coi="C", received_from="S"
        )
        await api.temperature_reading("sh", 4.5, measured_at=at)
        await api.add_outage("S", date(2026, 4, 1), date(2026, 4, 2), "requalification")
        await api.quarantine_decision("o", "release", "ok")
        await api.subscribe("TC", "http://h/x", "whsec_x", ["order.completed.v1"])
    assert seen == [
        (
            "POST",
            "127.0.0.1:8001",
            "/v1/orders/o/apheresis-date",
            {"requested_apheresis_date": "2026-03-20", "reason": "ill"},
        ),
        (
            "POST",
            "127.0.0.1:8003",
            "/v1/sites/S/receipts",
            {"order_id": "o", "coi": "C", "accepted": False, "reason": "bag", "received_at": at.isoformat()},
        ),
        (
            "POST",
            "127.0.0.1:8003",
            "/v1/sites/S/manufacturing/o/steps",
            {"step": "harvest", "completed_at": "2026-03-03T00:00:00+00:00"},
        ),
        ("POST", "127.0.0.1:8003", "/v1/sites/S/manufacturing/o/qc", {"disposition": "released"}),
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
            {"start_date": "2026-04-01", "end_date": "2026-04-02", "reason": "requalification"},
        ),
        (
            "POST",
            "127.0.0.1:8001",
            "/v1/orders/o/quarantine-decision",
            {"decision": "release", "reason": "ok"},
        ),
        (
            "POST",
            "127.0.0.1:8005",
            "/v1/subscriptions",
            {
                "treatment_center_id": "TC",
                "url": "http://h/x",
                "secret": "whsec_x",
                "event_types": ["order.completed.v1"],
            },
        ),
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
    assert [str(r.url.query, "ascii") for r in seen] == [
        "limit=200&offset=400",
        "order_id=o&status=held&status=consumed",
        "channel=email",
        "",
    ]


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
