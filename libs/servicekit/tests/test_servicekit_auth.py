"""Bearer tokens at the edge, against a real authorization server (the harness' local issuer, served to the
verifier over an httpx transport): only a valid, unexpired token from the configured issuer for this
audience, signed asymmetrically, with the route's scope, gets through; everything else is 401 or 403
problem+json with `WWW-Authenticate: Bearer`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from joserfc import jwt

from v2v_harness.issuer import (
    ASSERTION_TYPE,
    AuthorizationServer,
    TokenError,
    asgi_app,
    client_assertion,
    new_client,
)
from v2v_servicekit.auth import Principal, TokenVerifier, declared_scope, require_scope
from v2v_servicekit.problems import PROBLEM_JSON, install

ISSUER = "http://issuer.test"


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    centre, centre_key = new_client("centre-tc-de-be-001", "centre", "TC-DE-BE-001")
    carrier, carrier_key = new_client("carrier-ups", "carrier", "UPS")
    server = AuthorizationServer(ISSUER, [centre, carrier])
    issuer_http = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app(server)), base_url=ISSUER)
    verifier = TokenVerifier(ISSUER, "vein2vein", http=issuer_http)

    app = FastAPI()
    install(app)
    app.state.token_verifier = verifier

    @app.get("/orders")
    async def orders(principal: Principal = require_scope("orders:read")) -> dict[str, Any]:
        return {"tenant": principal.entity_id, "kind": principal.kind}

    with TestClient(app) as client:
        yield {
            "server": server,
            "client": client,
            "app": app,
            "keys": {centre.client_id: centre_key, carrier.client_id: carrier_key},
        }


def token_for(world: dict[str, Any], client_id: str) -> str:
    server: AuthorizationServer = world["server"]
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(client_id, world["keys"][client_id], server.token_endpoint),
    }
    return str(server.token(form)["access_token"])


def forged(world: dict[str, Any], **changes: Any) -> str:
    """A token signed with the issuer's real key but with claims changed."""
    server: AuthorizationServer = world["server"]
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "vein2vein",
        "sub": "centre-tc-de-be-001",
        "client_id": "centre-tc-de-be-001",
        "iat": now,
        "exp": now + 120,
        "scope": "orders:read",
        "v2v_kind": "centre",
        "v2v_entity": "TC-DE-BE-001",
        **changes,
    }
    return jwt.encode({"alg": "ES256", "kid": server.key.kid}, claims, server.key)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def call(world: dict[str, Any], token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return world["client"].get("/orders", headers=headers)


def refused(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM_JSON)
    assert resp.headers["www-authenticate"].startswith("Bearer")
    return dict(resp.json())


def test_a_valid_token_with_the_scope_passes_and_names_the_tenant(world: dict[str, Any]) -> None:
    resp = call(world, token_for(world, "centre-tc-de-be-001"))
    assert resp.status_code == 200
    assert resp.json() == {"tenant": "TC-DE-BE-001", "kind": "centre"}


def test_access_tokens_live_at_most_five_minutes(world: dict[str, Any]) -> None:
    token = token_for(world, "centre-tc-de-be-001")
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["exp"] - claims["iat"] <= 300
    assert claims["iss"] == ISSUER and claims["aud"] == "vein2vein"


@pytest.mark.parametrize(
    "case",
    ["missing", "not bearer", "garbage", "expired", "wrong audience", "wrong issuer", "alg none", "hs256"],
)
def test_anything_but_a_valid_token_is_401(world: dict[str, Any], case: str) -> None:
    server: AuthorizationServer = world["server"]
    if case == "missing":
        resp = call(world, None)
    elif case == "not bearer":
        resp = world["client"].get("/orders", headers={"authorization": "Basic dXNlcjpwYXNz"})
    elif case == "garbage":
        resp = call(world, "not.a.token")
    elif case == "expired":
        resp = call(world, forged(world, iat=int(time.time()) - 900, exp=int(time.time()) - 600))
    elif case == "wrong audience":
        resp = call(world, forged(world, aud="someone-else"))
    elif case == "wrong issuer":
        resp = call(world, forged(world, iss="http://evil.test"))
    elif case == "alg none":
        resp = call(
            world, f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'iss': ISSUER, 'scope': 'orders:read'})}."
        )
    else:  # HS256 "signed" with the issuer's public key as the shared secret (forged by hand, as an
        # attacker would: joserfc itself refuses to use a public key as an HMAC key)
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "vein2vein", "sub": "x", "exp": now + 60, "v2v_kind": "centre"}
        signing_input = f"{b64({'alg': 'HS256', 'kid': server.key.kid})}.{b64(claims)}"
        mac = hmac.new(server.key.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
        resp = call(world, signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
    body = refused(resp, 401)
    assert body["type"].endswith("/unauthenticated")


def test_a_right_token_without_the_scope_is_403(world: dict[str, Any]) -> None:
    body = refused(call(world, token_for(world, "carrier-ups")), 403)
    assert "orders:read" in body["detail"]


def test_a_client_assertion_is_accepted_once(world: dict[str, Any]) -> None:
    server: AuthorizationServer = world["server"]
    assertion = client_assertion(
        "centre-tc-de-be-001", world["keys"]["centre-tc-de-be-001"], server.token_endpoint
    )
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    assert server.token(form)["token_type"] == "Bearer"
    with pytest.raises(TokenError) as replay:
        server.token(form)
    assert replay.value.error == "invalid_client" and "replayed" in replay.value.description


def test_an_assertion_signed_by_another_clients_key_is_refused(world: dict[str, Any]) -> None:
    server: AuthorizationServer = world["server"]
    assertion = client_assertion("centre-tc-de-be-001", world["keys"]["carrier-ups"], server.token_endpoint)
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    with pytest.raises(TokenError):
        server.token(form)


def test_routes_declare_their_scope(world: dict[str, Any]) -> None:
    [route] = [r for r in world["app"].routes if getattr(r, "path", "") == "/orders"]
    assert declared_scope(route) == "orders:read"


def test_the_challenge_names_an_error_only_when_a_token_was_sent(world: dict[str, Any]) -> None:
    """RFC 6750 §3.1: a request without credentials gets the bare challenge; a bad token invalid_token."""
    none = refused(call(world, None), 401)
    assert none["status"] == 401
    assert world["client"].get("/orders").headers["www-authenticate"] == 'Bearer realm="vein2vein"'
    bad = world["client"].get("/orders", headers={"authorization": "Bearer not.a.token"})
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
