"""Bearer tokens for a service's own API tests (FastAPI TestClient / httpx ASGI transport), without an
issuer process: `TestTokens` signs tokens with a throw-away key and installs a verifier that trusts it.

    tokens = TestTokens.install(app)                      # app.state.token_verifier
    headers = tokens.headers("centre", "TC-DE-BE-001")    # the kind's default scopes
    headers = tokens.headers("qa", scopes=["orders:read"])

End-to-end tests use the harness' real authorization server instead (v2v_harness.issuer).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

from v2v_contracts.scopes import SCOPES_BY_KIND
from v2v_servicekit.auth import TokenVerifier

ISSUER = "https://issuer.test"
AUDIENCE = "vein2vein"

DEFAULT_SCOPES = SCOPES_BY_KIND  # the scopes each kind of principal gets by default


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
            "sub": client_id or f"{kind}-{(entity_id or 'x').lower()}",
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
