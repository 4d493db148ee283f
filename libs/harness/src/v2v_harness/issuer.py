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

**Signing users and the signing step-up** (21 CFR 11.100, 11.200, 11.300; EU GMP Annex 11 §14). Users are
registered individuals (user id, printed name, roles, organisation: a site or a treatment centre), their
passwords kept as argon2id hashes (`User`, `hash_password`). A registered client of a kind that collects
signatures (a centre's, a site's or QA's system) exchanges a user's id and password, re-entered at the
moment of signing, for a **signing token** with the OAuth 2.0 password grant (RFC 6749 §4.3, Keycloak's
"direct access grant"), its own `private_key_jwt` client authentication being required. The answer is not
an API access token (`token_type` "N_A", no scope, no principal): a JWT of at most 120 s naming the user
(`sub` = `preferred_username` = user id, `name`, `v2v_roles`, `v2v_org_kind`, `v2v_org`), `auth_time` =
now, `amr` ["pwd"], `acr` = `SIGNING_ACR`, the client it was issued to (`azp`, `client_id`) and a fresh
`jti` that the services accept once (`v2v_servicekit.signatures`). Only users of the client's own
organisation are served (`v2v_contracts.signing.org_fits`).

Lockout (11.300(d): attempted unauthorised use is detected and reported): after `max_failures` consecutive
failures for one user id (known or not, so a lockout tells nothing about which ids exist) the id is locked
for `lockout_s`; each lockout is logged as an alert, counted (`lockouts_total`, `lockouts`), appended to the
alert file when one is set, and handed to the `on_alert` hooks. A locked user is refused even with the
right password. The counters live in the issuer's memory (a restart clears them).

Why the password grant, which RFC 9700 (OAuth 2.0 Security BCP §2.4) says not to use for logging users in:
here it is no login. It is the re-entry of both identification components that 11.200(a)(1) asks for at
each signing, by a confidential client that already holds the user's attention (the centre's or QA's own
system, which authenticates itself with a signed assertion), and it yields a token that cannot call any
API. A browser portal should do the same with an OIDC authorization request (`prompt=login`, `max_age=0`,
`acr_values`; RFC 9470 step-up), which gives the same claims without the password passing through the
client; Keycloak serves both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet
from pydantic_settings import BaseSettings, SettingsConfigDict

from v2v_contracts.scopes import SCOPES, SCOPES_BY_KIND
from v2v_contracts.signing import (
    CLAIM_NAME,
    CLAIM_ORG,
    CLAIM_ORG_KIND,
    CLAIM_ROLES,
    CLAIM_USER,
    ORG_KINDS,
    ROLES,
    SIGNING_ACR,
    SIGNING_AMR,
    SIGNING_CLIENT_KINDS,
    SIGNING_GRANT_TYPE,
    SIGNING_TOKEN_MAX_TTL_S,
    SIGNING_TOKEN_TYPE,
    org_fits,
)

log = logging.getLogger(__name__)

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


# ---- signing users ---------------------------------------------------------------------------------------
USER_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_PASSWORD_CHARS = 1024  # longer inputs are refused before hashing (argon2 would take them; no need)


class IssuerSettings(BaseSettings):
    """The local issuer's settings (environment variables `V2V_*`)."""

    model_config = SettingsConfigDict(env_prefix="V2V_", extra="ignore")

    # consecutive failed signing authentications of one user id before it is locked (11.300(d))
    signing_max_failures: int = 5
    signing_lockout_s: float = 900.0  # how long a locked user id stays locked
    signing_token_ttl_s: int = SIGNING_TOKEN_MAX_TTL_S  # a signing token's life (capped at 120 s)
    # argon2id cost of new password hashes: OWASP's Password Storage Cheat Sheet minimum (19 MiB, 2
    # passes, 1 lane) by default; RFC 9106's "low memory" option is 65536 KiB, 3 passes, 4 lanes
    password_hash_memory_kib: int = 19_456
    password_hash_time_cost: int = 2
    password_hash_parallelism: int = 1

    def policy(self) -> SigningPolicy:
        return SigningPolicy(
            max_failures=self.signing_max_failures,
            lockout_s=self.signing_lockout_s,
            token_ttl_s=self.signing_token_ttl_s,
        )

    def hasher(self) -> PasswordHasher:
        return PasswordHasher(
            time_cost=self.password_hash_time_cost,
            memory_cost=self.password_hash_memory_kib,
            parallelism=self.password_hash_parallelism,
        )


@dataclass(frozen=True)
class SigningPolicy:
    max_failures: int = 5
    lockout_s: float = 900.0
    token_ttl_s: int = SIGNING_TOKEN_MAX_TTL_S

    def __post_init__(self) -> None:
        if self.max_failures < 1 or self.lockout_s <= 0 or self.token_ttl_s < 1:
            raise ValueError("signing policy: max_failures ≥ 1, lockout_s > 0, token_ttl_s ≥ 1")


def password_hasher() -> PasswordHasher:
    return IssuerSettings().hasher()


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    """An argon2id hash in the PHC string format (algorithm, version, cost, salt and hash in one string).

    argon2id is the memory-hard hash RFC 9106 recommends and OWASP lists first; argon2-cffi (maintained
    by the Python Cryptographic Authority's Hynek Schlawack) binds the reference implementation, draws a
    random 16-byte salt per hash and compares in constant time. hashlib.scrypt would need no dependency
    but leaves salt handling, encoding and parameter upgrades to us."""
    return (hasher or password_hasher()).hash(password)


@dataclass(frozen=True)
class User:
    """A registered individual who may sign (21 CFR 11.100(a): unique to one individual, never reused)."""

    user_id: str
    name: str  # the printed name shown with every signature (11.50(a)(1))
    roles: tuple[str, ...]
    org_kind: str  # site | centre
    org_id: str  # which site or treatment centre
    password_hash: str = field(default="", repr=False)
    active: bool = True

    def __post_init__(self) -> None:
        if not USER_ID_PATTERN.match(self.user_id):
            raise ValueError(f"user id {self.user_id!r}: lower-case letters, digits, '.', '_', '-'")
        if unknown := set(self.roles) - set(ROLES):
            raise ValueError(f"user {self.user_id}: unknown roles {sorted(unknown)}")
        if self.org_kind not in ORG_KINDS or not self.org_id:
            raise ValueError(f"user {self.user_id}: organisation must be a site or a centre")
        if not self.name.strip():
            raise ValueError(f"user {self.user_id}: a printed name is required")

    def public(self) -> dict[str, Any]:
        """What `users.json` holds: everything but the password hash."""
        return {
            "user_id": self.user_id,
            "name": self.name,
            "roles": list(self.roles),
            "org_kind": self.org_kind,
            "org_id": self.org_id,
            "active": self.active,
        }


@dataclass(frozen=True)
class SigningAlert:
    """A signing user id locked after repeated failures (11.300(d)), for logs, counters and hooks."""

    kind: str  # "lockout"
    user_id: str  # the id that was tried (it need not exist)
    client_id: str
    failures: int
    at: float  # epoch seconds
    locked_until: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "user_id": self.user_id,
            "client_id": self.client_id,
            "failures": self.failures,
            "at": self.at,
            "locked_until": self.locked_until,
        }


class TokenError(Exception):
    """An RFC 6749 §5.2 error answer; `reason` (sent as `v2v_reason`) is a stable code for the signing
    grant's refusals: wrong-credentials, locked, user-disabled, organisation, client-may-not-sign."""

    def __init__(self, error: str, description: str, status: int = 400, reason: str | None = None) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.reason = reason

    def body(self) -> dict[str, Any]:
        out = {"error": self.error, "error_description": self.description}
        if self.reason:
            out["v2v_reason"] = self.reason
        return out


class AuthorizationServer:
    def __init__(
        self,
        issuer: str,
        clients: Iterable[Client] = (),
        *,
        audience: str = AUDIENCE,
        token_ttl_s: int = TOKEN_TTL_S,
        key: ECKey | None = None,
        users: Iterable[User] = (),
        signing: SigningPolicy | None = None,
        hasher: PasswordHasher | None = None,
        alert_file: Path | None = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.token_ttl_s = min(token_ttl_s, TOKEN_TTL_S)
        self.key = key or ECKey.generate_key("P-256", parameters={"use": "sig"}, private=True)
        self.key.ensure_kid()
        self.clients = {c.client_id: c for c in clients}
        self._seen_jti: dict[str, float] = {}  # jti -> expiry of its assertion
        self._lock = threading.Lock()
        # signing users, their consecutive failures and lockouts (by the user id tried, known or not)
        self.users = {u.user_id: u for u in users}
        self.signing = signing or SigningPolicy()
        self.hasher = hasher or password_hasher()
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))  # unknown ids cost the same
        self.alert_file = alert_file
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}
        self.lockouts: dict[str, int] = {}  # user id -> how many times it was locked
        self.lockouts_total = 0
        self.alerts: list[SigningAlert] = []  # the latest alerts (bounded)
        self.on_alert: list[Any] = []  # callables taking a SigningAlert

    # ---- metadata ------------------------------------------------------------------------------------
    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.issuer + "/jwks",
            "grant_types_supported": ["client_credentials", SIGNING_GRANT_TYPE],
            "acr_values_supported": [SIGNING_ACR],
            "claims_supported": [
                "sub",
                CLAIM_USER,
                CLAIM_NAME,
                CLAIM_ROLES,
                CLAIM_ORG_KIND,
                CLAIM_ORG,
                "auth_time",
                "amr",
                "acr",
                "azp",
            ],
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
        grant = form.get("grant_type")
        if grant not in ("client_credentials", SIGNING_GRANT_TYPE):
            raise TokenError("unsupported_grant_type", "only client_credentials and password are supported")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            raise TokenError("invalid_client", "private_key_jwt client authentication required", 401)
        client = self._authenticate(form["client_assertion"], now)
        if grant == SIGNING_GRANT_TYPE:
            return self._signing_token(client, form, now)
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

    # ---- the signing step-up (password grant) --------------------------------------------------------
    def _signing_token(self, client: Client, form: dict[str, str], now: float) -> dict[str, Any]:
        """A user's id and password, re-entered for one signature, for a signing token (21 CFR 11.200)."""
        if client.kind not in SIGNING_CLIENT_KINDS:
            raise TokenError(
                "unauthorized_client", "this client does not collect signatures", reason="client-may-not-sign"
            )
        user_id = form.get("username", "").strip().lower()
        password = form.get("password", "")
        if not user_id or not password or len(user_id) > 64 or len(password) > MAX_PASSWORD_CHARS:
            raise TokenError("invalid_request", "username and password are required (bounded)")
        user = self._check_password(client, user_id, password, now)
        if not org_fits(client.kind, client.entity_id, user.org_kind, user.org_id):
            raise TokenError(
                "invalid_grant",
                "this user does not belong to the client's organisation",
                reason="organisation",
            )
        ttl = max(1, min(self.signing.token_ttl_s, SIGNING_TOKEN_MAX_TTL_S))
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user.user_id,
            CLAIM_USER: user.user_id,
            CLAIM_NAME: user.name,
            CLAIM_ROLES: list(user.roles),
            CLAIM_ORG_KIND: user.org_kind,
            CLAIM_ORG: user.org_id,
            "auth_time": int(now),
            "amr": [SIGNING_AMR],
            "acr": SIGNING_ACR,
            "azp": client.client_id,
            "client_id": client.client_id,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + ttl,
            "jti": str(uuid.uuid4()),
        }
        token = jwt.encode({"alg": "ES256", "kid": self.key.kid, "typ": SIGNING_TOKEN_TYPE}, claims, self.key)
        log.info("signing token issued: user %s via client %s", user.user_id, client.client_id)
        return {"access_token": token, "token_type": "N_A", "expires_in": ttl}

    def _check_password(self, client: Client, user_id: str, password: str, now: float) -> User:
        with self._lock:
            until = self._locked_until.get(user_id, 0.0)
            if until > now:
                log.warning("signing refused: user id %s is locked (client %s)", user_id, client.client_id)
                raise TokenError(
                    "invalid_grant", "this user is locked after repeated failures", reason="locked"
                )
            if until:  # the lockout is over: a fresh count
                self._locked_until.pop(user_id, None)
                self._failures.pop(user_id, None)
        user = self.users.get(user_id)
        ok = self._verify(user.password_hash if user and user.password_hash else self._dummy_hash, password)
        if user is not None and ok and user.active:
            with self._lock:
                if self._locked_until.get(user_id, 0.0) > now:  # locked while this attempt was checked
                    raise TokenError(
                        "invalid_grant", "this user is locked after repeated failures", reason="locked"
                    )
                self._failures.pop(user_id, None)
            return user
        if user is not None and ok and not user.active:
            raise TokenError("invalid_grant", "this user is disabled", reason="user-disabled")
        alert = None
        with self._lock:
            failures = self._failures.get(user_id, 0) + 1
            if failures >= self.signing.max_failures:
                self._failures.pop(user_id, None)
                self._locked_until[user_id] = now + self.signing.lockout_s
                self.lockouts[user_id] = self.lockouts.get(user_id, 0) + 1
                self.lockouts_total += 1
                alert = SigningAlert(
                    "lockout", user_id, client.client_id, failures, now, now + self.signing.lockout_s
                )
                self.alerts = [*self.alerts[-999:], alert]
            else:
                if len(self._failures) > 100_000:  # bounded: ids tried at random do not grow it forever
                    self._failures.clear()
                self._failures[user_id] = failures
        log.info("signing refused: wrong credentials for user id %s (client %s)", user_id, client.client_id)
        if alert is not None:
            self._raise_alert(alert)
        raise TokenError("invalid_grant", "user id or password not accepted", reason="wrong-credentials")

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _raise_alert(self, alert: SigningAlert) -> None:
        log.warning(
            "ALERT signing lockout: user id %s locked for %.0f s after %d consecutive failures (client %s)",
            alert.user_id,
            alert.locked_until - alert.at,
            alert.failures,
            alert.client_id,
        )
        if self.alert_file is not None:
            try:
                with self.alert_file.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(alert.as_dict()) + "\n")
            except OSError:
                log.exception("the signing alert could not be written to %s", self.alert_file)
        for hook in list(self.on_alert):
            try:
                hook(alert)
            except Exception:
                log.exception("a signing alert hook failed")

    def locked(self, user_id: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            return self._locked_until.get(user_id.lower(), 0.0) > now

    def unlock(self, user_id: str) -> None:
        """An administrator's unlock (the counters of that id start afresh)."""
        with self._lock:
            self._locked_until.pop(user_id.lower(), None)
            self._failures.pop(user_id.lower(), None)

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
def client_assertion(
    client_id: str, key: ECKey, audience: str, *, ttl_s: int = 60, now: float | None = None
) -> str:
    """A signed client assertion (RFC 7523 §3) for the token endpoint `audience` (made at `now`)."""
    now = int(time.time() if now is None else now)
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


# ---- signing users on disk ----------------------------------------------------------------------------
def _write_private(path: Path, data: Any) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through os.open


def new_user(
    user_id: str,
    name: str,
    roles: Iterable[str],
    org_kind: str,
    org_id: str,
    *,
    password: str | None = None,
    hasher: PasswordHasher | None = None,
) -> tuple[User, str]:
    """A user with a fresh random password (or the one given): (User with its hash, the password)."""
    password = password or secrets.token_urlsafe(15)
    user = User(user_id, name, tuple(roles), org_kind, org_id, hash_password(password, hasher))
    return user, password


def demo_users(
    centres: Iterable[str], sites: Iterable[tuple[str, str]]
) -> list[tuple[str, str, tuple[str, ...], str, str]]:
    """The demo signing users, as (user id, printed name, roles, org kind, org id): a physician per
    certified centre; per site a QA reviewer and a release signer (a Qualified Person where the site is in
    the EU/EEA or Switzerland, else the quality unit). `sites` are (site id, country). The names are
    illustrative (not real people)."""
    qp_countries = {
        "AT", "BE", "BG", "CH", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE",
        "IS", "IT", "LI", "LT", "LU", "LV", "MT", "NL", "NO", "PL", "PT", "RO", "SE", "SI", "SK",
    }  # fmt: skip
    wanted: list[tuple[str, str, tuple[str, ...], str, str]] = []
    for centre in centres:
        wanted.append(
            (f"phys.{centre.lower()}", f"Dr. Demo Physician ({centre})", ("physician",), "centre", centre)
        )
    for site_id, country in sites:
        low = site_id.lower()
        wanted.append((f"qa.{low}", f"Demo QA Reviewer ({site_id})", ("qa_reviewer",), "site", site_id))
        if country.upper() in qp_countries:
            wanted.append(
                (f"qp.{low}", f"Demo Qualified Person ({site_id})", ("qualified_person",), "site", site_id)
            )
        else:
            wanted.append((f"qu.{low}", f"Demo Quality Unit ({site_id})", ("quality_unit",), "site", site_id))
    return wanted


def write_users(state_dir: Path, users: list[User], passwords: dict[str, str] | None = None) -> Path:
    """`users.json` (public facts, no secret), `users.hashes.json` (argon2id hashes, 0600) and, for the
    passwords given (demo users just created), `users.secrets.json` (0600; merged with what it held)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    registry = state_dir / "users.json"
    registry.write_text(json.dumps([u.public() for u in users], indent=2) + "\n")
    _write_private(state_dir / "users.hashes.json", {u.user_id: u.password_hash for u in users})
    if passwords:
        known = read_user_secrets(state_dir)
        known.update(passwords)
        ids = {u.user_id for u in users}
        _write_private(state_dir / "users.secrets.json", {k: v for k, v in known.items() if k in ids})
    return registry


def read_users(state_dir: Path) -> list[User]:
    facts = json.loads((state_dir / "users.json").read_text())
    hashes = json.loads((state_dir / "users.hashes.json").read_text())
    return [
        User(
            f["user_id"],
            f["name"],
            tuple(f["roles"]),
            f["org_kind"],
            f["org_id"],
            hashes.get(f["user_id"], ""),
            bool(f.get("active", True)),
        )
        for f in facts
    ]


def read_user_secrets(state_dir: Path) -> dict[str, str]:
    """The demo users' passwords (`users.secrets.json`, 0600), for tests and trying the platform by hand."""
    path = state_dir / "users.secrets.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def signing_form(
    client_id: str, key: ECKey, endpoint: str, user_id: str, password: str, *, now: float | None = None
) -> dict[str, str]:
    """The signing step-up's token request: the password grant with a fresh client assertion."""
    return {
        "grant_type": SIGNING_GRANT_TYPE,
        "username": user_id,
        "password": password,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(client_id, key, endpoint, now=now),
    }


def fetch_signing_token(issuer: str, state_dir: Path, client_id: str, user_id: str, password: str) -> str:
    """The real signing step-up against `issuer` (discovery, then the password grant); raises
    `TokenError` with the issuer's error and `v2v_reason` when refused."""
    import httpx

    meta = httpx.get(issuer.rstrip("/") + "/.well-known/openid-configuration", timeout=10).json()
    endpoint = meta["token_endpoint"]
    form = signing_form(client_id, private_key(state_dir, client_id), endpoint, user_id, password)
    resp = httpx.post(endpoint, data=form, timeout=10)
    if resp.status_code != 200:
        raise token_error_of(resp)
    return str(resp.json()["access_token"])


def token_error_of(resp: Any) -> TokenError:
    """The issuer's error answer (an httpx response) as a TokenError."""
    try:
        body = resp.json()
    except ValueError:
        body = {}
    return TokenError(
        str(body.get("error", "server_error")),
        str(body.get("error_description", f"HTTP {resp.status_code}")),
        int(resp.status_code),
        body.get("v2v_reason"),
    )


# ---- HTTP --------------------------------------------------------------------------------------------
def asgi_app(server: AuthorizationServer) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
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
        try:  # password hashes take tens of milliseconds: not on the event loop
            return JSONResponse(await run_in_threadpool(server.token, form), headers=no_store)
        except TokenError as exc:
            return JSONResponse(exc.body(), exc.status, headers=no_store)

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
        cls,
        state_dir: Path,
        clients: list[Client],
        port: int = 0,
        key: ECKey | None = None,
        users: list[User] | None = None,
        settings: IssuerSettings | None = None,
    ) -> IssuerProcess:
        import uvicorn

        from v2v_harness.processes import free_port

        settings = settings or IssuerSettings()
        port = port or free_port()
        server = AuthorizationServer(
            f"http://127.0.0.1:{port}",
            clients,
            key=key,
            users=users or (),
            signing=settings.policy(),
            hasher=settings.hasher(),
            alert_file=state_dir / "signing-alerts.jsonl",
        )
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
    "IssuerSettings",
    "SigningAlert",
    "SigningPolicy",
    "TokenError",
    "User",
    "client_assertion",
    "demo_clients",
    "demo_users",
    "fetch_signing_token",
    "fetch_token",
    "hash_password",
    "new_client",
    "new_user",
    "private_key",
    "read_clients",
    "read_user_secrets",
    "read_users",
    "signing_form",
    "token_error_of",
    "write_clients",
    "write_users",
]
