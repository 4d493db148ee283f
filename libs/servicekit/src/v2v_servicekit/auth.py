"""Bearer tokens at the edge: who is calling (the principal) and what they may do (scopes).

Any standard OAuth 2.0 / OIDC identity provider can issue the tokens: the verifier reads the issuer's
discovery metadata and JWKS (cached; re-read when a token names a key it does not know, at most every
`min_refresh_s`), and accepts a JWT only when
- it is signed with an asymmetric algorithm the issuer publishes (never `none`, never HMAC: a token
  "signed" with the issuer's public key as an HMAC secret is refused),
- `iss` is the configured issuer, `aud` names this platform, `exp`/`nbf`/`iat` hold (small leeway) and it
  lives at most `max_ttl_s`,
- it carries the principal: `sub`/`client_id`, `v2v_kind`, `v2v_entity` and `scope`.

`require_scope("orders:read")` is the FastAPI dependency every route declares; it answers 401
(`WWW-Authenticate: Bearer`) or 403 through the domain errors `Unauthenticated` / `Forbidden`, which
`v2v_servicekit.problems` turns into problem+json.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from v2v_contracts.errors import Forbidden, Unauthenticated

ASYMMETRIC_ALGORITHMS = ("ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "EdDSA")
SCOPE_ATTR = "__v2v_scope__"


@dataclass(frozen=True)
class Principal:
    client_id: str
    kind: str  # centre | carrier | site | qa | admin | ops
    entity_id: str | None  # which centre, carrier or site: the tenant
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    def tenant(self, kind: str) -> str | None:
        """The entity this principal is confined to when it is of `kind` (a centre's id for "centre"),
        else None: not confined by that kind (QA, ops and admin see across tenants, within their scopes).

            centre = principal.tenant("centre")   # None for QA/ops: every centre
            orders = await tx.orders.list(centre=centre)
        """
        if self.kind != kind:
            return None
        if not self.entity_id:  # a tenant-bound kind without its entity: confined to nothing at all
            raise Forbidden(f"{kind} principal without an entity")
        return self.entity_id


class TokenVerifier:
    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        http: httpx.AsyncClient | None = None,
        leeway_s: int = 30,
        max_ttl_s: int = 600,
        jwks_ttl_s: float = 300.0,
        min_refresh_s: float = 10.0,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.leeway_s = leeway_s
        self.max_ttl_s = max_ttl_s
        self.jwks_ttl_s = jwks_ttl_s
        self.min_refresh_s = min_refresh_s
        self._http = http
        self._keys: KeySet | None = None
        self._algorithms: list[str] = list(ASYMMETRIC_ALGORITHMS)
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self._static = False

    @classmethod
    def with_keys(cls, issuer: str, audience: str, jwks: dict[str, Any], **kw: Any) -> TokenVerifier:
        """A verifier that trusts these keys and never fetches (tests, or a pinned issuer)."""
        verifier = cls(issuer, audience, **kw)
        verifier._keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        verifier._fetched_at = float("inf")
        verifier._static = True
        return verifier

    async def _fetch(self) -> None:
        client = self._http or httpx.AsyncClient(timeout=5.0)
        try:
            meta = (
                (await client.get(self.issuer + "/.well-known/openid-configuration"))
                .raise_for_status()
                .json()
            )
            if str(meta.get("issuer", "")).rstrip("/") != self.issuer:
                raise Unauthenticated("the identity provider's metadata names another issuer")
            jwks = (await client.get(meta["jwks_uri"])).raise_for_status().json()
        finally:
            if self._http is None:
                await client.aclose()
        published = meta.get("id_token_signing_alg_values_supported") or ASYMMETRIC_ALGORITHMS
        self._algorithms = [a for a in published if a in ASYMMETRIC_ALGORITHMS] or list(ASYMMETRIC_ALGORITHMS)
        self._keys = KeySet.import_key_set(jwks)
        self._fetched_at = time.monotonic()

    async def keys(self, *, refresh: bool = False) -> KeySet:
        async with self._lock:
            if self._static and self._keys is not None:
                return self._keys
            age = time.monotonic() - self._fetched_at
            stale = self._keys is None or age > self.jwks_ttl_s
            if stale or (refresh and age > self.min_refresh_s):
                try:
                    await self._fetch()
                except (httpx.HTTPError, KeyError, ValueError, JoseError):
                    if self._keys is None:
                        raise Unauthenticated("the identity provider cannot be reached") from None
            assert self._keys is not None
            return self._keys

    async def verify(self, token: str) -> Principal:
        keys = await self.keys()
        try:
            decoded = jwt.decode(token, keys, algorithms=self._algorithms)
        except JoseError as exc:
            if "kid" in str(exc).lower() or exc.__class__.__name__ in {
                "KeyNotFoundError",
                "InvalidKeyIdError",
            }:
                try:
                    decoded = jwt.decode(token, await self.keys(refresh=True), algorithms=self._algorithms)
                except JoseError:
                    raise Unauthenticated("invalid token") from None
            else:
                raise Unauthenticated("invalid token") from None
        except ValueError:
            raise Unauthenticated("invalid token") from None
        claims = decoded.claims
        now = int(time.time())
        try:
            jwt.JWTClaimsRegistry(
                now=now,
                leeway=self.leeway_s,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True},
                sub={"essential": True},
            ).validate(claims)
        except JoseError:
            raise Unauthenticated("invalid token") from None
        if int(claims["exp"]) - now > self.max_ttl_s:
            raise Unauthenticated("token lives too long")
        kind = claims.get("v2v_kind")
        if not isinstance(kind, str):
            raise Unauthenticated("token names no principal")
        entity = claims.get("v2v_entity")
        scopes = frozenset(str(claims.get("scope", "")).split())
        return Principal(str(claims.get("client_id") or claims["sub"]), kind, entity, scopes)

    async def verified_claims(self, token: str) -> dict[str, Any]:
        """The claims of a JWT whose signature verifies with one of the issuer's keys (an asymmetric
        algorithm it publishes; an unknown key id re-reads the JWKS), and nothing more: no claim is
        checked here. For tokens of another shape from the same issuer, such as the signing tokens of
        `v2v_servicekit.signatures`, whose verifier checks their claims. Raises Unauthenticated."""
        keys = await self.keys()
        try:
            decoded = jwt.decode(token, keys, algorithms=self._algorithms)
        except JoseError as exc:
            if "kid" not in str(exc).lower() and exc.__class__.__name__ not in {
                "KeyNotFoundError",
                "InvalidKeyIdError",
            }:
                raise Unauthenticated("invalid token") from None
            try:
                decoded = jwt.decode(token, await self.keys(refresh=True), algorithms=self._algorithms)
            except (JoseError, ValueError):
                raise Unauthenticated("invalid token") from None
        except ValueError:
            raise Unauthenticated("invalid token") from None
        return dict(decoded.claims)


# documents the scheme in every service's OpenAPI (Swagger UI's "Authorize"); parsing stays ours (`bearer`)
BEARER_SCHEME = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An access token from the platform's OAuth 2.0 issuer (client credentials with "
    "private_key_jwt); each operation names the scope it needs (`x-required-scope`).",
)


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Unauthenticated(no_credentials=True)
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated()
    return token.strip()


def require_scope(scope: str) -> Any:
    """The dependency a route declares: `principal: Principal = require_scope("orders:read")`."""

    async def principal(
        request: Request, _documented: HTTPAuthorizationCredentials | None = Depends(BEARER_SCHEME)
    ) -> Principal:
        verifier: TokenVerifier | None = getattr(request.app.state, "token_verifier", None)
        if verifier is None:
            raise Unauthenticated("authentication is not configured")
        found = await verifier.verify(bearer(request))
        if not found.has(scope):
            raise Forbidden(scope)
        request.state.principal = found
        return found

    setattr(principal, SCOPE_ATTR, scope)
    return Depends(principal)


PUBLIC = "public"


def public() -> Any:
    """The dependency of the few routes anyone may call (liveness, readiness, metrics, the AsyncAPI
    document): declared explicitly, so that a route without any declaration is caught by the tests."""

    async def anyone() -> None:
        return None

    setattr(anyone, SCOPE_ATTR, PUBLIC)
    return Depends(anyone)


def declared_scope(route: Any) -> str | None:
    """The scope a FastAPI route declares through `require_scope` (or `PUBLIC` through `public()`), if any:
    for the deny-by-default test."""
    dependant = getattr(route, "dependant", None)
    stack = list(dependant.dependencies) if dependant is not None else []
    while stack:
        dep = stack.pop()
        scope = getattr(dep.call, SCOPE_ATTR, None)
        if scope:
            return str(scope)
        stack.extend(dep.dependencies)
    return None


def document_scopes(app: Any) -> None:
    """Name each operation's scope in the app's OpenAPI document (`x-required-scope`, and the bearer
    requirement; public operations get `security: []`)."""
    from fastapi.openapi.utils import get_openapi
    from fastapi.routing import APIRoute, iter_route_contexts

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema  # type: ignore[no-any-return]
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for context in iter_route_contexts(app.routes):
            route = context.route
            if not isinstance(route, APIRoute) or not route.include_in_schema:
                continue
            scope = declared_scope(route)
            for method in route.methods or ():
                operation = schema.get("paths", {}).get(context.path, {}).get(method.lower())
                if operation is None:
                    continue
                if scope == PUBLIC:
                    operation["security"] = []
                elif scope:
                    operation["x-required-scope"] = scope
                    operation["security"] = [{"bearer": []}]
                    operation.setdefault("responses", {}).setdefault(
                        "401", {"description": "No valid bearer token (problem+json)"}
                    )
                    operation["responses"].setdefault(
                        "403", {"description": f"The token lacks the scope {scope} (problem+json)"}
                    )
        _problems_everywhere(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `errors` names each field and the reason",
    "type": "object",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "reason": {"type": "string"}},
                "required": ["field", "reason"],
            },
        },
    },
    "required": ["type", "title", "status"],
}


def _problems_everywhere(schema: dict[str, Any]) -> None:
    """Every error answer is application/problem+json (v2v_servicekit.problems): say so in the document,
    instead of FastAPI's default `HTTPValidationError` as application/json."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    ref = {"$ref": "#/components/schemas/Problem"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if str(status)[:1] in {"4", "5"}:
                    response["content"] = {"application/problem+json": {"schema": ref}}
    schemas = schema["components"]["schemas"]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
