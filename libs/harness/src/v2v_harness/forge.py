"""Tokens an attacker (or a careless client) would present, for the deny-by-default tests: each is built
from a real token's claims with one thing wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey

from v2v_harness.issuer import AuthorizationServer


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return data


def signed(server: AuthorizationServer, claims: dict[str, Any]) -> str:
    """Signed with the issuer's real key (so only the claims are wrong)."""
    return jwt.encode({"alg": "ES256", "kid": server.key.kid, "typ": "at+jwt"}, claims, server.key)


def expired(server: AuthorizationServer, token: str) -> str:
    now = int(time.time())
    return signed(server, {**claims_of(token), "iat": now - 900, "nbf": now - 900, "exp": now - 600})


def wrong_audience(server: AuthorizationServer, token: str) -> str:
    return signed(server, {**claims_of(token), "aud": "another-platform"})


def wrong_issuer(server: AuthorizationServer, token: str) -> str:
    return signed(server, {**claims_of(token), "iss": "https://issuer.attacker.example"})


def unsigned(token: str) -> str:
    """`alg: none` with an empty signature."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims_of(token)).encode())}."


def hs256_with_public_key(server: AuthorizationServer, token: str) -> str:
    """The algorithm-confusion attack: HMAC-SHA256 keyed with the issuer's PUBLIC key (PEM)."""
    public: ECKey = ECKey.import_key(server.key.as_dict(private=False))
    secret = public.as_pem(private=False)
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": server.key.kid}).encode())
    body = _b64(json.dumps(claims_of(token)).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


def foreign_key(token: str) -> str:
    """The right claims signed with a key the issuer never published."""
    key = ECKey.generate_key("P-256", private=True)
    key.ensure_kid()
    return jwt.encode({"alg": "ES256", "kid": key.kid}, claims_of(token), key)
