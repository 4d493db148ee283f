"""Exception e-mails: what a message may say (allow-list, no patient data), recipients' addresses, the
exception event types and where they come from, SMTP and retry settings."""

from __future__ import annotations

import email
import uuid
from datetime import UTC, datetime
from email import policy as email_policy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from notification_service.adapters.smtp import SmtpSender
from notification_service.config import NotificationSettings, SmtpSettings
from notification_service.domain import routing, subscriptions
from notification_service.domain.alerts import ALLOWED_FIELDS, MAX_VALUE_CHARS, render
from notification_service.domain.routing import EXCEPTION_EVENT_TYPES
from notification_service.domain.subscriptions import address_problem
from notification_service.service_layer.handlers import handlers
from v2v_contracts import (
    EVENT_TYPES,
    CloudEvent,
    CoiMismatchDetectedV1,
    MaterialRejectedV1,
    OrderCancelledV1,
    OrderEventData,
    ShipmentExcursionV1,
    SlotUnavailableV1,
    new_event,
)
from v2v_contracts.errors import Invalid
from v2v_servicekit.problems import status_of

ORDER_ID = uuid.UUID("0b6c3a52-5d6e-4e8f-9a51-1f2e3d4c5b6a")
COI = "V2V00-26-000042-K"
CENTRE = "TC-DE-BE-001"
PATIENT_REF = "BER-2026-0042"


def rejected(**extra: Any) -> CloudEvent:
    return new_event(
        MaterialRejectedV1(
            order_id=ORDER_ID,
            coi=COI,
            treatment_center_id=CENTRE,
            site_id="SITE-DE-01",
            reason="temperature_excursion",
            **extra,
        )
    )


def with_data(event: CloudEvent, **data: Any) -> CloudEvent:
    return event.model_copy(update={"data": {**event.data, **data}})


def detail_lines(body: str) -> dict[str, str]:
    """The `key value` block of the body (between the first and the second blank line)."""
    block = body.split("\n\n")[1]
    out = {}
    for line in block.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


# ---- the message ------------------------------------------------------------------------------------


def test_subject_names_the_event_type_and_the_order() -> None:
    message = render(rejected())
    assert message.subject == f"[vein2vein] site.material_rejected.v1 — order {ORDER_ID}"


def test_body_has_order_coi_event_allowed_fields_and_the_order_link() -> None:
    message = render(rejected())
    assert detail_lines(message.body) == {
        "order": str(ORDER_ID),
        "coi": COI,
        "event": "site.material_rejected.v1",
        "reason": "temperature_excursion",
        "site_id": "SITE-DE-01",
    }
    assert f"GET /v1/orders/{ORDER_ID}" in message.body
    assert CENTRE not in message.body  # not on the allow-list either


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("reason", "viability below threshold, patient Erika M."),  # free text where a code belongs
        ("reason", "Viability"),
        ("site_id", "SITE DE 01"),
        ("where", "pickup at ward 3"),
        ("run", "2"),  # a number as text
        ("run", True),
        ("retained_material", "yes"),
        ("reading_c", "cold"),
        ("reading_c", 10**12),
    ],
)
def test_an_allowed_field_whose_value_is_not_of_its_kind_is_left_out(key: str, value: Any) -> None:
    message = render(with_data(rejected(), **{key: value}))
    assert key not in detail_lines(message.body)
    if isinstance(value, str) and len(value) > 4:
        assert value not in message.body


def test_a_coi_that_is_not_a_code_is_left_out() -> None:
    event = rejected().model_copy(update={"coi": "V2V 0042 Erika"})
    message = render(with_data(event, coi="V2V 0042 Erika"))
    assert detail_lines(message.body)["coi"] == "(none)"
    assert "Erika" not in message.body


def test_a_planted_patient_reference_never_reaches_the_message() -> None:
    event = rejected(patient_ref=PATIENT_REF, patient_name="Erika Mustermann", date_of_birth="1970-01-01")
    assert event.data["patient_ref"] == PATIENT_REF  # the contract lets extra fields through
    message = render(event)
    for value in (PATIENT_REF, "Erika", "Mustermann", "1970-01-01", "patient_ref", "date_of_birth"):
        assert value not in message.subject
        assert value not in message.body


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=20).filter(lambda k: k not in ALLOWED_FIELDS and k != "event"),
        st.uuids().map(lambda u: f"SECRET-{u.hex}"),
        min_size=1,
        max_size=8,
    )
)
def test_no_key_off_the_allow_list_is_ever_rendered(planted: dict[str, str]) -> None:
    message = render(with_data(rejected(), **planted))
    text = message.subject + message.body
    assert "SECRET-" not in text
    assert set(detail_lines(message.body)) <= {"order", "coi", "event", *ALLOWED_FIELDS}


@pytest.mark.parametrize(
    "value",
    [{"patient_ref": PATIENT_REF}, [PATIENT_REF], None, float("nan"), {"nested": {"deep": PATIENT_REF}}],
)
def test_allowed_keys_with_structured_or_empty_values_are_left_out(value: Any) -> None:
    message = render(with_data(rejected(), reason=value))
    assert "reason" not in detail_lines(message.body)
    assert PATIENT_REF not in message.body


@given(st.text(max_size=1000))
def test_values_are_one_bounded_line(reason: str) -> None:
    message = render(with_data(rejected(), reason=reason))
    lines = detail_lines(message.body)
    assert len(message.body.split("\n\n")) == 4  # a value cannot add lines or paragraphs
    if "reason" in lines:
        assert len(lines["reason"]) <= MAX_VALUE_CHARS
        assert lines["reason"].isprintable()


def test_flags_and_numbers_are_rendered_plainly() -> None:
    event = new_event(
        ShipmentExcursionV1(
            order_id=ORDER_ID,
            coi=COI,
            treatment_center_id=CENTRE,
            shipment_id=uuid.uuid4(),
            leg="outbound_product",
            reading_c=-120.5,
            min_c=-196.0,
            max_c=-150.0,
            measured_at=datetime(2030, 1, 1, tzinfo=UTC),
        )
    )
    lines = detail_lines(render(event).body)
    assert lines == {
        "order": str(ORDER_ID),
        "coi": COI,
        "event": "logistics.shipment_excursion.v1",
        "leg": "outbound_product",
        "reading_c": "-120.5",
        "min_c": "-196.0",
        "max_c": "-150.0",
    }
    assert "shipment_id" not in render(event).body
    assert detail_lines(render(with_data(event, retained_material=True)).body)["retained_material"] == "yes"


def test_cancellation_and_coi_mismatch_carry_their_status_fields() -> None:
    cancelled = new_event(
        OrderCancelledV1(
            order_id=ORDER_ID,
            coi=COI,
            treatment_center_id=CENTRE,
            reason="physician_decision",
            previous_status="manufacturing",
        )
    )
    assert detail_lines(render(cancelled).body)["previous_status"] == "manufacturing"
    mismatch = new_event(
        CoiMismatchDetectedV1(
            order_id=ORDER_ID, coi=COI, treatment_center_id=CENTRE, shipment_id=uuid.uuid4(), where="pickup"
        )
    )
    assert detail_lines(render(mismatch).body)["where"] == "pickup"


@pytest.mark.parametrize("order_id", [None, "", "not-a-uuid", "1; DROP TABLE"])
def test_an_event_without_a_valid_order_id_is_refused(order_id: Any) -> None:
    with pytest.raises(ValueError):
        render(with_data(rejected(), order_id=order_id))


def test_the_smtp_message_has_the_rendered_text_and_a_stable_id() -> None:
    rendered = render(rejected())
    smtp = SmtpSettings(sender="alerts@v2v.example")
    sender = SmtpSender(smtp, timeout_s=5.0)
    delivery_id = uuid.uuid4()
    raw = sender.message(
        delivery_id=delivery_id, to="qa@hospital.example", subject=rendered.subject, body=rendered.body
    ).as_bytes()
    parsed = email.message_from_bytes(raw, policy=email_policy.default)
    assert parsed["From"] == "alerts@v2v.example"
    assert parsed["To"] == "qa@hospital.example"
    assert parsed["Subject"] == rendered.subject
    assert parsed["Message-ID"] == f"<{delivery_id}@v2v.example>"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed.get_content() == rendered.body  # type: ignore[attr-defined]


def slot_unavailable(reason: str) -> CloudEvent:
    return new_event(
        SlotUnavailableV1(
            order_id=ORDER_ID,
            coi=COI,
            treatment_center_id=CENTRE,
            reason=reason,
            detail="no active site approved for TISA-CEL (commercial) by EMA",
            waitlisted=True,
        )
    )


def test_an_order_left_without_an_approved_site_is_alerted_in_plain_words() -> None:
    message = render(slot_unavailable("no_approved_site"))
    assert message.subject == (
        f"[vein2vein] scheduling.slot_unavailable.v1 (no_approved_site) — order {ORDER_ID}"
    )
    intro = message.body.split("\n\n")[0]
    assert intro.splitlines() == [
        "An order of your treatment centre needs attention.",
        "No approved manufacturing site is left for this order's market: it cannot be scheduled "
        "until a site is approved again.",
    ]
    assert detail_lines(message.body) == {
        "order": str(ORDER_ID),
        "coi": COI,
        "event": "scheduling.slot_unavailable.v1",
        "reason": "no_approved_site",
    }
    assert len(message.body.split("\n\n")) == 4
    # the free-text detail and the other fields are not on the allow-list
    assert "TISA-CEL" not in message.body and "waitlisted" not in message.body


@given(st.text(max_size=60).filter(lambda r: r != "no_approved_site"))
def test_only_known_reason_codes_get_a_headline_and_reach_the_subject(reason: str) -> None:
    message = render(with_data(slot_unavailable("no_approved_site"), reason=reason))
    assert message.subject == f"[vein2vein] scheduling.slot_unavailable.v1 — order {ORDER_ID}"
    assert message.body.split("\n\n")[0] == "An order of your treatment centre needs attention."


# ---- which events, from where -----------------------------------------------------------------------


def test_exception_types_are_the_known_order_events() -> None:
    assert set(EXCEPTION_EVENT_TYPES) == {
        "order.cancelled.v1",
        "order.failed.v1",
        "site.material_rejected.v1",
        "site.product_out_of_specification.v1",
        "site.manufacturing_failed.v1",
        "site.booking_affected.v1",
        "logistics.shipment_excursion.v1",
        "logistics.coi_mismatch_detected.v1",
        "order.coi_mismatch_detected.v1",
        "site.coi_mismatch_detected.v1",
        "notification.webhook_delivery_failed.v1",
        "scheduling.slot_unavailable.v1",  # for reason no_approved_site only (routing.EXCEPTION_REASONS)
        "order.physician_decision_requested.v1",  # the centre's physician must decide on an OOS product
        "logistics.shipment_rerouted.v1",  # issue 11: the patient's material goes to another site
        "order.lymphodepletion_cleared.v1",  # issue 11: the product was lost after the patient's LD
    }
    for t in EXCEPTION_EVENT_TYPES:
        assert issubclass(EVENT_TYPES[t], OrderEventData), t


def test_the_consumer_reads_every_topic_that_carries_a_handled_event() -> None:
    assert routing.SOURCE_SERVICES == ["order", "scheduling", "site", "logistics", "notification"]
    handled = handlers.types
    assert set(EXCEPTION_EVENT_TYPES) <= set(handled)
    assert set(handled) >= routing.WEBHOOK_EVENT_TYPES
    for t in handled:
        assert EVENT_TYPES[t].SERVICE in routing.SOURCE_SERVICES


def test_this_services_own_events_are_e_mailed_but_never_sent_as_webhooks() -> None:
    # a webhook about a failed webhook could fail in turn: only e-mail (which publishes nothing) is used
    own = {t for t in handlers.types if t.startswith("notification.")}
    assert own == {"notification.webhook_delivery_failed.v1"}
    assert not own & routing.WEBHOOK_EVENT_TYPES


def test_slot_unavailable_is_an_exception_for_no_approved_site_only() -> None:
    t = "scheduling.slot_unavailable.v1"
    assert routing.is_exception(t, {"reason": "no_approved_site"})
    for data in ({"reason": "no_capacity"}, {"reason": "no_site_known"}, {}, {"reason": None}):
        assert not routing.is_exception(t, data), data
    assert not routing.is_exception(t, {"reason": {"nested": "no_approved_site"}})  # unhashable: no
    assert not routing.is_exception(t, {"reason": ["no_approved_site"]})
    # the other exception types are alerts whatever their reason; other events never are
    assert routing.is_exception("order.failed.v1", {"reason": "no_capacity"})
    assert routing.is_exception("site.material_rejected.v1", {})
    assert not routing.is_exception("order.submitted.v1", {"reason": "no_approved_site"})
    assert not routing.is_exception("scheduling.slot_reserved.v1", {"reason": "no_approved_site"})
    # and it stays a webhook for every reason
    assert routing.sent_as_webhook(t)


def test_recipient_filters_accept_exception_types_only() -> None:
    subscriptions.validate_exception_types(None)
    subscriptions.validate_exception_types(["order.failed.v1"])
    for bad in ([], ["order.submitted.v1"], ["nope"]):
        with pytest.raises(Invalid) as info:
            subscriptions.validate_exception_types(bad)
        assert [e.field for e in info.value.errors] == ["event_types"]


# ---- addresses --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "qa@hospital.example",
        "cart.coordination+alerts@charite.de",
        "o'brien@nhs.uk",
        "x@a-b.c-d.example",
        "UPPER@Example.ORG",
        "a" * 64 + "@" + "b" * 63 + ".example",
    ],
)
def test_plain_addresses_are_accepted(address: str) -> None:
    assert address_problem(address) is None
    subscriptions.validate_email(address)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "plain",
        "@hospital.example",
        "qa@",
        "qa@@hospital.example",
        "q@a@hospital.example",
        "qa@hospital",
        "qa@hospital.",
        "qa@.example",
        "qa@-hospital.example",
        "qa@hospital-.example",
        "qa@hospital..example",
        "qa@127.0.0.1",
        ".qa@hospital.example",
        "qa.@hospital.example",
        "q..a@hospital.example",
        "q a@hospital.example",
        '"qa"@hospital.example',
        "qa@hospital.example\r\nBcc: x@evil.example",
        "qa\n@hospital.example",
        "a" * 65 + "@hospital.example",
        "qa@" + "b" * 64 + ".example",
        "qa@" + ("b" * 60 + ".") * 5 + "example",
        "ärzte@klinik.example",
        "qa@klinik-ä.example",
    ],
)
def test_other_shapes_are_refused_naming_email(address: str) -> None:
    assert address_problem(address)
    with pytest.raises(Invalid) as info:
        subscriptions.validate_email(address)
    assert status_of(info.value) == 422
    assert [e.field for e in info.value.errors] == ["email"]
    assert info.value.detail.startswith("email: ")


# ---- settings ---------------------------------------------------------------------------------------


def test_smtp_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOST", "PORT", "FROM", "USER", "PASSWORD", "STARTTLS"):
        monkeypatch.delenv(f"V2V_SMTP_{name}", raising=False)
    assert NotificationSettings().smtp == SmtpSettings(
        host="127.0.0.1", port=8025, sender="alerts@vein2vein.local", user=None, password=None, starttls=False
    )
    monkeypatch.setenv("V2V_SMTP_HOST", "smtp.example")
    monkeypatch.setenv("V2V_SMTP_PORT", "587")
    monkeypatch.setenv("V2V_SMTP_FROM", "noreply@v2v.example")
    monkeypatch.setenv("V2V_SMTP_USER", "relay")
    monkeypatch.setenv("V2V_SMTP_PASSWORD", "s3cret")
    monkeypatch.setenv("V2V_SMTP_STARTTLS", "true")
    settings = NotificationSettings().smtp
    assert settings == SmtpSettings("smtp.example", 587, "noreply@v2v.example", "relay", "s3cret", True)
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in repr(NotificationSettings())


def test_email_retry_policy_has_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("V2V_EMAIL_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("V2V_EMAIL_BACKOFF_BASE_S", "2")
    monkeypatch.setenv("V2V_WEBHOOK_MAX_ATTEMPTS", "9")
    policy = NotificationSettings().email_policy
    assert (policy.max_attempts, policy.backoff_base_s, policy.backoff_max_s) == (3, 2.0, 300.0)
    assert NotificationSettings().webhook_policy.max_attempts == 9


def test_a_physician_decision_request_is_e_mailed_with_the_finding_and_qa_reason() -> None:
    order_id = uuid.uuid4()
    event = CloudEvent(
        source="/v2v/order",
        type="order.physician_decision_requested.v1",
        subject=str(order_id),
        data={
            "order_id": str(order_id),
            "coi": "V2V00260000011",
            "treatment_center_id": "TC-DE-BE-001",
            "site_id": "FR-LES-ULIS",
            "run": 1,
            "reason": "potency",
            "qa_reason": "benefit_risk_acceptable",
        },
    )
    assert routing.is_exception(event.type, event.data)
    body = render(event).body
    assert "order.physician_decision_requested.v1" in body
    assert "potency" in body and "benefit_risk_acceptable" in body and "FR-LES-ULIS" in body
