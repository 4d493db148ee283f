"""A local OAuth 2.0 authorization server for `make run` and the tests: client credentials with
`private_key_jwt` client authentication (RFC 7523, SMART Backend Services style), short-lived JWT access
tokens, OIDC discovery metadata and a JWKS, so that services validate tokens exactly as they would against
any standard identity provider (set by V2V_AUTH_ISSUER in production).

JOSE is joserfc's (signing, verification, keys); this module holds the protocol rules only:
- the client assertion: `iss` = `sub` = client id, `aud` = the token endpoint (or the issuer), `exp` at most
  5 minutes ahead, a `jti` never accepted twice, signed with the client's registered key (ES256/RS256);
- the access token: ES256-signed JWT, `iss`, `aud`, `sub` = client id, `exp` ≤ 5 min, `jti`, `scope`, and
  the principal: `v2v_kind` (centre, carrier, site, qa, admin, ops) and `v2v_entity` (which centre, carrier
  or site), from which services take the tenant (never from a request body).

Demo clients (one per certified centre, carrier and site, one QA, one admin, one ops) are written to
`<state>/clients.json` (public facts) with their private keys beside it in `<state>/clients/` (0600).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

from v2v_contracts.scopes import SCOPES, SCOPES_BY_KIND

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ["ES256", "RS256", "PS256"]  # asymmetric only: never none, never HMAC
TOKEN_TTL_S = 300
MAX_ASSERTION_TTL_S = 300
AUDIENCE = "vein2vein"


@dataclass(frozen=True)
class Client:
    client_id: str
    kind: str
    entity_id: str | None
    scopes: tuple[str, ...]
    jwks: dict[str, Any] = field(default_factory=dict)  # the client's public key(s)

    def public(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "kind": self.kind,
            "entity_id": self.entity_id,
            "scopes": list(self.scopes),
        }


class TokenError(Exception):
    """An RFC 6749 §5.2 error answer."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


class AuthorizationServer:
    def __init__(
        self,
        issuer: str,
        clients: Iterable[Client] = (),
        *,
        audience: str = AUDIENCE,
        token_ttl_s: int = TOKEN_TTL_S,
        key: ECKey | None = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.token_ttl_s = min(token_ttl_s, TOKEN_TTL_S)
        self.key = key or ECKey.generate_key("P-256", parameters={"use": "sig"}, private=True)
        self.key.ensure_kid()
        self.clients = {c.client_id: c for c in clients}
        self._seen_jti: dict[str, float] = {}  # jti -> expiry of its assertion
        self._lock = threading.Lock()

    # ---- metadata ------------------------------------------------------------------------------------
    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.issuer + "/jwks",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ALGORITHMS,
            "scopes_supported": sorted(SCOPES),
            "id_token_signing_alg_values_supported": ["ES256"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    # ---- the token endpoint --------------------------------------------------------------------------
    def token(self, form: dict[str, str], now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        if form.get("grant_type") != "client_credentials":
            raise TokenError("unsupported_grant_type", "only client_credentials is supported")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            raise TokenError("invalid_client", "private_key_jwt client authentication required", 401)
        client = self._authenticate(form["client_assertion"], now)
        asked = form.get("scope", "").split()
        scopes = [s for s in asked if s in client.scopes] if asked else list(client.scopes)
        if asked and len(scopes) != len(asked):
            raise TokenError("invalid_scope", "a requested scope is not granted to this client")
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": client.client_id,
            "client_id": client.client_id,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + self.token_ttl_s,
            "jti": str(uuid.uuid4()),
            "scope": " ".join(scopes),
            "v2v_kind": client.kind,
            "v2v_entity": client.entity_id,
        }
        token = jwt.encode({"alg": "ES256", "kid": self.key.kid, "typ": "at+jwt"}, claims, self.key)
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.token_ttl_s,
            "scope": claims["scope"],
        }

    def _authenticate(self, assertion: str, now: float) -> Client:
        try:
            client_id = _unverified_claims(assertion).get("iss")
            client = self.clients.get(str(client_id)) if client_id else None
            if client is None:
                raise TokenError("invalid_client", "unknown client", 401)
            keys = KeySet.import_key_set(client.jwks)  # type: ignore[arg-type]
            token = jwt.decode(assertion, keys, algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(
                now=int(now),
                leeway=5,
                iss={"essential": True, "value": client.client_id},
                sub={"essential": True, "value": client.client_id},
                exp={"essential": True},
                jti={"essential": True},
            ).validate(token.claims)
        except JoseError:
            raise TokenError("invalid_client", "client assertion rejected", 401) from None
        claims = token.claims
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if not ({self.token_endpoint, self.issuer} & {str(a) for a in auds}):
            raise TokenError("invalid_client", "client assertion audience is not this server", 401)
        if float(claims["exp"]) > now + MAX_ASSERTION_TTL_S:
            raise TokenError("invalid_client", "client assertion lives too long", 401)
        with self._lock:
            self._seen_jti = {j: exp for j, exp in self._seen_jti.items() if exp > now - 10}
            if claims["jti"] in self._seen_jti:
                raise TokenError("invalid_client", "client assertion replayed (jti already used)", 401)
            self._seen_jti[str(claims["jti"])] = float(claims["exp"])
        return client


def _unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, unverified: only to find which client's key verifies it."""
    import base64

    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- clients -----------------------------------------------------------------------------------------
def client_assertion(client_id: str, key: ECKey, audience: str, *, ttl_s: int = 60) -> str:
    """A signed client assertion (RFC 7523 §3) for the token endpoint `audience`."""
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + ttl_s,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key)


def new_client(
    client_id: str, kind: str, entity_id: str | None, *, key: ECKey | None = None
) -> tuple[Client, ECKey]:
    key = key or ECKey.generate_key("P-256", parameters={"use": "sig"}, private=True)
    key.ensure_kid()
    client = Client(client_id, kind, entity_id, SCOPES_BY_KIND[kind], {"keys": [key.as_dict(private=False)]})
    return client, key


def demo_clients(
    centres: Iterable[str], carriers: Iterable[str], sites: Iterable[str], *, generate: bool = True
) -> list[Any]:
    """One client per centre, carrier and site, and one QA, admin and ops client: (Client, key) pairs
    with fresh keys, or (client_id, kind, entity_id) when `generate` is False."""
    wanted: list[tuple[str, str, str | None]] = [(f"centre-{c.lower()}", "centre", c) for c in centres]
    wanted += [(f"carrier-{c.lower()}", "carrier", c) for c in carriers]
    wanted += [(f"site-{s.lower()}", "site", s) for s in sites]
    wanted += [(name, name, None) for name in ("qa", "admin", "ops")]
    if not generate:
        return wanted
    return [new_client(*w) for w in wanted]


def write_clients(state_dir: Path, clients: list[tuple[Client, ECKey]]) -> Path:
    """`clients.json` (a list of {client_id, kind, entity_id, scopes}) and one private key file per client."""
    keys_dir = state_dir / "clients"
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    for client, key in clients:
        path = keys_dir / f"{client.client_id}.jwk.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(key.as_dict(private=True), fh)
    registry = state_dir / "clients.json"
    registry.write_text(json.dumps([c.public() for c, _ in clients], indent=2) + "\n")
    (state_dir / "clients.jwks.json").write_text(
        json.dumps({c.client_id: c.jwks for c, _ in clients}, indent=2) + "\n"
    )
    return registry


def read_clients(state_dir: Path) -> list[Client]:
    facts = json.loads((state_dir / "clients.json").read_text())
    jwks = json.loads((state_dir / "clients.jwks.json").read_text())
    return [
        Client(f["client_id"], f["kind"], f["entity_id"], tuple(f["scopes"]), jwks[f["client_id"]])
        for f in facts
    ]


def private_key(state_dir: Path, client_id: str) -> ECKey:
    data = json.loads((state_dir / "clients" / f"{client_id}.jwk.json").read_text())
    key = ECKey.import_key(data)
    key.ensure_kid()
    return key


def fetch_token(issuer: str, state_dir: Path, client_id: str, scope: str | None = None) -> dict[str, Any]:
    """The real client-credentials exchange: discovery, a fresh client assertion, POST to /token."""
    import httpx

    meta = httpx.get(issuer.rstrip("/") + "/.well-known/openid-configuration", timeout=10).json()
    endpoint = meta["token_endpoint"]
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(client_id, private_key(state_dir, client_id), endpoint),
    }
    if scope:
        form["scope"] = scope
    resp = httpx.post(endpoint, data=form, timeout=10)
    resp.raise_for_status()
    return dict(resp.json())


# ---- HTTP --------------------------------------------------------------------------------------------
def asgi_app(server: AuthorizationServer) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    no_store = {"cache-control": "no-store", "pragma": "no-cache"}

    async def discovery(_request: Request) -> JSONResponse:
        return JSONResponse(server.metadata())

    async def jwks(_request: Request) -> JSONResponse:
        return JSONResponse(server.jwks())

    async def token(request: Request) -> JSONResponse:
        # RFC 6749 §4.4: application/x-www-form-urlencoded (parsed here: no multipart support needed)
        if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return JSONResponse(
                {"error": "invalid_request", "error_description": "form-encoded body required"},
                400,
                headers=no_store,
            )
        body = await request.body()
        try:
            form = dict(parse_qsl(body.decode("ascii"), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            return JSONResponse(
                {"error": "invalid_request", "error_description": "malformed form"}, 400, headers=no_store
            )
        try:
            return JSONResponse(server.token(form), headers=no_store)
        except TokenError as exc:
            return JSONResponse(
                {"error": exc.error, "error_description": exc.description}, exc.status, headers=no_store
            )

    return Starlette(
        routes=[
            Route("/.well-known/openid-configuration", discovery),
            Route("/.well-known/oauth-authorization-server", discovery),
            Route("/jwks", jwks),
            Route("/token", token, methods=["POST"]),
        ]
    )


@dataclass
class IssuerProcess:
    """The authorization server on 127.0.0.1 in a background thread (uvicorn)."""

    port: int
    server: AuthorizationServer
    _thread: threading.Thread | None = None
    _uvicorn: Any = None

    @classmethod
    def start(
        cls, state_dir: Path, clients: list[Client], port: int = 0, key: ECKey | None = None
    ) -> IssuerProcess:
        import uvicorn

        from v2v_harness.processes import free_port

        port = port or free_port()
        server = AuthorizationServer(f"http://127.0.0.1:{port}", clients, key=key)
        config = uvicorn.Config(
            asgi_app(server), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        instance = cls(port, server)
        instance._uvicorn = uvicorn.Server(config)
        instance._thread = threading.Thread(target=instance._uvicorn.run, daemon=True, name="v2v-issuer")
        instance._thread.start()
        deadline = time.monotonic() + 10
        while not instance._uvicorn.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the local token issuer did not start")
            time.sleep(0.02)
        (state_dir / "issuer.json").write_text(json.dumps({"issuer": server.issuer}) + "\n")
        return instance

    @property
    def url(self) -> str:
        return self.server.issuer

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = [
    "ASSERTION_TYPE",
    "SCOPES_BY_KIND",
    "AuthorizationServer",
    "Client",
    "IssuerProcess",
    "TokenError",
    "client_assertion",
    "demo_clients",
    "fetch_token",
    "new_client",
    "private_key",
    "read_clients",
    "write_clients",
]
