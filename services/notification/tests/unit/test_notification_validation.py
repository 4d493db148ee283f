"""Subscription input checks: Standard Webhooks secrets and known order event types."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from notification_service.domain.routing import ORDER_EVENT_TYPES
from notification_service.domain.subscriptions import validate_event_types, validate_secret
from v2v_contracts import EVENT_TYPES, OrderEventData
from v2v_contracts.errors import Invalid
from v2v_servicekit.problems import status_of


def secret_of(raw: bytes) -> str:
    return "whsec_" + base64.b64encode(raw).decode()


def assert_422_on(field: str, exc: Invalid) -> None:
    assert status_of(exc) == 422
    assert exc.kind == "validation"
    assert [e.field for e in exc.errors] == [field]
    assert exc.errors[0].reason
    assert exc.detail.startswith(f"{field}: ")


@given(st.binary(min_size=24, max_size=64))
def test_secrets_of_24_to_64_bytes_are_accepted(raw: bytes) -> None:
    validate_secret(secret_of(raw))


@given(st.binary(max_size=23) | st.binary(min_size=65, max_size=200))
def test_secrets_of_other_lengths_are_refused(raw: bytes) -> None:
    with pytest.raises(Invalid) as info:
        validate_secret(secret_of(raw))
    assert_422_on("secret", info.value)
    assert "24..64 bytes" in info.value.errors[0].reason


@given(st.binary(min_size=24, max_size=64), st.sampled_from(["", "whsec", "WHSEC_", "sk_", " whsec_"]))
def test_secrets_without_the_prefix_are_refused(raw: bytes, prefix: str) -> None:
    with pytest.raises(Invalid) as info:
        validate_secret(prefix + base64.b64encode(raw).decode())
    assert_422_on("secret", info.value)
    assert "whsec_" in info.value.errors[0].reason


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_not base64 at all!",
        "whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # url-safe alphabet
    ],
)
def test_secrets_that_are_not_base64_are_refused(secret: str) -> None:
    with pytest.raises(Invalid) as info:
        validate_secret(secret)
    assert_422_on("secret", info.value)


def test_order_event_types_are_exactly_the_order_events() -> None:
    expected = sorted(t for t, model in EVENT_TYPES.items() if issubclass(model, OrderEventData))
    assert expected == ORDER_EVENT_TYPES
    assert "order.submitted.v1" in ORDER_EVENT_TYPES
    assert "site.registered.v1" not in ORDER_EVENT_TYPES


def test_no_event_types_means_every_type() -> None:
    validate_event_types(None)


@given(st.lists(st.sampled_from(ORDER_EVENT_TYPES), min_size=1))
def test_known_event_types_are_accepted(types: list[str]) -> None:
    validate_event_types(types)


def test_an_empty_list_is_refused() -> None:
    with pytest.raises(Invalid) as info:
        validate_event_types([])
    assert_422_on("event_types", info.value)


@given(
    st.lists(st.sampled_from(ORDER_EVENT_TYPES)),
    st.lists(st.text(max_size=40).filter(lambda t: t not in ORDER_EVENT_TYPES), min_size=1),
)
def test_unknown_event_types_are_refused_and_named(known: list[str], unknown: list[str]) -> None:
    with pytest.raises(Invalid) as info:
        validate_event_types(known + unknown)
    assert_422_on("event_types", info.value)
    # named by their positions in the list: an error text never echoes the input
    positions = [str(i) for i in range(len(known), len(known) + len(unknown))]
    named = ", ".join(positions[:10]) + (", ..." if len(positions) > 10 else "")
    assert f"at positions [{named}]" in info.value.errors[0].reason


def test_an_unknown_event_type_is_not_echoed() -> None:
    with pytest.raises(Invalid) as info:
        validate_event_types(["order.submitted.v1", "PATIENT-BER-0042"])
    assert "PATIENT" not in str(info.value) and "PATIENT" not in info.value.errors[0].reason
    assert "positions [1]" in info.value.errors[0].reason


def test_site_events_cannot_be_subscribed_to() -> None:
    with pytest.raises(Invalid) as info:
        validate_event_types(["site.registered.v1"])
    assert_422_on("event_types", info.value)
