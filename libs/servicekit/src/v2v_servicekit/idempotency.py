"""Idempotency-Key (IETF httpapi draft "The Idempotency-Key HTTP Header Field") for every service.

A route declares its requirement next to its scope, as a dependency:

    @router.post("/orders", status_code=201, dependencies=[idempotent(required=True)])
    async def create_order(body: OrderIn, principal: Principal = require_scope("orders:write")) -> ...

    @router.patch("/sites/{site_id}", dependencies=[idempotent()])   # PATCH: only where a route opts in

Every POST accepts the header without declaring anything (declaring `idempotent()` documents it in the
OpenAPI schema); `required=True` makes a request without it a 400. The work is done by the edge
middleware (`v2v_servicekit.edge`), which finds the route a request is for and reads its declaration.

Keys are scoped to the calling client (the token's client id) and kept in the table `idempotency_keys`
of the service's own schema (migration in `MIGRATIONS_DIR`):
- the first request with a key claims it (`in_flight`, with a lease its process renews while it runs);
- a response marked `Cache-Control: no-store` (it carries a secret) is stored without its body: a replay
  gets its status and `Location` only (a lost webhook secret is replaced by rotating it);
- its final response is stored (`done`) unless it is 5xx, 401, 403 or 429: those release the key, and a
  retry runs afresh;
- a retry with the same method, path and body (the fingerprint) gets the stored response back with
  `Idempotent-Replayed: true`; another fingerprint under the same key is 422, a retry while the first is
  still running 409;
- a claim whose process died (lease not renewed for `lease_s`) is taken over by the next retry;
- keys expire after `ttl_s` (24 h): an expired key is free again, and expired rows are purged.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import Depends, Header

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# what `parse_key` accepts, for the OpenAPI schema: a bare key (printable ASCII, not starting with a space
# or a quote) or a quoted sf-string (printable ASCII, `"` and `\` escaped), 1..255 characters either way
KEY_PATTERN = r'^(?:[!#-~][ -~]{0,254}|"(?:[ !#-\[\]-~]|\\["\\]){1,255}")$'
IDEMPOTENCY_ATTR = "__v2v_idempotency__"

# the response headers kept with a stored response (and sent again on a replay)
STORED_HEADERS = frozenset({"content-type", "location", "content-location", "etag", "last-modified"})


def is_stored_status(status: int) -> bool:
    """Which final responses a key keeps: all but server errors and answers that say "not you / not now"
    (401, 403, 429) — after those the client may retry with the same key and be served afresh."""
    return status < 500 and status not in {401, 403, 429}


# ---- the route's declaration --------------------------------------------------------------------------


@dataclass(frozen=True)
class IdempotencyPolicy:
    required: bool = False


_DESCRIPTION = (
    "A unique key for this request (1 to 255 printable ASCII characters, e.g. a UUID; a quoted "
    'structured-field string such as "abc" is accepted too). A retry with the same key and body '
    "gets the first response back (Idempotent-Replayed: true); keys are kept for 24 hours."
)


def idempotent(*, required: bool = False) -> Any:
    """The dependency a POST (or PATCH) route declares: `dependencies=[idempotent(required=True)]`.

    It documents the `Idempotency-Key` header in the OpenAPI schema and marks the route for the edge
    middleware, which does the work. Declared without `required`, the key is optional (every POST
    accepts one anyway); on a PATCH route the declaration is what turns idempotency on."""
    if required:

        async def required_key(
            idempotency_key: Annotated[
                str,
                Header(alias=HEADER, pattern=KEY_PATTERN, description=_DESCRIPTION),
            ],
        ) -> None:
            return None

        marker: Any = required_key
    else:

        async def optional_key(
            idempotency_key: Annotated[
                str | None,
                Header(alias=HEADER, pattern=KEY_PATTERN, description=_DESCRIPTION),
            ] = None,
        ) -> None:
            return None

        marker = optional_key
    setattr(marker, IDEMPOTENCY_ATTR, IdempotencyPolicy(required=required))
    return Depends(marker)


def declared_idempotency(route: Any) -> IdempotencyPolicy | None:
    """The idempotency policy a FastAPI route declares through `idempotent()`, if any."""
    dependant = getattr(route, "dependant", None)
    stack = list(dependant.dependencies) if dependant is not None else []
    while stack:
        dep = stack.pop()
        policy = getattr(dep.call, IDEMPOTENCY_ATTR, None)
        if isinstance(policy, IdempotencyPolicy):
            return policy
        stack.extend(dep.dependencies)
    return None


# ---- the key and the request's fingerprint ------------------------------------------------------------


class InvalidKey(ValueError):
    pass


def parse_key(raw: str) -> str:
    """The key of an `Idempotency-Key` header value: the draft's sf-string (`"abc"`, with `\\"` and `\\\\`
    escapes), or the bare token most clients send. 1..255 printable ASCII characters, else InvalidKey."""
    value = raw  # (an HTTP server has already stripped the space around a header value)
    if value.startswith(" "):
        raise InvalidKey("leading space")
    if value.startswith('"'):  # then it must be a whole sf-string
        if len(value) < 2 or not value.endswith('"'):
            raise InvalidKey("unterminated string")
        inner, out, i = value[1:-1], [], 0
        while i < len(inner):
            ch = inner[i]
            if ch == "\\":
                if i + 1 >= len(inner) or inner[i + 1] not in '"\\':
                    raise InvalidKey("bad escape")
                out.append(inner[i + 1])
                i += 2
                continue
            if ch == '"':
                raise InvalidKey("unescaped quote")
            out.append(ch)
            i += 1
        value = "".join(out)
    if not 1 <= len(value) <= MAX_KEY_LENGTH:
        raise InvalidKey("length")
    if any(not (0x20 <= ord(c) <= 0x7E) for c in value):
        raise InvalidKey("not printable ASCII")
    return value


def fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """What makes two requests "the same": method, path (and query) and the SHA-256 of the body."""
    target = path + ("?" + query if query else "")
    return f"{method.upper()} {target} sha256:{hashlib.sha256(body).hexdigest()}"


# ---- the store -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a key: `owned` (run the request; `taken_over` when a dead owner's claim
    was taken), `replay` (the stored response), `mismatch` (the key was used for another request) or
    `in_flight` (the first request is still running)."""

    outcome: Literal["owned", "replay", "mismatch", "in_flight"]
    owner: uuid.UUID | None = None
    response: StoredResponse | None = None
    taken_over: bool = False


class IdempotencyStore:
    """The `idempotency_keys` table of a service's schema (the pool's search_path)."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float = 86_400.0, lease_s: float = 60.0) -> None:
        self.pool = pool
        self.ttl_s = float(ttl_s)
        self.lease_s = float(lease_s)

    async def claim(self, client_id: str, key: str, fingerprint: str) -> Claim:
        owner = uuid.uuid4()
        for _ in range(3):  # a row released or expired between the upsert and the read: claim again
            row = await self.pool.fetchrow(
                """
                INSERT INTO idempotency_keys AS k
                    (client_id, idempotency_key, fingerprint, state, owner, lease_until, created_at,
                     expires_at)
                VALUES ($1, $2, $3, 'in_flight', $4, now() + make_interval(secs => $5), now(),
                        now() + make_interval(secs => $6))
                ON CONFLICT (client_id, idempotency_key) DO UPDATE
                SET fingerprint = EXCLUDED.fingerprint, state = 'in_flight', owner = EXCLUDED.owner,
                    lease_until = EXCLUDED.lease_until, created_at = EXCLUDED.created_at,
                    expires_at = EXCLUDED.expires_at, status_code = NULL, response_headers = NULL,
                    response_body = NULL
                WHERE k.expires_at <= now()
                   OR (k.state = 'in_flight' AND k.lease_until <= now()
                       AND k.fingerprint = EXCLUDED.fingerprint)
                RETURNING (k.xmax = 0) AS inserted  -- false: a dead or expired claim taken over
                """,
                client_id,
                key,
                fingerprint,
                owner,
                self.lease_s,
                self.ttl_s,
            )
            if row is not None:
                return Claim("owned", owner=owner, taken_over=not row["inserted"])
            existing = await self.pool.fetchrow(
                """
                SELECT fingerprint, state, status_code, response_headers::text AS headers, response_body
                FROM idempotency_keys
                WHERE client_id = $1 AND idempotency_key = $2 AND expires_at > now()
                """,
                client_id,
                key,
            )
            if existing is None:
                continue
            if existing["fingerprint"] != fingerprint:
                return Claim("mismatch")
            if existing["state"] != "done":
                return Claim("in_flight")
            headers = [(str(n), str(v)) for n, v in json.loads(existing["headers"] or "[]")]
            stored = StoredResponse(int(existing["status_code"]), headers, bytes(existing["response_body"]))
            return Claim("replay", response=stored)
        return Claim("in_flight")

    async def renew(self, client_id: str, key: str, owner: uuid.UUID) -> bool:
        status = await self.pool.execute(
            """
            UPDATE idempotency_keys SET lease_until = now() + make_interval(secs => $4)
            WHERE client_id = $1 AND idempotency_key = $2 AND owner = $3 AND state = 'in_flight'
            """,
            client_id,
            key,
            owner,
            self.lease_s,
        )
        return str(status).endswith(" 1")

    async def complete(self, client_id: str, key: str, owner: uuid.UUID, response: StoredResponse) -> bool:
        """Stores the final response; False when this claim was lost (taken over after its lease)."""
        status = await self.pool.execute(
            """
            UPDATE idempotency_keys
            SET state = 'done', status_code = $4, response_headers = $5::text::jsonb, response_body = $6,
                lease_until = NULL
            WHERE client_id = $1 AND idempotency_key = $2 AND owner = $3 AND state = 'in_flight'
            """,
            client_id,
            key,
            owner,
            response.status,
            json.dumps([list(h) for h in response.headers]),
            response.body,
        )
        return str(status).endswith(" 1")

    async def release(self, client_id: str, key: str, owner: uuid.UUID) -> None:
        """Frees the key (the response is not kept): a retry runs afresh."""
        await self.pool.execute(
            """
            DELETE FROM idempotency_keys
            WHERE client_id = $1 AND idempotency_key = $2 AND owner = $3 AND state = 'in_flight'
            """,
            client_id,
            key,
            owner,
        )

    async def purge(self, batch: int = 1000) -> int:
        """Deletes expired keys (at most `batch` of them); returns how many."""
        status = await self.pool.execute(
            """
            DELETE FROM idempotency_keys
            WHERE (client_id, idempotency_key) IN (
                SELECT client_id, idempotency_key FROM idempotency_keys
                WHERE expires_at <= now() LIMIT $1)
            """,
            batch,
        )
        return int(str(status).rsplit(" ", 1)[-1])
