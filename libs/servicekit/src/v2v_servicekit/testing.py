"""Bearer tokens for a service's own API tests (FastAPI TestClient / httpx ASGI transport), without an
issuer process: `TestTokens` signs tokens with a throw-away key and installs a verifier that trusts it.

    tokens = TestTokens.install(app)                      # app.state.token_verifier
    headers = tokens.headers("centre", "TC-DE-BE-001")    # the kind's default scopes
    headers = tokens.headers("qa", scopes=["orders:read"])

Signing tokens (`v2v_servicekit.signatures`) from the same throw-away issuer, for a route that requires a
signature, beside the bearer token of the client they were issued to:

    tokens.install_signatures(app)                        # one-time use remembered in memory (no database)
    headers = {**tokens.headers("qa"), **tokens.signature_headers("qp.site-1", client_id="qa",
                                                                  roles=["qualified_person"])}

End-to-end tests use the harness' real authorization server instead (v2v_harness.issuer; signing tokens
through the real step-up: `credentials.signing_token(client_id, user_id)`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

from v2v_contracts.scopes import SCOPES_BY_KIND
from v2v_contracts.signing import (
    CLAIM_NAME,
    CLAIM_ORG,
    CLAIM_ORG_KIND,
    CLAIM_ROLES,
    CLAIM_USER,
    SIGNATURE_HEADER,
    SIGNING_ACR,
    SIGNING_AMR,
    SIGNING_TOKEN_TYPE,
)
from v2v_servicekit.auth import TokenVerifier

ISSUER = "https://issuer.test"
AUDIENCE = "vein2vein"

DEFAULT_SCOPES = SCOPES_BY_KIND  # the scopes each kind of principal gets by default


@dataclass(frozen=True)
class FromNow:
    """A timestamp relative to when a test runs, not to when it was collected: a parametrized "ten
    minutes ahead" computed at import is "five minutes ahead" in a suite that reaches it five minutes
    later. Its repr is stable, so test ids built from it agree across pytest-xdist workers.

        CASES = [({"received_at": FromNow(minutes=10)}, "received_at")]
        body = resolve_times(body)          # inside the test
    """

    days: float = 0
    hours: float = 0
    minutes: float = 0
    naive: bool = False  # without a time zone (a value the API must refuse)
    date_only: bool = False  # the UTC date (YYYY-MM-DD): a suite that crosses midnight keeps its day

    def iso(self) -> str:
        at = datetime.now(UTC) + timedelta(days=self.days, hours=self.hours, minutes=self.minutes)
        if self.date_only:
            return at.date().isoformat()
        return (at.replace(tzinfo=None) if self.naive else at).isoformat()

    def __repr__(self) -> str:
        units = (("days", self.days), ("hours", self.hours), ("minutes", self.minutes))
        parts = [f"{k}={v:g}" for k, v in units if v]
        flags = (["naive"] if self.naive else []) + (["date"] if self.date_only else [])
        return f"now({', '.join(parts + flags)})"


def resolve_times(value: Any) -> Any:
    """`value` with every `FromNow` inside it (dicts, lists, tuples) replaced by its ISO timestamp now."""
    if isinstance(value, FromNow):
        return value.iso()
    if isinstance(value, dict):
        return {k: resolve_times(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(resolve_times(v) for v in value)
    return value


def client_id_of(kind: str, entity_id: str | None = None) -> str:
    """The client id `TestTokens.token` gives a (kind, entity) by default (its `sub`)."""
    return f"{kind}-{(entity_id or 'x').lower()}"


class TestTokens:
    __test__ = False  # not a pytest class

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self.key = ECKey.generate_key("P-256", private=True)
        self.key.ensure_kid()

    @classmethod
    def install(cls, app: Any) -> TestTokens:
        tokens = cls()
        app.state.token_verifier = tokens.verifier()
        return tokens

    def verifier(self) -> TokenVerifier:
        return TokenVerifier.with_keys(
            self.issuer, self.audience, {"keys": [self.key.as_dict(private=False)]}
        )

    def token(
        self,
        kind: str,
        entity_id: str | None = None,
        *,
        scopes: Iterable[str] | None = None,
        client_id: str | None = None,
        ttl_s: int = 300,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": client_id or client_id_of(kind, entity_id),
            "iat": now,
            "nbf": now,
            "exp": now + ttl_s,
            "jti": str(uuid.uuid4()),
            "scope": " ".join(DEFAULT_SCOPES.get(kind, ()) if scopes is None else scopes),
            "v2v_kind": kind,
            "v2v_entity": entity_id,
            **claims,
        }
        return jwt.encode({"alg": "ES256", "kid": self.key.kid, "typ": "at+jwt"}, body, self.key)

    def headers(self, kind: str, entity_id: str | None = None, **kw: Any) -> dict[str, str]:
        return {"Authorization": "Bearer " + self.token(kind, entity_id, **kw)}

    # ---- signing tokens ---------------------------------------------------------------------------------
    def install_signatures(self, app: Any) -> Any:
        """Lets `require_signature` work without a database: the one-time use of signing tokens is
        remembered in memory (`MemoryTokenUses`, returned). Also installs the refusal answers."""
        from v2v_servicekit import signatures

        signatures.install(app)
        uses = signatures.MemoryTokenUses()
        app.state.signature_token_uses = uses
        app.state.signature_verifier = None
        return uses

    def signing_token(
        self,
        user_id: str = "qa.site-1",
        *,
        client_id: str | None = None,
        name: str | None = None,
        roles: Iterable[str] = ("qa_reviewer",),
        org_kind: str = "site",
        org_id: str = "SITE-1",
        ttl_s: int = 120,
        auth_age_s: int = 0,
        amr: Iterable[str] = (SIGNING_AMR,),
        acr: str = SIGNING_ACR,
        jti: str | None = None,
        **claims: Any,
    ) -> str:
        """A signing token as the identity provider issues it after the user re-entered the password
        `auth_age_s` seconds ago, for `client_id` (default: the client of the user's own organisation,
        `client_id_of(org_kind, org_id)`). Any claim may be overridden (or removed with None)."""
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            CLAIM_USER: user_id,
            CLAIM_NAME: name or f"Test Signer {user_id}",
            CLAIM_ROLES: list(roles),
            CLAIM_ORG_KIND: org_kind,
            CLAIM_ORG: org_id,
            "auth_time": now - auth_age_s,
            "amr": list(amr),
            "acr": acr,
            "azp": client_id or client_id_of(org_kind, org_id),
            "iat": now - auth_age_s,
            "nbf": now - auth_age_s,
            "exp": now - auth_age_s + ttl_s,
            "jti": jti or str(uuid.uuid4()),
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode({"alg": "ES256", "kid": self.key.kid, "typ": SIGNING_TOKEN_TYPE}, body, self.key)

    def signature_headers(self, user_id: str = "qa.site-1", **kw: Any) -> dict[str, str]:
        """`{"V2V-Signature-Token": ...}` (see `signing_token`), to merge with `headers(...)`."""
        return {SIGNATURE_HEADER: self.signing_token(user_id, **kw)}
