"""The issuer's signing step-up (21 CFR 11.200, 11.300): a registered client exchanges a user's id and
password for a short-lived, one-time signing token; a wrong password gets nothing; repeated failures lock
the user id (an alert, logged and counted), and a locked user cannot sign even with the right password.

The first tests run the authorization server in-process (a cheap argon2id cost, the same algorithm); the
last ones start it as `make run` does and go through HTTP, the `Credentials` helper and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from v2v_contracts.signing import SIGNING_ACR, SIGNING_TOKEN_TYPE
from v2v_harness import forge
from v2v_harness.issuer import (
    AuthorizationServer,
    IssuerSettings,
    SigningAlert,
    SigningPolicy,
    TokenError,
    User,
    client_assertion,
    hash_password,
    new_client,
    new_user,
    signing_form,
)

ISSUER = "http://issuer.test"
CHEAP = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


class World:
    def __init__(self, tmp_path: Path, **policy: Any) -> None:
        self.keys = {}
        clients = []
        for client_id, kind, entity in [
            ("qa", "qa", None),
            ("centre-tc-1", "centre", "TC-1"),
            ("centre-tc-2", "centre", "TC-2"),
            ("carrier-cryo", "carrier", "CRYO"),
            ("site-s-1", "site", "S-1"),
        ]:
            client, key = new_client(client_id, kind, entity)
            clients.append(client)
            self.keys[client_id] = key
        qp, self.qp_password = new_user(
            "qp.s-1", "Quinn Person", ["qualified_person"], "site", "S-1", hasher=CHEAP
        )
        phys, self.phys_password = new_user(
            "phys.tc-1", "Dr. Tess One", ["physician"], "centre", "TC-1", hasher=CHEAP
        )
        gone, self.gone_password = new_user(
            "qa.gone", "Gone Reviewer", ["qa_reviewer"], "site", "S-1", hasher=CHEAP
        )
        gone = User(
            gone.user_id, gone.name, gone.roles, gone.org_kind, gone.org_id, gone.password_hash, False
        )
        self.alert_file = tmp_path / "signing-alerts.jsonl"
        self.server = AuthorizationServer(
            ISSUER,
            clients,
            users=[qp, phys, gone],
            signing=SigningPolicy(**{"max_failures": 3, "lockout_s": 600.0, **policy}),
            hasher=CHEAP,
            alert_file=self.alert_file,
        )
        self.alerts: list[SigningAlert] = []
        self.server.on_alert.append(self.alerts.append)

    def sign(self, client_id: str, user_id: str, password: str, now: float | None = None) -> dict[str, Any]:
        form = signing_form(
            client_id, self.keys[client_id], self.server.token_endpoint, user_id, password, now=now
        )
        return self.server.token(form, now=now)

    def refused(self, client_id: str, user_id: str, password: str, now: float | None = None) -> TokenError:
        with pytest.raises(TokenError) as caught:
            self.sign(client_id, user_id, password, now)
        return caught.value


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_the_right_password_gets_a_short_lived_signing_token(world: World) -> None:
    before = int(time.time())
    answer = world.sign("qa", "qp.s-1", world.qp_password)
    assert answer["token_type"] == "N_A" and answer["expires_in"] == 120  # not an access token
    token = answer["access_token"]
    claims = forge.claims_of(token)
    assert (claims["iss"], claims["aud"], claims["sub"], claims["preferred_username"]) == (
        ISSUER,
        "vein2vein",
        "qp.s-1",
        "qp.s-1",
    )
    assert (claims["name"], claims["v2v_roles"], claims["v2v_org_kind"], claims["v2v_org"]) == (
        "Quinn Person",
        ["qualified_person"],
        "site",
        "S-1",
    )
    assert claims["amr"] == ["pwd"] and claims["acr"] == SIGNING_ACR
    assert claims["azp"] == claims["client_id"] == "qa"  # the client it was issued to
    assert before <= claims["auth_time"] <= int(time.time()) and claims["iat"] == claims["auth_time"]
    assert claims["exp"] - claims["iat"] <= 120
    assert "scope" not in claims and "v2v_kind" not in claims  # it calls no API
    import base64

    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["typ"] == SIGNING_TOKEN_TYPE and header["alg"] == "ES256"
    again = forge.claims_of(world.sign("qa", "qp.s-1", world.qp_password)["access_token"])
    assert again["jti"] != claims["jti"]  # every signing token has its own one-time id
    # the user id is taken as Keycloak takes it: case-insensitive
    assert forge.claims_of(world.sign("qa", "QP.S-1", world.qp_password)["access_token"])["sub"] == "qp.s-1"


def test_the_signing_token_verifies_with_the_issuers_key(world: World) -> None:
    from joserfc import jwt

    token = world.sign("centre-tc-1", "phys.tc-1", world.phys_password)["access_token"]
    claims = jwt.decode(token, world.server.key, algorithms=["ES256"]).claims
    assert claims["sub"] == "phys.tc-1" and claims["azp"] == "centre-tc-1"


def test_a_signing_token_is_no_bearer_token(world: World) -> None:
    from v2v_contracts.errors import Unauthenticated
    from v2v_servicekit.auth import TokenVerifier

    token = world.sign("qa", "qp.s-1", world.qp_password)["access_token"]
    verifier = TokenVerifier.with_keys(ISSUER, "vein2vein", world.server.jwks())
    with pytest.raises(Unauthenticated):
        asyncio.run(verifier.verify(token))


def test_a_wrong_password_or_unknown_user_gets_nothing(world: World) -> None:
    wrong = world.refused("qa", "qp.s-1", world.qp_password + "x")
    unknown = world.refused("qa", "nobody.s-1", world.qp_password)
    for refusal in (wrong, unknown):  # the same answer: it tells nothing about which ids exist
        assert (refusal.error, refusal.reason, refusal.status) == ("invalid_grant", "wrong-credentials", 400)
        assert refusal.body()["v2v_reason"] == "wrong-credentials"
    assert world.server.lockouts_total == 0


def test_only_an_authenticated_client_of_a_signing_kind_may_ask(world: World) -> None:
    carrier = world.refused("carrier-cryo", "qp.s-1", world.qp_password)
    assert (carrier.error, carrier.reason) == ("unauthorized_client", "client-may-not-sign")
    form = signing_form("qa", world.keys["qa"], world.server.token_endpoint, "qp.s-1", world.qp_password)
    with pytest.raises(TokenError) as anonymous:
        world.server.token({k: v for k, v in form.items() if not k.startswith("client_assertion")})
    assert (anonymous.value.error, anonymous.value.status) == ("invalid_client", 401)
    forged = {**form, "client_assertion": client_assertion("qa", world.keys["centre-tc-1"], ISSUER)}
    with pytest.raises(TokenError) as wrong_key:
        world.server.token(forged)
    assert wrong_key.value.error == "invalid_client"
    with pytest.raises(TokenError) as missing:
        world.server.token({**form, "password": ""})
    assert missing.value.error == "invalid_request"
    with pytest.raises(TokenError) as huge:
        world.server.token({**form, "password": "x" * 5000, "client_assertion": _fresh(world, "qa")})
    assert huge.value.error == "invalid_request"


def _fresh(world: World, client_id: str) -> str:
    return client_assertion(client_id, world.keys[client_id], world.server.token_endpoint)


def test_only_users_of_the_clients_organisation_are_served(world: World) -> None:
    other_centre = world.refused("centre-tc-2", "phys.tc-1", world.phys_password)
    centre_user_at_qa = world.refused("qa", "phys.tc-1", world.phys_password)
    site_user_at_centre = world.refused("centre-tc-1", "qp.s-1", world.qp_password)
    for refusal in (other_centre, centre_user_at_qa, site_user_at_centre):
        assert (refusal.error, refusal.reason) == ("invalid_grant", "organisation")
    assert world.sign("site-s-1", "qp.s-1", world.qp_password)["access_token"]  # its own site's system


def test_a_disabled_user_cannot_sign(world: World) -> None:
    refusal = world.refused("qa", "qa.gone", world.gone_password)
    assert (refusal.error, refusal.reason) == ("invalid_grant", "user-disabled")


def test_repeated_failures_lock_the_user_with_an_alert(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    # failures short of the limit are forgiven by a success (they must be consecutive)
    for _ in range(2):
        world.refused("qa", "qp.s-1", "guess", now)
    world.sign("qa", "qp.s-1", world.qp_password, now)
    for _ in range(2):
        world.refused("qa", "qp.s-1", "guess", now)
    assert world.server.lockouts_total == 0 and not world.server.locked("qp.s-1", now)
    with caplog.at_level(logging.INFO, logger="v2v_harness.issuer"):
        third = world.refused("qa", "qp.s-1", "guess", now)  # the 3rd consecutive failure
    assert third.reason == "wrong-credentials"
    assert world.server.locked("qp.s-1", now + 1)
    assert (world.server.lockouts_total, world.server.lockouts) == (1, {"qp.s-1": 1})
    [alert] = world.alerts
    assert (alert.kind, alert.user_id, alert.client_id, alert.failures) == ("lockout", "qp.s-1", "qa", 3)
    assert alert.locked_until == pytest.approx(now + 600)
    assert any(
        r.levelno == logging.WARNING
        and "ALERT signing lockout" in r.getMessage()
        and "qp.s-1" in r.getMessage()
        for r in caplog.records
    )
    assert "guess" not in caplog.text and world.qp_password not in caplog.text  # no password is logged
    [line] = world.alert_file.read_text().splitlines()
    assert json.loads(line)["user_id"] == "qp.s-1" and json.loads(line)["kind"] == "lockout"

    # locked: the right password is refused too, and the other users are not affected
    locked = world.refused("qa", "qp.s-1", world.qp_password, now + 10)
    assert (locked.error, locked.reason) == ("invalid_grant", "locked")
    assert world.sign("centre-tc-1", "phys.tc-1", world.phys_password, now + 10)["access_token"]
    # after the lockout period the right password works again, with a fresh count
    assert world.sign("qa", "qp.s-1", world.qp_password, now + 601)["access_token"]
    assert not world.server.locked("qp.s-1", now + 601)


def test_ids_that_do_not_exist_lock_the_same_way(world: World) -> None:
    now = time.time()
    for _ in range(3):
        world.refused("qa", "ghost.s-1", "guess", now)
    assert world.refused("qa", "ghost.s-1", "guess", now + 1).reason == "locked"
    assert world.server.lockouts == {"ghost.s-1": 1} and [a.user_id for a in world.alerts] == ["ghost.s-1"]


def test_an_administrator_may_unlock(world: World) -> None:
    now = time.time()
    for _ in range(3):
        world.refused("qa", "qp.s-1", "guess", now)
    world.server.unlock("qp.s-1")
    assert world.sign("qa", "qp.s-1", world.qp_password, now + 1)["access_token"]
    assert world.server.lockouts_total == 1  # the lockout stays counted


def test_users_and_password_hashes() -> None:
    digest = hash_password("correct horse battery staple", CHEAP)
    assert digest.startswith("$argon2id$") and "correct horse" not in digest
    assert hash_password("correct horse battery staple", CHEAP) != digest  # a fresh salt each time
    default = IssuerSettings().hasher()
    assert (default.memory_cost, default.time_cost, default.parallelism) == (19_456, 2, 1)  # OWASP
    for bad in [
        {"user_id": "Has Space"},
        {"roles": ("janitor",)},
        {"org_kind": "carrier"},
        {"name": "  "},
    ]:
        fields: dict[str, Any] = {
            "user_id": "qa.s-1",
            "name": "Q",
            "roles": ("qa_reviewer",),
            "org_kind": "site",
            "org_id": "S-1",
            **bad,
        }
        with pytest.raises(ValueError):
            User(**fields)
    user = User("qa.s-1", "Q", ("qa_reviewer",), "site", "S-1", digest)
    assert "password_hash" not in user.public() and digest not in repr(user)


def test_metadata_names_the_password_grant_and_the_signing_acr(world: World) -> None:
    meta = world.server.metadata()
    assert (
        "password" in meta["grant_types_supported"] and "client_credentials" in meta["grant_types_supported"]
    )
    assert meta["acr_values_supported"] == [SIGNING_ACR]
    assert {"auth_time", "amr", "acr", "azp", "v2v_roles", "v2v_org"} <= set(meta["claims_supported"])


def test_a_signing_token_lives_at_most_120_seconds(tmp_path: Path) -> None:
    world = World(tmp_path, token_ttl_s=3600)
    claims = forge.claims_of(world.sign("qa", "qp.s-1", world.qp_password)["access_token"])
    assert claims["exp"] - claims["iat"] == 120
    short = World(tmp_path, token_ttl_s=30)
    claims = forge.claims_of(short.sign("qa", "qp.s-1", short.qp_password)["access_token"])
    assert claims["exp"] - claims["iat"] == 30


# ---- as `make run` starts it: HTTP, files, Credentials and the CLI -----------------------------------
@pytest.mark.integration
def test_demo_users_are_provisioned_beside_the_demo_clients(tmp_path: Path) -> None:
    from v2v_harness.identity import Credentials, network_entities, start_identity

    first = start_identity(tmp_path)
    try:
        listed = json.loads((tmp_path / "users.json").read_text())
        secrets_file, hashes_file = tmp_path / "users.secrets.json", tmp_path / "users.hashes.json"
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(hashes_file.stat().st_mode) == 0o600
        passwords = json.loads(secrets_file.read_text())
        hashes = json.loads(hashes_file.read_text())
        assert {u["user_id"] for u in listed} == set(passwords) == set(hashes)
        text = (tmp_path / "users.json").read_text()
        assert all(p not in text for p in passwords.values()) and "$argon2id$" not in text  # no secret
        assert all(h.startswith("$argon2id$") for h in hashes.values())
        centres, _carriers, sites = network_entities()
        physicians = {u["org_id"] for u in listed if u["roles"] == ["physician"]}
        assert physicians == set(centres) and all(
            u["org_kind"] == "centre" for u in listed if u["org_id"] in physicians
        )
        for site in sites:
            roles = {r for u in listed if u["org_id"] == site for r in u["roles"]}
            assert "qa_reviewer" in roles and roles & {"qualified_person", "quality_unit"}, site
        qp = next(u for u in listed if u["org_id"] == "DE-LEIPZIG-IZI" and "qualified_person" in u["roles"])
        assert next(u for u in listed if u["org_id"] == "US-MORRIS-PLAINS" and "quality_unit" in u["roles"])

        creds = Credentials(first.url, tmp_path)
        assert creds.user_id("qualified_person", "DE-LEIPZIG-IZI") == qp["user_id"]
        token = asyncio.run(creds.signing_token("qa", qp["user_id"]))  # the demo password from the file
        claims = forge.claims_of(token)
        assert (claims["sub"], claims["azp"], claims["v2v_org"]) == (qp["user_id"], "qa", "DE-LEIPZIG-IZI")
        with pytest.raises(TokenError) as wrong:
            asyncio.run(creds.signing_token("qa", qp["user_id"], password="not-it"))
        assert (wrong.value.error, wrong.value.reason, wrong.value.status) == (
            "invalid_grant",
            "wrong-credentials",
            400,
        )
        headers = asyncio.run(creds.signature_headers("qa", qp["user_id"]))
        assert list(headers) == ["V2V-Signature-Token"]
    finally:
        first.stop()
    second = start_identity(tmp_path)  # kept across runs: same hashes, passwords still good
    try:
        assert json.loads((tmp_path / "users.hashes.json").read_text()) == hashes
        assert json.loads((tmp_path / "users.secrets.json").read_text()) == passwords
        assert asyncio.run(Credentials(second.url, tmp_path).signing_token("qa", qp["user_id"]))
    finally:
        second.stop()


@pytest.mark.integration
def test_lockout_over_http_and_the_sign_token_command(tmp_path: Path) -> None:
    from v2v_harness.identity import Credentials, start_identity

    issuer = start_identity(tmp_path, settings=IssuerSettings(signing_max_failures=2, signing_lockout_s=60))
    try:
        creds = Credentials(issuer.url, tmp_path)
        physician = creds.user_id("physician", "TC-DE-BE-001")

        def cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "v2v_harness", *args, "--state-dir", str(tmp_path)],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=60,
            )

        ok = cli("sign-token", "centre-tc-de-be-001", physician, stdin=creds.password(physician) + "\n")
        assert ok.returncode == 0, ok.stderr
        assert forge.claims_of(ok.stdout.strip())["sub"] == physician
        for _ in range(2):
            bad = cli("sign-token", "centre-tc-de-be-001", physician, stdin="wrong\n")
            assert bad.returncode == 1 and "wrong-credentials" in bad.stderr
        locked = cli("sign-token", "centre-tc-de-be-001", physician, stdin=creds.password(physician) + "\n")
        assert locked.returncode == 1 and "locked" in locked.stderr and locked.stdout == ""
        assert issuer.server.lockouts == {physician: 1}
        [alert] = [json.loads(line) for line in (tmp_path / "signing-alerts.jsonl").read_text().splitlines()]
        assert (alert["user_id"], alert["client_id"]) == (physician, "centre-tc-de-be-001")
        carrier = cli("sign-token", "carrier-cryo-eu", physician, stdin="x\n")
        assert carrier.returncode == 1 and "client-may-not-sign" in carrier.stderr
        users = cli("users", stdin="")
        assert physician in users.stdout and "physician" in users.stdout
        assert creds.password(physician) not in users.stdout
    finally:
        issuer.stop()


def test_the_keycloak_realm_mirrors_the_signing_users_and_lockout() -> None:
    """deploy/keycloak: the same roles, demo users of the realm's demo clients' organisations with the
    roles and organisation `make run` gives them, brute-force detection and argon2 password hashes."""
    from v2v_contracts.signing import ROLES
    from v2v_harness.issuer import demo_users

    realm = json.loads(
        (Path(__file__).parents[3] / "deploy" / "keycloak" / "vein2vein-realm.json").read_text(
            encoding="utf-8"
        )
    )
    assert {r["name"] for r in realm["roles"]["realm"]} == set(ROLES)
    assert realm["bruteForceProtected"] is True and realm["permanentLockout"] is False
    assert realm["failureFactor"] == IssuerSettings().signing_max_failures
    assert (
        realm["waitIncrementSeconds"] == realm["maxFailureWaitSeconds"] == IssuerSettings().signing_lockout_s
    )
    assert "hashAlgorithm(argon2)" in realm["passwordPolicy"] and realm["eventsEnabled"] is True
    orgs = {
        g["path"]: (g["attributes"]["v2v_org_kind"][0], g["attributes"]["v2v_org"][0])
        for g in realm["groups"]
    }
    wanted = {
        user_id: (name, roles, org_kind, org_id)
        for user_id, name, roles, org_kind, org_id in demo_users(["TC-DE-BE-001"], [("DE-LEIPZIG-IZI", "DE")])
    }
    assert {u["username"] for u in realm["users"]} == set(wanted)
    for user in realm["users"]:
        name, roles, org_kind, org_id = wanted[user["username"]]
        assert f"{user['firstName']} {user['lastName']}" == name
        assert tuple(user["realmRoles"]) == roles
        [group] = user["groups"]
        assert orgs[group] == (org_kind, org_id)
        assert "credentials" not in user  # no password in the repository
