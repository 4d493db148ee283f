"""What the delivery log says of an attempt: a category (delivered, http_4xx, http_5xx, timeout,
connection_refused, tls_error, dns_error, blocked_address, ...), never the text of the error; and what a
webhook carries: the allow-listed fields of its event type only."""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Any

import aiohttp
import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from notification_service.adapters import smtp
from notification_service.adapters.egress import AddressGuard, BlockedAddress, ResolutionFailed
from notification_service.adapters.secret_box import DEV_KEY, SecretBox, new_signing_secret
from notification_service.adapters.webhooks import WebhookSender, failure_of, failure_of_status
from notification_service.domain.delivery import FAILURES, WebhookDelivery
from notification_service.domain.payloads import COMMON, WEBHOOK_FIELDS, conforms, webhook_payload
from notification_service.domain.routing import WEBHOOK_EVENT_TYPES
from notification_service.domain.urls import UrlPolicy
from v2v_contracts import (
    EVENT_TYPES,
    CloudEvent,
    MaterialRejectedV1,
    OrderCancelledV1,
    OrderSubmittedV1,
    ShipmentMilestoneV1,
    SlotUnavailableV1,
    new_event,
)

BOX = SecretBox(DEV_KEY)
SECRET_TEXT = "10.0.0.7:5432 PATIENT-BER-0042"  # what an error's text could carry


def wrapped(cause: BaseException, outer: type[Exception] = aiohttp.ClientConnectionError) -> Exception:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer(SECRET_TEXT) from inner
    except Exception as exc:
        return exc


# ---- HTTP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (200, None),
        (204, None),
        (299, None),
        (301, "http_3xx"),
        (302, "http_3xx"),
        (308, "http_3xx"),
        (400, "http_4xx"),
        (401, "http_4xx"),
        (404, "http_4xx"),
        (410, "http_4xx"),
        (500, "http_5xx"),
        (503, "http_5xx"),
        (599, "http_5xx"),
        (101, "http_other"),
        (600, "http_other"),
    ],
)
def test_statuses_are_categories(status: int, category: str | None) -> None:
    assert failure_of_status(status) == category
    assert category is None or category in FAILURES


@pytest.mark.parametrize(
    ("exc", "category"),
    [
        (wrapped(BlockedAddress("address")), "blocked_address"),
        (BlockedAddress("address"), "blocked_address"),
        (ResolutionFailed("nx"), "dns_error"),
        (wrapped(ResolutionFailed("nx")), "dns_error"),
        (aiohttp.ConnectionTimeoutError(SECRET_TEXT), "timeout"),
        (aiohttp.SocketTimeoutError(SECRET_TEXT), "timeout"),
        (aiohttp.ServerTimeoutError(SECRET_TEXT), "timeout"),
        (TimeoutError(), "timeout"),
        (wrapped(ConnectionRefusedError(111, SECRET_TEXT)), "connection_refused"),
        (wrapped(ssl.SSLCertVerificationError(1, SECRET_TEXT)), "tls_error"),
        (wrapped(ssl.SSLError(1, SECRET_TEXT)), "tls_error"),
        (wrapped(ConnectionResetError(104, SECRET_TEXT), aiohttp.ClientOSError), "connection_error"),
        (aiohttp.ServerDisconnectedError(SECRET_TEXT), "connection_error"),
        (aiohttp.ClientPayloadError(SECRET_TEXT), "connection_error"),
        (aiohttp.ClientConnectionError(SECRET_TEXT), "connection_error"),
        (OSError(SECRET_TEXT), "connection_error"),
    ],
)
def test_errors_are_categories_without_their_text(exc: BaseException, category: str) -> None:
    assert failure_of(exc) == category
    assert category in FAILURES


def delivery(url: str = "https://hooks.example.com/v2v") -> WebhookDelivery:
    sid = uuid.uuid4()
    return WebhookDelivery(
        event_id=uuid.uuid4(),
        event_type="order.submitted.v1",
        order_id=uuid.uuid4(),
        coi="V2V00-26-000042-K",
        treatment_center_id="TC-DE-BE-001",
        delivery_id=uuid.uuid4(),
        attempts=0,
        subscription_id=sid,
        url=url,
        sealed_secrets=(BOX.seal(new_signing_secret(), sid),),
        payload=b'{"type":"order.submitted.v1"}',
    )


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def receiver(handler: Handler) -> AsyncIterator[int]:
    """A local TCP server running `handler` for each connection; yields its port."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def request_of(reader: asyncio.StreamReader) -> bytes:
    """Reads one request (its head and its body); returns its request line."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    await reader.readexactly(length)
    return head.split(b"\r\n", 1)[0]


def answering(raw: bytes, seen: list[bytes] | None = None) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await request_of(reader)
        if seen is not None:
            seen.append(line)
        writer.write(raw)
        await writer.drain()

    return handler


async def send_to(port: int, scheme: str = "http", timeout_s: float = 2.0) -> Any:
    """One attempt to hooks.example.com (resolving to the local receiver), on `port`."""

    async def local(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    dev = UrlPolicy(allow_loopback=True)
    sender = WebhookSender(timeout_s, BOX, dev, guard=AddressGuard(dev, local))
    try:
        return await sender.send(delivery(f"{scheme}://hooks.example.com:{port}/v2v"))
    finally:
        await sender.aclose()


async def send_with(handler: Handler, **kw: Any) -> Any:
    async with receiver(handler) as port:
        return await send_to(port, **kw)


@pytest.mark.parametrize(
    ("status", "category"), [(204, None), (302, "http_3xx"), (404, "http_4xx"), (503, "http_5xx")]
)
async def test_an_answer_is_recorded_as_its_status_and_category(status: int, category: str | None) -> None:
    text = b"" if status == 204 else (SECRET_TEXT * 10).encode()  # (a 204 has no body)
    location = b"location: http://169.254.169.254/\r\n" if status == 302 else b""
    raw = b"HTTP/1.1 %d Whatever\r\n%bcontent-length: %d\r\n\r\n%b" % (status, location, len(text), text)
    outcome = await send_with(answering(raw))
    assert (outcome.status_code, outcome.error, outcome.permanent) == (status, category, False)


async def never_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await request_of(reader)
    await reader.read()  # until the sender gives up and closes the connection


async def test_a_receiver_that_does_not_answer_is_a_timeout() -> None:
    outcome = await send_with(never_answering, timeout_s=0.3)
    assert (outcome.status_code, outcome.error) == (None, "timeout")


async def test_a_refused_connection_is_connection_refused() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    outcome = await send_to(port)
    assert (outcome.status_code, outcome.error) == (None, "connection_refused")


async def test_a_tls_handshake_that_fails_is_a_tls_error() -> None:
    # https to a receiver that answers the handshake with plain text
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 " + SECRET_TEXT.encode() + b"\r\n\r\n")
        await writer.drain()

    outcome = await send_with(plain, scheme="https")
    assert (outcome.status_code, outcome.error) == (None, "tls_error")


async def test_an_answer_that_is_not_http_is_a_connection_error() -> None:
    outcome = await send_with(answering(SECRET_TEXT.encode() + b"\r\n\r\n"))
    assert (outcome.status_code, outcome.error) == (None, "connection_error")
    assert SECRET_TEXT not in repr(outcome)


async def test_a_redirect_is_not_followed() -> None:
    seen: list[bytes] = []
    raw = (
        b"HTTP/1.1 307 Temporary Redirect\r\nlocation: https://10.0.0.1/internal\r\ncontent-length: 0\r\n\r\n"
    )
    outcome = await send_with(answering(raw, seen))
    await asyncio.sleep(0.05)  # (a second request, were one made, would have arrived)
    assert seen == [b"POST /v2v HTTP/1.1"]
    assert outcome.error == "http_3xx"


async def test_a_huge_answer_is_not_read_to_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    readany = aiohttp.StreamReader.readany

    async def counted(self: aiohttp.StreamReader) -> bytes:
        chunk = await readany(self)
        read.append(len(chunk))
        return chunk

    monkeypatch.setattr(aiohttp.StreamReader, "readany", counted)

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_of(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (10_000 * 1024))
        for _ in range(10_000):
            writer.write(b"x" * 1024)
            await writer.drain()

    outcome = await send_with(endless)
    assert outcome.status_code == 200 and outcome.error is None
    assert sum(read) < 200 * 1024  # at most ~64 KiB (and the chunk that went past it) were read


# ---- SMTP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code", "category"),
    [
        (aiosmtplib.SMTPResponseException(450, SECRET_TEXT), 450, "smtp_4xx"),
        (aiosmtplib.SMTPResponseException(554, SECRET_TEXT), 554, "smtp_5xx"),
        (aiosmtplib.SMTPConnectTimeoutError(SECRET_TEXT), None, "timeout"),
        (aiosmtplib.SMTPReadTimeoutError(SECRET_TEXT), None, "timeout"),
        (
            wrapped(ConnectionRefusedError(111, SECRET_TEXT), aiosmtplib.SMTPConnectError),
            None,
            "connection_refused",
        ),
        (wrapped(socket.gaierror(-2, SECRET_TEXT), aiosmtplib.SMTPConnectError), None, "dns_error"),
        (wrapped(ssl.SSLError(1, SECRET_TEXT), aiosmtplib.SMTPConnectError), None, "tls_error"),
        (aiosmtplib.SMTPServerDisconnected(SECRET_TEXT), None, "connection_error"),
    ],
)
def test_smtp_errors_are_categories_without_their_text(
    exc: BaseException, code: int | None, category: str
) -> None:
    assert smtp.failure_of(exc, code) == category
    assert category in FAILURES


# ---- the payload's allow-list -----------------------------------------------------------------------


def test_every_webhook_event_type_has_a_reviewed_allow_list() -> None:
    assert set(WEBHOOK_FIELDS) == set(WEBHOOK_EVENT_TYPES)


@pytest.mark.parametrize("event_type", sorted(WEBHOOK_FIELDS))
def test_allow_listed_fields_are_fields_of_the_event(event_type: str) -> None:
    model_fields = set(EVENT_TYPES[event_type].model_fields)
    assert set(COMMON) | set(WEBHOOK_FIELDS[event_type]) <= model_fields
    for free in ("detail", "location", "handled_by", "received_from", "patient_ref", "name"):
        assert free not in WEBHOOK_FIELDS[event_type]


def submitted(**extra: Any) -> CloudEvent:
    return new_event(
        OrderSubmittedV1(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000042-K",
            treatment_center_id="TC-DE-BE-001",
            product_code="TISA-CEL",
            order_type="commercial",
            regulator="EMA",
            country="DE",
            region="EU",
            requested_apheresis_date=date(2030, 1, 15),
            **extra,
        )
    )


def test_an_event_with_only_allowed_fields_goes_out_as_it_came() -> None:
    event = submitted()
    assert webhook_payload(event) == event.to_json()


def test_a_coi_whose_check_character_is_a_star_is_carried() -> None:
    # ISO 7064 MOD 37-2 makes `*` the check character of 1 COI in 37 (e.g. V2V0026000027*)
    event = new_event(
        OrderSubmittedV1(
            order_id=uuid.uuid4(),
            coi="V2V0026000027*",
            treatment_center_id="TC-DE-BE-001",
            product_code="TISA-CEL",
            order_type="commercial",
            regulator="EMA",
            country="DE",
            region="EU",
            requested_apheresis_date=date(2030, 1, 15),
        )
    )
    out = CloudEvent.from_json(webhook_payload(event))
    assert out.coi == "V2V0026000027*" and out.data["coi"] == "V2V0026000027*"


def test_fields_off_the_list_and_values_not_of_their_kind_are_left_out() -> None:
    event = submitted(patient_ref="BER-2026-0042", patient_name="Erika Mustermann")
    out = CloudEvent.from_json(webhook_payload(event))
    assert "patient_ref" not in out.data and "patient_name" not in out.data
    assert out.data == {k: v for k, v in event.data.items() if k not in {"patient_ref", "patient_name"}}
    assert (out.id, out.type, out.subject, out.coi, out.source) == (
        event.id,
        event.type,
        event.subject,
        event.coi,
        event.source,
    )

    cancelled = new_event(  # built unvalidated: the order contract itself refuses free text now
        OrderCancelledV1.model_construct(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000042-K",
            treatment_center_id="TC-DE-BE-001",
            reason="Patient Erika M. moved to another hospital",  # free text where a code belongs
            previous_status="manufacturing",
        )
    )
    out = CloudEvent.from_json(webhook_payload(cancelled))
    assert "reason" not in out.data and b"Erika" not in webhook_payload(cancelled)
    assert out.data["previous_status"] == "manufacturing"

    coded = cancelled.model_copy(update={"data": {**cancelled.data, "reason": "patient_transferred"}})
    assert CloudEvent.from_json(webhook_payload(coded)).data["reason"] == "patient_transferred"


def test_free_text_and_courier_references_never_go_out() -> None:
    unavailable = new_event(
        SlotUnavailableV1(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000042-K",
            treatment_center_id="TC-DE-BE-001",
            reason="no_approved_site",
            detail="no active site approved for TISA-CEL (commercial) by EMA",
            waitlisted=True,
        )
    )
    out = CloudEvent.from_json(webhook_payload(unavailable))
    assert out.data["reason"] == "no_approved_site" and out.data["waitlisted"] is True
    assert "detail" not in out.data
    milestone = new_event(  # built unvalidated: the logistics contract itself refuses free text now
        ShipmentMilestoneV1.model_construct(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000042-K",
            treatment_center_id="TC-DE-BE-001",
            shipment_id=uuid.uuid4(),
            leg="inbound_apheresis",
            milestone="picked_up",
            occurred_at=datetime(2030, 1, 15, 9, 30, tzinfo=UTC),
            location="Charité ward 3, bed 12",
            handled_by="courier-77",
            temperature_c=4.5,
        )
    )
    out = CloudEvent.from_json(webhook_payload(milestone))
    assert set(out.data) == {
        "order_id",
        "coi",
        "treatment_center_id",
        "shipment_id",
        "leg",
        "milestone",
        "occurred_at",
        "temperature_c",
    }


def test_unknown_envelope_extensions_and_odd_subjects_are_left_out() -> None:
    event = new_event(
        MaterialRejectedV1(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000042-K",
            treatment_center_id="TC-DE-BE-001",
            site_id="SITE-DE-01",
            reason="viability",
        )
    )
    raw = event.model_dump(mode="json") | {"patientref": "BER-0042", "subject": "BER-0042"}
    out = CloudEvent.from_json(webhook_payload(CloudEvent.model_validate(raw)))
    assert "patientref" not in out.model_dump() and out.subject is None
    assert b"BER-0042" not in webhook_payload(CloudEvent.model_validate(raw))


@given(st.text(max_size=80))
def test_a_reason_goes_out_only_as_a_reason_code(reason: str) -> None:
    event = new_event(  # built unvalidated: the site contract itself refuses free text now
        MaterialRejectedV1.model_construct(
            order_id=uuid.uuid4(),
            coi="V2V00-26-000042-K",
            treatment_center_id="TC-DE-BE-001",
            site_id="SITE-DE-01",
            reason=reason,
        )
    )
    out = CloudEvent.from_json(webhook_payload(event))
    if "reason" in out.data:
        assert conforms("reason", out.data["reason"])
        assert " " not in out.data["reason"] and out.data["reason"] == out.data["reason"].lower()


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        ("uuid", "4b377daa-a5ca-49b4-81c2-9fdb0d236a25", ["not-a-uuid", 42, None]),
        ("code", "SITE-DE-01", ["SITE DE 01", "", "x" * 65, 7]),
        ("coi", "V2V0026000027*", ["V2V0026000027**", "V2V 0026000027*", "*", 7]),
        ("coi", "V2V00-26-000042-K", ["V2V00 26 000042 K", "", "x" * 65]),
        ("reason", "outage:maintenance", ["Outage", "outage maintenance", "x" * 130]),
        ("date", "2030-01-15", ["15.01.2030", "2030-13-01", "2030-01-15T00:00:00Z"]),
        ("datetime", "2030-01-15T09:30:00Z", ["yesterday", "2030-01-15", "2030-01-15T09:30:00Z bed 3"]),
        ("number", -120.5, [float("nan"), float("inf"), True, "1.5", 1e12]),
        ("int", 2, [2.5, True, "2"]),
        ("bool", False, [0, "false", None]),
        ("range", [-196.0, -150.0], [[1.0], [1.0, "x"], "1..2"]),
    ],
)
def test_value_kinds(kind: Any, good: Any, bad: list[Any]) -> None:
    assert conforms(kind, good)
    for value in bad:
        assert not conforms(kind, value), value
