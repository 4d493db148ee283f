"""The local authorization server as `make run` and the tests start it: demo clients on disk, the
`token` command's real client-credentials exchange, and the forged tokens a service must refuse."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from v2v_contracts.errors import Unauthenticated
from v2v_contracts.scopes import SCOPES_BY_KIND
from v2v_harness import forge
from v2v_harness.identity import Credentials, network_entities, start_identity
from v2v_harness.issuer import ASSERTION_TYPE, IssuerProcess, client_assertion, private_key
from v2v_servicekit.auth import TokenVerifier

pytestmark = pytest.mark.integration  # a real HTTP server and subprocesses: not the unit loop


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[IssuerProcess]:
    process = start_identity(tmp_path)
    yield process
    process.stop()


def test_one_demo_client_per_centre_carrier_and_site_plus_qa_admin_ops(
    issuer: IssuerProcess, tmp_path: Path
) -> None:
    centres, carriers, sites = network_entities()
    listed = json.loads((tmp_path / "clients.json").read_text())
    assert {tuple(sorted(c)) for c in listed} == {("client_id", "entity_id", "kind", "scopes")}
    by_kind = {k: [c for c in listed if c["kind"] == k] for k in SCOPES_BY_KIND}
    assert sorted(c["entity_id"] for c in by_kind["centre"]) == sorted(centres)
    assert sorted(c["entity_id"] for c in by_kind["carrier"]) == sorted(carriers)
    assert sorted(c["entity_id"] for c in by_kind["site"]) == sorted(sites)
    assert [len(by_kind[k]) for k in ("qa", "admin", "ops")] == [1, 1, 1]
    for c in listed:
        assert c["scopes"] == list(SCOPES_BY_KIND[c["kind"]])
        key_file = tmp_path / "clients" / f"{c['client_id']}.jwk.json"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert "d" in json.loads(key_file.read_text())  # the private part, only in its own file
    assert '"d"' not in (tmp_path / "clients.json").read_text()


def test_clients_and_issuer_key_survive_a_restart(tmp_path: Path) -> None:
    first = start_identity(tmp_path)
    key_before = (tmp_path / "clients" / "centre-tc-de-be-001.jwk.json").read_text()
    kid_before = first.server.key.kid
    first.stop()
    second = start_identity(tmp_path)
    try:
        assert (tmp_path / "clients" / "centre-tc-de-be-001.jwk.json").read_text() == key_before
        assert second.server.key.kid == kid_before
    finally:
        second.stop()


def test_token_command_prints_a_token_the_services_accept(issuer: IssuerProcess, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "v2v_harness", "token", "centre-tc-de-be-001", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    principal = TokenVerifier(issuer.url, "vein2vein")
    import asyncio

    found = asyncio.run(principal.verify(token))
    assert (found.kind, found.entity_id) == ("centre", "TC-DE-BE-001")
    assert found.scopes == frozenset(SCOPES_BY_KIND["centre"])
    assert forge.claims_of(token)["exp"] - forge.claims_of(token)["iat"] <= 300
    unknown = subprocess.run(
        [sys.executable, "-m", "v2v_harness", "token", "nobody", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "unknown client" in unknown.stderr
    listing = subprocess.run(
        [sys.executable, "-m", "v2v_harness", "clients", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "centre-tc-de-be-001" in listing.stdout and '"d"' not in listing.stdout


def test_a_client_assertion_is_accepted_once(issuer: IssuerProcess, tmp_path: Path) -> None:
    endpoint = issuer.server.token_endpoint
    assertion = client_assertion("qa", private_key(tmp_path, "qa"), endpoint)
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    first = httpx.post(endpoint, data=form, timeout=10)
    assert first.status_code == 200 and first.json()["token_type"] == "Bearer"
    replay = httpx.post(endpoint, data=form, timeout=10)
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    other_key = client_assertion("qa", private_key(tmp_path, "admin"), endpoint)  # signed by another key
    wrong = httpx.post(endpoint, data={**form, "client_assertion": other_key}, timeout=10)
    assert wrong.status_code == 401
    more = httpx.post(
        endpoint,
        data={
            **form,
            "client_assertion": client_assertion("qa", private_key(tmp_path, "qa"), endpoint),
            "scope": "registry:admin",
        },
        timeout=10,
    )
    assert more.status_code == 400 and more.json()["error"] == "invalid_scope"


async def test_forged_tokens_are_refused(issuer: IssuerProcess, tmp_path: Path) -> None:
    good = await Credentials(issuer.url, tmp_path).token("centre-tc-de-be-001")
    verifier = TokenVerifier(issuer.url, "vein2vein")
    assert (await verifier.verify(good)).entity_id == "TC-DE-BE-001"
    server = issuer.server
    assertion = client_assertion(
        "centre-tc-de-be-001", private_key(tmp_path, "centre-tc-de-be-001"), server.token_endpoint
    )
    forged = {
        "expired": forge.expired(server, good),
        "wrong audience": forge.wrong_audience(server, good),
        "wrong issuer": forge.wrong_issuer(server, good),
        "alg none": forge.unsigned(good),
        "HS256 keyed with the public key": forge.hs256_with_public_key(server, good),
        "signed by an unknown key": forge.foreign_key(good),
        "a client assertion as the bearer token": assertion,
        "garbage": "not.a.token",
    }
    accepted = []
    for name, token in forged.items():
        try:
            await verifier.verify(token)
            accepted.append(name)
        except Unauthenticated:
            pass
    assert accepted == []
