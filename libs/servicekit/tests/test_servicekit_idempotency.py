"""Idempotency-Key against a real Postgres (a service schema migrated like `create_app` does it): replay
with the stored status, body and Location; another body under the same key 422; a concurrent retry 409;
a missing key 400; what is not kept (5xx, 401/403, responses too large); expiry and purge; a dead
owner's claim taken over after its lease, and a live owner's kept by renewing it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest

from v2v_messaging import MIGRATIONS_DIR as MESSAGING_MIGRATIONS_DIR
from v2v_persistence import apply_migrations, create_pool
from v2v_servicekit.edge import EdgeConfig
from v2v_servicekit.idempotency import MIGRATIONS_DIR, IdempotencyStore, fingerprint
from v2v_servicekit.problems import PROBLEM_BASE, PROBLEM_JSON

if TYPE_CHECKING:
    from v2v_harness.pytest_plugin import TestDatabase

pytestmark = pytest.mark.integration

SERVICE, SCHEMA = "order", "ordering"
CLIENT = "centre-tc-1"  # TestTokens' client id for ("centre", "TC-1")


@pytest.fixture
async def pool(test_db: TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    url = test_db.urls[SERVICE]
    owner_url = test_db.owner_urls[SERVICE]  # migrations run as the owner
    applied = await apply_migrations(owner_url, SCHEMA, [MESSAGING_MIGRATIONS_DIR, MIGRATIONS_DIR])
    assert "0000.servicekit-idempotency-keys" in applied
    pool = await create_pool(url, max_size=8)
    try:
        yield pool
    finally:
        await pool.close()


def keyed(world: Any, key: str, **kw: Any) -> dict[str, str]:
    return {**world.centre(**kw), "Idempotency-Key": key}


def order(**kw: Any) -> dict[str, Any]:
    return {"patient_ref": "P-1", **kw}


async def rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT * FROM idempotency_keys ORDER BY created_at"))


def is_problem(resp: httpx.Response, status: int, kind: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM_JSON)
    assert resp.json()["type"] == PROBLEM_BASE + kind


async def test_a_retry_gets_the_stored_response_and_runs_nothing(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    first = await client.post("/v1/orders", json=order(), headers=keyed(world, "k-1"))
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    again = await client.post("/v1/orders", json=order(), headers=keyed(world, "k-1"))  # a new token too
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content and again.json() == {"order": 1, "centre": "TC-1"}
    assert again.headers["location"] == first.headers["location"] == "/v1/orders/1"
    assert again.headers["content-type"] == first.headers["content-type"]
    assert "x-not-kept" not in again.headers  # only the headers worth keeping are stored
    assert world.calls == ["create:1"]
    [row] = await rows(pool)
    assert (row["client_id"], row["idempotency_key"], row["state"], row["status_code"]) == (
        CLIENT,
        "k-1",
        "done",
        201,
    )
    assert row["fingerprint"].startswith("POST /v1/orders sha256:")
    lifetime = row["expires_at"] - row["created_at"]
    assert lifetime.total_seconds() == pytest.approx(86_400, abs=1)


async def test_a_quoted_key_is_the_same_key(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    assert (await client.post("/v1/orders", json=order(), headers=keyed(world, "abc"))).status_code == 201
    again = await client.post("/v1/orders", json=order(), headers=keyed(world, '"abc"'))
    assert again.headers["idempotent-replayed"] == "true"
    assert world.calls == ["create:1"]


async def test_keys_are_scoped_to_the_client(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    mine = await client.post("/v1/orders", json=order(), headers=keyed(world, "shared"))
    theirs = await client.post(
        "/v1/orders", json=order(), headers={**world.centre("TC-2"), "Idempotency-Key": "shared"}
    )
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert "idempotent-replayed" not in theirs.headers
    assert theirs.json() == {"order": 2, "centre": "TC-2"}
    assert {r["client_id"] for r in await rows(pool)} == {CLIENT, "centre-tc-2"}


async def test_the_same_key_with_another_body_or_path_is_422(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    assert (await client.post("/v1/orders", json=order(), headers=keyed(world, "k-2"))).status_code == 201
    is_problem(
        await client.post("/v1/orders", json=order(patient_ref="P-2"), headers=keyed(world, "k-2")),
        422,
        "idempotency-key-reused",
    )
    is_problem(
        await client.post("/v1/orders/1/cancel", headers=keyed(world, "k-2")), 422, "idempotency-key-reused"
    )
    assert world.calls == ["create:1"]
    [row] = await rows(pool)
    assert row["status_code"] == 201  # the first request's record is untouched


async def test_a_concurrent_retry_is_409_while_the_first_runs(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    slow = order(behaviour="slow")
    first = asyncio.create_task(client.post("/v1/orders", json=slow, headers=keyed(world, "k-3")))
    await asyncio.wait_for(world.entered.wait(), 10)
    racing = await client.post("/v1/orders", json=slow, headers=keyed(world, "k-3"))
    is_problem(racing, 409, "idempotency-key-in-flight")
    assert racing.headers["retry-after"] == "1"
    [row] = await rows(pool)
    assert row["state"] == "in_flight"
    world.release.set()
    done = await asyncio.wait_for(first, 10)
    assert done.status_code == 201
    replay = await client.post("/v1/orders", json=slow, headers=keyed(world, "k-3"))
    assert replay.headers["idempotent-replayed"] == "true" and replay.content == done.content
    assert world.calls == ["create:1"]


async def test_two_identical_requests_racing_run_once(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    results = await asyncio.gather(
        *[client.post("/v1/orders", json=order(), headers=keyed(world, "k-race")) for _ in range(8)]
    )
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {201, 409} and 201 in statuses
    assert world.calls == ["create:1"]


async def test_a_missing_key_on_a_required_route_is_400_and_keeps_nothing(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    resp = await client.post("/v1/orders", json=order(), headers=world.centre())
    is_problem(resp, 400, "idempotency-key-missing")
    assert "Idempotency-Key" in resp.json()["detail"]
    assert world.calls == [] and await rows(pool) == []


async def test_an_optional_post_runs_each_time_without_a_key_and_once_with_one(
    edge_app, client_of, pool
) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    for _ in range(2):
        assert (await client.post("/v1/orders/7/cancel", headers=world.centre())).status_code == 200
    assert world.calls == ["cancel:7", "cancel:7"]
    for _ in range(2):
        assert (await client.post("/v1/orders/7/cancel", headers=keyed(world, "c-1"))).status_code == 200
    assert world.calls == ["cancel:7"] * 3


async def test_patch_only_where_the_route_opts_in(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    a = await client.patch("/v1/sites/S1", json={"capacity": 3}, headers=keyed(world, "p-1"))
    b = await client.patch("/v1/sites/S1", json={"capacity": 3}, headers=keyed(world, "p-1"))
    assert b.headers["idempotent-replayed"] == "true" and a.json() == b.json()
    for _ in range(2):
        resp = await client.patch("/v1/plain/x", headers=keyed(world, "p-2"))
        assert "idempotent-replayed" not in resp.headers
    assert world.calls == ["patch:S1", "plain:x", "plain:x"]


async def test_a_4xx_answer_is_kept_and_replayed(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    first = await client.post("/v1/orders", json=order(behaviour="conflict"), headers=keyed(world, "k-4"))
    is_problem(first, 409, "open-order-exists")
    again = await client.post("/v1/orders", json=order(behaviour="conflict"), headers=keyed(world, "k-4"))
    assert again.status_code == 409 and again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content and again.headers["content-type"].startswith(PROBLEM_JSON)
    assert len(world.calls) == 1


@pytest.mark.parametrize("behaviour", ["unavailable", "crash"])
async def test_a_server_error_releases_the_key(edge_app, client_of, pool, behaviour: str) -> None:
    world = edge_app(pool=pool)
    client = client_of(world, raise_app_exceptions=False)
    first = await client.post("/v1/orders", json=order(behaviour=behaviour), headers=keyed(world, "k-5"))
    assert first.status_code in {500, 503}
    assert await rows(pool) == []
    again = await client.post("/v1/orders", json=order(behaviour=behaviour), headers=keyed(world, "k-5"))
    assert "idempotent-replayed" not in again.headers
    assert len(world.calls) == 2


async def test_401_and_403_keep_nothing(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    r1 = await client.post("/v1/orders", json=order(), headers={"Idempotency-Key": "k-6"})
    r2 = await client.post("/v1/orders", json=order(), headers=keyed(world, "k-6", scopes=["orders:read"]))
    assert (r1.status_code, r2.status_code) == (401, 403)
    assert await rows(pool) == [] and world.calls == []
    assert (await client.post("/v1/orders", json=order(), headers=keyed(world, "k-6"))).status_code == 201


async def test_a_response_too_large_to_keep_releases_the_key(edge_app, client_of, pool) -> None:
    world = edge_app(EdgeConfig(idempotency_max_response_bytes=1024), pool=pool)
    client = client_of(world)
    for _ in range(2):
        resp = await client.post("/v1/orders", json=order(behaviour="huge"), headers=keyed(world, "k-7"))
        assert resp.status_code == 201 and len(resp.json()["padding"]) == 4096
    assert len(world.calls) == 2
    assert await rows(pool) == []


async def test_an_expired_key_is_free_again_and_purged(edge_app, client_of, pool) -> None:
    world = edge_app(EdgeConfig(idempotency_purge_interval_s=0), pool=pool)
    client = client_of(world)
    assert (await client.post("/v1/orders", json=order(), headers=keyed(world, "k-8"))).status_code == 201
    assert (await client.post("/v1/orders", json=order(), headers=keyed(world, "old"))).status_code == 201
    await pool.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'")
    # 24 h later the key means nothing: another body is a new request, not a reuse
    resp = await client.post("/v1/orders", json=order(patient_ref="P-9"), headers=keyed(world, "k-8"))
    assert resp.status_code == 201 and "idempotent-replayed" not in resp.headers
    assert resp.json()["order"] == 3
    await asyncio.sleep(0.2)  # the purge the middleware started after that request
    left = {r["idempotency_key"]: r for r in await rows(pool)}
    assert set(left) == {"k-8"} and left["k-8"]["state"] == "done"


async def test_the_store_purges_only_expired_keys(pool) -> None:
    store = IdempotencyStore(pool, ttl_s=3600)
    for key in ("a", "b", "c"):
        claim = await store.claim(CLIENT, key, fingerprint("POST", "/x", "", key.encode()))
        assert claim.outcome == "owned"
    await pool.execute(
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 hour' WHERE idempotency_key <> 'c'"
    )
    assert await store.purge(batch=1) == 1
    assert await store.purge() == 1
    assert await store.purge() == 0
    assert [r["idempotency_key"] for r in await rows(pool)] == ["c"]


async def test_a_dead_owners_claim_is_taken_over_after_its_lease(edge_app, client_of, pool) -> None:
    world = edge_app(pool=pool)
    client = client_of(world)
    body = b'{"patient_ref":"P-1"}'
    print_ = fingerprint("POST", "/v1/orders", "", body)
    dead = uuid.uuid4()
    insert = """INSERT INTO idempotency_keys (client_id, idempotency_key, fingerprint, state, owner,
                    lease_until, expires_at)
                VALUES ($1, $2, $3, 'in_flight', $4, now() + make_interval(secs => $5),
                        now() + interval '1 day')"""
    await pool.execute(insert, CLIENT, "live", print_, dead, 30.0)
    await pool.execute(insert, CLIENT, "dead", print_, dead, -1.0)
    headers = {"content-type": "application/json"}
    live = await client.post("/v1/orders", content=body, headers={**headers, **keyed(world, "live")})
    is_problem(live, 409, "idempotency-key-in-flight")
    taken = await client.post("/v1/orders", content=body, headers={**headers, **keyed(world, "dead")})
    assert taken.status_code == 201 and "idempotent-replayed" not in taken.headers
    # a dead claim is taken over only by the same request: another body under its key is still a reuse
    other = await client.post("/v1/orders", json=order(patient_ref="P-2"), headers=keyed(world, "live"))
    is_problem(other, 422, "idempotency-key-reused")
    row = await pool.fetchrow("SELECT * FROM idempotency_keys WHERE idempotency_key = 'dead'")
    assert row["state"] == "done" and row["owner"] != dead
    assert world.calls == ["create:1"]


async def test_a_live_owner_renews_its_lease(edge_app, client_of, pool) -> None:
    world = edge_app(EdgeConfig(idempotency_lease_s=0.3), pool=pool)
    client = client_of(world)
    slow = order(behaviour="slow")
    first = asyncio.create_task(client.post("/v1/orders", json=slow, headers=keyed(world, "k-9")))
    await asyncio.wait_for(world.entered.wait(), 10)
    await asyncio.sleep(1.0)  # three leases long: renewed all along
    is_problem(
        await client.post("/v1/orders", json=slow, headers=keyed(world, "k-9")),
        409,
        "idempotency-key-in-flight",
    )
    world.release.set()
    assert (await asyncio.wait_for(first, 10)).status_code == 201
    assert world.calls == ["create:1"]


async def test_a_store_that_is_down_is_503_not_500(edge_app, client_of, test_db: TestDatabase) -> None:
    url = test_db.urls[SERVICE]
    owner_url = test_db.owner_urls[SERVICE]  # migrations run as the owner
    await apply_migrations(owner_url, SCHEMA, [MIGRATIONS_DIR])
    closed = await create_pool(url, max_size=1)
    await closed.close()
    world = edge_app(pool=closed)
    client = client_of(world)
    resp = await client.post("/v1/orders", json=order(), headers=keyed(world, "k-10"))
    is_problem(resp, 503, "unavailable")
    assert world.calls == []


async def test_a_response_marked_no_store_is_kept_without_its_body(edge_app, client_of, pool) -> None:
    """A webhook signing secret is returned once: the key's record keeps the status and Location, never
    the secret; a replay answers them with no body (a lost secret is replaced by rotating it)."""
    world = edge_app(pool=pool)
    client = client_of(world)
    first = await client.post("/v1/secrets", headers=keyed(world, "s-1"))
    assert first.status_code == 201 and first.json()["secret"].startswith("whsec_TOPSECRET")
    again = await client.post("/v1/secrets", headers=keyed(world, "s-1"))
    assert (again.status_code, again.headers["idempotent-replayed"]) == (201, "true")
    assert again.headers["location"] == first.headers["location"]
    assert again.content == b"" and again.headers["cache-control"] == "no-store"
    assert world.calls == ["secret"]
    [row] = await rows(pool)
    assert "TOPSECRET" not in repr(dict(row))


async def test_routes_included_from_a_router_get_replays_too(pool) -> None:
    """Services include their routes from routers (behind a prefix): the edge finds what those declare."""
    from fastapi import APIRouter, FastAPI

    from v2v_servicekit import edge, problems
    from v2v_servicekit.auth import Principal, require_scope
    from v2v_servicekit.idempotency import idempotent
    from v2v_servicekit.testing import TestTokens

    router = APIRouter(prefix="/v1")
    calls: list[int] = []

    @router.post("/things", status_code=201, dependencies=[idempotent(required=True)])
    async def make(principal: Principal = require_scope("orders:write")) -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    app = FastAPI()
    problems.install(app)
    edge.install(app, EdgeConfig(), pool=lambda _app: pool)
    tokens = TestTokens.install(app)
    app.include_router(router)
    headers = {**tokens.headers("centre", "TC-1"), "Idempotency-Key": "inc-1"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        first = await client.post("/v1/things", headers=headers)
        again = await client.post("/v1/things", headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["idempotent-replayed"] == "true" and again.json() == {"n": 1}
    assert calls == [1]
