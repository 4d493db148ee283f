"""The notification service layer on in-memory repositories: order events fanned out to the centres'
subscriptions and (for exceptions) e-mail recipients through the same handlers the consumer calls, the
subscription and recipient use cases behind the API, and the delivery loop's decisions (delivered,
retried after a backoff, dead-lettered) with a fake sender in place of HTTP and SMTP."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date
from typing import Any

import pytest

from notification_service.adapters.memory import MemoryStore, Row, fake_unit_of_work
from notification_service.adapters.secret_box import DEV_KEY, SecretBox
from notification_service.domain.alerts import render
from notification_service.domain.delivery import (
    Delivery,
    DeliveryPolicy,
    Outcome,
    Verdict,
    WebhookDelivery,
    decide,
)
from notification_service.domain.endpoints import BreakerPolicy
from notification_service.domain.payloads import webhook_payload
from notification_service.domain.subscriptions import validate_secret
from notification_service.domain.urls import UrlPolicy
from notification_service.service_layer import commands
from notification_service.service_layer.dispatch import LEASE, EmailDispatcher, WebhookDispatcher
from notification_service.service_layer.handlers import handlers
from v2v_contracts import (
    CloudEvent,
    MaterialRejectedV1,
    OrderCancelledV1,
    OrderSubmittedV1,
    SiteRegisteredV1,
    SlotUnavailableV1,
    new_event,
)
from v2v_contracts.errors import Conflict, Invalid, NotFound
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork
from v2v_servicekit.problems import status_of

CENTRE = "TC-DE-BE-001"
OTHER_CENTRE = "TC-FR-PA-001"
BOX = SecretBox(DEV_KEY)
URLS = UrlPolicy()
COI = "V2V00-26-000042-K"


# ---- events -----------------------------------------------------------------------------------------


def submitted(centre: str = CENTRE) -> CloudEvent:
    return new_event(
        OrderSubmittedV1(
            order_id=uuid.uuid4(),
            coi=COI,
            treatment_center_id=centre,
            product_code="TISA-CEL",
            order_type="commercial",
            regulator="EMA",
            country="DE",
            region="EU",
            requested_apheresis_date=date(2030, 1, 15),
        )
    )


def rejected(centre: str = CENTRE) -> CloudEvent:
    return new_event(
        MaterialRejectedV1(
            order_id=uuid.uuid4(),
            coi=COI,
            treatment_center_id=centre,
            site_id="SITE-DE-01",
            reason="viability",
        )
    )


def slot_unavailable(reason: str, centre: str = CENTRE) -> CloudEvent:
    return new_event(
        SlotUnavailableV1(
            order_id=uuid.uuid4(),
            coi=COI,
            treatment_center_id=centre,
            reason=reason,
            detail="no active site approved for TISA-CEL (commercial) by EMA",
            waitlisted=True,
        )
    )


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def uow(store: MemoryStore) -> FakeUnitOfWork[Any]:
    return fake_unit_of_work(store)


@pytest.fixture
def inbox(uow: FakeUnitOfWork[Any]) -> FakeInbox[Any]:
    return FakeInbox(uow, handlers)


async def subscription(
    uow: FakeUnitOfWork[Any], centre: str = CENTRE, types: list[str] | None = None
) -> uuid.UUID:
    sub, _secret = await commands.subscribe(
        uow,
        BOX,
        URLS,
        treatment_center_id=centre,
        url=f"https://{centre.lower()}.example/hook",
        event_types=types,
    )
    return sub.subscription_id


async def recipient(
    uow: FakeUnitOfWork[Any],
    email: str = "qa@charite.example",
    centre: str = CENTRE,
    types: list[str] | None = None,
) -> uuid.UUID:
    r = await commands.add_recipient(uow, treatment_center_id=centre, email=email, event_types=types)
    return r.recipient_id


def targets(store: MemoryStore, channel: str) -> list[uuid.UUID]:
    return [r.target_id for r in store.deliveries(channel)]


# ---- fan-out: order events become deliveries --------------------------------------------------------


async def test_an_order_event_goes_to_the_centres_matching_subscriptions_only(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    every = await subscription(uow)
    wanted = await subscription(uow, types=["order.submitted.v1", "order.cancelled.v1"])
    await subscription(uow, types=["order.cancelled.v1"])  # filters the type out
    await subscription(uow, centre=OTHER_CENTRE)  # another centre's
    await recipient(uow)  # not an exception: no e-mail
    event = submitted()

    await inbox.deliver(event)

    assert sorted(targets(store, "webhook")) == sorted([every, wanted])
    assert targets(store, "email") == []
    for row in store.deliveries("webhook"):
        assert row.content["payload"] == webhook_payload(event)  # the allow-listed fields only
        assert row.content["payload"] == event.to_json()  # ... which for a submitted order are all of them
        assert (row.event.event_id, row.event.event_type) == (event.id, "order.submitted.v1")
        assert (row.event.order_id, row.event.coi, row.event.treatment_center_id) == (
            uuid.UUID(event.data["order_id"]),
            COI,
            CENTRE,
        )
        assert row.status == "pending"
    assert store.wakes == {"webhook": 1, "email": 0}
    assert uow.committed == []  # queueing publishes nothing


async def test_an_exception_is_emailed_to_the_matching_recipients_and_sent_as_webhook(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub = await subscription(uow)
    every = await recipient(uow, "qa@charite.example")
    wanted = await recipient(uow, "lab@charite.example", types=["site.material_rejected.v1"])
    await recipient(uow, "cancel@charite.example", types=["order.cancelled.v1"])
    await recipient(uow, "qa@hopital.example", centre=OTHER_CENTRE)
    event = rejected()

    await inbox.deliver(event)

    assert targets(store, "webhook") == [sub]
    assert sorted(targets(store, "email")) == sorted([every, wanted])
    expected = render(event)
    for row in store.deliveries("email"):
        assert row.content == {"subject": expected.subject, "body": expected.body}
    assert store.wakes == {"webhook": 1, "email": 1}


async def test_an_order_left_without_an_approved_site_is_emailed_but_ordinary_waitlisting_is_not(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub = await subscription(uow)
    every = await recipient(uow, "qa@charite.example")
    only_this = await recipient(uow, "planning@charite.example", types=["scheduling.slot_unavailable.v1"])
    await recipient(uow, "cancel@charite.example", types=["order.cancelled.v1"])

    for reason in ("no_capacity", "no_site_known"):
        await inbox.deliver(slot_unavailable(reason))
    assert len(store.deliveries("webhook")) == 2  # webhook subscribers hear of every reason
    assert store.deliveries("email") == []

    lost = slot_unavailable("no_approved_site")
    await inbox.deliver(lost)
    assert targets(store, "webhook") == [sub, sub, sub]
    assert sorted(targets(store, "email")) == sorted([every, only_this])
    order_id = lost.data["order_id"]
    for row in store.deliveries("email"):
        assert row.content["subject"] == (
            f"[vein2vein] scheduling.slot_unavailable.v1 (no_approved_site) — order {order_id}"
        )
        body = row.content["body"]
        assert "No approved manufacturing site is left for this order's market" in body
        for expected in (order_id, COI, "no_approved_site"):
            assert expected in body
        assert "TISA-CEL" not in body  # the free-text detail is not on the allow-list


async def test_an_unknown_centre_or_no_subscription_queues_nothing(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await inbox.deliver(submitted(), rejected())  # nobody subscribed anywhere
    await subscription(uow, centre=OTHER_CENTRE)
    await recipient(uow, centre=OTHER_CENTRE)
    await subscription(uow, types=["order.cancelled.v1"])  # this centre, another type
    await inbox.deliver(submitted(), rejected(centre="TC-XX-UNKNOWN"), slot_unavailable("no_capacity"))

    assert store.rows == {}
    assert store.wakes == {"webhook": 0, "email": 0}
    assert uow.committed == []


async def test_events_that_are_not_about_an_order_are_not_handled(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await subscription(uow)
    registered = new_event(
        SiteRegisteredV1(
            site_id="SITE-DE-01",
            name="Berlin",
            country="DE",
            region="EU",
            timezone="Europe/Berlin",
            operator="own",
            active=True,
            approvals=[],
            daily_capacity={},
        )
    )
    await inbox.deliver(registered)
    assert inbox.ignored == ["site.registered.v1"]
    assert store.rows == {}


async def test_a_duplicate_event_is_a_no_op(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await subscription(uow)
    await recipient(uow)
    event = rejected()
    await inbox.deliver(event)
    commits = uow.commits

    await inbox.deliver(event)  # redelivered: the inbox drops it
    assert uow.commits == commits
    await FakeInbox(uow, handlers).deliver(event)  # past the inbox: still one delivery per target and event
    assert len(store.deliveries("webhook")) == 1
    assert len(store.deliveries("email")) == 1


# ---- webhook subscriptions --------------------------------------------------------------------------


async def test_a_subscription_is_stored_listed_and_read(uow: FakeUnitOfWork[Any], store: MemoryStore) -> None:
    sub, secret = await commands.subscribe(
        uow,
        BOX,
        URLS,
        treatment_center_id=CENTRE,
        url="https://charite.example/hook",
        event_types=["order.submitted.v1"],
    )
    validate_secret(secret)  # generated by the platform: whsec_ and 24..64 random bytes
    sealed, previous = store.sealed[sub.subscription_id]
    assert previous is None
    assert secret.encode() not in sealed and secret[6:].encode() not in sealed  # stored sealed, not in clear
    assert BOX.open(sealed, sub.subscription_id) == secret
    assert (sub.treatment_center_id, sub.url, sub.event_types, sub.active) == (
        CENTRE,
        "https://charite.example/hook",
        ["order.submitted.v1"],
        True,
    )
    assert secret not in repr(sub)
    other = await subscription(uow, centre=OTHER_CENTRE)
    assert await commands.list_subscriptions(uow, treatment_center_id=CENTRE) == [sub]
    assert await commands.list_subscriptions(uow, tenant=CENTRE) == [sub]
    assert await commands.list_subscriptions(uow, tenant=CENTRE, treatment_center_id=OTHER_CENTRE) == []
    assert [s.subscription_id for s in await commands.list_subscriptions(uow)] == [sub.subscription_id, other]
    assert await commands.get_subscription(uow, sub.subscription_id) == sub
    assert await commands.get_subscription(uow, sub.subscription_id, CENTRE) == sub
    with pytest.raises(NotFound):  # another centre's: not there for it
        await commands.get_subscription(uow, sub.subscription_id, OTHER_CENTRE)
    with pytest.raises(NotFound) as info:
        await commands.get_subscription(uow, uuid.uuid4())
    assert (status_of(info.value), info.value.title) == (404, "Subscription not found")
    assert "order.submitted.v1" in commands.event_types()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": "ftp://charite.example/hook"}, "url"),
        ({"url": "/relative/hook"}, "url"),
        ({"url": "http://charite.example/hook"}, "url"),  # https only
        ({"url": "https://169.254.169.254/latest/meta-data"}, "url"),
        ({"url": "https://10.1.2.3/hook"}, "url"),
        ({"event_types": []}, "event_types"),
        ({"event_types": ["site.registered.v1"]}, "event_types"),
    ],
)
async def test_an_invalid_subscription_is_refused_naming_the_field(
    uow: FakeUnitOfWork[Any], store: MemoryStore, change: dict[str, Any], field: str
) -> None:
    body: dict[str, Any] = {
        "treatment_center_id": CENTRE,
        "url": "https://charite.example/hook",
        "event_types": None,
    }
    with pytest.raises(Invalid) as info:
        await commands.subscribe(uow, BOX, URLS, **{**body, **change})
    assert status_of(info.value) == 422
    assert [e.field for e in info.value.errors] == [field]
    assert store.subscriptions == {}


# ---- e-mail recipients ------------------------------------------------------------------------------


async def test_a_recipient_is_added_listed_read_and_removed(uow: FakeUnitOfWork[Any]) -> None:
    r = await commands.add_recipient(
        uow, treatment_center_id=CENTRE, email="qa@charite.example", event_types=["order.failed.v1"]
    )
    assert (r.treatment_center_id, r.email, r.event_types) == (
        CENTRE,
        "qa@charite.example",
        ["order.failed.v1"],
    )
    other = await recipient(uow, "a@b.fr", centre=OTHER_CENTRE)
    assert await commands.list_recipients(uow, treatment_center_id=CENTRE) == [r]
    assert await commands.list_recipients(uow, tenant=CENTRE) == [r]
    assert len(await commands.list_recipients(uow)) == 2
    assert await commands.get_recipient(uow, r.recipient_id) == r
    assert await commands.get_recipient(uow, r.recipient_id, CENTRE) == r
    for gone in (commands.get_recipient, commands.remove_recipient):  # another centre's: not there for it
        with pytest.raises(NotFound):
            await gone(uow, other, CENTRE)
    assert len(await commands.list_recipients(uow, tenant=OTHER_CENTRE)) == 1

    await commands.remove_recipient(uow, r.recipient_id)
    for gone in (commands.remove_recipient, commands.get_recipient):
        with pytest.raises(NotFound) as info:
            await gone(uow, r.recipient_id)
        assert (status_of(info.value), info.value.title) == (404, "E-mail recipient not found")
    assert await commands.list_recipients(uow, treatment_center_id=CENTRE) == []
    await recipient(uow, "qa@charite.example")  # removed, the address may be added anew


async def test_the_same_address_twice_for_a_centre_is_a_conflict(
    uow: FakeUnitOfWork[Any], store: MemoryStore
) -> None:
    await recipient(uow, "qa@charite.example")
    with pytest.raises(Conflict) as info:
        await commands.add_recipient(
            uow, treatment_center_id=CENTRE, email="QA@charite.example", event_types=None
        )
    error = info.value
    assert (status_of(error), error.kind, error.title) == (409, "conflict", "Already a recipient")
    assert [e.as_dict() for e in error.errors] == [
        {"field": "email", "reason": "already a recipient for this treatment centre"}
    ]
    # the error text does not echo the address
    assert error.detail == "email: this address already receives the alerts of this treatment centre"
    assert "QA@charite.example" not in str(error)
    assert len(store.recipients) == 1
    await recipient(uow, "qa@charite.example", centre=OTHER_CENTRE)  # another centre may have it


@pytest.mark.parametrize(
    ("email", "types", "field"),
    [
        ("not-an-address", None, "email"),
        ("qa@charite", None, "email"),
        ("qa@charite.example\r\nBcc: x@evil.example", None, "email"),
        ("qa@charite.example", [], "event_types"),
        ("qa@charite.example", ["order.submitted.v1"], "event_types"),
    ],
)
async def test_an_invalid_recipient_is_refused_naming_the_field(
    uow: FakeUnitOfWork[Any], store: MemoryStore, email: str, types: list[str] | None, field: str
) -> None:
    with pytest.raises(Invalid) as info:
        await commands.add_recipient(uow, treatment_center_id=CENTRE, email=email, event_types=types)
    assert [e.field for e in info.value.errors] == [field]
    assert store.recipients == {}


async def test_removing_a_recipient_cancels_what_it_was_still_to_receive(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    rid = await recipient(uow)
    kept = await recipient(uow, "lab@charite.example")
    await inbox.deliver(rejected())
    await commands.remove_recipient(uow, rid)
    status = {r.target_id: (r.status, r.last_error) for r in store.deliveries("email")}
    assert status == {rid: ("cancelled", "recipient_removed"), kept: ("pending", None)}
    await inbox.deliver(rejected())  # nothing new for a removed recipient
    assert targets(store, "email").count(rid) == 1


# ---- the delivery loop ------------------------------------------------------------------------------


class FakeSender:
    """Answers each attempt with the next scripted outcome (the last one repeats); an exception is raised."""

    def __init__(self, *script: Outcome | Exception) -> None:
        self.script = list(script)
        self.sent: list[Delivery] = []
        self.closed = False

    async def send(self, delivery: Any) -> Outcome:
        self.sent.append(delivery)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return step

    async def aclose(self) -> None:
        self.closed = True


POLICY = DeliveryPolicy(max_attempts=3, backoff_base_s=10.0, backoff_max_s=300.0)
OK = Outcome(204)
DOWN = Outcome(503, "http_5xx")


def only(store: MemoryStore, channel: str) -> Row:
    (row,) = store.deliveries(channel)
    return row


async def queued_webhook(uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any]) -> tuple[uuid.UUID, CloudEvent]:
    sub = await subscription(uow)
    event = submitted()
    await inbox.deliver(event)
    return sub, event


def test_the_verdict_after_an_attempt() -> None:
    assert decide(POLICY, 1, OK) == Verdict("delivered")
    assert decide(POLICY, 3, OK) == Verdict("delivered")
    retry = decide(POLICY, 1, DOWN)
    assert retry.label == "retry" and retry.retry_in_s is not None and 5.0 <= retry.retry_in_s <= 10.0
    retry = decide(POLICY, 2, DOWN)
    assert retry.label == "retry" and retry.retry_in_s is not None and 10.0 <= retry.retry_in_s <= 20.0
    assert decide(POLICY, 3, DOWN) == Verdict("failed")  # the last attempt
    assert decide(POLICY, 1, Outcome(550, "smtp_5xx", permanent=True)) == Verdict("failed")
    with pytest.raises(ValueError):  # an outcome carries a category, never an error's text
        Outcome(None, "ConnectError: [Errno 111] Connection refused")


async def test_a_delivered_webhook_is_done(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub, event = await queued_webhook(uow, inbox)
    sender = FakeSender(OK)
    hooks = WebhookDispatcher(uow, sender, POLICY)

    assert await hooks.dispatch_due() == 1
    (sent,) = sender.sent
    assert isinstance(sent, WebhookDelivery)
    assert (sent.subscription_id, sent.url, sent.payload) == (
        sub,
        f"https://{CENTRE.lower()}.example/hook",
        event.to_json(),
    )
    assert sent.sealed_secrets == (store.sealed[sub][0],)  # the current secret only: no rotation
    validate_secret(BOX.open(sent.sealed_secrets[0], sub))
    row = only(store, "webhook")
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("delivered", 1, 204, None)
    assert row.delivered_at is not None and row.lease_until is None
    assert [(a["attempt"], a["status_code"], a["error"]) for a in row.attempt_log] == [(1, 204, None)]
    assert uow.committed == []
    store.make_due()
    assert await hooks.dispatch_due() == 0  # never sent again
    await hooks.aclose()
    assert sender.closed


async def test_a_failed_attempt_is_retried_after_an_exponential_backoff(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await queued_webhook(uow, inbox)
    hooks = WebhookDispatcher(uow, FakeSender(DOWN, DOWN, OK), POLICY)

    assert await hooks.dispatch_due() == 1
    row = only(store, "webhook")
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("pending", 1, 503, "http_5xx")
    first = (row.next_attempt_at - store.now).total_seconds()
    assert 5.0 <= first <= 10.0
    assert await hooks.dispatch_due() == 0  # not due yet
    assert await hooks.until_next_due() == 5.0  # the idle wait at most

    store.advance(first)
    assert await hooks.dispatch_due() == 1
    second = (only(store, "webhook").next_attempt_at - store.now).total_seconds()
    assert 10.0 <= second <= 20.0

    store.advance(second)
    assert await hooks.dispatch_due() == 1
    row = only(store, "webhook")
    assert (row.status, row.attempts, row.last_error) == ("delivered", 3, None)
    assert [a["status_code"] for a in row.attempt_log] == [503, 503, 204]
    assert uow.committed == []


async def test_after_the_last_attempt_a_webhook_is_dead_lettered_and_reported(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub, event = await queued_webhook(uow, inbox)
    it = await recipient(uow, "it@charite.example", types=["notification.webhook_delivery_failed.v1"])
    hooks = WebhookDispatcher(uow, FakeSender(Outcome(500, "http_5xx")), POLICY)

    for _ in range(POLICY.max_attempts):
        store.make_due()
        assert await hooks.dispatch_due() == 1
    row = only(store, "webhook")
    assert (row.status, row.attempts, row.last_status_code) == ("failed", POLICY.max_attempts, 500)
    store.make_due()
    assert await hooks.dispatch_due() == 0  # a failed delivery is never picked up again

    (failed,) = uow.committed
    assert failed.type == "notification.webhook_delivery_failed.v1"
    assert failed.data == {
        "order_id": event.data["order_id"],
        "coi": COI,
        "treatment_center_id": CENTRE,
        "subscription_id": str(sub),
        "event_id": str(event.id),
        "event_type": "order.submitted.v1",
        "attempts": POLICY.max_attempts,
        "last_error": "http_5xx",  # a category, never an error's text
    }

    # read back from this service's own topic: e-mailed, never sent as a webhook (no loop)
    await inbox.deliver(failed)
    assert len(store.deliveries("webhook")) == 1
    assert targets(store, "email") == [it]


async def test_a_permanent_refusal_fails_at_once_and_an_email_reports_nothing(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await recipient(uow, "nobody@charite.example")
    await inbox.deliver(rejected())
    mailer = EmailDispatcher(uow, FakeSender(Outcome(550, "smtp_5xx", permanent=True)), POLICY)
    assert await mailer.dispatch_due() == 1
    row = only(store, "email")
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, 550)
    assert uow.committed == []


async def test_a_sender_that_raises_counts_as_a_failed_attempt(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await queued_webhook(uow, inbox)
    hooks = WebhookDispatcher(uow, FakeSender(RuntimeError("boom")), POLICY)
    assert await hooks.dispatch_due() == 1
    row = only(store, "webhook")
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        "pending",
        1,
        None,
        "internal_error",  # the exception's text stays out of the delivery log
    )
    assert "boom" not in str(row.attempt_log)


async def test_a_leased_delivery_is_not_attempted_twice_until_its_lease_runs_out(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await queued_webhook(uow, inbox)
    async with uow.begin() as tx:  # another dispatcher (a replica) holds it
        assert len(await tx.webhooks.claim_due(10, LEASE)) == 1
    hooks = WebhookDispatcher(uow, FakeSender(OK), POLICY)
    assert await hooks.dispatch_due() == 0
    store.advance(LEASE.total_seconds() + 1)  # that replica died mid-attempt
    assert await hooks.dispatch_due() == 1
    assert only(store, "webhook").status == "delivered"


async def test_at_most_a_batch_is_leased_at_once(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await subscription(uow)
    await inbox.deliver(*(submitted() for _ in range(5)))
    hooks = WebhookDispatcher(uow, FakeSender(OK), DeliveryPolicy(batch=3))
    assert await hooks.dispatch_due() == 3
    assert await hooks.dispatch_due() == 2
    assert {r.status for r in store.deliveries("webhook")} == {"delivered"}


async def test_an_orders_webhooks_go_in_event_order_while_other_orders_go_alongside(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await subscription(uow)
    first, second = submitted(), submitted()
    # three events of each order, queued alternately; the first of each order is the slowest to send
    queued: dict[str, list[uuid.UUID]] = {"first": [], "second": []}
    for _ in range(3):
        for key, ev in (("first", first), ("second", second)):
            event = new_event(OrderSubmittedV1.model_validate(ev.data))
            queued[key].append(uuid.UUID(str(event.id)))
            await inbox.deliver(event)

    in_flight, most = 0, 0
    sent: dict[uuid.UUID, list[uuid.UUID]] = {}

    class SlowFirst(FakeSender):
        async def send(self, delivery: Any) -> Outcome:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            slow = delivery.event_id in (queued["first"][0], queued["second"][0])
            await asyncio.sleep(0.05 if slow else 0.0)
            sent.setdefault(delivery.order_id, []).append(delivery.event_id)
            in_flight -= 1
            return OK

    # room for all six at once (an endpoint's deliveries in flight are bounded: BreakerPolicy.per_endpoint)
    hooks = WebhookDispatcher(uow, SlowFirst(OK), POLICY, breaker=BreakerPolicy(per_endpoint=8))
    assert await hooks.dispatch_due() == 6
    assert sent == {
        uuid.UUID(first.data["order_id"]): queued["first"],
        uuid.UUID(second.data["order_id"]): queued["second"],
    }
    assert most == 2  # one lane per order, both at once
    assert {r.status for r in store.deliveries("webhook")} == {"delivered"}


# ---- the delivery log -------------------------------------------------------------------------------


async def test_the_delivery_log_shows_both_channels_and_every_attempt(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    sub = await subscription(uow)
    rid = await recipient(uow)
    event = rejected()
    await inbox.deliver(event, rejected())
    await EmailDispatcher(
        uow, FakeSender(Outcome(None, "connection_refused"), Outcome(250)), POLICY
    ).dispatch_due()

    log = await commands.list_deliveries(uow, order_id=uuid.UUID(event.data["order_id"]))
    by_channel = {d["channel"]: d for d in log}
    assert set(by_channel) == {"webhook", "email"}
    assert (by_channel["webhook"]["subscription_id"], by_channel["webhook"]["recipient_id"]) == (sub, None)
    assert (by_channel["email"]["recipient_id"], by_channel["email"]["subscription_id"]) == (rid, None)
    assert len(await commands.list_deliveries(uow, channel="email")) == 2
    assert len(await commands.list_deliveries(uow, channel="email", status="pending", limit=1)) == 1

    mail = await commands.get_delivery(uow, by_channel["email"]["delivery_id"])
    assert [(a["attempt"], a["error"]) for a in mail["attempt_log"]] == [(1, "connection_refused")]
    with pytest.raises(NotFound):
        await commands.get_delivery(uow, uuid.uuid4())
    # a centre sees its own deliveries only
    assert await commands.get_delivery(uow, mail["delivery_id"], CENTRE) == mail
    with pytest.raises(NotFound):
        await commands.get_delivery(uow, mail["delivery_id"], OTHER_CENTRE)
    assert len(await commands.list_deliveries(uow, tenant=CENTRE)) == 4
    assert await commands.list_deliveries(uow, tenant=OTHER_CENTRE) == []
    assert len(await commands.list_deliveries(uow, tenant=CENTRE, limit=2, offset=3)) == 1


async def test_a_cancelled_order_reaches_both_channels_with_its_status_fields(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    await subscription(uow)
    await recipient(uow)
    cancelled = new_event(
        OrderCancelledV1(
            order_id=uuid.uuid4(),
            coi=COI,
            treatment_center_id=CENTRE,
            reason="physician_decision",
            previous_status="x",
        )
    )
    await inbox.deliver(cancelled)
    assert len(store.deliveries("webhook")) == 1
    assert "previous_status" in only(store, "email").content["body"]


# ---- the audit trail ---------------------------------------------------------------------------------


async def test_subscriptions_recipients_rotations_and_dead_letters_are_audited_without_addresses(
    uow: FakeUnitOfWork[Any], inbox: FakeInbox[Any], store: MemoryStore
) -> None:
    """Each change in the trail with ids and codes only: the webhook URL and the e-mail address appear as
    SHA-256 fingerprints, never as themselves; a dead-lettered delivery is audited by its dispatcher with
    the failure category; one intact chain."""
    import hashlib
    import json
    from datetime import timedelta

    from v2v_audit import Actor, verify

    sub, _event = await queued_webhook(uow, inbox)
    await commands.rotate_secret(uow, BOX, sub, tenant=CENTRE, overlap=timedelta(hours=1))
    rid = await recipient(uow, "QA@charite.example")
    await commands.remove_recipient(uow, rid, CENTRE)
    hooks = WebhookDispatcher(uow, FakeSender(Outcome(500, "http_5xx")), POLICY)
    for _ in range(POLICY.max_attempts):
        store.make_due()
        await hooks.dispatch_due()

    trail = store.audit
    assert [(r.action, r.object_type, r.reason) for r in trail] == [
        ("subscription.created", "subscription", None),
        ("subscription.secret_rotated", "subscription", None),
        ("recipient.added", "recipient", None),
        ("recipient.removed", "recipient", None),
        ("delivery.dead_lettered", "webhook_delivery", "http_5xx"),
    ]
    created, _rotated, added, _removed, dead = trail
    url = f"https://{CENTRE.lower()}.example/hook"
    assert created.new["url_sha256"] == hashlib.sha256(url.encode()).hexdigest()  # type: ignore[index, call-overload]
    assert added.new["email_sha256"] == hashlib.sha256(b"qa@charite.example").hexdigest()  # type: ignore[index, call-overload]
    text = json.dumps([[r.old, r.new] for r in trail]).lower()
    assert "example/hook" not in text and "charite.example" not in text
    assert dead.actor == Actor.system("notification.webhook-dispatcher")
    assert dead.new["attempts"] == POLICY.max_attempts and dead.new["status"] == "failed"  # type: ignore[index, call-overload]
    assert verify("notification", trail).broken is None
