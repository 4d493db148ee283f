"""Identity for `make run` and the tests: the local authorization server, its demo clients, and bearer
tokens for them obtained by the real client-credentials exchange.

- `start_identity(state_dir)` provisions one client per certified treatment centre, carrier and site
  (read from the services' seed files) plus one QA, one admin and one ops client, keeps them across runs
  (`<state>/clients.json`, private keys in `<state>/clients/`, 0600), keeps the issuer's signing key across
  runs too (`<state>/issuer.key.jwk.json`), and starts the issuer on 127.0.0.1.
- `provision_users(state_dir)` does the same for the demo signing users (a physician per centre; a QA
  reviewer and a Qualified Person or quality-unit signer per site): `<state>/users.json` (no secret),
  argon2id hashes in `<state>/users.hashes.json` (0600), and each demo password, written once when the user
  is made, in `<state>/users.secrets.json` (0600) for the tests and for trying the platform by hand.
- `Credentials(issuer, state_dir)` hands out `Authorization` headers per client id, caching each token
  until shortly before it expires, and signing tokens through the real step-up:
  `await credentials.signing_token("qa", "qp.de-leipzig-izi")` (the demo password from the secrets file)
  or with a password given (`password="..."`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import yaml
from joserfc.jwk import ECKey

from v2v_harness.issuer import (
    ASSERTION_TYPE,
    AuthorizationServer,
    Client,
    IssuerProcess,
    IssuerSettings,
    User,
    client_assertion,
    demo_clients,
    demo_users,
    new_client,
    new_user,
    private_key,
    read_clients,
    read_user_secrets,
    read_users,
    signing_form,
    token_error_of,
    write_clients,
    write_users,
)

AUDIENCE = "vein2vein"
DEFAULT_ISSUER_PORT = 8010


def _seed(package: str, name: str) -> Any:
    return yaml.safe_load(resources.files(package).joinpath("seed", name).read_text())


def site_countries() -> list[tuple[str, str]]:
    """(site id, country) of every site, from the site service's seed file."""
    return [(s["site_id"], str(s.get("country", ""))) for s in _seed("site_service", "sites.yaml")]


def network_entities() -> tuple[list[str], list[str], list[str]]:
    """(certified centres, carriers, sites) from the services' own seed files."""
    centres = [c["id"] for c in _seed("order_service", "treatment_centers.yaml")]
    carriers = [c["id"] for c in (_seed("logistics_service", "logistics.yaml").get("carriers") or [])]
    sites = [s["site_id"] for s in _seed("site_service", "sites.yaml")]
    return centres, carriers, sites


def provision_clients(state_dir: Path) -> list[Client]:
    """The demo clients: those already in `state_dir` are kept (with their keys), missing ones added."""
    centres, carriers, sites = network_entities()
    wanted = demo_clients(centres, carriers, sites, generate=False)
    existing: dict[str, tuple[Client, ECKey]] = {}
    if (state_dir / "clients.json").exists():
        try:
            for client in read_clients(state_dir):
                existing[client.client_id] = (client, private_key(state_dir, client.client_id))
        except (OSError, ValueError, KeyError):
            existing = {}
    pairs: list[tuple[Client, ECKey]] = []
    for client_id, kind, entity in wanted:
        kept = existing.get(client_id)
        if kept is not None and kept[0].kind == kind and kept[0].entity_id == entity:
            client, key = kept
            client = new_client(client_id, kind, entity, key=key)[0]  # today's scopes for its kind
            pairs.append((client, key))
        else:
            pairs.append(new_client(client_id, kind, entity))
    write_clients(state_dir, pairs)
    return [c for c, _ in pairs]


def provision_users(state_dir: Path, settings: IssuerSettings | None = None) -> list[User]:
    """The demo signing users: those already in `state_dir` are kept (with their password hashes), missing
    ones are made with a random password, written once to `users.secrets.json` (0600)."""
    centres, _carriers, _sites = network_entities()
    wanted = demo_users(centres, site_countries())
    existing: dict[str, User] = {}
    if (state_dir / "users.json").exists():
        try:
            existing = {u.user_id: u for u in read_users(state_dir)}
        except (OSError, ValueError, KeyError):
            existing = {}
    hasher = (settings or IssuerSettings()).hasher()
    users: list[User] = []
    fresh: dict[str, str] = {}
    for user_id, name, roles, org_kind, org_id in wanted:
        kept = existing.get(user_id)
        if (
            kept is not None
            and kept.password_hash
            and (kept.roles, kept.org_kind, kept.org_id) == (roles, org_kind, org_id)
        ):
            users.append(User(user_id, name, roles, org_kind, org_id, kept.password_hash, kept.active))
        else:
            user, password = new_user(user_id, name, roles, org_kind, org_id, hasher=hasher)
            users.append(user)
            fresh[user_id] = password
    write_users(state_dir, users, fresh)
    return users


def _issuer_key(state_dir: Path) -> ECKey:
    path = state_dir / "issuer.key.jwk.json"
    if path.exists():
        key = ECKey.import_key(json.loads(path.read_text()))
    else:
        key = ECKey.generate_key("P-256", parameters={"use": "sig"}, private=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(key.as_dict(private=True), fh)
    key.ensure_kid()
    return key


def start_identity(state_dir: Path, port: int = 0, settings: IssuerSettings | None = None) -> IssuerProcess:
    state_dir.mkdir(parents=True, exist_ok=True)
    settings = settings or IssuerSettings()
    clients = provision_clients(state_dir)
    users = provision_users(state_dir, settings)
    return IssuerProcess.start(
        state_dir, clients, port=port, key=_issuer_key(state_dir), users=users, settings=settings
    )


def issuer_of(state_dir: Path) -> str:
    """The issuer URL that `make run` (or a test run) wrote into its state folder."""
    return str(json.loads((state_dir / "issuer.json").read_text())["issuer"])


@dataclass
class Credentials:
    """Bearer tokens for the demo clients of one state folder, by the real client-credentials exchange."""

    issuer: str
    state_dir: Path
    refresh_before_s: float = 60.0
    _tokens: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _endpoint: str | None = None

    def clients(self, kind: str | None = None) -> list[Client]:
        found = read_clients(self.state_dir)
        return [c for c in found if kind is None or c.kind == kind]

    def client_id(self, kind: str, entity_id: str | None = None) -> str:
        """The demo client of a kind (and entity for a centre, carrier or site)."""
        for client in self.clients(kind):
            if entity_id is None or client.entity_id == entity_id:
                return client.client_id
        raise KeyError(f"no demo client of kind {kind} for {entity_id}")

    async def token(self, client_id: str, scope: str | None = None) -> str:
        cache_key = (client_id, scope or "")
        async with self._lock:
            cached = self._tokens.get(cache_key)
            if cached and cached[1] - time.monotonic() > self.refresh_before_s:
                return cached[0]
            async with httpx.AsyncClient(timeout=10) as http:
                if self._endpoint is None:
                    meta = await http.get(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
                    self._endpoint = str(meta.raise_for_status().json()["token_endpoint"])
                form = {
                    "grant_type": "client_credentials",
                    "client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": client_assertion(
                        client_id, private_key(self.state_dir, client_id), self._endpoint
                    ),
                }
                if scope:
                    form["scope"] = scope
                resp = (await http.post(self._endpoint, data=form)).raise_for_status().json()
            self._tokens[cache_key] = (resp["access_token"], time.monotonic() + float(resp["expires_in"]))
            return str(resp["access_token"])

    # ---- signing users and the signing step-up ----------------------------------------------------------
    def users(self, role: str | None = None, org_id: str | None = None) -> list[User]:
        found = read_users(self.state_dir)
        return [
            u for u in found if (role is None or role in u.roles) and (org_id is None or u.org_id == org_id)
        ]

    def user_id(self, role: str, org_id: str) -> str:
        """The demo user with `role` at organisation `org_id` (a site or centre id)."""
        for user in self.users(role, org_id):
            return user.user_id
        raise KeyError(f"no demo user with role {role} at {org_id}")

    def password(self, user_id: str) -> str:
        """A demo user's password, from `users.secrets.json` (0600)."""
        try:
            return read_user_secrets(self.state_dir)[user_id]
        except KeyError:
            raise KeyError(
                f"no demo password for {user_id} in {self.state_dir / 'users.secrets.json'}"
            ) from None

    async def signing_token(self, client_id: str, user_id: str, password: str | None = None) -> str:
        """A fresh signing token (never cached: each is good for one signature) for `user_id`, asked for by
        `client_id` with the user's password (the demo password unless one is given). A refusal raises
        `TokenError` with the issuer's `error` and `reason` (wrong-credentials, locked, organisation, ...)."""
        secret = self.password(user_id) if password is None else password
        async with httpx.AsyncClient(timeout=10) as http:
            if self._endpoint is None:
                meta = await http.get(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
                self._endpoint = str(meta.raise_for_status().json()["token_endpoint"])
            form = signing_form(
                client_id, private_key(self.state_dir, client_id), self._endpoint, user_id, secret
            )
            resp = await http.post(self._endpoint, data=form)
        if resp.status_code != 200:
            raise token_error_of(resp)
        return str(resp.json()["access_token"])

    async def signature_headers(
        self, client_id: str, user_id: str, password: str | None = None
    ) -> dict[str, str]:
        """`{"V2V-Signature-Token": <a fresh signing token>}`, to send beside the client's bearer token."""
        from v2v_contracts.signing import SIGNATURE_HEADER

        return {SIGNATURE_HEADER: await self.signing_token(client_id, user_id, password)}

    async def headers(self, client_id: str, scope: str | None = None) -> dict[str, str]:
        return {"Authorization": "Bearer " + await self.token(client_id, scope)}

    def auth(self, client_id: str, scope: str | None = None) -> BearerAuth:
        """An `httpx.Auth` that sends this client's token: `httpx.AsyncClient(auth=creds.auth(id))`."""
        return BearerAuth(self, client_id, scope)

    def auth_for(self, kind: str, entity_id: str | None = None) -> BearerAuth:
        return self.auth(self.client_id(kind, entity_id))

    def client(self, kind: str, entity_id: str | None = None, **kw: Any) -> httpx.AsyncClient:
        """An httpx client acting as the demo client of `kind` (and entity): e.g. ("centre", "TC-DE-BE-001"),
        ("carrier", "CRYO-EU"), ("site", "FR-LES-ULIS"), ("qa",), ("admin",), ("ops",)."""
        kw.setdefault("timeout", 10)
        return httpx.AsyncClient(auth=self.auth_for(kind, entity_id), **kw)


class BearerAuth(httpx.Auth):
    """Adds `Authorization: Bearer <token>` of one demo client (a cached token, renewed a minute before it
    expires)."""

    def __init__(self, credentials: Credentials, client_id: str, scope: str | None = None) -> None:
        self.credentials = credentials
        self.client_id = client_id
        self.scope = scope

    def sync_auth_flow(self, request: httpx.Request) -> Any:
        raise RuntimeError("BearerAuth is for httpx.AsyncClient")

    async def async_auth_flow(self, request: httpx.Request) -> Any:
        request.headers["Authorization"] = "Bearer " + await self.credentials.token(
            self.client_id, self.scope
        )
        yield request


__all__ = [
    "AUDIENCE",
    "DEFAULT_ISSUER_PORT",
    "AuthorizationServer",
    "BearerAuth",
    "Credentials",
    "issuer_of",
    "network_entities",
    "provision_clients",
    "provision_users",
    "site_countries",
    "start_identity",
]
