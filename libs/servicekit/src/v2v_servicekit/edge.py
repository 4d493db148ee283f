"""The edge every service gets from `create_app`: one pure-ASGI middleware in front of the routes.

In order, for every HTTP request:
1. **Declared size** — a `Content-Length` over `max_body_bytes` (64 KiB) is 413 at once, an unparsable
   one 400; nothing is read. A URL with a NUL character (`%00`) is 400 (no database text can hold one).
2. **Who** — the bearer token is verified once (`app.state.token_verifier`, wrapped in a
   `CachedVerifier`: a token string verified before is not verified again while it lives). No token or
   an invalid one: the request goes on untouched and the route answers 401.
3. **Rate** — a token bucket per client id (`rate_limit_per_s`, `rate_limit_burst`): 429 with
   `Retry-After` (before the body is read).
4. **Body** — read (streamed or chunked) and counted; past `max_body_bytes` it is 413 without reading
   further (`Connection: close`). The app gets the body replayed.
5. **JSON that no field type can refuse** — lone surrogates or NUL characters in any string (a key too),
   `NaN`/`Infinity` or numbers that overflow to infinity, nesting deeper than `json_max_depth`: 422
   problem naming `body`, without echoing anything.
6. **Idempotency-Key** (`v2v_servicekit.idempotency`) — for a POST (any; a route may require the key
   with `idempotent(required=True)`) or a PATCH whose route declares `idempotent()`, by a caller whose
   token carries the route's scope (else the route answers 401/403 and nothing is kept).

Every refusal is problem+json (`v2v_servicekit.problems`) and never echoes the input.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from v2v_observability import get_logger
from v2v_servicekit import problems
from v2v_servicekit.auth import Principal, declared_scope
from v2v_servicekit.idempotency import (
    HEADER,
    REPLAYED_HEADER,
    STORED_HEADERS,
    IdempotencyPolicy,
    IdempotencyStore,
    InvalidKey,
    StoredResponse,
    declared_idempotency,
    fingerprint,
    is_stored_status,
    parse_key,
)
from v2v_servicekit.limits import TokenBuckets, retry_after_seconds
from v2v_servicekit.settings import ServiceSettings

log = get_logger(__name__)

# what a failing idempotency store raises (a 503 for the caller, never a 500)
STORE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    ConnectionError,
)


@dataclass(frozen=True)
class EdgeConfig:
    max_body_bytes: int = 65_536
    rate_limit_per_s: float = 50.0  # per client and process; 0 turns the limit off
    rate_limit_burst: int = 100
    json_max_depth: int = 32
    idempotency_ttl_s: float = 86_400.0
    idempotency_lease_s: float = 60.0
    idempotency_purge_interval_s: float = 300.0
    idempotency_max_response_bytes: int = 1_048_576
    token_cache_size: int = 10_000

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> EdgeConfig:
        return cls(
            max_body_bytes=settings.max_body_bytes,
            rate_limit_per_s=settings.rate_limit_per_s,
            rate_limit_burst=settings.rate_limit_burst,
            json_max_depth=settings.json_max_depth,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            idempotency_lease_s=settings.idempotency_lease_s,
            idempotency_purge_interval_s=settings.idempotency_purge_interval_s,
            idempotency_max_response_bytes=settings.idempotency_max_response_bytes,
            token_cache_size=settings.token_cache_size,
        )


# ---- bearer tokens, verified once per token ------------------------------------------------------------


class Verifier(Protocol):
    async def verify(self, token: str) -> Principal: ...


class CachedVerifier:
    """Wraps a `TokenVerifier`: a token string that verified is remembered (by its SHA-256) until its
    `exp`, at most `max_ttl_s`; failures are not remembered. The edge middleware installs it on
    `app.state.token_verifier`, so `require_scope` in the route reuses the middleware's verification."""

    def __init__(self, inner: Verifier, *, max_entries: int = 10_000, max_ttl_s: float = 600.0) -> None:
        self.inner = inner
        self.max_entries = max_entries
        self.max_ttl_s = max_ttl_s
        self._cache: dict[bytes, tuple[Principal, float]] = {}

    def __getattr__(self, name: str) -> Any:  # issuer, audience, keys(): the wrapped verifier's
        return getattr(self.inner, name)

    async def verify(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        now = time.time()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[digest]
        principal = await self.inner.verify(token)
        until = min(_expiry(token) or now, now + self.max_ttl_s)
        if until > now:
            if len(self._cache) >= self.max_entries:
                self._evict(now)
            self._cache[digest] = (principal, until)
        return principal

    def _evict(self, now: float) -> None:
        for digest in [d for d, (_, until) in self._cache.items() if until <= now]:
            del self._cache[digest]
        if len(self._cache) >= self.max_entries:  # still full: forget the oldest half
            for digest in list(self._cache)[: self.max_entries // 2]:
                del self._cache[digest]


def _expiry(token: str) -> float | None:
    """The `exp` of a JWT already verified (its payload read without checking the signature again)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) and math.isfinite(exp) else None
    except (IndexError, ValueError, AttributeError, TypeError):
        return None


# ---- JSON no field type can refuse -----------------------------------------------------------------------


class _NotFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite
    return value


def _no_constant(_name: str) -> Any:
    raise _NotFinite


_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
_JSON_SUBTYPE = re.compile(r"^application/([a-z0-9.+-]*\+)?json$")


def is_json(content_type: str) -> bool:
    return bool(_JSON_SUBTYPE.match(content_type.split(";", 1)[0].strip().lower()))


def json_problem(body: bytes, max_depth: int) -> str | None:
    """Why a JSON body must be refused before any field sees it, or None. A body that is not JSON at all
    is left to the app (422 "not valid JSON", 400 for invalid UTF-8)."""
    try:
        value = json.loads(body, parse_float=_finite_float, parse_constant=_no_constant)
    except _NotFinite:
        return "numbers must be finite (no NaN or Infinity)"
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _BAD_CHARS.search(item):
                return "strings must be valid Unicode without NUL characters"
        elif isinstance(item, dict | list):
            if depth > max_depth:
                return f"is nested too deeply (at most {max_depth} levels)"
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return None


# ---- the middleware ----------------------------------------------------------------------------------


@dataclass
class _RouteInfo:
    policy: IdempotencyPolicy | None
    scope: str | None


@dataclass
class _Capture:
    """The app's response, held back until it is stored (or passed through once it grows too large)."""

    send: Send
    limit: int
    start: Message | None = None
    messages: list[Message] = field(default_factory=list)
    size: int = 0
    complete: bool = False
    passthrough: bool = False

    async def __call__(self, message: Message) -> None:
        if self.passthrough:
            await self.send(message)
            return
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.size += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
        self.messages.append(message)
        if self.size > self.limit:  # too large to keep: send what we have and the rest as it comes
            self.passthrough = True
            await self.flush()

    async def flush(self) -> None:
        messages, self.messages = self.messages, []
        for message in messages:
            await self.send(message)

    def stored(self) -> StoredResponse | None:
        if self.start is None or not self.complete or self.passthrough:
            return None
        raw = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in self.start.get("headers", [])]
        if any(n == "cache-control" and "no-store" in v.lower() for n, v in raw):
            # a response that must not be kept (it carries a secret, e.g. a webhook signing secret): its
            # status and Location are recorded, never its body; a replay answers them with no body
            kept = [(n, v) for n, v in raw if n == "location"] + [("cache-control", "no-store")]
            return StoredResponse(int(self.start["status"]), kept, b"")
        headers = [(n, v) for n, v in raw if n in STORED_HEADERS]
        body = b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
        return StoredResponse(int(self.start["status"]), headers, body)


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        config: EdgeConfig | None = None,
        pool: Callable[[Any], asyncpg.Pool | None] | None = None,
    ) -> None:
        self.app = app
        self.config = config or EdgeConfig()
        self.buckets = TokenBuckets(self.config.rate_limit_per_s, self.config.rate_limit_burst)
        self._pool = pool or _runtime_pool
        self._store: IdempotencyStore | None = None
        self._table: list[tuple[re.Pattern[str], frozenset[str], _RouteInfo]] | None = None
        self._purged_at = time.monotonic()
        self._purge_task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app = scope.get("app")
        path = scope.get("path", "")
        headers = Headers(scope=scope)

        declared = headers.getlist("content-length")
        if declared:
            if len(set(declared)) != 1 or not declared[0].strip().isdigit():
                await _answer(scope, receive, send, _bad_content_length(path))
                return
            if int(declared[0]) > self.config.max_body_bytes:
                await _answer(scope, receive, send, self._too_large(path))
                return

        target = (
            (scope.get("raw_path") or path.encode("utf-8", "replace")) + b"?" + scope.get("query_string", b"")
        )
        if b"%00" in target or b"\x00" in target:  # no database text holds a NUL: refuse it at the door
            await _answer(scope, receive, send, _nul_in_url(path))
            return

        principal = await self._principal(app, headers)
        if principal is not None:
            wait = self.buckets.take(principal.client_id)
            if wait > 0:
                await _answer(scope, receive, send, _rate_limited(path, wait))
                return

        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await _answer(scope, receive, send, self._too_large(path))
            return
        except _Disconnected:
            return
        replay = _replaying(body, receive)

        content_type = headers.get("content-type")
        if body and content_type is not None and is_json(content_type):
            reason = json_problem(body, self.config.json_max_depth)
            if reason is not None:
                await _answer(scope, replay, send, _invalid_body(path, reason))
                return

        method = scope.get("method", "GET").upper()
        if method in {"POST", "PATCH"} and principal is not None and app is not None:
            route = self._route(app, scope)
            if route is not None and (route.scope is None or principal.has(route.scope)):
                policy = route.policy
                if policy is None and method == "POST":
                    policy = IdempotencyPolicy(required=False)  # every POST accepts a key
                if policy is not None:
                    await self._idempotent(scope, replay, send, app, principal, policy, headers, body)
                    return
        await self.app(scope, replay, send)

    # ---- steps ----

    async def _principal(self, app: Any, headers: Headers) -> Principal | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or app is None:
            return None
        verifier = getattr(app.state, "token_verifier", None)
        if verifier is None:
            return None
        if not isinstance(verifier, CachedVerifier):
            verifier = CachedVerifier(verifier, max_entries=self.config.token_cache_size)
            app.state.token_verifier = verifier
        try:
            return await verifier.verify(token)
        except Exception:  # invalid, expired, issuer unreachable: the route answers 401
            return None

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body; _TooLarge as soon as it passes the limit (the rest is not read)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _route(self, app: Any, scope: Scope) -> _RouteInfo | None:
        """What the route a request goes to declares (idempotency, scope), or None for a path no API
        route serves. Routes included from routers are flattened (FastAPI keeps them behind an included
        router entry), each with its full path."""
        if self._table is None:
            self._table = self._route_table(app)
        path, method = scope.get("path", ""), scope.get("method", "")
        for regex, methods, info in self._table:
            if regex.match(path) and method in methods:
                return info
        return None

    @staticmethod
    def _route_table(app: Any) -> list[tuple[re.Pattern[str], frozenset[str], _RouteInfo]]:
        from fastapi.routing import APIRoute, iter_route_contexts
        from starlette.routing import compile_path

        table = []
        for context in iter_route_contexts(getattr(app, "routes", ())):
            route = context.route
            if not isinstance(route, APIRoute):
                continue
            regex, _, _ = compile_path(context.path or route.path)
            info = _RouteInfo(declared_idempotency(route), declared_scope(route))
            table.append((regex, frozenset(route.methods or ()), info))
        return table

    def _idempotency_store(self, app: Any) -> IdempotencyStore | None:
        pool = self._pool(app)
        if pool is None:
            return None
        if self._store is None or self._store.pool is not pool:
            self._store = IdempotencyStore(
                pool, ttl_s=self.config.idempotency_ttl_s, lease_s=self.config.idempotency_lease_s
            )
        return self._store

    async def _idempotent(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        app: Any,
        principal: Principal,
        policy: IdempotencyPolicy,
        headers: Headers,
        body: bytes,
    ) -> None:
        path = scope.get("path", "")
        raw = headers.getlist(HEADER)
        if not raw:
            if policy.required:
                await _answer(scope, receive, send, problems.idempotency_key_missing(path))
            else:
                await self.app(scope, receive, send)
            return
        try:
            if len(raw) != 1:
                raise InvalidKey("more than one")
            key = parse_key(raw[0])
        except InvalidKey:
            await _answer(scope, receive, send, problems.idempotency_key_invalid(path))
            return
        store = self._idempotency_store(app)
        if store is None:
            await _answer(scope, receive, send, _store_unavailable(path))
            return
        query = scope.get("query_string", b"").decode("latin-1")
        print_ = fingerprint(scope.get("method", "POST"), path, query, body)
        client = principal.client_id
        try:
            claim = await store.claim(client, key, print_)
        except STORE_ERRORS as exc:
            log.warning("idempotency store unavailable", error=exc.__class__.__name__)
            await _answer(scope, receive, send, _store_unavailable(path))
            return
        if claim.outcome == "replay":
            assert claim.response is not None
            await _replay(send, claim.response)
            return
        if claim.outcome == "mismatch":
            await _answer(scope, receive, send, _key_reused(path))
            return
        if claim.outcome == "in_flight":
            await _answer(scope, receive, send, _key_in_flight(path))
            return
        owner = claim.owner
        assert owner is not None
        if claim.taken_over:
            log.warning(
                "idempotency key reclaimed (expired, or its owner stopped renewing)", client_id=client
            )
        capture = _Capture(send, self.config.idempotency_max_response_bytes)
        renewer = asyncio.create_task(self._renew(store, client, key, owner))
        try:
            await self.app(scope, receive, capture)
        except BaseException:
            await _stop(renewer)
            await _quietly(store.release(client, key, owner))
            raise
        await _stop(renewer)
        stored = capture.stored()
        if stored is not None and is_stored_status(stored.status):
            try:
                if not await store.complete(client, key, owner, stored):
                    log.warning("idempotency claim lost before the response was stored", client_id=client)
            except STORE_ERRORS as exc:
                log.warning("idempotent response not stored", error=exc.__class__.__name__)
        else:
            await _quietly(store.release(client, key, owner))
        await capture.flush()
        self._maybe_purge(store)

    async def _renew(self, store: IdempotencyStore, client: str, key: str, owner: Any) -> None:
        every = max(0.05, store.lease_s / 3)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(*STORE_ERRORS):
                await store.renew(client, key, owner)

    def _maybe_purge(self, store: IdempotencyStore) -> None:
        now = time.monotonic()
        if now - self._purged_at < self.config.idempotency_purge_interval_s:
            return
        if self._purge_task is not None and not self._purge_task.done():
            return
        self._purged_at = now

        async def purge() -> None:
            try:
                deleted = await store.purge()
                if deleted:
                    log.info("expired idempotency keys purged", deleted=deleted)
            except STORE_ERRORS as exc:
                log.warning("idempotency purge failed", error=exc.__class__.__name__)

        self._purge_task = asyncio.create_task(purge())

    def _too_large(self, path: str) -> problems.ProblemResponse:
        limit = self.config.max_body_bytes
        return problems.problem_response(
            path,
            413,
            "body-too-large",
            "Content too large",
            f"request bodies are limited to {limit} bytes",
            headers={"Connection": "close"},
            max_bytes=limit,
        )


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


def _runtime_pool(app: Any) -> asyncpg.Pool | None:
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    return getattr(runtime, "pool", None)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then the connection's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(scope: Scope, receive: Receive, send: Send, response: problems.ProblemResponse) -> None:
    await response(scope, receive, send)


async def _replay(send: Send, stored: StoredResponse) -> None:
    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in stored.headers]
    headers += [
        (b"content-length", str(len(stored.body)).encode()),
        (REPLAYED_HEADER.lower().encode(), b"true"),
    ]
    await send({"type": "http.response.start", "status": stored.status, "headers": headers})
    await send({"type": "http.response.body", "body": stored.body, "more_body": False})


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])  # (the caller's own cancellation still propagates)


async def _quietly(release: Awaitable[None]) -> None:
    try:
        await release
    except STORE_ERRORS as exc:
        log.warning("idempotency key not released", error=exc.__class__.__name__)


def _bad_content_length(path: str) -> problems.ProblemResponse:
    return problems.problem_response(
        path, 400, "bad-content-length", "Bad request", "Content-Length must be one non-negative integer"
    )


def _nul_in_url(path: str) -> problems.ProblemResponse:
    return problems.problem_response(
        path.replace("\x00", ""), 400, "bad-request", "Bad request", "the URL must not contain NUL characters"
    )


def _rate_limited(path: str, wait_s: float) -> problems.ProblemResponse:
    seconds = retry_after_seconds(wait_s)
    return problems.problem_response(
        path,
        429,
        "rate-limited",
        "Too many requests",
        f"this client sends requests faster than allowed; retry after {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def _invalid_body(path: str, reason: str) -> problems.ProblemResponse:
    return problems.problem_response(
        path,
        422,
        "validation",
        "Invalid request",
        f"body: {reason}",
        errors=[{"field": "body", "reason": reason}],
    )


def _key_reused(path: str) -> problems.ProblemResponse:
    return problems.problem_response(
        path,
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        f"this {HEADER} was used for a different request (method, path or body); use a new key",
    )


def _key_in_flight(path: str) -> problems.ProblemResponse:
    return problems.problem_response(
        path,
        409,
        "idempotency-key-in-flight",
        "Request with this Idempotency-Key in progress",
        f"a request with this {HEADER} is still being processed; retry later",
        headers={"Retry-After": "1"},
    )


def _store_unavailable(path: str) -> problems.ProblemResponse:
    return problems.problem_response(
        path,
        503,
        "unavailable",
        "Service unavailable",
        "idempotency keys cannot be checked right now; retry shortly",
        headers={"Retry-After": "1"},
    )


def install(
    app: Any,
    settings: ServiceSettings | EdgeConfig | None = None,
    *,
    pool: Callable[[Any], asyncpg.Pool | None] | None = None,
) -> None:
    """Puts the edge middleware in front of `app`'s routes. The idempotency store uses `pool(app)`
    (default: the service runtime's pool, `app.state.runtime.pool`)."""
    config = settings if isinstance(settings, EdgeConfig) else None
    if isinstance(settings, ServiceSettings):
        config = EdgeConfig.from_settings(settings)
    app.add_middleware(EdgeMiddleware, config=config or EdgeConfig(), pool=pool)


__all__ = ["CachedVerifier", "EdgeConfig", "EdgeMiddleware", "install", "is_json", "json_problem"]
