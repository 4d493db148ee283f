"""An error no handler expects: a lost database connection is 503 with Retry-After (retry, with the same
Idempotency-Key); anything else a bare 500 problem that carries nothing of the request or the error."""

from __future__ import annotations

import asyncpg
import httpx
from fastapi import FastAPI

from v2v_servicekit import problems


def app_raising(exc: Exception) -> FastAPI:
    app = FastAPI()
    problems.install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return app


async def call(app: FastAPI) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/boom")


async def test_a_lost_database_connection_is_503_with_retry_after() -> None:
    resp = await call(app_raising(asyncpg.ConnectionDoesNotExistError("connection was closed")))
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert resp.headers["content-type"].startswith(problems.PROBLEM_JSON)
    assert "closed" not in resp.text


async def test_any_other_error_is_a_bare_500_problem() -> None:
    resp = await call(app_raising(RuntimeError("secret-patient-BER-0042")))
    assert resp.status_code == 500
    assert resp.headers["content-type"].startswith(problems.PROBLEM_JSON)
    assert "BER-0042" not in resp.text and resp.json()["type"].endswith("/internal")
