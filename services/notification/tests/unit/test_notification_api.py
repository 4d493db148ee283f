"""The notification API at the edge (in-memory repositories, bearer tokens from `TestTokens`): one scope
on every route, tenancy (another centre's subscriptions, recipients and deliveries are 404, lists hold the
caller's own only, the centre comes from the token), the signing secret returned once and rotated,
hostile input refused, and the delivery log's outcome categories."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from standardwebhooks.webhooks import Webhook

from notification_service.adapters.memory import MemoryStore, fake_unit_of_work
from notification_service.adapters.secret_box import DEV_KEY, SecretBox
from notification_service.adapters.webhooks import sign
from notification_service.config import NotificationSettings
from notification_service.domain.delivery import DeliveryPolicy, Outcome
from notification_service.domain.endpoints import BreakerPolicy
from notification_service.entrypoints.api import router
from notification_service.service_layer.dispatch import EmailDispatcher, WebhookDispatcher
from notification_service.service_layer.handlers import handlers
from v2v_contracts import MaterialRejectedV1, OrderSubmittedV1, new_event
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork
from v2v_servicekit import problems
from v2v_servicekit.auth import declared_scope
from v2v_servicekit.testing import TestTokens

CENTRE = "TC-DE-BE-001"
OTHER = "TC-FR-PA-001"
SCOPE = "notifications:manage"
HOOK = "https://charite.example/v2v/hooks"


class Edge:
    def __init__(self, client: httpx.AsyncClient, tokens: TestTokens, store: MemoryStore, uow: Any) -> None:
        self.client = client
        self.tokens = tokens
        self.store = store
        self.uow: FakeUnitOfWork[Any] = uow
        self.mine = tokens.headers("centre", CENTRE)
        self.theirs = tokens.headers("centre", OTHER)

    async def subscribe(self, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
        resp = await self.client.post(
            "/v1/subscriptions", json={"url": HOOK, **body}, headers=headers or self.mine
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json())


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    store = MemoryStore()
    uow = fake_unit_of_work(store)
    app = FastAPI()
    problems.install(app)
    app.include_router(router)
    tokens = TestTokens.install(app)
    settings = NotificationSettings(notification_insecure_dev_key=True, webhook_secret_overlap_s=3600)
    app.state.runtime = SimpleNamespace(uow=uow, settings=settings, extras={})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://notification") as client:
        yield Edge(client, tokens, store, uow)


def paths() -> list[tuple[str, str]]:
    return [(m, r.path) for r in router.routes if isinstance(r, APIRoute) for m in sorted(r.methods)]


def concrete(path: str) -> str:
    return (
        path.replace("{subscription_id}", str(uuid.uuid4()))
        .replace("{recipient_id}", str(uuid.uuid4()))
        .replace("{delivery_id}", str(uuid.uuid4()))
    )


# ---- deny by default --------------------------------------------------------------------------------


def test_every_route_declares_the_one_scope() -> None:
    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) == 11
    assert {r.path: declared_scope(r) for r in routes} == {r.path: SCOPE for r in routes}


@pytest.mark.parametrize(("method", "path"), paths())
async def test_no_token_is_401_and_a_token_without_the_scope_is_403(
    edge: Edge, method: str, path: str
) -> None:
    url = concrete(path)
    resp = await edge.client.request(method, url)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert resp.headers["content-type"].startswith("application/problem+json")
    unscoped = edge.tokens.headers("centre", CENTRE, scopes=["orders:read", "orders:write"])
    assert (await edge.client.request(method, url, headers=unscoped)).status_code == 403
    for kind, entity in (("carrier", "DHL-MED"), ("site", "SITE-DE-01"), ("qa", None), ("ops", None)):
        assert (
            await edge.client.request(method, url, headers=edge.tokens.headers(kind, entity))
        ).status_code == 403
    assert edge.store.subscriptions == {} and edge.store.recipients == {}


async def test_event_types_are_listed_for_a_centre(edge: Edge) -> None:
    resp = await edge.client.get("/v1/event-types", headers=edge.mine)
    assert resp.status_code == 200 and "order.submitted.v1" in resp.json()


# ---- subscriptions: the secret, once ----------------------------------------------------------------


async def test_a_subscription_returns_its_generated_secret_once(edge: Edge) -> None:
    resp = await edge.client.post("/v1/subscriptions", json={"url": HOOK}, headers=edge.mine)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["location"] == f"/v1/subscriptions/{created['subscription_id']}"
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert created["treatment_center_id"] == CENTRE  # from the token
    assert (created["secret_rotated_at"], created["previous_secret_expires_at"]) == (None, None)
    sid = uuid.UUID(created["subscription_id"])
    assert SecretBox(DEV_KEY).open(edge.store.sealed[sid][0], sid) == secret
    assert secret.encode() not in edge.store.sealed[sid][0]

    shown = (await edge.client.get(resp.headers["location"], headers=edge.mine)).json()
    assert "secret" not in shown and secret not in str(shown)
    assert shown == {k: v for k, v in created.items() if k != "secret"}
    listed = (await edge.client.get("/v1/subscriptions", headers=edge.mine)).json()
    assert listed == [shown]


async def test_the_secret_is_rotated_and_the_replaced_one_signs_during_the_overlap(edge: Edge) -> None:
    created = await edge.subscribe()
    sid = created["subscription_id"]
    resp = await edge.client.post(f"/v1/subscriptions/{sid}/rotate-secret", headers=edge.mine)
    assert resp.status_code == 200, resp.text
    rotated = resp.json()
    assert resp.headers["cache-control"] == "no-store"
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    assert rotated["secret_rotated_at"] is not None and rotated["previous_secret_expires_at"] is not None
    expires = rotated["previous_secret_expires_at"]
    assert (await edge.client.get(f"/v1/subscriptions/{sid}", headers=edge.mine)).json()[
        "previous_secret_expires_at"
    ] == expires

    # the next delivery carries two signatures: each secret verifies it
    await FakeInbox(edge.uow, handlers).deliver(submitted(CENTRE))
    posted: list[tuple[str, dict[str, str]]] = []

    class Capture:
        async def send(self, delivery: Any) -> Outcome:
            box = SecretBox(DEV_KEY)
            secrets = [box.open(s, delivery.subscription_id) for s in delivery.sealed_secrets]
            body = delivery.payload.decode()
            posted.append((body, sign(secrets, "msg_1", datetime.now(UTC), body)))
            return Outcome(204)

        async def aclose(self) -> None:
            return None

    await WebhookDispatcher(edge.uow, Capture(), DeliveryPolicy()).dispatch_due()
    ((body, headers),) = posted
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(rotated["secret"]).verify(body, headers)
    Webhook(created["secret"]).verify(body, headers)


async def test_another_centres_subscription_is_not_there(edge: Edge) -> None:
    theirs = await edge.subscribe(edge.theirs)
    mine = await edge.subscribe()
    sid = theirs["subscription_id"]
    assert (await edge.client.get(f"/v1/subscriptions/{sid}", headers=edge.mine)).status_code == 404
    rotate = await edge.client.post(f"/v1/subscriptions/{sid}/rotate-secret", headers=edge.mine)
    assert rotate.status_code == 404
    assert rotate.json()["title"] == "Subscription not found"  # the same answer as for no subscription
    unknown = await edge.client.post(f"/v1/subscriptions/{uuid.uuid4()}/rotate-secret", headers=edge.mine)
    assert unknown.status_code == 404 and unknown.json()["title"] == rotate.json()["title"]
    listed = (await edge.client.get("/v1/subscriptions", headers=edge.mine)).json()
    assert [s["subscription_id"] for s in listed] == [mine["subscription_id"]]
    filtered = await edge.client.get(
        "/v1/subscriptions", params={"treatment_center_id": OTHER}, headers=edge.mine
    )
    assert filtered.json() == []
    anyone = edge.tokens.headers("ops", scopes=[SCOPE])  # not confined to a centre
    assert len((await edge.client.get("/v1/subscriptions", headers=anyone)).json()) == 2
    assert (await edge.client.get(f"/v1/subscriptions/{sid}", headers=edge.theirs)).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"treatment_center_id": OTHER}, "treatment_center_id"),  # the centre comes from the token
        ({"treatment_center_id": "TC DE"}, "treatment_center_id"),
        ({"secret": "whsec_" + "A" * 44}, "secret"),  # the platform makes the secret: none may be sent
        ({"url": "http://charite.example/hook"}, "url"),
        ({"url": "https://169.254.169.254/latest/meta-data/"}, "url"),
        ({"url": "https://[::ffff:169.254.169.254]/"}, "url"),
        ({"url": "https://2852039166/"}, "url"),
        ({"url": "https://0xA9FEA9FE/"}, "url"),
        ({"url": "https://10.0.0.1/hook"}, "url"),
        ({"url": "https://localhost./hook"}, "url"),
        ({"url": "https://127.0.0.1/hook"}, "url"),  # loopback: development deployments only
        ({"url": "https://user:pw@charite.example/hook"}, "url"),
        ({"url": "https://charite.example/hook#x"}, "url"),
        ({"url": "https://charite.example/" + "a" * 2000}, "url"),
        ({"url": 42}, "url"),
        ({"event_types": []}, "event_types"),
        ({"event_types": ["site.registered.v1"]}, "event_types"),
        ({"event_types": ["order.submitted.v1"] * 101}, "event_types"),
        ({"event_types": ["order submitted"]}, "event_types.0"),
        ({"patient_ref": "BER-0042"}, "patient_ref"),
    ],
)
async def test_a_bad_subscription_is_refused_naming_the_field(
    edge: Edge, body: dict[str, Any], field: str
) -> None:
    resp = await edge.client.post("/v1/subscriptions", json={"url": HOOK, **body}, headers=edge.mine)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in resp.json()["errors"]][:1] == [field]
    assert edge.store.subscriptions == {}


async def test_a_caller_not_confined_to_a_centre_names_the_centre(edge: Edge) -> None:
    anyone = edge.tokens.headers("ops", scopes=[SCOPE])
    resp = await edge.client.post("/v1/subscriptions", json={"url": HOOK}, headers=anyone)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "treatment_center_id"
    created = await edge.subscribe(anyone, treatment_center_id=OTHER)
    assert created["treatment_center_id"] == OTHER
    # a centre may repeat its own id
    assert (await edge.subscribe(treatment_center_id=CENTRE))["treatment_center_id"] == CENTRE


# ---- e-mail recipients ------------------------------------------------------------------------------


async def test_recipients_are_the_tokens_centres_only(edge: Edge) -> None:
    resp = await edge.client.post(
        "/v1/email-recipients", json={"email": "qa@charite.example"}, headers=edge.mine
    )
    assert resp.status_code == 201, resp.text
    mine = resp.json()
    assert mine["treatment_center_id"] == CENTRE
    theirs = (
        await edge.client.post(
            "/v1/email-recipients", json={"email": "qa@hopital.example"}, headers=edge.theirs
        )
    ).json()
    rid = theirs["recipient_id"]
    assert (await edge.client.get(f"/v1/email-recipients/{rid}", headers=edge.mine)).status_code == 404
    assert (await edge.client.delete(f"/v1/email-recipients/{rid}", headers=edge.mine)).status_code == 404
    assert (await edge.client.get(f"/v1/email-recipients/{rid}", headers=edge.theirs)).status_code == 200
    assert (await edge.client.get("/v1/email-recipients", headers=edge.mine)).json() == [mine]
    assert (await edge.client.get("/v1/email-recipients", headers=edge.theirs)).json() == [theirs]
    wrong = await edge.client.post(
        "/v1/email-recipients",
        json={"email": "x@charite.example", "treatment_center_id": OTHER},
        headers=edge.mine,
    )
    assert wrong.status_code == 422 and wrong.json()["errors"][0]["field"] == "treatment_center_id"
    named = await edge.client.post(
        "/v1/email-recipients", json={"email": "x@charite.example", "name": "Dr. Erika M."}, headers=edge.mine
    )
    assert named.status_code == 422 and named.json()["errors"][0]["field"] == "name"  # no free-text label


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"limit": 200}, 200),
        ({"limit": 201}, 422),
        ({"limit": 0}, 422),
        ({"offset": -1}, 422),
        ({"offset": 100_001}, 422),
        ({"treatment_center_id": "TC DE;--"}, 422),
    ],
)
async def test_lists_are_paginated_and_capped(edge: Edge, params: dict[str, Any], status: int) -> None:
    for path in ("/v1/subscriptions", "/v1/email-recipients", "/v1/deliveries"):
        assert (await edge.client.get(path, params=params, headers=edge.mine)).status_code == status, path


async def test_pages_of_a_list(edge: Edge) -> None:
    for _ in range(5):
        await edge.subscribe()
    everything = (await edge.client.get("/v1/subscriptions", headers=edge.mine)).json()
    page = (
        await edge.client.get("/v1/subscriptions", params={"limit": 2, "offset": 2}, headers=edge.mine)
    ).json()
    assert page == everything[2:4]


# ---- the delivery log -------------------------------------------------------------------------------


def submitted(centre: str) -> Any:
    return new_event(
        OrderSubmittedV1(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000042-K",
            treatment_center_id=centre,
            product_code="TISA-CEL",
            order_type="commercial",
            regulator="EMA",
            country="DE",
            region="EU",
            requested_apheresis_date=date(2030, 1, 15),
        )
    )


class ByEvent:
    """Answers each delivery by its (centre, event type)."""

    def __init__(self, outcomes: dict[tuple[str, str], Outcome]) -> None:
        self.outcomes = outcomes

    async def send(self, delivery: Any) -> Outcome:
        return self.outcomes[(delivery.treatment_center_id, delivery.event_type)]

    async def aclose(self) -> None:
        return None


async def test_the_delivery_log_shows_outcome_categories_to_the_owning_centre_only(edge: Edge) -> None:
    await edge.subscribe()
    await edge.subscribe(edge.theirs)
    await edge.client.post("/v1/email-recipients", json={"email": "qa@charite.example"}, headers=edge.mine)
    inbox = FakeInbox(edge.uow, handlers)
    await inbox.deliver(submitted(CENTRE), submitted(OTHER))
    rejected = new_event(
        MaterialRejectedV1(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000043-K",
            treatment_center_id=CENTRE,
            site_id="SITE-DE-01",
            reason="viability",
        )
    )
    await inbox.deliver(rejected)
    policy = DeliveryPolicy(max_attempts=5)
    hooks = ByEvent(
        {
            (CENTRE, "order.submitted.v1"): Outcome(503, "http_5xx"),
            (CENTRE, "site.material_rejected.v1"): Outcome(None, "blocked_address", permanent=True),
            (OTHER, "order.submitted.v1"): Outcome(204),
        }
    )
    await WebhookDispatcher(edge.uow, hooks, policy).dispatch_due()
    mails = ByEvent({(CENTRE, "site.material_rejected.v1"): Outcome(None, "timeout")})
    await EmailDispatcher(edge.uow, mails, policy).dispatch_due()

    mine = (await edge.client.get("/v1/deliveries", headers=edge.mine)).json()
    assert sorted(
        (d["channel"], d["event_type"], d["status"], d["last_status_code"], d["last_outcome"]) for d in mine
    ) == [
        ("email", "site.material_rejected.v1", "pending", None, "timeout"),
        ("webhook", "order.submitted.v1", "pending", 503, "http_5xx"),
        ("webhook", "site.material_rejected.v1", "failed", None, "blocked_address"),
    ]
    for entry in mine:
        assert "last_error" not in entry and entry["treatment_center_id"] == CENTRE
        detail = (await edge.client.get(f"/v1/deliveries/{entry['delivery_id']}", headers=edge.mine)).json()
        assert [a["outcome"] for a in detail["attempt_log"]] == [entry["last_outcome"]]
        assert set(detail["attempt_log"][0]) == {
            "attempt",
            "attempted_at",
            "status_code",
            "outcome",
            "duration_ms",
        }
        theirs = await edge.client.get(f"/v1/deliveries/{entry['delivery_id']}", headers=edge.theirs)
        assert theirs.status_code == 404
    theirs = (await edge.client.get("/v1/deliveries", headers=edge.theirs)).json()
    assert [(d["treatment_center_id"], d["status"], d["last_outcome"]) for d in theirs] == [
        (OTHER, "delivered", "delivered")
    ]
    assert (
        await edge.client.get("/v1/deliveries", params={"channel": "email"}, headers=edge.theirs)
    ).json() == []


async def test_the_owning_centre_sees_its_endpoint_parked_on_the_subscription_and_in_the_log(
    edge: Edge,
) -> None:
    sub = await edge.subscribe()
    await edge.subscribe(edge.theirs)
    inbox = FakeInbox(edge.uow, handlers)
    await inbox.deliver(*(submitted(CENTRE) for _ in range(3)), submitted(OTHER))
    hooks = ByEvent({(CENTRE, "order.submitted.v1"): Outcome(None, "connection_refused")})
    dispatcher = WebhookDispatcher(
        edge.uow, hooks, DeliveryPolicy(max_attempts=5), breaker=BreakerPolicy(failures=3, cooldown_s=60.0)
    )
    await dispatcher.dispatch_due()

    seen = (await edge.client.get(f"/v1/subscriptions/{sub['subscription_id']}", headers=edge.mine)).json()
    assert (seen["endpoint_state"], seen["consecutive_failures"]) == ("parked", 3)
    parked_until = datetime.fromisoformat(seen["parked_until"])
    assert (parked_until - edge.store.now).total_seconds() == 60.0
    mine = (await edge.client.get("/v1/deliveries", headers=edge.mine)).json()
    assert {(d["endpoint_state"], d["parked_until"]) for d in mine} == {("parked", seen["parked_until"])}
    assert [d["status"] for d in mine] == ["pending"] * 3  # waiting, not failed

    # another centre sees neither that subscription nor anything of its endpoint
    theirs = (await edge.client.get("/v1/subscriptions", headers=edge.theirs)).json()
    assert [(s["endpoint_state"], s["parked_until"], s["consecutive_failures"]) for s in theirs] == [
        ("open", None, 0)
    ]
    listed = (await edge.client.get("/v1/deliveries", headers=edge.theirs)).json()
    assert [(d["endpoint_state"], d["parked_until"]) for d in listed] == [("open", None)]
