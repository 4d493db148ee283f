"""Webhooks at the edge, for real: a subscription made through the API (as a centre, with its token) gets
a platform-generated secret that the database keeps sealed; deliveries over HTTP verify with it; after a
rotation they carry two signatures (old and new secret) until the overlap ends; a name re-pointed at a
private address (DNS rebinding) is blocked at connect time with nothing sent; and over TLS the pinned
connection keeps the name for SNI, Host and certificate verification.

Real Postgres (the notification schema, all migrations), a real HTTP receiver and a real TLS server on
127.0.0.1 (the development flag allows loopback); the only stand-in is the DNS answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import notification_service
from notification_service.adapters.egress import AddressGuard
from notification_service.adapters.repository import NotificationTx, tx_factory
from notification_service.adapters.secret_box import DEV_KEY, SecretBox
from notification_service.adapters.webhooks import WebhookSender
from notification_service.config import NotificationSettings
from notification_service.domain.delivery import DeliveryPolicy
from notification_service.domain.urls import UrlPolicy
from notification_service.entrypoints.api import router
from notification_service.service_layer.dispatch import WebhookDispatcher
from notification_service.service_layer.handlers import handlers
from v2v_audit.service import migrate as audit_migrate
from v2v_contracts import CloudEvent, OrderSubmittedV1, new_event
from v2v_harness import pytest_plugin
from v2v_harness.receiver import WebhookReceiver
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool
from v2v_servicekit import problems
from v2v_servicekit.testing import TestTokens

pytestmark = pytest.mark.integration

MIGRATIONS = Path(notification_service.__file__).parent / "migrations"
CENTRE = "TC-DE-BE-001"
OTHER = "TC-FR-PA-001"
BOX = SecretBox(DEV_KEY)
DEV = UrlPolicy(allow_loopback=True)
ONCE = DeliveryPolicy(max_attempts=1, timeout_s=3.0)


class FakeDns:
    def __init__(self, answer: Sequence[str]) -> None:
        self.answer = list(answer)
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        return self.answer


@dataclass
class Edge:
    pool: asyncpg.Pool
    uow: UnitOfWork[NotificationTx]
    api: httpx.AsyncClient
    tokens: TestTokens
    senders: list[WebhookSender] = field(default_factory=list)

    async def consume(self, event: CloudEvent) -> None:
        async with self.uow.begin() as tx:
            await handlers.dispatch(tx, event)

    async def deliver(self, sender: WebhookSender) -> int:
        return await WebhookDispatcher(self.uow, sender, ONCE).dispatch_due()

    def sender(self, dns: FakeDns | None = None, verify: ssl.SSLContext | bool = True) -> WebhookSender:
        guard = AddressGuard(DEV, dns) if dns is not None else None
        sender = WebhookSender(ONCE.timeout_s, BOX, DEV, guard=guard, verify=verify)
        self.senders.append(sender)
        return sender


@pytest.fixture
async def edge(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[Edge]:
    url = test_db.urls["notification"]
    owner_url = test_db.owner_urls["notification"]  # migrations run as the owner
    await apply_migrations(owner_url, "notification", [MIGRATIONS_DIR, MIGRATIONS])
    await audit_migrate(owner_url, "notification")  # the audit trail (v2v_audit), as the service applies it
    pool = await create_pool(url, max_size=6)
    uow: UnitOfWork[NotificationTx] = UnitOfWork(
        pool, "t.v2v.notification", notify_channel("notification"), tx_factory
    )
    app = FastAPI()
    problems.install(app)
    app.include_router(router)
    tokens = TestTokens.install(app)
    settings = NotificationSettings(
        notification_insecure_dev_key=True, webhook_allow_loopback=True, webhook_secret_overlap_s=3600
    )
    app.state.runtime = SimpleNamespace(pool=pool, uow=uow, settings=settings, extras={})
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://notification",
        headers=tokens.headers("centre", CENTRE),
    )
    found = Edge(pool, uow, client, tokens)
    try:
        yield found
    finally:
        for sender in found.senders:
            await sender.aclose()
        await client.aclose()
        await pool.close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().start()
    try:
        yield r
    finally:
        r.stop()


def submitted(centre: str = CENTRE) -> CloudEvent:
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


def signatures(headers: dict[str, str]) -> list[str]:
    return headers["webhook-signature"].split(" ")


# ---- secrets: generated, sealed, rotated ------------------------------------------------------------


async def test_the_secret_is_sealed_at_rest_and_rotation_signs_with_both_during_the_overlap(
    edge: Edge, receiver: WebhookReceiver
) -> None:
    resp = await edge.api.post("/v1/subscriptions", json={"url": receiver.url("/rotation")})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    first = created["secret"]
    sid = uuid.UUID(created["subscription_id"])

    # the database keeps it sealed: no column holds the secret or its key bytes in clear
    row = await edge.pool.fetchrow("SELECT * FROM subscriptions WHERE subscription_id = $1", sid)
    assert row is not None
    assert "secret" not in dict(row)  # the plaintext column is gone
    stored = b"".join(bytes(v) if isinstance(v, bytes) else str(v).encode() for v in dict(row).values())
    assert first.encode() not in stored and first.removeprefix("whsec_").encode() not in stored
    assert BOX.open(bytes(row["secret_sealed"]), sid) == first
    assert (await edge.api.get(f"/v1/subscriptions/{sid}")).json().get("secret") is None

    sender = edge.sender()
    await edge.consume(submitted())
    assert await edge.deliver(sender) == 1
    (hook,) = receiver.on("/rotation")
    assert len(signatures(hook.headers)) == 1
    Webhook(first).verify(hook.body, hook.headers)

    resp = await edge.api.post(f"/v1/subscriptions/{sid}/rotate-secret")
    assert resp.status_code == 200, resp.text
    second = resp.json()["secret"]
    assert second != first
    await edge.consume(submitted())
    assert await edge.deliver(sender) == 1
    hook = receiver.on("/rotation")[-1]
    assert len(signatures(hook.headers)) == 2  # both, during the overlap
    assert Webhook(second).verify(hook.body, hook.headers) == Webhook(first).verify(hook.body, hook.headers)

    # the overlap is over: the new secret alone
    await edge.pool.execute(
        """UPDATE subscriptions SET previous_secret_expires_at = now() - interval '1 second'
           WHERE subscription_id = $1""",
        sid,
    )
    await edge.consume(submitted())
    assert await edge.deliver(sender) == 1
    hook = receiver.on("/rotation")[-1]
    assert len(signatures(hook.headers)) == 1
    Webhook(second).verify(hook.body, hook.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(first).verify(hook.body, hook.headers)

    # another centre can neither read nor rotate it
    other = edge.tokens.headers("centre", OTHER)
    assert (await edge.api.post(f"/v1/subscriptions/{sid}/rotate-secret", headers=other)).status_code == 404
    assert (await edge.api.get(f"/v1/subscriptions/{sid}", headers=other)).status_code == 404


async def test_the_migration_retires_subscriptions_with_chosen_secrets_and_keeps_categories_only(
    test_db: pytest_plugin.TestDatabase, tmp_path: Path
) -> None:
    url = test_db.urls["notification"]
    owner_url = test_db.owner_urls["notification"]  # migrations run as the owner
    before = tmp_path / "before"
    before.mkdir()
    for done in ("0001.notification-initial.sql", "0002.notification-email.sql"):
        (before / done).write_text((MIGRATIONS / done).read_text())
    await apply_migrations(owner_url, "notification", [MIGRATIONS_DIR, before])
    pool = await create_pool(url, max_size=2)
    try:
        sid, rid, hook, mail = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await pool.execute(
            """INSERT INTO subscriptions (subscription_id, treatment_center_id, url, secret)
               VALUES ($1, $2, $3, $4)""",
            sid,
            CENTRE,
            "http://127.0.0.1:9/hook",
            "whsec_" + "A" * 44,
        )
        await pool.execute(
            """INSERT INTO deliveries (delivery_id, subscription_id, event_id, event_type,
                                       treatment_center_id, payload, status, attempts, last_error)
               VALUES ($1, $2, gen_random_uuid(), 'order.submitted.v1', $3, '{}', 'pending', 1,
                       'ConnectError: [Errno 111] Connection refused (10.0.0.7)')""",
            hook,
            sid,
            CENTRE,
        )
        await pool.execute(
            "INSERT INTO delivery_attempts (delivery_id, attempt, error, duration_ms) VALUES ($1, 1, $2, 3)",
            hook,
            "ConnectError: [Errno 111] Connection refused (10.0.0.7)",
        )
        await pool.execute(
            """INSERT INTO email_recipients (recipient_id, treatment_center_id, email)
               VALUES ($1, $2, 'qa@c.example')""",
            rid,
            CENTRE,
        )
        await pool.execute(
            """INSERT INTO email_deliveries (delivery_id, recipient_id, event_id, event_type,
                                             treatment_center_id, subject, body, status, last_status_code,
                                             last_error)
               VALUES ($1, $2, gen_random_uuid(), 'order.failed.v1', $3, 's', 'b', 'failed', 550,
                       'SMTPRecipientsRefused: qa@c.example 550 mailbox unavailable')""",
            mail,
            rid,
            CENTRE,
        )

        assert await apply_migrations(owner_url, "notification", [MIGRATIONS_DIR, MIGRATIONS]) == [
            "0003.notification-edge",
            "0004.notification-endpoints",  # (issue 9: every subscription gets its endpoint's breaker)
        ]
        sub = await pool.fetchrow("SELECT * FROM subscriptions WHERE subscription_id = $1", sid)
        assert sub is not None and "secret" not in dict(sub)
        assert (sub["active"], sub["secret_sealed"]) == (False, None)
        assert (
            await pool.fetchval("SELECT state FROM webhook_endpoints WHERE subscription_id = $1", sid)
            == "open"
        )
        assert await pool.fetchrow(
            "SELECT status, last_error FROM deliveries WHERE delivery_id = $1", hook
        ) == (
            "failed",
            "signing_secret_unavailable",
        )
        assert await pool.fetchval("SELECT error FROM delivery_attempts WHERE delivery_id = $1", hook) == (
            "connection_refused"
        )
        assert await pool.fetchval(
            "SELECT last_error FROM email_deliveries WHERE delivery_id = $1", mail
        ) == ("smtp_5xx")
        # from now on: an active subscription has a sealed secret, and the log holds categories only
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute("UPDATE subscriptions SET active = true WHERE subscription_id = $1", sid)
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(
                "UPDATE deliveries SET last_error = 'ConnectError: refused' WHERE delivery_id = $1", hook
            )
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(
                """INSERT INTO email_delivery_attempts (delivery_id, attempt, error, duration_ms)
                   VALUES ($1, 2, $2, 1)""",
                mail,
                "SMTPServerDisconnected: Connection lost",
            )
    finally:
        await pool.close()


# ---- DNS rebinding at connect time -------------------------------------------------------------------


async def test_a_name_rebound_to_a_private_address_is_blocked_and_nothing_is_sent(
    edge: Edge, receiver: WebhookReceiver
) -> None:
    url = f"http://hooks.example.test:{receiver.port}/rebind"
    resp = await edge.api.post("/v1/subscriptions", json={"url": url})
    assert resp.status_code == 201, resp.text
    dns = FakeDns(["127.0.0.1"])  # (the development flag allows loopback: the receiver's address)
    sender = edge.sender(dns)

    await edge.consume(submitted())
    assert await edge.deliver(sender) == 1
    assert len(receiver.on("/rebind")) == 1
    assert receiver.on("/rebind")[0].headers["host"] == f"hooks.example.test:{receiver.port}"  # the name kept

    dns.answer = ["10.0.0.7"]  # rebound to a private address
    await edge.consume(submitted())
    assert await edge.deliver(sender) == 1
    dns.answer = ["127.0.0.1", "169.254.169.254"]  # or to one of several addresses
    await edge.consume(submitted())
    assert await edge.deliver(sender) == 1
    assert len(receiver.on("/rebind")) == 1  # nothing more reached the receiver
    assert dns.asked == ["hooks.example.test"] * 3

    log = (await edge.api.get("/v1/deliveries", params={"channel": "webhook"})).json()
    assert sorted((d["status"], d["last_outcome"]) for d in log) == [
        ("delivered", "delivered"),
        ("failed", "blocked_address"),
        ("failed", "blocked_address"),
    ]
    attempts = await edge.pool.fetch("SELECT error FROM delivery_attempts WHERE error IS NOT NULL")
    assert [a["error"] for a in attempts] == ["blocked_address", "blocked_address"]


# ---- TLS: pinned address, the name for SNI, Host and the certificate ------------------------------------


@dataclass
class TlsServer:
    port: int
    ca: Path
    sni: list[str | None] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)


def _certificates(tmp: Path, name: str) -> tuple[Path, Path, Path]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "v2v test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


@pytest.fixture
async def tls_server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[TlsServer]:
    """An HTTPS endpoint on 127.0.0.1 whose certificate names `request.param` (hooks.example.test)."""
    name = getattr(request, "param", "hooks.example.test")
    ca, cert, key = _certificates(tmp_path, name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    found = TlsServer(0, ca)

    def on_sni(_sock: Any, server_name: str | None, _ctx: Any) -> None:
        found.sni.append(server_name)

    context.sni_callback = on_sni

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            body = await reader.readexactly(length)
            found.requests.append(head + body)
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    found.port = server.sockets[0].getsockname()[1]
    try:
        yield found
    finally:
        server.close()
        await server.wait_closed()


async def test_over_tls_the_pinned_connection_keeps_the_name_for_sni_host_and_certificate(
    edge: Edge, tls_server: TlsServer
) -> None:
    url = f"https://hooks.example.test:{tls_server.port}/tls"
    assert (await edge.api.post("/v1/subscriptions", json={"url": url})).status_code == 201
    trust = ssl.create_default_context(cafile=str(tls_server.ca))
    dns = FakeDns(["127.0.0.1"])
    await edge.consume(submitted())
    assert await edge.deliver(edge.sender(dns, verify=trust)) == 1
    assert tls_server.sni == ["hooks.example.test"]
    (raw,) = tls_server.requests
    assert raw.startswith(b"POST /tls HTTP/1.1\r\n")
    assert f"host: hooks.example.test:{tls_server.port}".encode() in raw.lower()
    log = (await edge.api.get("/v1/deliveries")).json()
    assert [(d["status"], d["last_status_code"], d["last_outcome"]) for d in log] == [
        ("delivered", 204, "delivered")
    ]


@pytest.mark.parametrize("tls_server", ["other.example.test"], indirect=True)
async def test_a_certificate_for_another_name_is_a_tls_error(edge: Edge, tls_server: TlsServer) -> None:
    url = f"https://hooks.example.test:{tls_server.port}/tls"
    assert (await edge.api.post("/v1/subscriptions", json={"url": url})).status_code == 201
    trust = ssl.create_default_context(cafile=str(tls_server.ca))
    await edge.consume(submitted())
    assert await edge.deliver(edge.sender(FakeDns(["127.0.0.1"]), verify=trust)) == 1
    assert tls_server.requests == []  # nothing sent over a connection to the wrong name
    (entry,) = (await edge.api.get("/v1/deliveries")).json()
    assert (entry["status"], entry["last_outcome"]) == ("failed", "tls_error")
