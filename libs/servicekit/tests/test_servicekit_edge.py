"""The edge middleware without a database: body limit (declared and streamed), per-client rate limit,
bearer tokens verified once, hostile or malformed input answered 4xx problem+json that echoes nothing,
capped pagination, and the Idempotency-Key checks that come before the store (missing, malformed, and
who is asked first: 401/403 before 400)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st

from v2v_servicekit import problems
from v2v_servicekit.auth import Principal, require_scope
from v2v_servicekit.edge import CachedVerifier, EdgeConfig, is_json, json_problem
from v2v_servicekit.idempotency import (
    KEY_PATTERN,
    InvalidKey,
    fingerprint,
    idempotent,
    is_stored_status,
    parse_key,
)
from v2v_servicekit.limits import TokenBuckets, retry_after_seconds
from v2v_servicekit.problems import PROBLEM_BASE, PROBLEM_JSON, problem_response
from v2v_servicekit.testing import TestTokens

KIB = 1024
MARKER = "CANARY7Q"  # must never come back in an error


def problem(resp: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM_JSON)
    body = dict(resp.json())
    assert body["status"] == status and body["title"] and "detail" in body
    if kind is not None:
        assert body["type"] == PROBLEM_BASE + kind, body
    return body


async def raw(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[int, dict[str, str], bytes, int]:
    """One request straight through ASGI, its body handed over chunk by chunk; returns the status,
    headers, body and how many chunks the app pulled."""
    pending = list(chunks)
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pending:
            pulled += 1
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    started: dict[str, Any] = {}
    body = bytearray()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started["status"] = message["status"]
            started["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("svc", 80),
    }
    await app(scope, receive, send)
    return started["status"], started["headers"], bytes(body), pulled


def order(**kw: Any) -> dict[str, Any]:
    return {"patient_ref": "P-1", **kw}


# ---- body limit --------------------------------------------------------------------------------------


async def test_a_declared_body_over_the_limit_is_413_before_anything_reads_it(edge_app, client_of) -> None:
    world = edge_app(EdgeConfig(max_body_bytes=64 * KIB))
    client = client_of(world)
    big = json.dumps(order(anything="x" * (64 * KIB))).encode()
    resp = await client.post(
        "/v1/echo", content=big, headers={**world.centre(), "content-type": "application/json"}
    )
    body = problem(resp, 413, "body-too-large")
    assert body["max_bytes"] == 64 * KIB
    assert resp.headers["connection"] == "close"
    assert world.calls == []


async def test_a_body_of_exactly_the_limit_passes(edge_app, client_of) -> None:
    world = edge_app(EdgeConfig(max_body_bytes=64 * KIB))
    client = client_of(world)
    payload = order(anything="")
    pad = 64 * KIB - len(json.dumps(payload).encode())
    content = json.dumps(order(anything="x" * pad)).encode()
    assert len(content) == 64 * KIB
    resp = await client.post(
        "/v1/echo", content=content, headers={**world.centre(), "content-type": "application/json"}
    )
    assert resp.status_code == 200, resp.text
    assert world.calls == ["echo"]


async def test_a_chunked_body_is_counted_and_refused_without_reading_on(edge_app) -> None:
    world = edge_app(EdgeConfig(max_body_bytes=64 * KIB))
    auth = world.centre()["Authorization"].encode()
    headers = [
        (b"authorization", auth),
        (b"content-type", b"application/json"),
        (b"transfer-encoding", b"chunked"),
    ]
    chunks = [b'{"patient_ref": "P-1", "anything": "'] + [b"x" * KIB] * 200 + [b'"}']
    status, resp_headers, body, pulled = await raw(world.app, "POST", "/v1/echo", headers, chunks)
    assert status == 413
    assert resp_headers["content-type"].startswith(PROBLEM_JSON)
    assert json.loads(body)["type"] == PROBLEM_BASE + "body-too-large"
    assert pulled <= 66  # stopped just past 64 KiB: 200 more chunks were never read
    assert world.calls == []


async def test_a_chunked_body_under_the_limit_reaches_the_route(edge_app, client_of) -> None:
    world = edge_app()
    client = client_of(world)

    async def chunks() -> Any:
        yield b'{"patient_ref": "P-1", '
        yield b'"anything": "' + b"y" * (10 * KIB) + b'"}'

    resp = await client.post(
        "/v1/echo", content=chunks(), headers={**world.centre(), "content-type": "application/json"}
    )
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["anything"]) == 10 * KIB


@pytest.mark.parametrize("declared", [b"abc", b"-1", b"12, 13"])
async def test_a_malformed_content_length_is_400(edge_app, declared: bytes) -> None:
    world = edge_app()
    status, _headers, body, _ = await raw(
        world.app, "POST", "/v1/echo", [(b"content-length", declared)], [b"{}"]
    )
    assert status == 400 and json.loads(body)["type"] == PROBLEM_BASE + "bad-content-length"
    assert world.calls == []


# ---- rate limit -------------------------------------------------------------------------------------------


async def test_a_client_over_its_rate_gets_429_with_retry_after(edge_app, client_of) -> None:
    world = edge_app(EdgeConfig(rate_limit_per_s=0.5, rate_limit_burst=3))
    client = client_of(world)
    centre = world.centre("TC-1")
    for _ in range(3):
        assert (await client.get("/v1/orders", headers=centre)).status_code == 200
    resp = await client.get("/v1/orders", headers=centre)
    body = problem(resp, 429, "rate-limited")
    assert resp.headers["retry-after"] == "2"  # one token per 2 s
    assert MARKER not in body["detail"]
    # another client has its own bucket; a caller without a token is not limited here (it gets its 401)
    assert (await client.get("/v1/orders", headers=world.centre("TC-2"))).status_code == 200
    for _ in range(5):
        assert (await client.get("/v1/orders")).status_code == 401


async def test_the_rate_limit_can_be_turned_off(edge_app, client_of) -> None:
    world = edge_app(EdgeConfig(rate_limit_per_s=0, rate_limit_burst=1))
    client = client_of(world)
    centre = world.centre()
    for _ in range(30):
        assert (await client.get("/v1/orders", headers=centre)).status_code == 200


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate=10, burst=5, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(5)] == [0.0] * 5
    wait = buckets.take("a")
    assert wait == pytest.approx(0.1)
    assert retry_after_seconds(wait) == 1
    now[0] += 0.25  # 2.5 tokens back
    assert buckets.take("a") == 0.0 and buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.05)
    now[0] += 3600  # idle: full again, never more than the burst
    assert [buckets.take("a") for _ in range(5)] == [0.0] * 5
    assert buckets.take("a") > 0


def test_token_buckets_stay_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=1, burst=1, max_clients=10, clock=lambda: now[0])
    for i in range(100):
        buckets.take(f"c{i}")
        now[0] += 0.01
    assert len(buckets._buckets) <= 10


# ---- bearer tokens are verified once -------------------------------------------------------------------


class CountingVerifier:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    async def verify(self, token: str) -> Principal:
        self.calls += 1
        return await self.inner.verify(token)  # type: ignore[no-any-return]


async def test_a_token_is_verified_once_for_the_middleware_and_the_route(edge_app, client_of) -> None:
    world = edge_app()
    counting = CountingVerifier(world.app.state.token_verifier)
    world.app.state.token_verifier = counting
    client = client_of(world)
    centre = world.centre()
    for _ in range(3):
        assert (await client.get("/v1/orders", headers=centre)).status_code == 200
    assert counting.calls == 1
    assert isinstance(world.app.state.token_verifier, CachedVerifier)
    assert (await client.get("/v1/orders", headers=world.centre())).status_code == 200  # a new token
    assert counting.calls == 2
    bad = {"Authorization": "Bearer not.a.token"}
    assert (await client.get("/v1/orders", headers=bad)).status_code == 401
    assert (await client.get("/v1/orders", headers=bad)).status_code == 401
    assert counting.calls > 2  # failures are not remembered


async def test_a_cached_token_is_forgotten_when_it_expires() -> None:
    tokens = TestTokens()
    counting = CountingVerifier(tokens.verifier())
    cached = CachedVerifier(counting)
    token = tokens.token("centre", "TC-1", ttl_s=300)
    first = await cached.verify(token)
    assert (await cached.verify(token)) == first and counting.calls == 1
    digest = next(iter(cached._cache))
    cached._cache[digest] = (first, 0.0)  # as if its exp had passed
    await cached.verify(token)
    assert counting.calls == 2


# ---- malformed and hostile input: 4xx problem+json, nothing echoed ------------------------------------

JSON = "application/json"
MALFORMED: dict[str, tuple[bytes, str | None, int]] = {
    "not JSON": (f"{MARKER} hello".encode(), JSON, 422),
    "truncated JSON": (b'{"patient_ref": "' + MARKER.encode(), JSON, 422),
    "invalid UTF-8": (b'{"patient_ref": "' + MARKER.encode() + b'\xff\xfe"}', JSON, 400),
    "UTF-8-encoded surrogate": (b'{"patient_ref": "' + MARKER.encode() + b'\xed\xa0\x80"}', JSON, 422),
    "lone surrogate": (b'{"patient_ref": "' + MARKER.encode() + b'\\ud800"}', JSON, 422),
    "lone low surrogate": (
        b'{"patient_ref": "P", "anything": ["\\udc00' + MARKER.encode() + b'"]}',
        JSON,
        422,
    ),
    "surrogate in a key": (
        b'{"patient_ref": "P", "notes": {"\\udbff' + MARKER.encode() + b'": 1}}',
        JSON,
        422,
    ),
    "NUL in a string": (b'{"patient_ref": "' + MARKER.encode() + b'\\u0000"}', JSON, 422),
    "NaN": (b'{"patient_ref": "' + MARKER.encode() + b'", "amount": NaN}', JSON, 422),
    "Infinity": (b'{"patient_ref": "P", "amount": -Infinity}', JSON, 422),
    "overflowing float": (b'{"patient_ref": "P", "amount": 1e999}', JSON, 422),
    "huge integer": (b'{"patient_ref": "P", "anything": ' + b"9" * 5000 + b"}", JSON, 400),
    "nested too deep": (b'{"patient_ref": "P", "anything": ' + b"[" * 40 + b"]" * 40 + b"}", JSON, 422),
    "nested beyond recursion": (
        b'{"patient_ref": "P", "anything": ' + b"[" * 20000 + b"]" * 20000 + b"}",
        JSON,
        400,
    ),
    "unknown field not like a name": (b'{"patient_ref": "P", "' + MARKER.encode() + b'@x": "x"}', JSON, 422),
    "unknown field with spaces": (b'{"patient_ref": "P", "' + MARKER.encode() + b' Doe": 1}', JSON, 422),
    "odd dict key": (b'{"patient_ref": "P", "notes": {"' + MARKER.encode() + b' x": "y"}}', JSON, 422),
    "too long": (json.dumps({"patient_ref": MARKER * 20}).encode(), JSON, 422),
    "null": (b"null", JSON, 422),
    "array": (b"[]", JSON, 422),
    "string": (b'"' + MARKER.encode() + b'"', JSON, 422),
    "empty": (b"", JSON, 422),
    "text/plain": (json.dumps(order()).encode(), "text/plain", 422),
    "form": (b"patient_ref=" + MARKER.encode(), "application/x-www-form-urlencoded", 422),
    "no content type": (json.dumps(order()).encode(), None, 422),
    "multipart without boundary": (b"--x\r\n", "multipart/form-data", 422),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_bodies_are_4xx_problems_that_echo_nothing(edge_app, client_of, case: str) -> None:
    content, content_type, status = MALFORMED[case]
    world = edge_app()
    client = client_of(world, raise_app_exceptions=False)
    headers = world.centre()
    if content_type is not None:
        headers["content-type"] = content_type
    resp = await client.post("/v1/echo", content=content, headers=headers)
    problem(resp, status)
    assert MARKER not in resp.text
    assert MARKER.lower() not in resp.text.lower()
    assert world.calls == []


async def test_an_unknown_field_is_named_when_it_looks_like_a_field_name(edge_app, client_of) -> None:
    world = edge_app()
    client = client_of(world)
    resp = await client.post(
        "/v1/echo", json={"patient_ref": "P", "patient_name": "Jane Doe"}, headers=world.centre()
    )
    body = problem(resp, 422, "validation")
    assert [e["field"] for e in body["errors"]] == ["patient_name"]
    assert "Jane" not in resp.text
    resp = await client.post(
        "/v1/echo", json={"patient_ref": "P", "notes": {"Jane Doe": "x"}}, headers=world.centre()
    )
    assert [e["field"] for e in problem(resp, 422)["errors"]] == ["notes.*"]
    assert "Jane" not in resp.text


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=99999999999999999999999",
        "offset=-1",
        "offset=10001",
        "limit=%ff",
        "limit=1e3",
    ],
)
async def test_pagination_is_capped(edge_app, client_of, query: str) -> None:
    world = edge_app()
    client = client_of(world)
    body = problem(await client.get("/v1/orders?" + query, headers=world.centre()), 422, "validation")
    assert {e["field"] for e in body["errors"]} <= {"limit", "offset"}
    ok = await client.get("/v1/orders?limit=200&offset=10000", headers=world.centre())
    assert ok.json() == {"limit": 200, "offset": 10000}


@pytest.mark.parametrize(
    "target",
    [
        f"/v1/things/{MARKER}",
        f"/v1/things/{MARKER}%ED%A0%80",
        "/v1/orders?limit=" + MARKER,
        f"/v1/things/{MARKER}%00",
        f"/v1/orders?limit=1&x={MARKER}%00",
    ],
)
async def test_malformed_urls_are_4xx_problems_that_echo_nothing_in_their_errors(
    edge_app, client_of, target: str
) -> None:
    world = edge_app()
    client = client_of(world)
    resp = await client.get(target, headers=world.centre())
    assert resp.status_code in {400, 422}, resp.text
    body = problem(resp, resp.status_code)
    assert MARKER not in body["detail"] and MARKER not in json.dumps(body.get("errors", []))
    if "%00" in target:
        assert body["type"] == PROBLEM_BASE + "bad-request"


def test_json_guard() -> None:
    assert json_problem(b'{"a": [1, 2.5, "\\ud83d\\ude00", {"b": null}]}', 32) is None  # a valid pair is fine
    assert json_problem(b"not json", 32) is None  # left to the app
    assert json_problem(b'{"a": "\\ud83d"}', 32)
    assert json_problem(b"[" * 33 + b"]" * 33, 32)
    assert json_problem(b"[" * 32 + b"]" * 32, 32) is None
    assert is_json("application/json; charset=utf-8") and is_json("application/merge-patch+json")
    assert not is_json("text/json") and not is_json("application/jsonx")


def test_a_problem_cannot_fail_to_render() -> None:
    resp = problem_response("/x", 422, "validation", "Invalid", "bad \ud800 text")
    assert b"\\ud800" in resp.body


# ---- Idempotency-Key: the checks before the store ---------------------------------------------------


async def test_a_missing_key_on_a_route_that_requires_it_is_400_naming_the_header(
    edge_app, client_of
) -> None:
    world = edge_app()
    client = client_of(world)
    resp = await client.post("/v1/orders", json=order(), headers=world.centre())
    body = problem(resp, 400, "idempotency-key-missing")
    assert "Idempotency-Key" in body["detail"]
    assert body["errors"] == [{"field": "Idempotency-Key", "reason": "is required"}]
    assert world.calls == []


async def test_authentication_and_scope_are_answered_before_the_key(edge_app, client_of) -> None:
    world = edge_app()
    client = client_of(world)
    problem(await client.post("/v1/orders", json=order()), 401)
    no_scope = world.centre(scopes=["orders:read"])
    problem(await client.post("/v1/orders", json=order(), headers=no_scope), 403)
    assert world.calls == []


@pytest.mark.parametrize("key", ["", " ", "x" * 256, "ключ", "a\tb", '"unterminated', '"bad\\escape"'])
async def test_a_malformed_key_is_400(edge_app, client_of, key: str) -> None:
    world = edge_app()
    client = client_of(world)
    headers = [*world.centre().items(), ("Idempotency-Key", key.encode("utf-8"))]
    resp = await client.post("/v1/orders", json=order(), headers=headers)
    assert resp.status_code == 400, resp.text
    assert resp.json()["type"] in {
        PROBLEM_BASE + "idempotency-key-invalid",
        PROBLEM_BASE + "idempotency-key-missing",
    }
    assert world.calls == []


async def test_two_keys_in_one_request_are_400(edge_app, client_of) -> None:
    world = edge_app()
    client = client_of(world)
    headers = [*world.centre().items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    problem(await client.post("/v1/orders", json=order(), headers=headers), 400, "idempotency-key-invalid")


async def test_a_key_without_a_store_is_503_not_ignored(edge_app, client_of) -> None:
    world = edge_app(pool=None)
    client = client_of(world)
    headers = {**world.centre(), "Idempotency-Key": "k-1"}
    problem(await client.post("/v1/orders", json=order(), headers=headers), 503, "unavailable")
    assert world.calls == []


async def test_without_the_middleware_a_missing_required_key_is_the_same_400() -> None:
    app = FastAPI()
    problems.install(app)
    tokens = TestTokens.install(app)

    @app.post("/v1/orders", dependencies=[idempotent(required=True)])
    async def create(principal: Principal = require_scope("orders:write")) -> dict[str, str]:
        return {"ok": "yes"}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
        centre = tokens.headers("centre", "TC-1")
        problem(await client.post("/v1/orders", headers=centre), 400, "idempotency-key-missing")
        bad = {**centre, "Idempotency-Key": "x" * 256}
        problem(await client.post("/v1/orders", headers=bad), 400, "idempotency-key-invalid")
        quoted = {**centre, "Idempotency-Key": '"a \\"quoted\\" key"'}
        assert (await client.post("/v1/orders", headers=quoted)).status_code == 200


def test_the_declaration_is_documented_in_openapi(edge_app) -> None:
    spec = edge_app().app.openapi()

    def header(path: str, method: str) -> dict[str, Any]:
        params = spec["paths"][path][method]["parameters"]
        return next(p for p in params if p["name"] == "Idempotency-Key")

    assert header("/v1/orders", "post")["required"] is True
    assert header("/v1/orders", "post")["in"] == "header"
    assert header("/v1/sites/{site_id}", "patch").get("required", False) is False


def test_keys_and_fingerprints() -> None:
    assert parse_key("abc-123") == "abc-123"
    assert parse_key('"8e03978e-40d5-43e8-bc93-6894a57f9324"') == "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert parse_key('"a\\"b\\\\c"') == 'a"b\\c'
    assert parse_key("x" * 255) == "x" * 255
    assert parse_key("with space") == "with space"
    for bad in ["", "x" * 256, '""', "é", "a\x7fb", '"a"b"']:
        with pytest.raises(InvalidKey):
            parse_key(bad)
    a = fingerprint("post", "/v1/orders", "", b'{"a":1}')
    assert a == fingerprint("POST", "/v1/orders", "", b'{"a":1}')
    assert a != fingerprint("POST", "/v1/orders", "", b'{"a":2}')
    assert a != fingerprint("POST", "/v1/orderz", "", b'{"a":1}')
    assert a != fingerprint("PATCH", "/v1/orders", "", b'{"a":1}')
    assert a != fingerprint("POST", "/v1/orders", "x=1", b'{"a":1}')
    assert MARKER not in fingerprint("POST", "/v1/orders", "", MARKER.encode())  # a hash, not the body


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(' !"#AZaz09~\\\t\x7fé')), max_size=8) | st.text(max_size=300))
def test_the_documented_key_pattern_is_what_the_parser_accepts(raw: str) -> None:
    try:
        parse_key(raw)
        accepted = True
    except InvalidKey:
        accepted = False
    assert accepted == bool(re.fullmatch(KEY_PATTERN, raw))


def test_the_edge_reads_its_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from v2v_servicekit.settings import ServiceSettings

    defaults = EdgeConfig.from_settings(ServiceSettings())
    assert defaults == EdgeConfig()
    assert (defaults.max_body_bytes, defaults.rate_limit_per_s, defaults.rate_limit_burst) == (
        65_536,
        50.0,
        100,
    )
    assert defaults.idempotency_ttl_s == 86_400 and defaults.idempotency_lease_s == 60
    monkeypatch.setenv("V2V_MAX_BODY_BYTES", "1024")
    monkeypatch.setenv("V2V_RATE_LIMIT_PER_S", "0")
    monkeypatch.setenv("V2V_IDEMPOTENCY_LEASE_S", "5")
    config = EdgeConfig.from_settings(ServiceSettings())
    assert (config.max_body_bytes, config.rate_limit_per_s, config.idempotency_lease_s) == (1024, 0.0, 5.0)


def test_which_responses_a_key_keeps() -> None:
    assert all(is_stored_status(s) for s in (200, 201, 202, 204, 400, 404, 409, 410, 422))
    assert not any(is_stored_status(s) for s in (401, 403, 429, 500, 502, 503, 504))
