"""`require_signature` on a tiny app (bearer tokens and signing tokens from `TestTokens`, one-time use in
memory): only a fresh signing token, issued to the very client that calls, for a user of the caller's
organisation holding a role the meaning needs, and presented once, signs; every other request is a 401 or
403 problem with its reason code, logged and handed to the refusal hooks. And the canonical form that a
signature's record hash is taken over."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import ECKey

from v2v_contracts.signing import MEANING_ROLES, SIGNATURE_HEADER, SIGNING_ACR
from v2v_servicekit import signatures
from v2v_servicekit.auth import Principal, declared_scope, require_scope
from v2v_servicekit.problems import PROBLEM_BASE, PROBLEM_JSON
from v2v_servicekit.problems import install as install_problems
from v2v_servicekit.signatures import (
    SignatureRefusal,
    SignedRecord,
    Signer,
    canonical_json,
    declared_signature,
    require_signature,
)
from v2v_servicekit.testing import TestTokens

QP = {"user_id": "qp.site-1", "roles": ["qualified_person"], "org_kind": "site", "org_id": "SITE-1"}


class World:
    def __init__(self) -> None:
        self.app = FastAPI()
        install_problems(self.app)
        self.tokens = TestTokens.install(self.app)
        self.uses = self.tokens.install_signatures(self.app)
        self.refusals: list[SignatureRefusal] = []
        self.async_refusals: list[str] = []
        signatures.on_refusal(self.app, self.refusals.append)

        async def later(refusal: SignatureRefusal) -> None:
            self.async_refusals.append(refusal.reason)

        def broken(_refusal: SignatureRefusal) -> None:
            raise RuntimeError("a broken hook changes nothing")

        signatures.on_refusal(self.app, broken)
        signatures.on_refusal(self.app, later)

        @self.app.post("/v1/lots/{lot}/release")
        async def release(
            lot: str, signer: Signer = require_signature("release", scope="qc:release")
        ) -> dict[str, Any]:
            return {
                "lot": lot,
                "user": signer.user_id,
                "name": signer.name,
                "meaning": signer.meaning,
                "client": signer.client_id,
                "org": signer.org_id,
                "auth_age_s": (dt.datetime.now(dt.UTC) - signer.auth_time).total_seconds(),
            }

        @self.app.post("/v1/orders/{order}/accept")
        async def accept(
            order: str,
            principal: Principal = require_scope("orders:write"),
            signer: Signer = require_signature("physician-acceptance"),
        ) -> dict[str, Any]:
            return {"order": order, "user": signer.user_id, "centre": principal.entity_id}

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://svc")

    def qa(self, **signing: Any) -> dict[str, str]:
        """QA's system (bearer) with a signing token issued to it for the QP of SITE-1 (or as changed)."""
        spec = {**QP, "client_id": "qa-x", **signing}
        return {**self.tokens.headers("qa"), **self.tokens.signature_headers(**spec)}


@pytest.fixture
def world() -> World:
    return World()


def refused(resp: httpx.Response, status: int, reason: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM_JSON)
    body = resp.json()
    assert body["type"] == PROBLEM_BASE + reason and body["reason"] == reason and body["status"] == status
    if status == 401:  # RFC 9470: sign (again) with a fresh password entry
        challenge = resp.headers["www-authenticate"]
        assert 'error="insufficient_user_authentication"' in challenge
        assert f'acr_values="{SIGNING_ACR}"' in challenge and 'max_age="120"' in challenge


async def test_a_fresh_signing_token_of_the_calling_client_signs(world: World) -> None:
    async with world.client() as http:
        resp = await http.post("/v1/lots/L-1/release", headers=world.qa())
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert (out["user"], out["meaning"], out["client"], out["org"]) == (
        "qp.site-1",
        "release",
        "qa-x",
        "SITE-1",
    )
    assert out["name"] == "Test Signer qp.site-1" and out["auth_age_s"] < 5
    assert len(world.uses.seen) == 1 and world.refusals == []


async def test_without_a_signing_token_it_is_401_signature_required(world: World) -> None:
    async with world.client() as http:
        resp = await http.post("/v1/lots/L-1/release", headers=world.tokens.headers("qa"))
        blank = await http.post(
            "/v1/lots/L-1/release", headers={**world.tokens.headers("qa"), SIGNATURE_HEADER: " "}
        )
    refused(resp, 401, "signature-required")
    refused(blank, 401, "signature-required")
    assert [r.reason for r in world.refusals] == ["signature-required"] * 2
    first = world.refusals[0]
    assert (first.meaning, first.method, first.path, first.client_id, first.user_id) == (
        "release",
        "POST",
        "/v1/lots/L-1/release",
        "qa-x",
        None,
    )
    assert world.async_refusals == ["signature-required"] * 2  # async hooks are awaited


async def test_the_bearer_token_is_still_needed_and_checked_first(world: World) -> None:
    async with world.client() as http:
        none = await http.post("/v1/lots/L-1/release", headers=world.tokens.signature_headers(**QP))
        no_scope = await http.post(
            "/v1/lots/L-1/release",
            headers={**world.tokens.headers("centre", "TC-1"), **world.tokens.signature_headers(**QP)},
        )
    assert none.status_code == 401 and none.json()["type"] == PROBLEM_BASE + "unauthenticated"
    assert no_scope.status_code == 403 and no_scope.json()["type"] == PROBLEM_BASE + "forbidden"
    assert world.refusals == []  # not signature refusals: the caller was not let in at all


async def test_an_expired_or_stale_signing_token_is_401_signature_expired(world: World) -> None:
    async with world.client() as http:
        expired = await http.post("/v1/lots/L-1/release", headers=world.qa(auth_age_s=300))
        stale = await http.post(  # the password was entered 3 minutes ago, whatever the token says
            "/v1/lots/L-1/release", headers=world.qa(auth_time=int(dt.datetime.now(dt.UTC).timestamp()) - 180)
        )
    refused(expired, 401, "signature-expired")
    refused(stale, 401, "signature-expired")
    assert [r.user_id for r in world.refusals] == ["qp.site-1", "qp.site-1"]  # the token did verify


async def test_a_long_lived_or_future_or_foreign_token_is_401_signature_invalid(world: World) -> None:
    stranger = ECKey.generate_key("P-256", private=True)
    claims = jwt.decode(world.tokens.signing_token(**{**QP, "client_id": "qa-x"}), world.tokens.key).claims
    forged = jwt.encode({"alg": "ES256"}, claims, stranger)
    async with world.client() as http:
        long_lived = await http.post("/v1/lots/L-1/release", headers=world.qa(ttl_s=600))
        future = await http.post(
            "/v1/lots/L-1/release", headers=world.qa(auth_time=int(dt.datetime.now(dt.UTC).timestamp()) + 60)
        )
        other_issuer = await http.post("/v1/lots/L-1/release", headers=world.qa(iss="https://evil.test"))
        other_audience = await http.post("/v1/lots/L-1/release", headers=world.qa(aud="another-platform"))
        no_name = await http.post("/v1/lots/L-1/release", headers=world.qa(name=" "))
        foreign = await http.post(
            "/v1/lots/L-1/release", headers={**world.tokens.headers("qa"), SIGNATURE_HEADER: forged}
        )
        garbage = await http.post(
            "/v1/lots/L-1/release", headers={**world.tokens.headers("qa"), SIGNATURE_HEADER: "not.a.jwt"}
        )
    for resp in (long_lived, future, other_issuer, other_audience, no_name, foreign, garbage):
        refused(resp, 401, "signature-invalid")
    assert world.refusals[-1].user_id is None  # an unverified token names nobody


async def test_a_token_without_a_password_entered_to_sign_is_401(world: World) -> None:
    async with world.client() as http:
        otp_only = await http.post("/v1/lots/L-1/release", headers=world.qa(amr=["otp"]))
        other_acr = await http.post("/v1/lots/L-1/release", headers=world.qa(acr="1"))
        an_access_token = await http.post(  # the client's own access token is no signature
            "/v1/lots/L-1/release",
            headers={**world.tokens.headers("qa"), SIGNATURE_HEADER: world.tokens.token("qa")},
        )
    refused(otp_only, 401, "signature-authentication")
    refused(other_acr, 401, "signature-authentication")
    refused(an_access_token, 401, "signature-invalid")  # it has no auth_time, no user


async def test_a_signing_token_is_not_a_bearer_token(world: World) -> None:
    token = world.tokens.signing_token(**QP)
    async with world.client() as http:
        resp = await http.post(
            "/v1/lots/L-1/release", headers={"Authorization": f"Bearer {token}", SIGNATURE_HEADER: token}
        )
    assert resp.status_code == 401 and resp.json()["type"] == PROBLEM_BASE + "unauthenticated"


async def test_a_wrong_role_is_403_signature_role(world: World) -> None:
    async with world.client() as http:
        reviewer = await http.post("/v1/lots/L-1/release", headers=world.qa(roles=["qa_reviewer"]))
        none = await http.post("/v1/lots/L-1/release", headers=world.qa(roles=[]))
        physician = await http.post(
            "/v1/orders/O-1/accept",
            headers={
                **world.tokens.headers("centre", "TC-1"),
                **world.tokens.signature_headers(
                    "nurse.tc-1", roles=["qa_reviewer"], org_kind="centre", org_id="TC-1"
                ),
            },
        )
    refused(reviewer, 403, "signature-role")
    refused(none, 403, "signature-role")
    refused(physician, 403, "signature-role")
    assert "qualified_person" in reviewer.json()["detail"]  # it says which roles would do
    assert [(r.reason, r.status, r.user_id) for r in world.refusals] == [
        ("signature-role", 403, "qp.site-1"),
        ("signature-role", 403, "qp.site-1"),
        ("signature-role", 403, "nurse.tc-1"),
    ]


async def test_a_token_issued_to_another_client_is_403_signature_client(world: World) -> None:
    async with world.client() as http:
        resp = await http.post("/v1/lots/L-1/release", headers=world.qa(client_id="site-site-1"))
        no_azp = await http.post("/v1/lots/L-1/release", headers=world.qa(azp=None, client_id=None))
    refused(resp, 403, "signature-client")
    refused(no_azp, 403, "signature-client")  # a token that names no client is nobody's


async def test_a_user_of_another_organisation_is_403_signature_organisation(world: World) -> None:
    async with world.client() as http:
        # a centre's system, a physician of another centre (the token issued to that same centre's client)
        other_centre = await http.post(
            "/v1/orders/O-1/accept",
            headers={
                **world.tokens.headers("centre", "TC-1"),
                **world.tokens.signature_headers(
                    "phys.tc-2",
                    client_id="centre-tc-1",
                    roles=["physician"],
                    org_kind="centre",
                    org_id="TC-2",
                ),
            },
        )
        # QA's system signs only for staff of a manufacturing / batch-release site, never a centre's
        centre_user_at_qa = await http.post(
            "/v1/lots/L-1/release", headers=world.qa(org_kind="centre", org_id="TC-1")
        )
    refused(other_centre, 403, "signature-organisation")
    refused(centre_user_at_qa, 403, "signature-organisation")


async def test_a_signing_token_signs_once(world: World) -> None:
    token = world.tokens.signing_token(**{**QP, "client_id": "qa-x"})
    headers = {**world.tokens.headers("qa"), SIGNATURE_HEADER: token}
    async with world.client() as http:
        first = await http.post("/v1/lots/L-1/release", headers=headers)
        again = await http.post("/v1/lots/L-2/release", headers=headers)
    assert first.status_code == 200
    refused(again, 401, "signature-replayed")
    assert world.refusals[-1].user_id == "qp.site-1"


async def test_the_route_declares_its_signature_and_scope(world: World) -> None:
    routes = {getattr(r, "path", ""): r for r in world.app.routes}
    release, accept = routes["/v1/lots/{lot}/release"], routes["/v1/orders/{order}/accept"]
    assert declared_signature(release) == ("release", MEANING_ROLES["release"])
    assert declared_scope(release) == "qc:release"  # the deny-by-default test finds it
    assert declared_signature(accept) == ("physician-acceptance", ("physician",))
    operation = world.app.openapi()["paths"]["/v1/lots/{lot}/release"]["post"]
    assert SIGNATURE_HEADER in {p["name"] for p in operation["parameters"] if p["in"] == "header"}


def test_a_route_cannot_ask_for_an_unknown_meaning_or_role() -> None:
    with pytest.raises(ValueError, match="meaning"):
        require_signature("looks-fine")
    with pytest.raises(ValueError, match="roles"):
        require_signature("release", roles=["janitor"])
    with pytest.raises(ValueError, match="roles"):
        require_signature("release", roles=[])


# ---- the canonical form --------------------------------------------------------------------------------
def test_canonical_json_is_rfc_8785_shaped() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "x"], "c": {"z": "é", "y": "\n\u0001"}}) == (
        b'{"a":[true,null,"x"],"b":1,"c":{"y":"\\n\\u0001","z":"\xc3\xa9"}}'
    )
    # members sorted by UTF-16 code units: U+1F600 (surrogates D83D..) before U+FB01
    assert canonical_json({"\ufb01": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb01":1}'.encode()
    moment = dt.datetime(2026, 5, 1, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert canonical_json(moment) == b'"2026-05-01T12:30:00.000000Z"'
    assert canonical_json(dt.date(2026, 5, 1)) == b'"2026-05-01"'
    assert canonical_json(Decimal("1.50")) == b'"1.50"'
    ident = uuid.UUID(int=7)
    assert canonical_json(ident) == f'"{ident}"'.encode()
    assert canonical_json((1, 2)) == b"[1,2]"


@pytest.mark.parametrize(
    "value",
    [1.5, float("nan"), 2**53, dt.datetime(2026, 5, 1), {1: "x"}, {"a"}, b"raw", "\ud800", Decimal("NaN")],
)
def test_what_has_no_canonical_form_is_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json(value)


def test_a_record_hash_depends_on_content_not_on_field_order() -> None:
    one = SignedRecord("lot", "L-1", {"lot": "L-1", "status": "released", "coa": "COA-9"})
    same = SignedRecord("lot", "L-1", {"coa": "COA-9", "status": "released", "lot": "L-1"})
    assert one.sha256() == same.sha256() and len(one.sha256()) == 64
    assert SignedRecord("lot", "L-1", {**one.fields, "coa": "COA-10"}).sha256() != one.sha256()
    assert SignedRecord("lot", "L-2", one.fields).sha256() != one.sha256()  # bound to the object's id
    assert SignedRecord("run", "L-1", one.fields).sha256() != one.sha256()  # and its type
