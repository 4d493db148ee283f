"""Deny by default, shown on the running platform: every route of all five services (read from their
OpenAPI documents, so a new route without a row here fails the test) is called with

    no token · an expired token · a wrong audience · a wrong issuer · `alg: none` · HS256 keyed with the
    issuer's public key · a client assertion replayed as a bearer token · the right kind of token of
    another tenant · the right token without the route's scope · the right token

and only the last gets through: the bad tokens get 401 with `WWW-Authenticate: Bearer` and problem+json,
the token without the scope 403, another tenant's token 404 on an object of the first tenant (a list
does not show it; a create naming the first tenant is refused), and the right token is served (a GET
answers 2xx; an action may still answer 409/422 for the object's state: it was let through).

The platform here is its own (module scope): the right-token pass changes a site, adds an outage and
cancels an order, which other tests' platforms must not see.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from v2v_contracts.scopes import SCOPES_BY_KIND
from v2v_harness import forge
from v2v_harness.e2e import Parties, eventually, order_body, subscribe
from v2v_harness.identity import Credentials
from v2v_harness.infra import Infrastructure
from v2v_harness.issuer import IssuerProcess, client_assertion, private_key
from v2v_harness.platform import Platform
from v2v_harness.pytest_plugin import _start_platform
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SERVICES = ("order", "scheduling", "site", "logistics", "notification")
PUBLIC = {"/health", "/ready", "/metrics", "/asyncapi.json"}
CENTRE_A, CENTRE_B = "TC-DE-BE-001", "TC-FR-PA-001"
BAD_TOKENS = (
    "no token",
    "expired",
    "wrong audience",
    "wrong issuer",
    "alg none",
    "HS256 keyed with the public key",
    "replayed client assertion",
)


@pytest.fixture(scope="module")
def edge_platform(infra: Infrastructure, state_dir: Path, issuer: IssuerProcess) -> Iterator[Platform]:
    platform = _start_platform(infra, state_dir, {"notification": {"V2V_WEBHOOK_BACKOFF_BASE_S": "0.2"}})
    yield platform
    platform.stop()


@dataclass
class Route:
    """How to call one route: as whom (kind, entity), with which path parameters and body; and who
    "another tenant" is for it (None where the route has no tenant: QA, admin and ops act across)."""

    service: str
    method: str
    path: str
    kind: str
    entity: str | None
    params: dict[str, str] = field(default_factory=dict)
    body: Any = None
    other: str | None = None  # another entity of the same kind
    tenant_object: str | None = None  # the object of the first tenant the route names (its id)
    lists: str | None = None  # a list route: the id of the first tenant's object that must not show
    # a signed route: the demo user who signs (`{entity}`: the calling tenant's id, lower case)
    signer: str | None = None
    query: dict[str, str] | None = None  # a GET's query parameters

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.service, self.method, self.path)

    def url(self, platform: Platform) -> str:
        path = self.path
        for name, value in self.params.items():
            path = path.replace("{" + name + "}", value)
        return platform.url(self.service) + path


@dataclass
class World:
    order_id: str
    coi: str
    site: str
    other_site: str
    shipment: str
    carrier: str
    other_carrier: str
    subscription: str
    recipient: str
    delivery: str
    hold: str  # a slot offer centre A holds (scheduling)
    hold_body: dict[str, Any]  # an offer to hold


# centre A's market for TISA-CEL (EMA, europe), a month ahead: the offers a centre may hold
AVAILABILITY = {
    "product_code": "TISA-CEL",
    "order_type": "commercial",
    "regulator": "EMA",
    "region": "europe",
    "apheresis_from": str(date.today() + timedelta(days=30)),
}
HOLD_FIELDS = (
    "product_code",
    "order_type",
    "regulator",
    "region",
    "site_id",
    "manufacturing_start_date",
    "apheresis_date",
)


async def build_world(platform: Platform, parties: Parties, receiver: WebhookReceiver) -> World:
    """Centre A's order with its slot, booking and inbound shipment, a subscription, a recipient and a
    delivery; the site and carrier that serve it, and another of each."""
    centre = parties.centre(CENTRE_A)
    sub = await subscribe(centre, platform.url("notification"), None, receiver.url(f"/edge/{uuid.uuid4()}"))
    recipient = await centre.post(
        f"{platform.url('notification')}/v1/email-recipients", json={"email": "cell-lab@berlin.example"}
    )
    assert recipient.status_code == 201, recipient.text
    placed = await centre.post(f"{platform.url('order')}/v1/orders", json=order_body(CENTRE_A))
    assert placed.status_code == 201, placed.text
    order = placed.json()

    async def planned() -> dict[str, Any] | None:
        body = (await centre.get(f"{platform.url('order')}/v1/orders/{order['order_id']}")).json()
        return body if body["status"] == "inbound_shipment_planned" else None

    detail = await eventually(planned, timeout=30, what="the order's inbound shipment planned")

    async def shipment() -> dict[str, Any] | None:
        resp = await parties.ops.get(
            f"{platform.url('logistics')}/v1/shipments", params={"order_id": order["order_id"]}
        )
        return resp.json()[0] if resp.status_code == 200 and resp.json() else None

    ship = await eventually(shipment, timeout=15, what="the shipment")

    async def delivery() -> dict[str, Any] | None:
        resp = await centre.get(
            f"{platform.url('notification')}/v1/deliveries", params={"order_id": order["order_id"]}
        )
        return resp.json()[0] if resp.status_code == 200 and resp.json() else None

    hook = await eventually(delivery, timeout=15, what="a webhook delivery")
    offers = await centre.get(f"{platform.url('scheduling')}/v1/availability", params=AVAILABILITY)
    assert offers.status_code == 200 and offers.json(), offers.text
    offer = offers.json()[0]
    held = await centre.post(
        f"{platform.url('scheduling')}/v1/holds",
        json={k: offer[k] for k in HOLD_FIELDS},
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert held.status_code == 201, held.text
    sites = [c.entity_id for c in parties.credentials.clients("site")]
    carriers = [c.entity_id for c in parties.credentials.clients("carrier")]
    site = str(detail["site_id"])
    return World(
        order_id=str(order["order_id"]),
        coi=str(order["coi"]),
        site=site,
        other_site=str(next(s for s in sites if s != site)),
        shipment=str(ship["shipment_id"]),
        carrier=str(ship["carrier_id"]),
        other_carrier=str(next(c for c in carriers if c != ship["carrier_id"])),
        subscription=str(sub["subscription_id"]),
        recipient=str(recipient.json()["recipient_id"]),
        delivery=str(hook["delivery_id"]),
        hold=str(held.json()["offer_id"]),
        hold_body={k: offer[k] for k in HOLD_FIELDS},
    )


def routes(w: World) -> list[Route]:
    """One row per route. The order matters for the right-token pass: reads first, then actions, the
    ones that end something last."""
    today = date.today()
    order = {"order_id": w.order_id}
    ship = {"shipment_id": w.shipment}
    mfg = {"site_id": w.site, "order_id": w.order_id}
    now = forge_now()
    rows = [
        # order service: the centre's orders, the catalogue, QA's decision, ops' dead letters
        Route("order", "GET", "/v1/orders", "centre", CENTRE_A, other=CENTRE_B, lists=w.order_id),
        Route(
            "order",
            "GET",
            "/v1/orders/{order_id}",
            "centre",
            CENTRE_A,
            order,
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "order",
            "GET",
            "/v1/orders/{order_id}/audit",
            "centre",
            CENTRE_A,
            order,
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route("order", "GET", "/v1/treatment-centers", "centre", CENTRE_A),
        Route("order", "GET", "/v1/products", "centre", CENTRE_A),
        Route("order", "GET", "/v1/dead-letters", "ops", None),
        Route("order", "GET", "/v1/dead-letters/{dead_letter_id}", "ops", None, {"dead_letter_id": "1"}),
        # scheduling
        Route("scheduling", "GET", "/v1/slots", "ops", None),
        Route("scheduling", "GET", "/v1/waitlist", "ops", None),
        # offers and holds (issue 11): a centre sees its own holds only
        Route("scheduling", "GET", "/v1/availability", "centre", CENTRE_A, query=AVAILABILITY),
        Route(
            "scheduling",
            "GET",
            "/v1/holds/{offer_id}",
            "centre",
            CENTRE_A,
            {"offer_id": w.hold},
            other=CENTRE_B,
            tenant_object=w.hold,
        ),
        Route("scheduling", "POST", "/v1/holds", "centre", CENTRE_A, body=w.hold_body),
        Route(
            "scheduling",
            "POST",
            "/v1/holds/{offer_id}/release",
            "centre",
            CENTRE_A,
            {"offer_id": w.hold},
            {},
            other=CENTRE_B,
            tenant_object=w.hold,
        ),
        Route("scheduling", "POST", "/v1/waitlist/{order_id}/priority", "ops", None, order, {"priority": 1}),
        Route("scheduling", "GET", "/v1/dead-letters", "ops", None),
        Route("scheduling", "GET", "/v1/dead-letters/{dead_letter_id}", "ops", None, {"dead_letter_id": "1"}),
        # site: a site's MES on its own site; QA; the registry admin
        Route("site", "GET", "/v1/sites", "site", w.site, other=w.other_site, lists=w.site),
        Route(
            "site",
            "GET",
            "/v1/sites/{site_id}",
            "site",
            w.site,
            {"site_id": w.site},
            other=w.other_site,
            tenant_object=w.site,
        ),
        Route(
            "site",
            "GET",
            "/v1/sites/{site_id}/manufacturing/{order_id}",
            "site",
            w.site,
            mfg,
            other=w.other_site,
            tenant_object=w.site,
        ),
        Route("site", "GET", "/v1/dead-letters", "ops", None),
        Route("site", "GET", "/v1/dead-letters/{dead_letter_id}", "ops", None, {"dead_letter_id": "1"}),
        # logistics: the carrier of the shipment
        Route(
            "logistics", "GET", "/v1/shipments", "carrier", w.carrier, other=w.other_carrier, lists=w.shipment
        ),
        Route(
            "logistics",
            "GET",
            "/v1/shipments/{shipment_id}",
            "carrier",
            w.carrier,
            ship,
            other=w.other_carrier,
            tenant_object=w.shipment,
        ),
        Route(
            "logistics",
            "GET",
            "/v1/shipments/{shipment_id}/custody",
            "carrier",
            w.carrier,
            ship,
            other=w.other_carrier,
            tenant_object=w.shipment,
        ),
        Route(
            "logistics",
            "GET",
            "/v1/shipments/{shipment_id}/temperature",
            "carrier",
            w.carrier,
            ship,
            other=w.other_carrier,
            tenant_object=w.shipment,
        ),
        Route("logistics", "GET", "/v1/dead-letters", "ops", None),
        Route("logistics", "GET", "/v1/dead-letters/{dead_letter_id}", "ops", None, {"dead_letter_id": "1"}),
        # notification: the centre's subscriptions, recipients and deliveries
        Route(
            "notification",
            "GET",
            "/v1/subscriptions",
            "centre",
            CENTRE_A,
            other=CENTRE_B,
            lists=w.subscription,
        ),
        Route(
            "notification",
            "GET",
            "/v1/subscriptions/{subscription_id}",
            "centre",
            CENTRE_A,
            {"subscription_id": w.subscription},
            other=CENTRE_B,
            tenant_object=w.subscription,
        ),
        Route("notification", "GET", "/v1/event-types", "centre", CENTRE_A),
        Route(
            "notification",
            "GET",
            "/v1/email-recipients",
            "centre",
            CENTRE_A,
            other=CENTRE_B,
            lists=w.recipient,
        ),
        Route(
            "notification",
            "GET",
            "/v1/email-recipients/{recipient_id}",
            "centre",
            CENTRE_A,
            {"recipient_id": w.recipient},
            other=CENTRE_B,
            tenant_object=w.recipient,
        ),
        Route("notification", "GET", "/v1/deliveries", "centre", CENTRE_A, other=CENTRE_B, lists=w.delivery),
        Route(
            "notification",
            "GET",
            "/v1/deliveries/{delivery_id}",
            "centre",
            CENTRE_A,
            {"delivery_id": w.delivery},
            other=CENTRE_B,
            tenant_object=w.delivery,
        ),
        Route("notification", "GET", "/v1/dead-letters", "ops", None),
        Route(
            "notification", "GET", "/v1/dead-letters/{dead_letter_id}", "ops", None, {"dead_letter_id": "1"}
        ),
        # actions
        Route("order", "POST", "/v1/orders", "centre", CENTRE_A, body=order_body(CENTRE_A), other=CENTRE_B),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/apheresis",
            "centre",
            CENTRE_A,
            order,
            {"coi": w.coi},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "logistics",
            "POST",
            "/v1/shipments/{shipment_id}/milestones",
            "carrier",
            w.carrier,
            ship,
            {
                "milestone": "picked_up",
                "occurred_at": now,
                "location": "HUB-1",
                "handled_by": "courier-42",
                "coi": w.coi,
            },
            other=w.other_carrier,
            tenant_object=w.shipment,
        ),
        Route(
            "logistics",
            "POST",
            "/v1/shipments/{shipment_id}/temperature",
            "carrier",
            w.carrier,
            ship,
            {"reading_c": 5.0, "measured_at": now, "coi": w.coi},
            other=w.other_carrier,
            tenant_object=w.shipment,
        ),
        Route(
            "site",
            "POST",
            "/v1/sites/{site_id}/receipts",
            "site",
            w.site,
            {"site_id": w.site},
            {"order_id": w.order_id, "coi": w.coi, "accepted": True},
            other=w.other_site,
            tenant_object=w.site,
        ),
        Route(
            "site",
            "POST",
            "/v1/sites/{site_id}/manufacturing/{order_id}/steps",
            "site",
            w.site,
            mfg,
            {"step": "activation"},
            other=w.other_site,
            tenant_object=w.site,
        ),
        Route(
            "site",
            "POST",
            "/v1/sites/{site_id}/manufacturing/{order_id}/qc",
            "qa",
            None,
            mfg,
            {
                "disposition": "passed",
                "results": {"viability_pct": 92.5, "sterility": "negative"},
                "coa_reference": "COA-1",
            },
        ),
        # signed: the signature's meaning and role depend on the order's market and are read first, so
        # an order whose material the site never received is refused (409) before any signing token
        Route("site", "POST", "/v1/sites/{site_id}/manufacturing/{order_id}/release", "qa", None, mfg, {}),
        Route(
            "site",
            "POST",
            "/v1/sites/{site_id}/manufacturing/{order_id}/import-certification",
            "qa",
            None,
            mfg,
            {},
        ),
        Route("site", "PATCH", "/v1/sites/{site_id}", "admin", None, {"site_id": w.site}, {"active": True}),
        Route(
            "site",
            "POST",
            "/v1/sites/{site_id}/outages",
            "admin",
            None,
            {"site_id": w.other_site},
            {
                "start_date": str(today + timedelta(days=700)),
                "end_date": str(today + timedelta(days=701)),
                "reason": "maintenance",
            },
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/lymphodepletion",
            "centre",
            CENTRE_A,
            order,
            {},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/product-receipt",
            "centre",
            CENTRE_A,
            order,
            {"coi": w.coi},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/infusion",
            "centre",
            CENTRE_A,
            order,
            {"coi": w.coi},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/quarantine-decision",
            "qa",
            None,
            order,
            {"decision": "release", "reason_code": "within_stability_data"},
            signer=f"qa.{w.site.lower()}",
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/disposition",
            "qa",
            None,
            order,
            {"outcome": "release", "reason_code": "within_stability_data", "document_reference": "QA-1"},
            signer=f"qa.{w.site.lower()}",
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/physician-decision",
            "centre",
            CENTRE_A,
            order,
            {"accept": True},
            other=CENTRE_B,
            tenant_object=w.order_id,
            signer="phys.{entity}",
        ),
        Route("order", "GET", "/v1/tasks", "qa", None),
        Route(
            "order",
            "POST",
            "/v1/tasks/{task_id}/done",
            "qa",
            None,
            {"task_id": str(uuid.uuid4())},
            {"reference": "NOTIF-1"},
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/apheresis-date",
            "centre",
            CENTRE_A,
            order,
            {"requested_apheresis_date": str(today + timedelta(days=20)), "reason_code": "patient_unwell"},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "notification",
            "POST",
            "/v1/subscriptions",
            "centre",
            CENTRE_A,
            body={"treatment_center_id": CENTRE_A, "url": "https://hooks.example.org/v2v"},
            other=CENTRE_B,
        ),
        Route(
            "notification",
            "POST",
            "/v1/subscriptions/{subscription_id}/rotate-secret",
            "centre",
            CENTRE_A,
            {"subscription_id": w.subscription},
            other=CENTRE_B,
            tenant_object=w.subscription,
        ),
        Route(
            "notification",
            "POST",
            "/v1/email-recipients",
            "centre",
            CENTRE_A,
            body={"treatment_center_id": CENTRE_A, "email": "qa@berlin.example"},
            other=CENTRE_B,
        ),
        Route(
            "notification",
            "DELETE",
            "/v1/email-recipients/{recipient_id}",
            "centre",
            CENTRE_A,
            {"recipient_id": w.recipient},
            other=CENTRE_B,
            tenant_object=w.recipient,
        ),
        # issue 11: the patient's journey on hold and resumed; the disposition of material left at the end
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/hold",
            "centre",
            CENTRE_A,
            order,
            {"reason_code": "patient_unwell"},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/resume",
            "centre",
            CENTRE_A,
            order,
            {"reason_code": "patient_cleared"},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/material-disposition",
            "centre",
            CENTRE_A,
            order,
            {"material": "product", "outcome": "destroyed", "reason_code": "order_cancelled"},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/site-material-disposition",
            "qa",
            None,
            order,
            {"material": "product", "outcome": "destroyed", "reason_code": "other"},
        ),
        Route(
            "order",
            "POST",
            "/v1/orders/{order_id}/cancel",
            "centre",
            CENTRE_A,
            order,
            {"reason_code": "physician_decision"},
            other=CENTRE_B,
            tenant_object=w.order_id,
        ),
    ]
    for service in SERVICES:  # replaying dead letter 1 (there is none: the right token gets a 404)
        rows.append(
            Route(
                service,
                "POST",
                "/v1/dead-letters/{dead_letter_id}/replay",
                "ops",
                None,
                {"dead_letter_id": "1"},
            )
        )
    return rows


def forge_now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()


async def documented_routes(platform: Platform) -> set[tuple[str, str, str]]:
    found = set()
    async with httpx.AsyncClient(timeout=10) as http:
        for service in SERVICES:
            doc = (await http.get(platform.url(service) + "/openapi.json")).json()
            for path, operations in doc["paths"].items():
                for method, operation in operations.items():
                    if path in PUBLIC:
                        assert operation.get("security") == [], (service, path)
                        continue
                    assert operation.get("x-required-scope"), (service, method, path)
                    found.add((service, method.upper(), path))
    return found


async def bad_tokens(
    credentials: Credentials, issuer: IssuerProcess, client_id: str
) -> dict[str, str | None]:
    good = await credentials.token(client_id)
    server = issuer.server
    # a client assertion, used once at the token endpoint; presented as a bearer token it is not one
    assertion = client_assertion(
        client_id, private_key(credentials.state_dir, client_id), server.token_endpoint
    )
    return {
        "no token": None,
        "expired": forge.expired(server, good),
        "wrong audience": forge.wrong_audience(server, good),
        "wrong issuer": forge.wrong_issuer(server, good),
        "alg none": forge.unsigned(good),
        "HS256 keyed with the public key": forge.hs256_with_public_key(server, good),
        "replayed client assertion": assertion,
    }


async def call(
    http: httpx.AsyncClient,
    route: Route,
    platform: Platform,
    token: str | None,
    signature: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {"Idempotency-Key": str(uuid.uuid4())} if route.method in {"POST", "PATCH"} else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    headers.update(signature or {})
    return await http.request(
        route.method, route.url(platform), json=route.body, headers=headers, params=route.query
    )


def client_id(credentials: Credentials, kind: str, entity: str | None) -> str:
    return credentials.client_id(kind, entity)


async def signature(credentials: Credentials, route: Route, entity: str | None) -> dict[str, str] | None:
    """A fresh signing token of the route's signer for the calling tenant (`entity`), when it is signed."""
    if route.signer is None:
        return None
    user = route.signer.replace("{entity}", (entity or "").lower())
    return await credentials.signature_headers(client_id(credentials, route.kind, entity), user)


async def test_every_route_lets_only_the_right_token_of_the_right_tenant_through(
    edge_platform: Platform,
    issuer: IssuerProcess,
    credentials: Credentials,
    webhook_receiver: WebhookReceiver,
) -> None:
    platform = edge_platform
    parties = Parties(credentials)
    try:
        world = await build_world(platform, parties, webhook_receiver)
    finally:
        await parties.aclose()
    table = routes(world)
    assert len({r.key for r in table}) == len(table), "one row per route"
    documented = await documented_routes(platform)
    assert {r.key for r in table} == documented, (
        f"routes without a row: {sorted(documented - {r.key for r in table})}; "
        f"rows without a route: {sorted({r.key for r in table} - documented)}"
    )

    failures: list[str] = []
    seen: Counter[str] = Counter()  # what each pass answered: proof that every pass ran
    async with httpx.AsyncClient(timeout=15) as http:
        # 1. the bad tokens: 401, a Bearer challenge, problem+json
        for route in table:
            forged = await bad_tokens(credentials, issuer, client_id(credentials, route.kind, route.entity))
            for name in BAD_TOKENS:
                resp = await call(http, route, platform, forged[name])
                seen[f"bad token {resp.status_code}"] += 1
                ok = (
                    resp.status_code == 401
                    and resp.headers.get("www-authenticate", "").startswith("Bearer")
                    and resp.headers.get("content-type", "").startswith("application/problem+json")
                )
                if not ok:
                    failures.append(
                        f"{route.method} {route.service}{route.path} [{name}]: {resp.status_code}"
                    )
        # the replayed assertion is refused by the token endpoint too
        cid = client_id(credentials, "centre", CENTRE_A)
        endpoint = issuer.server.token_endpoint
        assertion = client_assertion(cid, private_key(credentials.state_dir, cid), endpoint)
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        }
        assert (await http.post(endpoint, data=form)).status_code == 200
        assert (await http.post(endpoint, data=form)).status_code == 401

        # 2. the right kind of token without the route's scope: 403
        scope_of = {k: v for k, v in _scopes(documented, platform).items()}
        for route in table:
            needed = scope_of[route.key]
            cid = client_id(credentials, route.kind, route.entity)
            rest = [s for s in SCOPES_BY_KIND[route.kind] if s != needed]
            token = await credentials.token(cid, " ".join(rest))
            resp = await call(http, route, platform, token)
            seen[f"no scope {resp.status_code}"] += 1
            if resp.status_code != 403:
                failures.append(f"{route.method} {route.service}{route.path} [no scope]: {resp.status_code}")

        # 3. the right kind of token of another tenant: never served the first tenant's object
        for route in table:
            if route.other is None:
                continue
            token = await credentials.token(client_id(credentials, route.kind, route.other))
            signed = await signature(credentials, route, route.other)
            resp = await call(http, route, platform, token, signed)
            seen[f"other tenant {resp.status_code}"] += 1
            where = f"{route.method} {route.service}{route.path} [other tenant {route.other}]"
            if route.tenant_object is not None:
                if resp.status_code != 404:
                    failures.append(f"{where}: {resp.status_code} (expected 404)")
            elif route.lists is not None:
                if resp.status_code != 200 or route.lists in resp.text:
                    failures.append(f"{where}: {resp.status_code}, shows the first tenant's object")
            elif 200 <= resp.status_code < 300:  # a create naming the first tenant
                failures.append(f"{where}: {resp.status_code} (created for another tenant)")

        # 4. the right token: let through (a GET is served; an action may answer for the object's state)
        for route in table:
            token = await credentials.token(client_id(credentials, route.kind, route.entity))
            signed = await signature(credentials, route, route.entity)
            resp = await call(http, route, platform, token, signed)
            seen[f"right token {resp.status_code}"] += 1
            where = f"{route.method} {route.service}{route.path} [right token]"
            if (
                resp.status_code in {401, 403}
                or resp.status_code >= 500
                or (route.method == "GET" and "dead_letter_id" not in route.params and not resp.is_success)
            ):
                failures.append(f"{where}: {resp.status_code} {resp.text[:200]}")
            elif route.tenant_object is not None and resp.status_code == 404:
                failures.append(f"{where}: 404 on its own object")
    print(f"\n{len(table)} routes: {dict(sorted(seen.items()))}")
    assert failures == []
    tenanted = [r for r in table if r.other is not None]
    assert seen["bad token 401"] == len(table) * len(BAD_TOKENS)
    assert seen["no scope 403"] == len(table)
    assert sum(n for k, n in seen.items() if k.startswith("other tenant")) == len(tenanted) >= 30
    assert sum(n for k, n in seen.items() if k.startswith("right token 2")) >= 35


def _scopes(documented: set[tuple[str, str, str]], platform: Platform) -> dict[tuple[str, str, str], str]:
    out: dict[tuple[str, str, str], str] = {}
    with httpx.Client(timeout=10) as http:
        for service in SERVICES:
            doc = http.get(platform.url(service) + "/openapi.json").json()
            for path, operations in doc["paths"].items():
                for method, operation in operations.items():
                    key = (service, method.upper(), path)
                    if key in documented:
                        out[key] = str(operation["x-required-scope"])
    return out
