"""A small service-like app with the edge middleware in front (as `create_app` installs it), bearer
tokens from `TestTokens`, and an async client speaking ASGI to it (request bodies streamed chunk by
chunk, as a real server hands them over)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field

from v2v_contracts.errors import Conflict, Unavailable
from v2v_servicekit import edge, problems
from v2v_servicekit.auth import Principal, require_scope
from v2v_servicekit.edge import EdgeConfig
from v2v_servicekit.idempotency import idempotent
from v2v_servicekit.pagination import PageLimit, PageOffset
from v2v_servicekit.testing import TestTokens


class OrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    patient_ref: str = Field(min_length=1, max_length=64)
    product: str = "TISA-CEL"
    behaviour: str = "ok"  # ok | slow | conflict | unavailable | crash | huge
    notes: dict[str, int] = {}
    amount: float = 0.0
    anything: Any = None


class SitePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    capacity: int = Field(ge=0, le=1000)


@dataclass
class EdgeApp:
    app: FastAPI
    tokens: TestTokens
    calls: list[str] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def client(self, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=raise_app_exceptions)
        return httpx.AsyncClient(transport=transport, base_url="http://svc")

    def centre(self, centre: str = "TC-1", **kw: Any) -> dict[str, str]:
        return self.tokens.headers("centre", centre, **kw)


def build_edge_app(config: EdgeConfig, pool: asyncpg.Pool | None = None) -> EdgeApp:
    app = FastAPI()
    problems.install(app)
    edge.install(app, config, pool=lambda _app: pool)
    tokens = TestTokens.install(app)
    world = EdgeApp(app, tokens)
    numbers = iter(range(1, 1_000_000))

    @app.post("/v1/orders", status_code=201, dependencies=[idempotent(required=True)])
    async def create_order(
        body: OrderIn, response: Response, principal: Principal = require_scope("orders:write")
    ) -> dict[str, Any]:
        n = next(numbers)
        world.calls.append(f"create:{n}")
        if body.behaviour == "slow":
            world.entered.set()
            await world.release.wait()
        if body.behaviour == "conflict":
            raise Conflict("patient_ref", "an open order exists", kind="open-order-exists")
        if body.behaviour == "unavailable":
            raise Unavailable("try again")
        if body.behaviour == "crash":
            raise RuntimeError("boom")
        response.headers["Location"] = f"/v1/orders/{n}"
        response.headers["X-Not-Kept"] = "1"
        out: dict[str, Any] = {"order": n, "centre": principal.entity_id}
        if body.behaviour == "huge":
            out["padding"] = "x" * 4096
        return out

    @app.post("/v1/orders/{order_id}/cancel")
    async def cancel(order_id: int, principal: Principal = require_scope("orders:write")) -> dict[str, Any]:
        world.calls.append(f"cancel:{order_id}")
        return {"order": order_id, "status": "cancelled"}

    @app.patch("/v1/sites/{site_id}", dependencies=[idempotent()])
    async def patch_site(
        site_id: str, body: SitePatch, principal: Principal = require_scope("orders:write")
    ) -> dict[str, Any]:
        world.calls.append(f"patch:{site_id}")
        return {"site": site_id, "capacity": body.capacity, "n": len(world.calls)}

    @app.patch("/v1/plain/{thing}")
    async def patch_plain(thing: str, principal: Principal = require_scope("orders:write")) -> dict[str, Any]:
        world.calls.append(f"plain:{thing}")
        return {"n": len(world.calls)}

    @app.get("/v1/orders")
    async def list_orders(
        limit: PageLimit = 50, offset: PageOffset = 0, principal: Principal = require_scope("orders:read")
    ) -> dict[str, Any]:
        return {"limit": limit, "offset": offset}

    @app.get("/v1/things/{thing_id}")
    async def get_thing(
        thing_id: uuid.UUID, principal: Principal = require_scope("orders:read")
    ) -> dict[str, str]:
        return {"thing": str(thing_id)}

    @app.post("/v1/secrets", status_code=201)
    async def new_secret(
        response: Response, principal: Principal = require_scope("orders:write")
    ) -> dict[str, Any]:
        world.calls.append("secret")
        response.headers["Location"] = f"/v1/secrets/{len(world.calls)}"
        response.headers["Cache-Control"] = "no-store"
        return {"secret": f"whsec_TOPSECRET{len(world.calls)}"}

    @app.post("/v1/echo")
    async def echo(body: OrderIn, principal: Principal = require_scope("orders:write")) -> dict[str, Any]:
        world.calls.append("echo")
        return {"patient_ref": body.patient_ref, "anything": body.anything}

    return world


@pytest.fixture
def edge_app() -> Callable[..., EdgeApp]:
    """`edge_app(config=EdgeConfig(...), pool=pool)`: a fresh app (own buckets, token cache, handler log)."""

    def make(config: EdgeConfig | None = None, pool: asyncpg.Pool | None = None) -> EdgeApp:
        return build_edge_app(config or EdgeConfig(), pool)

    return make


@pytest.fixture
async def client_of() -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    opened: list[httpx.AsyncClient] = []

    def open_client(world: EdgeApp, **kw: Any) -> httpx.AsyncClient:
        client = world.client(**kw)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        await client.aclose()
