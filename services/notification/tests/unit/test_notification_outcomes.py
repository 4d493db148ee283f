"""What the delivery log says of an attempt: a category (delivered, http_4xx, http_5xx, timeout,
connection_refused, tls_error, dns_error, blocked_address, ...), never the text of the error; and what a
webhook carries: the allow-listed fields of its event type only."""

from __future__ import annotations

import socket
import ssl
import uuid
from datetime import UTC, date, datetime
from typing import Any

import aiosmtplib
import httpcore
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from notification_service.adapters import smtp
from notification_service.adapters.egress import BlockedAddress, ResolutionFailed
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


def wrapped(cause: BaseException, outer: type[Exception] = httpx.ConnectError) -> Exception:
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
        (httpx.ConnectTimeout(SECRET_TEXT), "timeout"),
        (httpx.ReadTimeout(SECRET_TEXT), "timeout"),
        (httpx.PoolTimeout(SECRET_TEXT), "timeout"),
        (TimeoutError(), "timeout"),
        (wrapped(ConnectionRefusedError(111, SECRET_TEXT)), "connection_refused"),
        (wrapped(ssl.SSLCertVerificationError(1, SECRET_TEXT)), "tls_error"),
        (wrapped(ssl.SSLError(1, SECRET_TEXT)), "tls_error"),
        (wrapped(ConnectionResetError(104, SECRET_TEXT), httpx.ReadError), "connection_error"),
        (httpx.RemoteProtocolError(SECRET_TEXT), "connection_error"),
        (httpcore.ConnectError(SECRET_TEXT), "connection_error"),
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


async def send_with(handler: Any) -> Any:
    sender = WebhookSender(2.0, BOX, UrlPolicy(), transport=httpx.MockTransport(handler))
    try:
        return await sender.send(delivery())
    finally:
        await sender.aclose()


@pytest.mark.parametrize(
    ("status", "category"), [(204, None), (302, "http_3xx"), (404, "http_4xx"), (503, "http_5xx")]
)
async def test_an_answer_is_recorded_as_its_status_and_category(status: int, category: str | None) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"location": "http://169.254.169.254/"} if status == 302 else {}
        return httpx.Response(status, headers=headers, text=SECRET_TEXT * 10)

    outcome = await send_with(answer)
    assert (outcome.status_code, outcome.error, outcome.permanent) == (status, category, False)


@pytest.mark.parametrize(
    ("raised", "category"),
    [
        (httpx.ConnectTimeout(SECRET_TEXT), "timeout"),
        (wrapped(ConnectionRefusedError(111, SECRET_TEXT)), "connection_refused"),
        (wrapped(ssl.SSLCertVerificationError(1, SECRET_TEXT)), "tls_error"),
        (httpx.RemoteProtocolError(SECRET_TEXT), "connection_error"),
    ],
)
async def test_a_failed_request_is_recorded_as_its_category(raised: Exception, category: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    outcome = await send_with(fail)
    assert (outcome.status_code, outcome.error) == (None, category)
    assert SECRET_TEXT not in repr(outcome)


async def test_a_redirect_is_not_followed() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(307, headers={"location": "https://10.0.0.1/internal"})

    outcome = await send_with(answer)
    assert seen == ["https://hooks.example.com/v2v"]
    assert outcome.error == "http_3xx"


async def test_a_huge_answer_is_not_read_to_its_end() -> None:
    read: list[int] = []

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> Any:
            for _ in range(10_000):
                read.append(1)
                yield b"x" * 1024

    outcome = await send_with(lambda request: httpx.Response(200, stream=Endless()))
    assert outcome.status_code == 200 and outcome.error is None
    assert len(read) < 100  # at most ~64 KiB were read


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
