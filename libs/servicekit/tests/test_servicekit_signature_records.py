"""Signature records against a real Postgres (a service schema migrated as `create_app` does it, the
runtime role's pool): a signature is written in the transaction of the change it signs and bound to the
record's hash, a record changed after signing shows unsigned (21 CFR 11.70), signatures cannot be changed
or removed, and a signing token signs once across replicas. Last, the whole path with the harness' real
authorization server: a user's password → signing token → `require_signature` → a stored signature."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from v2v_contracts.signing import SIGNATURE_HEADER
from v2v_messaging import MIGRATIONS_DIR as MESSAGING_MIGRATIONS_DIR
from v2v_persistence import apply_migrations, create_pool
from v2v_servicekit import signatures
from v2v_servicekit.auth import Principal, TokenVerifier
from v2v_servicekit.problems import PROBLEM_BASE
from v2v_servicekit.problems import install as install_problems
from v2v_servicekit.signatures import (
    MIGRATIONS_DIR,
    SignatureRepository,
    SignatureTokenUses,
    SignedRecord,
    Signer,
    check_record,
    record_signature,
    require_signature,
)
from v2v_servicekit.testing import TestTokens

if TYPE_CHECKING:
    from v2v_harness.pytest_plugin import TestDatabase

pytestmark = pytest.mark.integration

SERVICE, SCHEMA = "site", "site"


@pytest.fixture
async def db(test_db: TestDatabase) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    owner_url = test_db.owner_urls[SERVICE]
    applied = await apply_migrations(owner_url, SCHEMA, [MESSAGING_MIGRATIONS_DIR, MIGRATIONS_DIR])
    assert "0001.servicekit-signatures" in applied
    owner = await asyncpg.connect(owner_url)
    try:  # a stand-in for a service's own table of things that get signed
        await owner.execute("CREATE TABLE it_lots (lot_id text PRIMARY KEY, status text, coa text)")
    finally:
        await owner.close()
    pool = await create_pool(test_db.urls[SERVICE], max_size=6)
    try:
        yield pool, owner_url
    finally:
        await pool.close()


def a_signer(meaning: str = "release", **kw: Any) -> Signer:
    now = dt.datetime.now(dt.UTC)
    fields: dict[str, Any] = {
        "user_id": "qp.de-leipzig-izi",
        "name": "Demo Qualified Person",
        "roles": frozenset({"qualified_person"}),
        "org_kind": "site",
        "org_id": "DE-LEIPZIG-IZI",
        "meaning": meaning,
        "client_id": "qa",
        "principal": Principal("qa", "qa", None, frozenset({"qc:release"})),
        "auth_time": now - dt.timedelta(seconds=3),
        "token_id": str(uuid.uuid4()),
        "issuer": "https://issuer.test",
        "expires_at": now + dt.timedelta(seconds=117),
        **kw,
    }
    return Signer(**fields)


async def lot_record(conn: asyncpg.Connection | asyncpg.Pool, lot_id: str) -> SignedRecord:
    row = await conn.fetchrow("SELECT lot_id, status, coa FROM it_lots WHERE lot_id = $1", lot_id)
    assert row is not None
    return SignedRecord("lot", lot_id, {"status": row["status"], "coa": row["coa"]})


async def test_a_signature_is_written_with_the_change_it_signs(db: tuple[asyncpg.Pool, str]) -> None:
    pool, _ = db
    signer = a_signer()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO it_lots VALUES ('L-1', 'released', 'COA-1')")
        signature = await SignatureRepository(conn).record(signer, await lot_record(conn, "L-1"))
    check = await check_record(pool, await lot_record(pool, "L-1"), "release")
    assert check.signed and check.current == (signature,) and check.stale == ()
    assert (signature.user_id, signature.name, signature.meaning, signature.client_id) == (
        "qp.de-leipzig-izi",
        "Demo Qualified Person",
        "release",
        "qa",
    )
    assert signature.roles == ("qualified_person",) and signature.org_id == "DE-LEIPZIG-IZI"
    assert signature.token_id == signer.token_id and signature.auth_time == signer.auth_time
    assert signature.signed_at.utcoffset() == dt.timedelta(0)  # server time, UTC
    assert abs((dt.datetime.now(dt.UTC) - signature.signed_at).total_seconds()) < 30
    assert signature.record_sha256 == (await lot_record(pool, "L-1")).sha256()
    assert "Demo Qualified Person (qp.de-leipzig-izi)" in signature.manifestation()
    assert "release" in signature.manifestation() and "UTC" in signature.manifestation()
    assert not (await check_record(pool, await lot_record(pool, "L-1"), "qp-certification")).signed


async def test_a_record_changed_after_signing_shows_unsigned(db: tuple[asyncpg.Pool, str]) -> None:
    pool, _ = db
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO it_lots VALUES ('L-2', 'released', 'COA-2')")
        signature = await record_signature(conn, a_signer(), await lot_record(conn, "L-2"))
    await pool.execute("UPDATE it_lots SET coa = 'COA-2-EDITED' WHERE lot_id = 'L-2'")
    changed = await check_record(pool, await lot_record(pool, "L-2"))
    assert not changed.signed and changed.stale == (signature,) and changed.current == ()
    assert not signature.matches(await lot_record(pool, "L-2"))
    await pool.execute("UPDATE it_lots SET coa = 'COA-2' WHERE lot_id = 'L-2'")  # the signed content again
    assert (await check_record(pool, await lot_record(pool, "L-2"))).signed
    # a signature cannot be moved to another record: the hash covers the object's type and id
    await pool.execute("INSERT INTO it_lots VALUES ('L-3', 'released', 'COA-2')")
    assert not signature.matches(await lot_record(pool, "L-3"))
    assert not signature.matches(SignedRecord("run", "L-2", {"status": "released", "coa": "COA-2"}))


async def test_no_change_no_signature_and_never_outside_a_transaction(db: tuple[asyncpg.Pool, str]) -> None:
    pool, _ = db
    with pytest.raises(RuntimeError, match="boom"):
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO it_lots VALUES ('L-4', 'released', 'COA-4')")
            await record_signature(conn, a_signer(), await lot_record(conn, "L-4"))
            raise RuntimeError("boom")  # the change fails: its signature goes with it
    assert await pool.fetchval("SELECT count(*) FROM signatures WHERE object_id = 'L-4'") == 0
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="transaction"):
            await record_signature(conn, a_signer(), SignedRecord("lot", "L-4", {}))


async def test_signatures_cannot_be_changed_or_removed(db: tuple[asyncpg.Pool, str]) -> None:
    pool, owner_url = db
    signer = a_signer()
    async with pool.acquire() as conn, conn.transaction():
        await record_signature(conn, signer, SignedRecord("lot", "L-5", {"status": "released"}))
    for statement in (
        "UPDATE signatures SET signer_name = 'Someone Else'",
        "UPDATE signatures SET record_sha256 = repeat('0', 64)",
        "DELETE FROM signatures",
        "TRUNCATE signatures",
    ):
        with pytest.raises(asyncpg.PostgresError):
            await pool.execute(statement)  # the runtime role
    owner = await asyncpg.connect(owner_url)
    try:
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await owner.execute("DELETE FROM signatures")  # the schema owner too
    finally:
        await owner.close()
    assert await pool.fetchval("SELECT signer_name FROM signatures") == "Demo Qualified Person"
    # one signature per signing token
    with pytest.raises(asyncpg.UniqueViolationError):
        async with pool.acquire() as conn, conn.transaction():
            await record_signature(conn, signer, SignedRecord("lot", "L-6", {"status": "released"}))


async def test_a_signing_token_is_used_once_across_replicas(db: tuple[asyncpg.Pool, str]) -> None:
    pool, _ = db
    replicas = [SignatureTokenUses(pool) for _ in range(4)]
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120)
    outcomes = await asyncio.gather(*(r.consume("jti-1", expires) for r in replicas))
    assert sorted(outcomes) == [False, False, False, True]
    assert await replicas[0].consume("jti-2", expires) is True
    # through require_signature on two "replicas" of one app sharing the database
    tokens = TestTokens()
    apps = []
    for _ in range(2):
        app = FastAPI()
        install_problems(app)
        signatures.install(app)
        app.state.token_verifier = tokens.verifier()
        app.state.runtime = SimpleNamespace(pool=pool)  # as create_app's runtime holds the pool

        @app.post("/v1/lots/{lot}/release")
        async def release(lot: str, signer: Signer = require_signature("release", scope="qc:release")) -> str:
            return signer.user_id

        apps.append(app)
    headers = {
        **tokens.headers("qa"),
        **tokens.signature_headers(
            "qp.site-1", client_id="qa-x", roles=["qualified_person"], org_id="SITE-1"
        ),
    }
    answers = []
    for app in apps:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as http:
            answers.append(await http.post("/v1/lots/L-7/release", headers=headers))
    assert answers[0].status_code == 200 and answers[0].json() == "qp.site-1"
    assert answers[1].status_code == 401 and answers[1].json()["reason"] == "signature-replayed"
    assert await pool.fetchval("SELECT count(*) FROM signature_token_uses") == 3


# ---- with the real authorization server ---------------------------------------------------------------
ISSUER = "http://issuer.test"


@pytest.fixture(scope="module")
def issuer() -> Iterator[dict[str, Any]]:
    from argon2 import PasswordHasher

    from v2v_harness.issuer import AuthorizationServer, new_client, new_user

    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)  # fast tests; same algorithm
    qa, qa_key = new_client("qa", "qa", None)
    site, site_key = new_client("site-de-leipzig-izi", "site", "DE-LEIPZIG-IZI")
    qp, password = new_user(
        "qp.de-leipzig-izi", "Demo QP", ["qualified_person"], "site", "DE-LEIPZIG-IZI", hasher=cheap
    )
    server = AuthorizationServer(ISSUER, [qa, site], users=[qp], hasher=cheap)
    yield {"server": server, "keys": {"qa": qa_key, site.client_id: site_key}, "password": password}


async def test_a_user_signs_through_the_real_issuer(
    db: tuple[asyncpg.Pool, str], issuer: dict[str, Any]
) -> None:
    from v2v_harness.issuer import ASSERTION_TYPE, TokenError, asgi_app, client_assertion, signing_form

    pool, _ = db
    server = issuer["server"]
    issuer_http = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app(server)), base_url=ISSUER)
    app = FastAPI()
    install_problems(app)
    signatures.install(app)
    app.state.token_verifier = TokenVerifier(ISSUER, "vein2vein", http=issuer_http)
    app.state.runtime = SimpleNamespace(pool=pool)

    @app.post("/v1/lots/{lot}/release")
    async def release(lot: str, signer: Signer = require_signature("release", scope="qc:release")) -> str:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO it_lots VALUES ($1, 'released', 'COA-8')", lot)
            signature = await record_signature(conn, signer, await lot_record(conn, lot))
        return str(signature.signature_id)

    def bearer(client_id: str) -> str:
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion(client_id, issuer["keys"][client_id], server.token_endpoint),
        }
        return str(server.token(form)["access_token"])

    def signing(client_id: str, password: str) -> str:
        key = issuer["keys"][client_id]
        form = signing_form(client_id, key, server.token_endpoint, "qp.de-leipzig-izi", password)
        return str(server.token(form)["access_token"])

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as http:
        signed = await http.post(
            "/v1/lots/L-8/release",
            headers={
                "Authorization": f"Bearer {bearer('qa')}",
                SIGNATURE_HEADER: signing("qa", issuer["password"]),
            },
        )
        # the signing token of the site's system, sent with QA's bearer token: not the same client
        crossed = await http.post(
            "/v1/lots/L-9/release",
            headers={
                "Authorization": f"Bearer {bearer('qa')}",
                SIGNATURE_HEADER: signing("site-de-leipzig-izi", issuer["password"]),
            },
        )
    assert signed.status_code == 200, signed.text
    [stored] = await signatures.signatures_of(pool, "lot", "L-8")
    assert str(stored.signature_id) == signed.json()
    assert (stored.user_id, stored.name, stored.client_id, stored.issuer) == (
        "qp.de-leipzig-izi",
        "Demo QP",
        "qa",
        ISSUER,
    )
    assert (await check_record(pool, await lot_record(pool, "L-8"), "release")).signed
    assert crossed.status_code == 403 and crossed.json()["type"] == PROBLEM_BASE + "signature-client"
    with pytest.raises(TokenError) as wrong:  # a wrong password gets no signing token at all
        signing("qa", issuer["password"] + "x")
    assert (wrong.value.error, wrong.value.reason) == ("invalid_grant", "wrong-credentials")
    await issuer_http.aclose()
