"""Exception e-mails end to end inside the notification service: the consumer's handler queues them in
its transaction, the dispatcher sends them over real SMTP (an aiosmtpd server on a random port), every
attempt is recorded, failures back off and end failed, and the delivery log shows both channels.

Real Postgres (the notification schema, its own role, all migrations); nothing is mocked.
"""

from __future__ import annotations

import email
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from aiosmtpd.controller import Controller
from fastapi import FastAPI

import notification_service
from notification_service.adapters.repository import NotificationTx, tx_factory
from notification_service.adapters.secret_box import DEV_KEY, SecretBox, new_signing_secret
from notification_service.adapters.smtp import SmtpSender
from notification_service.adapters.webhooks import WebhookSender
from notification_service.config import NotificationSettings, SmtpSettings
from notification_service.domain.delivery import DeliveryPolicy
from notification_service.domain.urls import UrlPolicy
from notification_service.entrypoints.api import router
from notification_service.service_layer.dispatch import EmailDispatcher, WebhookDispatcher
from notification_service.service_layer.handlers import handlers
from v2v_audit.service import migrate as audit_migrate
from v2v_contracts import (
    BookingConfirmedV1,
    CloudEvent,
    MaterialRejectedV1,
    OrderSubmittedV1,
    SiteRegisteredV1,
    new_event,
)
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool
from v2v_servicekit import problems
from v2v_servicekit.testing import TestTokens

pytestmark = pytest.mark.integration

MIGRATIONS = Path(notification_service.__file__).parent / "migrations"
CENTRE = "TC-DE-BE-001"
OTHER_CENTRE = "TC-FR-PA-001"
PATIENT_REF = "BER-2026-0042-PATIENT"
SENDER = "alerts@v2v.example"
SLOW = DeliveryPolicy(max_attempts=3, backoff_base_s=30.0, backoff_max_s=300.0, timeout_s=5.0)
BOX = SecretBox(DEV_KEY)
LOOPBACK = UrlPolicy(allow_loopback=True)  # the development flag: the test endpoints are on 127.0.0.1


# ---- a real SMTP server -----------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes


@dataclass
class MailSink:
    """aiosmtpd handler: keeps every message; refuses recipients at nobody@… with 550."""

    received: list[Received] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = bytes(envelope.content)
        parsed = email.message_from_bytes(raw, policy=email_policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), parsed, raw))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[MailSink, SmtpSettings]]:
    sink = MailSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield sink, SmtpSettings(host="127.0.0.1", port=controller.port, sender=SENDER)
    finally:
        controller.stop()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: every connection to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


# ---- the notification schema ------------------------------------------------------------------------


@dataclass
class Notification:
    pool: asyncpg.Pool
    uow: UnitOfWork[NotificationTx]

    async def consume(self, event: CloudEvent) -> None:
        """What the consumer does with a message: its handler, in one transaction (inbox left out)."""
        if not handlers.handles(event.type):  # the consumer ignores types it has no handler for
            return
        async with self.uow.begin() as tx:
            await handlers.dispatch(tx, event)

    async def recipient(
        self, address: str, centre: str = CENTRE, types: list[str] | None = None
    ) -> uuid.UUID:
        rid = uuid.uuid4()
        await self.pool.execute(
            """INSERT INTO email_recipients (recipient_id, treatment_center_id, email, event_types)
               VALUES ($1, $2, $3, $4)""",
            rid,
            centre,
            address,
            types,
        )
        return rid

    async def subscription(self, url: str, centre: str = CENTRE) -> uuid.UUID:
        """A subscription as the API stores it: its generated secret sealed."""
        sid = uuid.uuid4()
        await self.pool.execute(
            """INSERT INTO subscriptions (subscription_id, treatment_center_id, url, secret_sealed)
               VALUES ($1, $2, $3, $4)""",
            sid,
            centre,
            url,
            BOX.seal(new_signing_secret(), sid),
        )
        return sid

    async def emails(self) -> list[asyncpg.Record]:
        return await self.pool.fetch("SELECT * FROM email_deliveries ORDER BY created_at")

    async def attempts(self, delivery_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT a.*, d.next_attempt_at FROM email_delivery_attempts a
               JOIN email_deliveries d USING (delivery_id) WHERE delivery_id = $1 ORDER BY attempt""",
            delivery_id,
        )

    async def make_due(self) -> None:
        """As if the backoff had elapsed."""
        await self.pool.execute(
            "UPDATE email_deliveries SET next_attempt_at = now() WHERE status = 'pending'"
        )

    def mailer(self, smtp: SmtpSettings, policy: DeliveryPolicy = SLOW) -> EmailDispatcher:
        return EmailDispatcher(self.uow, SmtpSender(smtp, policy.timeout_s), policy)


@pytest.fixture
async def notification(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[Notification]:
    url = test_db.urls["notification"]
    owner_url = test_db.owner_urls["notification"]  # migrations run as the owner
    await apply_migrations(owner_url, "notification", [MIGRATIONS_DIR, MIGRATIONS])
    await audit_migrate(owner_url, "notification")  # the audit trail (v2v_audit), as the service applies it
    pool = await create_pool(url, max_size=6)
    try:
        yield Notification(
            pool, UnitOfWork(pool, "t.v2v.notification", notify_channel("notification"), tx_factory)
        )
    finally:
        await pool.close()


@pytest.fixture
def tokens() -> TestTokens:
    return TestTokens()


@pytest.fixture
async def api(notification: Notification, tokens: TestTokens) -> AsyncIterator[httpx.AsyncClient]:
    """The service's HTTP API on this database (no broker needed for it), called as the centre CENTRE
    (its token by default; another's `headers=` where a test says so)."""
    app = FastAPI()
    problems.install(app)
    app.include_router(router)
    app.state.token_verifier = tokens.verifier()
    settings = NotificationSettings(notification_insecure_dev_key=True, webhook_allow_loopback=True)
    app.state.runtime = SimpleNamespace(
        pool=notification.pool, uow=notification.uow, settings=settings, extras={}
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://notification",
        headers=tokens.headers("centre", CENTRE),
    ) as c:
        yield c


def material_rejected(centre: str = CENTRE, **extra: Any) -> CloudEvent:
    return new_event(
        MaterialRejectedV1(
            order_id=uuid.uuid4(),
            coi=f"V2V00-26-{uuid.uuid4().int % 10**6:06d}-K",
            treatment_center_id=centre,
            site_id="SITE-DE-01",
            reason="label_mismatch",
            **extra,
        )
    )


def submitted(centre: str = CENTRE) -> CloudEvent:
    from datetime import date

    return new_event(
        OrderSubmittedV1(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000001-K",
            treatment_center_id=centre,
            product_code="TISA-CEL",
            order_type="commercial",
            regulator="EMA",
            country="DE",
            region="EU",
            requested_apheresis_date=date(2030, 1, 15),
        )
    )


# ---- the happy path ---------------------------------------------------------------------------------


async def test_an_exception_is_emailed_once_to_each_matching_recipient_without_patient_data(
    notification: Notification, smtp: tuple[MailSink, SmtpSettings]
) -> None:
    sink, settings = smtp
    qa = await notification.recipient("qa@charite.example")
    await notification.recipient("cancellations@charite.example", types=["order.cancelled.v1"])
    await notification.recipient("qa@hopital.example", centre=OTHER_CENTRE)
    event = material_rejected(patient_ref=PATIENT_REF)
    assert event.data["patient_ref"] == PATIENT_REF  # planted: the contract lets extra fields through
    order_id, coi = event.data["order_id"], event.coi
    assert coi

    await notification.consume(event)
    rows = await notification.emails()
    assert [(r["recipient_id"], r["status"], r["event_id"]) for r in rows] == [(qa, "pending", event.id)]
    assert PATIENT_REF not in rows[0]["subject"] + rows[0]["body"]  # not even stored

    assert await notification.mailer(settings).dispatch_due() == 1
    assert len(sink.received) == 1
    mail = sink.received[0]
    assert mail.mail_from == SENDER
    assert mail.rcpt_tos == ["qa@charite.example"]
    assert mail.message["To"] == "qa@charite.example"
    assert mail.message["Subject"] == f"[vein2vein] site.material_rejected.v1 — order {order_id}"
    body = mail.message.get_content()
    for expected in (order_id, coi, "site.material_rejected.v1", "label_mismatch", "SITE-DE-01"):
        assert expected in body
    assert f"GET /v1/orders/{order_id}" in body
    assert PATIENT_REF.encode() not in mail.raw
    assert b"patient_ref" not in mail.raw

    (row,) = await notification.emails()
    assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == (
        "delivered",
        1,
        250,
        None,
    )
    assert row["delivered_at"] is not None
    (attempt,) = await notification.attempts(row["delivery_id"])
    assert (attempt["attempt"], attempt["status_code"], attempt["error"]) == (1, 250, None)

    # the same event again (a redelivery past the inbox) queues nothing, and nothing is due any more
    await notification.consume(event)
    assert len(await notification.emails()) == 1
    assert await notification.mailer(settings).dispatch_due() == 0
    assert len(sink.received) == 1


async def test_events_that_are_not_exceptions_send_no_email(
    notification: Notification, smtp: tuple[MailSink, SmtpSettings]
) -> None:
    sink, settings = smtp
    await notification.recipient("qa@charite.example")
    await notification.subscription("http://127.0.0.1:9/hook")
    order = submitted()
    confirmed = new_event(
        BookingConfirmedV1(
            order_id=uuid.UUID(order.data["order_id"]),
            coi=order.data["coi"],
            treatment_center_id=CENTRE,
            booking_id=uuid.uuid4(),
            slot_id=uuid.uuid4(),
            site_id="SITE-DE-01",
            product_code="TISA-CEL",
            manufacturing_start_date=order.data["requested_apheresis_date"],
            apheresis_date=order.data["requested_apheresis_date"],
        )
    )
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
    for event in (order, confirmed, registered):
        await notification.consume(event)

    assert await notification.emails() == []
    assert await notification.mailer(settings).dispatch_due() == 0
    assert sink.received == []
    # the webhooks still go out for them: one consumer serves both channels
    assert await notification.pool.fetchval("SELECT count(*) FROM deliveries") == 2

    await notification.consume(material_rejected())  # an exception: both channels
    assert len(await notification.emails()) == 1
    assert await notification.pool.fetchval("SELECT count(*) FROM deliveries") == 3


# ---- failures ---------------------------------------------------------------------------------------


async def test_an_unreachable_smtp_server_is_retried_with_backoff_then_the_email_fails(
    notification: Notification, closed_port: int
) -> None:
    await notification.recipient("qa@charite.example")
    await notification.consume(material_rejected())
    mailer = notification.mailer(SmtpSettings(host="127.0.0.1", port=closed_port, sender=SENDER))

    assert await mailer.dispatch_due() == 1
    (row,) = await notification.emails()
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("pending", 1, None)
    assert row["last_error"]
    # backed off: not due again at once
    assert await mailer.dispatch_due() == 0

    for _ in range(SLOW.max_attempts - 1):
        await notification.make_due()
        assert await mailer.dispatch_due() == 1
    assert await mailer.dispatch_due() == 0

    (row,) = await notification.emails()
    assert (row["status"], row["attempts"]) == ("failed", SLOW.max_attempts)
    attempts = await notification.attempts(row["delivery_id"])
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    for a in attempts:
        assert a["status_code"] is None
        assert a["error"] == "connection_refused", a["error"]  # a category, not the socket error's text
        assert a["duration_ms"] >= 0
    await notification.make_due()  # a failed delivery is never picked up again
    assert await mailer.dispatch_due() == 0
    # e-mail publishes no event of its own when it gives up (nothing that could loop)
    assert await notification.pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_each_retry_waits_for_its_exponential_backoff_with_jitter(
    notification: Notification, closed_port: int
) -> None:
    await notification.recipient("qa@charite.example")
    await notification.consume(material_rejected())
    mailer = notification.mailer(SmtpSettings(port=closed_port), policy=SLOW)
    delays = []
    for _ in range(SLOW.max_attempts - 1):
        await notification.make_due()
        await mailer.dispatch_due()
        (row,) = await notification.emails()
        last = (await notification.attempts(row["delivery_id"]))[-1]
        # the attempt row and the reschedule share one transaction (one now())
        delays.append((row["next_attempt_at"] - last["attempted_at"]).total_seconds())
    for n, delay in enumerate(delays, start=1):
        ceiling = SLOW.backoff_base_s * 2 ** (n - 1)
        assert ceiling / 2 <= delay <= ceiling, (n, delay)


async def test_a_delivery_goes_out_once_the_server_is_back(
    notification: Notification, closed_port: int, smtp: tuple[MailSink, SmtpSettings]
) -> None:
    sink, settings = smtp
    await notification.recipient("qa@charite.example")
    await notification.consume(material_rejected())
    assert await notification.mailer(SmtpSettings(port=closed_port)).dispatch_due() == 1
    await notification.make_due()
    assert await notification.mailer(settings).dispatch_due() == 1
    (row,) = await notification.emails()
    assert (row["status"], row["attempts"]) == ("delivered", 2)
    assert [a["error"] is None for a in await notification.attempts(row["delivery_id"])] == [False, True]
    assert len(sink.received) == 1
    # the same Message-ID whatever the attempt, so that a receiver can drop a copy it already has
    assert sink.received[0].message["Message-ID"] == f"<{row['delivery_id']}@v2v.example>"


async def test_a_recipient_the_server_refuses_for_good_fails_at_once(
    notification: Notification, smtp: tuple[MailSink, SmtpSettings]
) -> None:
    sink, settings = smtp
    await notification.recipient("nobody@charite.example")
    await notification.consume(material_rejected())
    assert await notification.mailer(settings).dispatch_due() == 1
    (row,) = await notification.emails()
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("failed", 1, 550)
    assert sink.received == []


# ---- webhook dead letters are e-mailed, without a loop ----------------------------------------------


async def test_a_dead_lettered_webhook_is_emailed_and_never_sent_as_a_webhook(
    notification: Notification, closed_port: int, smtp: tuple[MailSink, SmtpSettings]
) -> None:
    sink, settings = smtp
    await notification.recipient("it@charite.example", types=["notification.webhook_delivery_failed.v1"])
    await notification.subscription(f"http://127.0.0.1:{closed_port}/hook")
    order = submitted()
    await notification.consume(order)
    policy = DeliveryPolicy(max_attempts=1, timeout_s=2)
    hooks = WebhookDispatcher(notification.uow, WebhookSender(policy.timeout_s, BOX, LOOPBACK), policy)
    try:
        assert await hooks.dispatch_due() == 1
    finally:
        await hooks.aclose()
    (payload,) = await notification.pool.fetch("SELECT payload FROM outbox")
    failed = CloudEvent.from_json(bytes(payload["payload"]))
    assert failed.type == "notification.webhook_delivery_failed.v1"

    await notification.consume(failed)  # as read back from this service's own topic
    assert await notification.pool.fetchval("SELECT count(*) FROM deliveries") == 1  # no webhook for it
    assert await notification.mailer(settings).dispatch_due() == 1
    (mail,) = sink.received
    assert mail.rcpt_tos == ["it@charite.example"]
    body = mail.message.get_content()
    assert order.data["order_id"] in body
    assert "order.submitted.v1" in body  # the type that could not be delivered
    assert f"127.0.0.1:{closed_port}" not in mail.message["Subject"]


# ---- the HTTP API -----------------------------------------------------------------------------------


async def test_recipients_can_be_added_listed_and_removed(
    notification: Notification, api: httpx.AsyncClient, tokens: TestTokens
) -> None:
    resp = await api.post(
        "/v1/email-recipients",
        json={
            "treatment_center_id": CENTRE,
            "email": " qa@charite.example ",
            "event_types": ["order.failed.v1"],
        },
    )
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["email"] == "qa@charite.example"
    assert created["event_types"] == ["order.failed.v1"]
    assert resp.headers["location"] == f"/v1/email-recipients/{created['recipient_id']}"
    assert (await api.get(resp.headers["location"])).json() == created

    other_centre = tokens.headers("centre", OTHER_CENTRE)
    other = await api.post("/v1/email-recipients", json={"email": "a@b.fr"}, headers=other_centre)
    assert other.status_code == 201
    assert other.json()["treatment_center_id"] == OTHER_CENTRE  # the centre comes from the token
    listed = await api.get("/v1/email-recipients", params={"treatment_center_id": CENTRE})
    assert listed.json() == [created]
    # a centre lists its own recipients only; a caller not confined to a centre (granted the scope) both
    assert (await api.get("/v1/email-recipients")).json() == [created]
    assert (await api.get("/v1/email-recipients", params={"treatment_center_id": OTHER_CENTRE})).json() == []
    anyone = tokens.headers("ops", scopes=["notifications:manage"])
    assert len((await api.get("/v1/email-recipients", headers=anyone)).json()) == 2
    # another centre's recipient is not there for this one
    assert (await api.get(f"/v1/email-recipients/{other.json()['recipient_id']}")).status_code == 404
    assert (await api.delete(f"/v1/email-recipients/{other.json()['recipient_id']}")).status_code == 404
    assert (
        await api.get(f"/v1/email-recipients/{other.json()['recipient_id']}", headers=other_centre)
    ).json()

    again = await api.post(
        "/v1/email-recipients", json={"treatment_center_id": CENTRE, "email": "QA@charite.example"}
    )
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")
    problem = again.json()
    assert (problem["type"], problem["title"]) == (
        "https://vein2vein.dev/problems/conflict",
        "Already a recipient",
    )
    assert problem["errors"] == [
        {"field": "email", "reason": "already a recipient for this treatment centre"}
    ]
    # the error text does not echo the address
    assert problem["detail"] == "email: this address already receives the alerts of this treatment centre"
    assert "QA@charite.example" not in again.text

    assert (await api.delete(f"/v1/email-recipients/{created['recipient_id']}")).status_code == 204
    assert (await api.delete(f"/v1/email-recipients/{created['recipient_id']}")).status_code == 404
    assert (await api.get(f"/v1/email-recipients/{created['recipient_id']}")).status_code == 404
    assert (await api.get("/v1/email-recipients", params={"treatment_center_id": CENTRE})).json() == []
    # removed, the address may be added anew
    readd = await api.post(
        "/v1/email-recipients", json={"treatment_center_id": CENTRE, "email": "qa@charite.example"}
    )
    assert readd.status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"treatment_center_id": CENTRE, "email": "not-an-address"}, "email"),
        ({"treatment_center_id": CENTRE, "email": "qa@charite"}, "email"),
        ({"treatment_center_id": CENTRE, "email": "qa@charite.example\r\nBcc: x@evil.example"}, "email"),
        ({"treatment_center_id": CENTRE}, "email"),
        ({"treatment_center_id": CENTRE, "email": "a" * 250 + "@b.example"}, "email"),
        ({"treatment_center_id": CENTRE, "email": "qa@charite.example", "event_types": []}, "event_types"),
        (
            {
                "treatment_center_id": CENTRE,
                "email": "qa@charite.example",
                "event_types": ["order.submitted.v1"],
            },
            "event_types",
        ),
        ({"treatment_center_id": CENTRE, "email": "qa@charite.example", "patient_ref": "x"}, "patient_ref"),
        # the centre comes from the token: a body naming another one is refused
        ({"treatment_center_id": OTHER_CENTRE, "email": "qa@charite.example"}, "treatment_center_id"),
        ({"treatment_center_id": "TC DE\nBE", "email": "qa@charite.example"}, "treatment_center_id"),
    ],
)
async def test_bad_recipients_are_refused_naming_the_field(
    notification: Notification, api: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    resp = await api.post("/v1/email-recipients", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in resp.json()["errors"]] == [field]
    assert await notification.pool.fetchval("SELECT count(*) FROM email_recipients") == 0


async def test_a_caller_not_confined_to_a_centre_must_name_one(
    notification: Notification, api: httpx.AsyncClient, tokens: TestTokens
) -> None:
    anyone = tokens.headers("ops", scopes=["notifications:manage"])
    resp = await api.post("/v1/email-recipients", json={"email": "qa@charite.example"}, headers=anyone)
    assert resp.status_code == 422, resp.text
    assert [e["field"] for e in resp.json()["errors"]] == ["treatment_center_id"]
    assert await notification.pool.fetchval("SELECT count(*) FROM email_recipients") == 0
    named = {"email": "qa@charite.example", "treatment_center_id": OTHER_CENTRE}
    resp = await api.post("/v1/email-recipients", json=named, headers=anyone)
    assert resp.status_code == 201 and resp.json()["treatment_center_id"] == OTHER_CENTRE


async def test_removing_a_recipient_cancels_what_it_was_still_to_receive(
    notification: Notification, api: httpx.AsyncClient, closed_port: int
) -> None:
    rid = await notification.recipient("qa@charite.example")
    await notification.consume(material_rejected())
    await notification.mailer(SmtpSettings(port=closed_port)).dispatch_due()  # one failed attempt: pending
    assert (await api.delete(f"/v1/email-recipients/{rid}")).status_code == 204
    (row,) = await notification.emails()
    assert row["status"] == "cancelled"
    await notification.make_due()
    assert await notification.mailer(SmtpSettings(port=closed_port)).dispatch_due() == 0
    await notification.consume(material_rejected())  # nothing new for a removed recipient
    assert len(await notification.emails()) == 1


async def test_the_delivery_log_shows_both_channels_and_every_attempt(
    notification: Notification,
    api: httpx.AsyncClient,
    smtp: tuple[MailSink, SmtpSettings],
    closed_port: int,
    tokens: TestTokens,
) -> None:
    _sink, settings = smtp
    rid = await notification.recipient("qa@charite.example")
    sid = await notification.subscription("http://127.0.0.1:9/hook")
    event = material_rejected()
    order_id = event.data["order_id"]
    await notification.consume(event)
    await notification.consume(material_rejected())  # another order: filtered out below
    mailer = notification.mailer(SmtpSettings(port=closed_port))
    await mailer.dispatch_due()
    await notification.make_due()
    await notification.mailer(settings).dispatch_due()

    log = (await api.get("/v1/deliveries", params={"order_id": order_id})).json()
    assert sorted(d["channel"] for d in log) == ["email", "webhook"]
    by_channel = {d["channel"]: d for d in log}
    assert by_channel["webhook"]["subscription_id"] == str(sid)
    assert by_channel["webhook"]["recipient_id"] is None
    mail = by_channel["email"]
    assert (mail["recipient_id"], mail["subscription_id"]) == (str(rid), None)
    assert (mail["status"], mail["attempts"], mail["last_status_code"]) == ("delivered", 2, 250)
    assert mail["last_outcome"] == "delivered"
    assert "last_error" not in mail
    assert (mail["event_type"], mail["coi"]) == ("site.material_rejected.v1", event.coi)
    assert "qa@charite.example" not in str(log)

    emails_only = (await api.get("/v1/deliveries", params={"channel": "email"})).json()
    assert {d["channel"] for d in emails_only} == {"email"} and len(emails_only) == 2
    assert len((await api.get("/v1/deliveries", params={"recipient_id": str(rid)})).json()) == 2
    assert len((await api.get("/v1/deliveries", params={"channel": "webhook"})).json()) == 2
    assert (await api.get("/v1/deliveries", params={"channel": "sms"})).status_code == 422

    detail = (await api.get(f"/v1/deliveries/{mail['delivery_id']}")).json()
    assert [(a["attempt"], a["status_code"], a["outcome"]) for a in detail["attempt_log"]] == [
        (1, None, "connection_refused"),  # an outcome category, never the socket error's text
        (2, 250, "delivered"),
    ]
    assert (await api.get(f"/v1/deliveries/{uuid.uuid4()}")).status_code == 404

    # only to the owning centre: another centre neither lists nor reads these deliveries
    other = tokens.headers("centre", OTHER_CENTRE)
    assert (await api.get("/v1/deliveries", headers=other)).json() == []
    assert (await api.get("/v1/deliveries", params={"order_id": order_id}, headers=other)).json() == []
    assert (await api.get(f"/v1/deliveries/{mail['delivery_id']}", headers=other)).status_code == 404
    assert (await api.get("/v1/deliveries", params={"limit": 201})).status_code == 422  # capped at 200
    assert len((await api.get("/v1/deliveries", params={"limit": 1, "offset": 3})).json()) == 1
