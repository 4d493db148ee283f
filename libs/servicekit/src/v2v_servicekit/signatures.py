"""Electronic signatures for every service: who signed, what it meant, and which record it binds.

Sources: 21 CFR 11.50 (signature manifestation: printed name, date and time, meaning), 11.70 (signature /
record linking: a signature cannot be excised, copied or transferred to falsify a record), 11.100(a)
(unique to one individual), 11.200(a)(1) (two distinct identification components, both re-entered when
signings are not done in one continuous session), 11.300(d) (attempted unauthorised use detected and
reported); EU GMP Annex 11 §14 (electronic signatures: same impact as hand-written ones, permanently
linked to their record, with time and date).

**The request.** A route that needs a signature declares it next to its scope:

    @router.post("/runs/{run_id}/release")
    async def release(run_id: UUID, signer: Signer = require_signature("release", scope="qc:release")):
        async with uow.begin() as tx:
            run = ...
            await SignatureRepository(tx.conn).record(signer, SignedRecord("run", str(run_id), {...}))

The caller (a registered OAuth client: QA's, a site's or a centre's system) sends its bearer token as
always, and in `V2V-Signature-Token` a **signing token** it obtained from the identity provider with the
signing user's id and password re-entered at that moment (`v2v_harness.issuer`; Keycloak's direct access
grant). `require_signature` verifies that token, checking in order: it is there (401
`signature-required`); it is a JWT of the platform's issuer for this audience, signed with one of its
keys (401 `signature-invalid`); it has not expired and the password was entered at most
`V2V_SIGNATURE_MAX_AGE_S` (120 s) ago, nor does it live longer than that (401 `signature-expired` /
`signature-invalid`); it says a password was re-entered for a signature (`amr` has "pwd", `acr` is
`SIGNING_ACR`: else 401 `signature-authentication`); it was issued to the very client whose bearer token
comes with it (403 `signature-client`); the user's organisation fits the caller's tenant (403
`signature-organisation`, `v2v_contracts.signing.org_fits`); the user holds one of the roles the meaning
needs (403 `signature-role`); its `jti` was never used before in this service (401 `signature-replayed`:
the `signature_token_uses` table, so that replicas agree). The dependency yields a `Signer`.

Each refusal is problem+json with its reason code as the problem type (`.../problems/signature-role`) and
as `reason`, logged (never the token), and handed to the hooks registered with `on_refusal(app, hook)` —
where the audit trail can record it (`SignatureRefusal`: reason, meaning, client, the user when the token
verified, path, time). `install(app)` adds the RFC 9470 step-up challenge to the 401s
(`WWW-Authenticate: Bearer error="insufficient_user_authentication", acr_values=..., max_age=...`);
without it they are still 401/403 problems with their reason code.

**The record.** `record_signature` (or `SignatureRepository.record`) writes the signature in the caller's
transaction: the signer's user id, printed name, roles and organisation, the meaning, the client it came
through, the server's UTC time (`clock_timestamp()`), the signing token's id and `auth_time`, and the
SHA-256 of a canonical serialization of the signed record (`SignedRecord`: object type, id and the
fields that matter). The table refuses UPDATE, DELETE and TRUNCATE (a trigger). `check_record` tells
whether a record still matches its signature(s): a record changed after signing shows unsigned, and the
signatures of an earlier content are listed as `stale` (11.70 linking).

The one-time use of a signing token is claimed when the request is verified, in a transaction of its own:
a request that fails afterwards (a state conflict, say) has spent it, and the user signs again.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import inspect
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Protocol

import asyncpg
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic_settings import BaseSettings, SettingsConfigDict

from v2v_contracts.errors import DomainError, Forbidden, Unauthenticated, Unavailable
from v2v_contracts.signing import (
    CLAIM_NAME,
    CLAIM_ORG,
    CLAIM_ORG_KIND,
    CLAIM_ROLES,
    CLAIM_USER,
    MEANING_ROLES,
    MEANINGS,
    ROLES,
    SIGNATURE_HEADER,
    SIGNING_ACR,
    SIGNING_AMR,
    SIGNING_TOKEN_MAX_TTL_S,
    org_fits,
)
from v2v_observability import get_logger
from v2v_servicekit.auth import Principal, bearer, require_scope
from v2v_servicekit.problems import PROBLEM_BASE, ProblemResponse

log = get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"  # 0001.servicekit-signatures (with the others)
HEADER = SIGNATURE_HEADER
SIGNATURE_ATTR = "__v2v_signature__"
CANONICALIZATION = "v2v-jcs-1"  # the canonical form's version, stored with each signature


class SignatureSettings(BaseSettings):
    """Settings of signature verification (environment variables `V2V_*`)."""

    model_config = SettingsConfigDict(env_prefix="V2V_", extra="ignore")

    # how long ago the password may have been entered, and how long a signing token may live (≤ 120 s)
    signature_max_age_s: int = SIGNING_TOKEN_MAX_TTL_S
    signature_leeway_s: int = 5  # clock skew allowed between the identity provider and the service


# ---- refusals ------------------------------------------------------------------------------------------
REASONS: dict[str, tuple[int, str]] = {
    "signature-required": (401, "Electronic signature required"),
    "signature-invalid": (401, "Invalid signing token"),
    "signature-expired": (401, "Signing token expired"),
    "signature-authentication": (401, "Signing token without a re-entered password"),
    "signature-replayed": (401, "Signing token already used"),
    "signature-client": (403, "Signing token issued to another client"),
    "signature-organisation": (403, "Signer not of the caller's organisation"),
    "signature-role": (403, "Signer lacks the role for this signature"),
}


class SignatureUnauthenticated(Unauthenticated):
    """No valid signing token (401): `reason` is one of the 401 codes of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        DomainError.__init__(self, detail, kind=reason, title=REASONS[reason][1])
        self.no_credentials = False
        self.reason = reason


class SignatureForbidden(Forbidden):
    """A valid signing token that may not sign here (403): `reason` is one of the 403 codes."""

    def __init__(self, reason: str, detail: str) -> None:
        DomainError.__init__(self, detail, kind=reason, title=REASONS[reason][1])
        self.scope = ""
        self.reason = reason


SignatureRefused = (SignatureUnauthenticated, SignatureForbidden)


def _refuse(reason: str, detail: str) -> SignatureUnauthenticated | SignatureForbidden:
    status = REASONS[reason][0]
    return SignatureUnauthenticated(reason, detail) if status == 401 else SignatureForbidden(reason, detail)


@dataclass(frozen=True)
class SignatureRefusal:
    """What a refusal hook receives (for the audit trail): ids and codes only, never the token."""

    reason: str
    status: int
    meaning: str
    method: str
    path: str
    client_id: str | None  # the caller's client, when its bearer token verified
    user_id: str | None  # the signing user, only when the signing token verified
    at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "status": self.status,
            "meaning": self.meaning,
            "method": self.method,
            "path": self.path,
            "client_id": self.client_id,
            "user_id": self.user_id,
            "at": self.at.isoformat(),
        }


RefusalHook = Callable[[SignatureRefusal], Awaitable[None] | None]


def on_refusal(app: FastAPI, hook: RefusalHook) -> None:
    """Call `hook` (sync or async) with every signature refusal of this app; a failing hook is logged
    and never changes the answer."""
    hooks: list[RefusalHook] = getattr(app.state, "signature_refusal_hooks", None) or []
    hooks.append(hook)
    app.state.signature_refusal_hooks = hooks


def install(app: FastAPI) -> None:
    """Signature refusals as problem+json with `reason`, and the 401s with RFC 9470's step-up challenge
    (which `v2v_servicekit.problems` alone would answer as a plain bearer-token error)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SignatureRefused)
        status = REASONS[exc.reason][0]
        body = {
            "type": PROBLEM_BASE + exc.reason,
            "title": exc.title,
            "status": status,
            "detail": exc.detail,
            "instance": request.url.path,
            "reason": exc.reason,
        }
        headers = {}
        if status == 401:
            settings = _settings(request.app)
            headers["WWW-Authenticate"] = (
                'Bearer realm="vein2vein", error="insufficient_user_authentication", '
                f'error_description="{exc.reason}", acr_values="{SIGNING_ACR}", '
                f'max_age="{settings.signature_max_age_s}"'
            )
        return ProblemResponse(body, status_code=status, headers=headers)

    app.add_exception_handler(SignatureUnauthenticated, handler)
    app.add_exception_handler(SignatureForbidden, handler)


# ---- the signer and the verifier -----------------------------------------------------------------------
@dataclass(frozen=True)
class Signer:
    """The individual who signs this request, verified (21 CFR 11.100(a), 11.200(a)(1))."""

    user_id: str
    name: str  # printed name (11.50(a)(1))
    roles: frozenset[str]
    org_kind: str  # site | centre
    org_id: str
    meaning: str  # what the route's signature means (11.50(a)(3))
    client_id: str  # the registered system the signature was collected through
    principal: Principal  # the caller's bearer-token principal
    auth_time: dt.datetime  # when the password was entered (UTC)
    token_id: str  # the signing token's jti (used once)
    issuer: str
    expires_at: dt.datetime


class TokenUses(Protocol):
    async def consume(self, jti: str, expires_at: dt.datetime) -> bool:
        """True the first time `jti` is presented, False on every later presentation."""
        ...


class SignatureTokenUses:
    """The `signature_token_uses` table of the service's schema: each signing token's jti, once. Rows are
    purged a day after the token expired (a replayed token is refused as expired by then anyway)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def consume(self, jti: str, expires_at: dt.datetime) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                """INSERT INTO signature_token_uses (jti, expires_at) VALUES ($1, $2)
                   ON CONFLICT (jti) DO NOTHING RETURNING true""",
                jti,
                expires_at,
            )
            await conn.execute(
                """DELETE FROM signature_token_uses WHERE jti IN (
                       SELECT jti FROM signature_token_uses
                       WHERE expires_at < now() - interval '1 day' LIMIT 100)"""
            )
        return bool(claimed)


@dataclass
class MemoryTokenUses:
    """In-process one-time use (unit tests of an app without a database); not shared by replicas."""

    seen: dict[str, dt.datetime] = field(default_factory=dict)

    async def consume(self, jti: str, expires_at: dt.datetime) -> bool:
        if jti in self.seen:
            return False
        self.seen[jti] = expires_at
        return True


class SignatureVerifier:
    """Checks a signing token against the caller's principal (see the module's docstring for the order
    of the checks and the reason codes). The keys and the issuer are those of the bearer tokens'
    verifier: signing tokens come from the same identity provider."""

    def __init__(
        self,
        tokens: Any,  # a v2v_servicekit.auth.TokenVerifier (or the edge's CachedVerifier around one)
        uses: TokenUses,
        *,
        max_age_s: int = SIGNING_TOKEN_MAX_TTL_S,
        leeway_s: int = 5,
    ) -> None:
        self.tokens = tokens
        self.uses = uses
        self.max_age_s = min(max_age_s, SIGNING_TOKEN_MAX_TTL_S)
        self.leeway_s = leeway_s

    async def verify(
        self,
        token: str,
        principal: Principal,
        meaning: str,
        roles: Iterable[str],
        *,
        now: float | None = None,
        seen: dict[str, Any] | None = None,
    ) -> Signer:
        """The signer, or SignatureUnauthenticated / SignatureForbidden. `seen` (optional) receives the
        user id once the token's signature verified (for the refusal record)."""
        import time

        now = time.time() if now is None else now
        try:
            claims = await self.tokens.verified_claims(token)
        except Unauthenticated:
            raise _refuse("signature-invalid", "the signing token is not one of the issuer's") from None
        issuer = str(self.tokens.issuer).rstrip("/")
        if str(claims.get("iss", "")).rstrip("/") != issuer:
            raise _refuse("signature-invalid", "the signing token is from another issuer")
        aud = claims.get("aud")
        if self.tokens.audience not in (aud if isinstance(aud, list) else [aud]):
            raise _refuse("signature-invalid", "the signing token is for another audience")
        user_id = claims.get(CLAIM_USER) or claims.get("sub")
        if not isinstance(user_id, str) or not user_id:
            raise _refuse("signature-invalid", "the signing token names no user")
        if seen is not None:
            seen["user_id"] = user_id
        exp, iat, auth_time = claims.get("exp"), claims.get("iat"), claims.get("auth_time")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (exp, iat, auth_time)):
            raise _refuse("signature-invalid", "the signing token lacks exp, iat or auth_time")
        assert isinstance(exp, int | float) and isinstance(iat, int | float)
        assert isinstance(auth_time, int | float)
        if exp - iat > self.max_age_s:
            raise _refuse("signature-invalid", f"a signing token lives at most {self.max_age_s} s")
        if exp + self.leeway_s <= now:
            raise _refuse("signature-expired", "the signing token has expired: sign again")
        if now - auth_time > self.max_age_s + self.leeway_s:
            raise _refuse(
                "signature-expired", f"the password was entered over {self.max_age_s} s ago: sign again"
            )
        if iat > now + self.leeway_s or auth_time > now + self.leeway_s:
            raise _refuse("signature-invalid", "the signing token is dated in the future")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf > now + self.leeway_s:
            raise _refuse("signature-invalid", "the signing token is not valid yet")
        amr = claims.get("amr")
        if not isinstance(amr, list) or SIGNING_AMR not in amr or claims.get("acr") != SIGNING_ACR:
            raise _refuse(
                "signature-authentication", "the signing token does not show a password entered to sign"
            )
        jti = claims.get("jti")
        name = claims.get(CLAIM_NAME)
        org_kind, org_id = claims.get(CLAIM_ORG_KIND), claims.get(CLAIM_ORG)
        user_roles = claims.get(CLAIM_ROLES)
        if not (isinstance(jti, str) and jti and isinstance(name, str) and name.strip()):
            raise _refuse("signature-invalid", "the signing token lacks its id or the printed name")
        if not (isinstance(org_kind, str) and isinstance(org_id, str) and isinstance(user_roles, list)):
            raise _refuse("signature-invalid", "the signing token lacks the user's organisation or roles")
        issued_to = claims.get("azp") or claims.get("client_id")
        if issued_to != principal.client_id:
            raise _refuse("signature-client", "the signing token was issued to another client")
        if not org_fits(principal.kind, principal.entity_id, org_kind, org_id):
            raise _refuse("signature-organisation", "the signer is not of the caller's organisation")
        held = frozenset(str(r) for r in user_roles)
        wanted = tuple(roles)
        if not held & set(wanted):
            raise _refuse(
                "signature-role", f"a {meaning} signature needs one of the roles {', '.join(wanted)}"
            )
        expires_at = dt.datetime.fromtimestamp(exp, dt.UTC)
        if not await self.uses.consume(jti, expires_at):
            raise _refuse("signature-replayed", "this signing token was used already: sign again")
        return Signer(
            user_id=user_id,
            name=name.strip(),
            roles=held,
            org_kind=org_kind,
            org_id=org_id,
            meaning=meaning,
            client_id=principal.client_id,
            principal=principal,
            auth_time=dt.datetime.fromtimestamp(auth_time, dt.UTC),
            token_id=jti,
            issuer=issuer,
            expires_at=expires_at,
        )


def _settings(app: Any) -> SignatureSettings:
    settings = getattr(app.state, "signature_settings", None)
    if not isinstance(settings, SignatureSettings):
        settings = SignatureSettings()
        app.state.signature_settings = settings
    return settings


def signature_verifier(app: Any) -> SignatureVerifier:
    """The app's verifier: `app.state.signature_verifier` when set, else one made (once) from the bearer
    tokens' verifier (`app.state.token_verifier`) and a one-time-use store: `app.state.signature_token_uses`
    when set, else the `signature_token_uses` table through the service's pool."""
    found = getattr(app.state, "signature_verifier", None)
    if isinstance(found, SignatureVerifier):
        return found
    tokens = getattr(app.state, "token_verifier", None)
    if tokens is None:
        raise Unauthenticated("authentication is not configured")
    uses = getattr(app.state, "signature_token_uses", None)
    if uses is None:
        runtime = getattr(app.state, "runtime", None)
        pool = getattr(runtime, "pool", None)
        if pool is None:
            raise Unavailable("signatures cannot be verified yet (no database)")
        uses = SignatureTokenUses(pool)
    settings = _settings(app)
    verifier = SignatureVerifier(
        tokens, uses, max_age_s=settings.signature_max_age_s, leeway_s=settings.signature_leeway_s
    )
    app.state.signature_verifier = verifier
    return verifier


async def _report(request: Request, refusal: SignatureRefusal) -> None:
    log.warning("signature refused", **refusal.as_dict())
    for hook in list(getattr(request.app.state, "signature_refusal_hooks", None) or []):
        try:
            result = hook(refusal)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("a signature refusal hook failed", reason=refusal.reason)


_HEADER_DESCRIPTION = (
    "A signing token from the identity provider: the signing user's id and password, re-entered for this "
    "signature, exchanged by the same client whose bearer token comes with the request (at most "
    f"{SIGNING_TOKEN_MAX_TTL_S} s old, used once)."
)


def require_signature(meaning: str, *, roles: Sequence[str] | None = None, scope: str | None = None) -> Any:
    """The dependency of a route that needs an electronic signature with `meaning` (one of
    `v2v_contracts.signing.MEANINGS`) by a user holding one of `roles` (default: `MEANING_ROLES[meaning]`).

    With `scope`, it also checks the bearer token for that scope (as `require_scope`) and the route need
    declare nothing else; without, it uses the principal the route's own `require_scope` verified (or
    verifies the bearer token itself). Yields the `Signer`."""
    if meaning not in MEANINGS:
        raise ValueError(f"unknown signature meaning {meaning!r}: one of {', '.join(MEANINGS)}")
    wanted = tuple(roles) if roles is not None else MEANING_ROLES[meaning]
    if not wanted or set(wanted) - set(ROLES):
        raise ValueError(f"signature roles must be among {', '.join(ROLES)}")

    async def current_principal(request: Request) -> Principal:
        found = getattr(request.state, "principal", None)
        if isinstance(found, Principal):
            return found
        verifier = getattr(request.app.state, "token_verifier", None)
        if verifier is None:
            raise Unauthenticated("authentication is not configured")
        principal: Principal = await verifier.verify(bearer(request))
        request.state.principal = principal
        return principal

    principal_dependency = require_scope(scope) if scope else Depends(current_principal)

    async def signer(
        request: Request,
        signing_token: Annotated[
            str | None, Header(alias=HEADER, description=_HEADER_DESCRIPTION, max_length=8192)
        ] = None,
        principal: Principal = principal_dependency,
    ) -> Signer:
        seen: dict[str, Any] = {}
        try:
            if not signing_token or not signing_token.strip():
                raise _refuse(
                    "signature-required", f"this action is signed: send a signing token in {HEADER}"
                )
            verifier = signature_verifier(request.app)
            return await verifier.verify(signing_token.strip(), principal, meaning, wanted, seen=seen)
        except SignatureRefused as exc:
            await _report(
                request,
                SignatureRefusal(
                    reason=exc.reason,
                    status=REASONS[exc.reason][0],
                    meaning=meaning,
                    method=request.method,
                    path=request.url.path,
                    client_id=principal.client_id,
                    user_id=seen.get("user_id"),
                    at=dt.datetime.now(dt.UTC),
                ),
            )
            raise

    setattr(signer, SIGNATURE_ATTR, (meaning, wanted))
    return Depends(signer)


def declared_signature(route: Any) -> tuple[str, tuple[str, ...]] | None:
    """(meaning, roles) of the signature a FastAPI route requires through `require_signature`, if any."""
    dependant = getattr(route, "dependant", None)
    stack = list(dependant.dependencies) if dependant is not None else []
    while stack:
        dep = stack.pop()
        found = getattr(dep.call, SIGNATURE_ATTR, None)
        if found:
            return found  # type: ignore[no-any-return]
        stack.extend(dep.dependencies)
    return None


# ---- the signed record -------------------------------------------------------------------------------
MAX_SAFE_INTEGER = 2**53 - 1  # beyond this JSON numbers are not exact everywhere (RFC 8785 §3.2.2.3)


def canonical_json(value: Any) -> bytes:
    """A canonical UTF-8 JSON serialization after RFC 8785 (JCS): object members sorted by their names'
    UTF-16 code units, no whitespace, JSON's shortest string escapes. To stay exact in every language,
    floats are refused (use Decimal or a string) and so are integers beyond ±(2^53 - 1); Decimal is its
    string, datetimes must be timezone-aware and become UTC ISO 8601 with `Z`, dates ISO 8601, UUIDs their
    string, enums their value; tuples are arrays; sets, bytes and other types are refused."""
    return _serialize(value).encode("utf-8")


def _serialize(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return _serialize(value.value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError("integer beyond ±(2^53 - 1): sign it as a string")
        return str(value)
    if isinstance(value, float):
        raise ValueError("floats have no canonical form across languages: sign a Decimal or a string")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string with a lone surrogate cannot be signed") from None
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("a non-finite Decimal cannot be signed")
        return json.dumps(str(value))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("a naive datetime cannot be signed: make it timezone-aware")
        text = value.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return json.dumps(text)
    if isinstance(value, dt.date):
        return json.dumps(value.isoformat())
    if isinstance(value, uuid.UUID):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise ValueError("object member names must be strings")
        keys = sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        return "{" + ",".join(_serialize(k) + ":" + _serialize(value[k]) for k in keys) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_serialize(v) for v in value) + "]"
    raise ValueError(f"a {type(value).__name__} has no canonical form here")


@dataclass(frozen=True)
class SignedRecord:
    """What a signature binds: the object's type and id and the fields that matter to the decision (for a
    release: lot, QC summary, certificate reference, status ...). The same fields, read again later, give
    the same hash only if none of them changed."""

    object_type: str
    object_id: str
    fields: Mapping[str, Any]

    def document(self) -> dict[str, Any]:
        return {"object_type": self.object_type, "object_id": self.object_id, "fields": dict(self.fields)}

    def canonical(self) -> bytes:
        return canonical_json(self.document())

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()


@dataclass(frozen=True)
class Signature:
    """A stored signature (its manifestation, 11.50, and its link to the record, 11.70)."""

    signature_id: uuid.UUID
    object_type: str
    object_id: str
    meaning: str
    user_id: str
    name: str
    roles: tuple[str, ...]
    org_kind: str
    org_id: str
    client_id: str
    record_sha256: str
    canonicalization: str
    token_id: str
    auth_time: dt.datetime
    signed_at: dt.datetime
    issuer: str

    @classmethod
    def of(cls, signer: Signer, record: SignedRecord, signed_at: dt.datetime) -> Signature:
        """The signature `signer` makes on `record` at `signed_at` (what `record_signature` stores; the
        services' in-memory stores build theirs with it too)."""
        return cls(
            signature_id=uuid.uuid4(),
            object_type=record.object_type,
            object_id=record.object_id,
            meaning=signer.meaning,
            user_id=signer.user_id,
            name=signer.name,
            roles=tuple(sorted(signer.roles)),
            org_kind=signer.org_kind,
            org_id=signer.org_id,
            client_id=signer.client_id,
            record_sha256=record.sha256(),
            canonicalization=CANONICALIZATION,
            token_id=signer.token_id,
            auth_time=signer.auth_time,
            signed_at=signed_at,
            issuer=signer.issuer,
        )

    def matches(self, record: SignedRecord) -> bool:
        """Whether `record`, as it is now, is what was signed."""
        return (
            (record.object_type, record.object_id) == (self.object_type, self.object_id)
            and self.canonicalization == CANONICALIZATION
            and record.sha256() == self.record_sha256
        )

    def manifestation(self) -> str:
        """How the signature reads wherever it is shown: printed name, date and time (UTC) and meaning."""
        at = self.signed_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.name} ({self.user_id}), {at}: {self.meaning} — {MEANINGS.get(self.meaning, '')}"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Signature:
        return cls(
            signature_id=row["signature_id"],
            object_type=row["object_type"],
            object_id=row["object_id"],
            meaning=row["meaning"],
            user_id=row["signer_user_id"],
            name=row["signer_name"],
            roles=tuple(row["signer_roles"]),
            org_kind=row["signer_org_kind"],
            org_id=row["signer_org"],
            client_id=row["client_id"],
            record_sha256=row["record_sha256"],
            canonicalization=row["canonicalization"],
            token_id=row["token_jti"],
            auth_time=row["auth_time"],
            signed_at=row["signed_at"],
            issuer=row["issuer"],
        )


@dataclass(frozen=True)
class SignatureCheck:
    """Whether a record is signed as it is now: `current` signatures match its content; `stale` ones
    were made on an earlier content (the record changed after signing: it shows unsigned)."""

    current: tuple[Signature, ...]
    stale: tuple[Signature, ...]

    @property
    def signed(self) -> bool:
        return bool(self.current)


_COLUMNS = """signature_id, object_type, object_id, meaning, signer_user_id, signer_name, signer_roles,
              signer_org_kind, signer_org, client_id, record_sha256, canonicalization, token_jti, auth_time,
              signed_at, issuer"""


async def record_signature(conn: asyncpg.Connection, signer: Signer, record: SignedRecord) -> Signature:
    """Writes `signer`'s signature of `record` (with the route's meaning) in the caller's open transaction,
    so that the signature and the change it signs commit together or not at all."""
    if not conn.is_in_transaction():
        raise RuntimeError("record_signature runs inside the transaction of the change it signs")
    row = await conn.fetchrow(
        f"""INSERT INTO signatures
               (signature_id, object_type, object_id, meaning, signer_user_id, signer_name, signer_roles,
                signer_org_kind, signer_org, client_id, record_sha256, canonicalization, token_jti,
                auth_time, signed_at, issuer)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, clock_timestamp(), $15)
            RETURNING {_COLUMNS}""",
        uuid.uuid4(),
        record.object_type,
        record.object_id,
        signer.meaning,
        signer.user_id,
        signer.name,
        sorted(signer.roles),
        signer.org_kind,
        signer.org_id,
        signer.client_id,
        record.sha256(),
        CANONICALIZATION,
        signer.token_id,
        signer.auth_time,
        signer.issuer,
    )
    assert row is not None
    signature = Signature.from_row(row)
    log.info(
        "record signed",
        object_type=record.object_type,
        object_id=record.object_id,
        meaning=signer.meaning,
        user_id=signer.user_id,
        client_id=signer.client_id,
        signature_id=str(signature.signature_id),
    )
    return signature


async def signatures_of(
    conn: asyncpg.Connection | asyncpg.Pool, object_type: str, object_id: str, meaning: str | None = None
) -> list[Signature]:
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM signatures
            WHERE object_type = $1 AND object_id = $2 AND ($3::text IS NULL OR meaning = $3)
            ORDER BY signed_at, signature_id""",
        object_type,
        object_id,
        meaning,
    )
    return [Signature.from_row(r) for r in rows]


async def check_record(
    conn: asyncpg.Connection | asyncpg.Pool, record: SignedRecord, meaning: str | None = None
) -> SignatureCheck:
    """Whether `record` as it is now carries a signature (with `meaning`, if given) that matches it."""
    found = await signatures_of(conn, record.object_type, record.object_id, meaning)
    return SignatureCheck(
        current=tuple(s for s in found if s.matches(record)),
        stale=tuple(s for s in found if not s.matches(record)),
    )


class SignatureRepository:
    """The signatures of one transaction, for a service's unit of work (`tx.signatures`)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def record(self, signer: Signer, record: SignedRecord) -> Signature:
        return await record_signature(self.conn, signer, record)

    async def of(self, object_type: str, object_id: str, meaning: str | None = None) -> list[Signature]:
        return await signatures_of(self.conn, object_type, object_id, meaning)

    async def check(self, record: SignedRecord, meaning: str | None = None) -> SignatureCheck:
        return await check_record(self.conn, record, meaning)


__all__ = [
    "CANONICALIZATION",
    "HEADER",
    "MIGRATIONS_DIR",
    "REASONS",
    "MemoryTokenUses",
    "Signature",
    "SignatureCheck",
    "SignatureForbidden",
    "SignatureRefusal",
    "SignatureRepository",
    "SignatureSettings",
    "SignatureTokenUses",
    "SignatureUnauthenticated",
    "SignatureVerifier",
    "SignedRecord",
    "Signer",
    "canonical_json",
    "check_record",
    "declared_signature",
    "install",
    "on_refusal",
    "record_signature",
    "require_signature",
    "signature_verifier",
    "signatures_of",
]
