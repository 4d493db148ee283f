"""Property-based API tests (schemathesis) against all five services' OpenAPI documents, on a platform of
their own, with two treatment centres' credentials.

For every operation, schemathesis generates requests from the schema (valid and invalid); each is sent
as centre A and must not answer 5xx, and its answer must match the documented schema and content type.
The same request without credentials must be refused (401, or 400/413/422 when it is malformed before
any credentials are looked at); with centre B's credentials, aimed at
centre A's own order, subscription, recipient or delivery, it must not succeed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance
from schemathesis.core.result import Ok

from v2v_harness.e2e import Parties, eventually, order_body, subscribe
from v2v_harness.identity import Credentials
from v2v_harness.infra import Infrastructure
from v2v_harness.issuer import IssuerProcess, fetch_token
from v2v_harness.platform import Platform
from v2v_harness.pytest_plugin import _start_platform
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SERVICES = ("order", "scheduling", "site", "logistics", "notification")
CENTRE_A, CENTRE_B = "TC-US-NJ-001", "TC-US-TX-002"
PUBLIC = {"/health", "/ready", "/metrics", "/asyncapi.json"}
EXAMPLES = 8  # per operation and generation mode (hypothesis examples): about 150-250 requests per service


class Tokens:
    """Access tokens of the two centres (the real client-credentials exchange), renewed before expiry."""

    def __init__(self, issuer: str, state_dir: Path) -> None:
        self.issuer, self.state_dir = issuer, state_dir
        self._cache: dict[str, tuple[str, float]] = {}

    def get(self, centre: str) -> str:
        client_id = f"centre-{centre.lower()}"
        token, until = self._cache.get(client_id, ("", 0.0))
        if time.monotonic() > until - 60:
            answer = fetch_token(self.issuer, self.state_dir, client_id)
            token, until = answer["access_token"], time.monotonic() + float(answer["expires_in"])
            self._cache[client_id] = (token, until)
        return token


@pytest.fixture(scope="module")
def contract_platform(infra: Infrastructure, state_dir: Path, issuer: IssuerProcess) -> Iterator[Platform]:
    env = {name: {"V2V_RATE_LIMIT_PER_S": "0"} for name in SERVICES}  # thousands of requests, one client
    platform = _start_platform(infra, state_dir, env)
    yield platform
    platform.stop()


@pytest.fixture(scope="module")
def centre_a_objects(
    contract_platform: Platform, credentials: Credentials, webhook_receiver: WebhookReceiver
) -> dict[str, str]:
    """Centre A's own order, subscription, recipient and delivery: what centre B must never reach."""
    platform = contract_platform

    async def build() -> dict[str, str]:
        parties = Parties(credentials)
        try:
            centre = parties.centre(CENTRE_A)
            sub = await subscribe(
                centre, platform.url("notification"), None, webhook_receiver.url(f"/contract/{uuid.uuid4()}")
            )
            rec = await centre.post(
                f"{platform.url('notification')}/v1/email-recipients", json={"email": "lab@nj.example"}
            )
            order = (
                await centre.post(f"{platform.url('order')}/v1/orders", json=order_body(CENTRE_A))
            ).json()

            async def delivery() -> str | None:
                resp = await centre.get(
                    f"{platform.url('notification')}/v1/deliveries", params={"order_id": order["order_id"]}
                )
                return str(resp.json()[0]["delivery_id"]) if resp.json() else None

            return {
                "order_id": str(order["order_id"]),
                "subscription_id": str(sub["subscription_id"]),
                "recipient_id": str(rec.json()["recipient_id"]),
                "delivery_id": str(await eventually(delivery, timeout=20, what="a delivery")),
            }
        finally:
            await parties.aclose()

    return asyncio.run(build())


@pytest.fixture(scope="module")
def tokens(contract_platform: Platform, issuer: IssuerProcess, credentials: Credentials) -> Tokens:
    return Tokens(issuer.url, credentials.state_dir)


def operations(platform: Platform, service: str) -> list[Any]:
    base = platform.url(service)
    doc = httpx.get(base + "/openapi.json", timeout=10).json()
    loaded = schemathesis.openapi.from_dict(doc)
    loaded.config.update(base_url=base)
    found = []
    for result in loaded.get_all_operations():
        assert isinstance(result, Ok), f"{service}: an operation schemathesis cannot read: {result}"
        found.append(result.ok())
    return found


def exercise(case: Any, tokens: Tokens, centre_a_objects: dict[str, str], seen: Counter[int]) -> None:
    public = case.path in PUBLIC
    keyed = {"Idempotency-Key": str(uuid.uuid4())} if case.method.upper() in {"POST", "PATCH"} else {}
    as_a = case.call(headers={**keyed, "Authorization": f"Bearer {tokens.get(CENTRE_A)}"})
    seen[as_a.status_code] += 1
    case.validate_response(
        as_a, checks=[not_a_server_error, response_schema_conformance, content_type_conformance]
    )
    if public:
        return
    anonymous = case.call(headers=keyed)
    # refused: 401, or earlier still for a request malformed before any credentials are looked at
    # (a NUL in the URL 400, an oversized body 413, a body that is not JSON 422)
    assert anonymous.status_code in {400, 401, 413, 422}, (case.method, case.path, anonymous.status_code)
    names = set(case.path_parameters or {}) & set(centre_a_objects)
    if names:  # aimed at centre A's own objects, as centre B
        case.path_parameters = {**(case.path_parameters or {}), **{n: centre_a_objects[n] for n in names}}
        as_b = case.call(headers={**keyed, "Authorization": f"Bearer {tokens.get(CENTRE_B)}"})
        assert not 200 <= as_b.status_code < 300, (case.method, case.path, as_b.status_code, as_b.text[:200])


@pytest.mark.parametrize("service", SERVICES)
def test_no_5xx_schema_conformance_and_no_way_in_without_the_right_credentials(
    service: str, contract_platform: Platform, tokens: Tokens, centre_a_objects: dict[str, str]
) -> None:
    ran: list[str] = []
    seen: Counter[int] = Counter()  # centre A's answers, by status
    exercised: Counter[str] = Counter()  # requests per operation
    for operation in operations(contract_platform, service):
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            exercise(case, tokens, centre_a_objects, seen)

        before = sum(seen.values())
        check()
        name = f"{operation.method.upper()} {operation.path}"
        ran.append(name)
        exercised[name] = sum(seen.values()) - before
    print(f"\n{service}: {len(ran)} operations, centre A's answers {dict(sorted(seen.items()))}")
    assert len(ran) >= 4, ran  # the service's own operations and the operational ones
    # every operation was exercised: those with inputs EXAMPLES times; a public one without any (health,
    # readiness, AsyncAPI) has a single possible request, and hypothesis stops once it has sent it
    assert all(exercised[name] >= 1 for name in ran), exercised
    assert all(exercised[name] >= EXAMPLES for name in ran if name.split(" ", 1)[1] not in PUBLIC), exercised
    assert sum(n for status, n in seen.items() if 200 <= status < 300) > 0  # and some requests served
