"""Webhook signing per Standard Webhooks, and the retry backoff policy."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from notification_service.adapters.repository import webhook_channel as channel
from notification_service.adapters.webhooks import sign
from notification_service.config import NotificationSettings
from notification_service.domain.delivery import DeliveryPolicy

secrets = st.binary(min_size=24, max_size=64).map(lambda raw: "whsec_" + base64.b64encode(raw).decode())
bodies = st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=20), max_size=5).map(
    json.dumps
)
msg_ids = st.uuids().map(lambda u: f"msg_{u}")
offsets = st.integers(min_value=-12 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


# --- signing -----------------------------------------------------------------------------------------


@given(secrets, msg_ids, bodies)
def test_signed_delivery_verifies_with_the_reference_library(secret: str, msg_id: str, body: str) -> None:
    headers = sign(secret, msg_id, datetime.now(UTC), body)
    assert Webhook(secret).verify(body, headers) == json.loads(body)


@given(secrets, msg_ids, bodies, offsets)
def test_signature_verifies_whatever_the_timestamp_time_zone(
    secret: str, msg_id: str, body: str, tz: timezone
) -> None:
    now = datetime.now(tz)
    headers = sign(secret, msg_id, now, body)
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert Webhook(secret).verify(body, headers) == json.loads(body)


def test_headers_follow_standard_webhooks() -> None:
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    ts = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers = sign(secret, "msg_1", ts, "{}")
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == str(int(ts.timestamp())) == "1767323045"
    assert headers["webhook-signature"].startswith("v1,")
    assert len(base64.b64decode(headers["webhook-signature"][3:])) == 32  # HMAC-SHA256
    assert headers["content-type"] == "application/json"


@given(secrets, secrets, bodies)
def test_tampering_or_a_wrong_secret_fails_verification(secret: str, other: str, body: str) -> None:
    headers = sign(secret, "msg_x", datetime.now(UTC), body)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + " ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": "msg_y"})
    if other != secret:
        with pytest.raises(WebhookVerificationError):
            Webhook(other).verify(body, headers)


def test_channel_is_per_schema() -> None:
    assert channel("notification") == "v2v_webhooks_notification"
    assert channel("a") != channel("b")


# --- backoff -----------------------------------------------------------------------------------------

policies = st.builds(
    DeliveryPolicy,
    backoff_base_s=st.floats(min_value=0.01, max_value=10),
    backoff_max_s=st.floats(min_value=0.01, max_value=3600),
)


def ceiling(policy: DeliveryPolicy, attempt: int) -> float:
    return min(policy.backoff_base_s * 2.0 ** (attempt - 1), policy.backoff_max_s)


@given(policies, st.integers(min_value=1, max_value=80))
def test_backoff_stays_within_half_ceiling_and_ceiling(policy: DeliveryPolicy, attempt: int) -> None:
    delay = policy.backoff(attempt)
    top = ceiling(policy, attempt)
    assert top / 2 <= delay <= top
    assert delay <= policy.backoff_max_s


@given(policies, st.integers(min_value=1, max_value=80))
def test_backoff_grows_until_capped(policy: DeliveryPolicy, attempt: int) -> None:
    # equal jitter: while the ceiling doubles, the next delay's floor is the previous delay's ceiling
    assert ceiling(policy, attempt + 1) >= ceiling(policy, attempt)
    if policy.backoff_base_s * 2.0**attempt <= policy.backoff_max_s:
        assert policy.backoff(attempt + 1) >= policy.backoff(attempt)


def test_backoff_bounds_with_fixed_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = DeliveryPolicy(backoff_base_s=1.0, backoff_max_s=300.0)
    monkeypatch.setattr(random, "random", lambda: 0.0)
    assert [policy.backoff(a) for a in range(1, 11)] == [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150]
    monkeypatch.setattr(random, "random", lambda: 1.0)
    assert [policy.backoff(a) for a in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]


@pytest.mark.parametrize("attempt", [100, 1025, 1026, 5000, 10**6])
def test_backoff_is_capped_even_after_very_many_attempts(attempt: int) -> None:
    policy = DeliveryPolicy(backoff_base_s=1.0, backoff_max_s=300.0)
    assert 150.0 <= policy.backoff(attempt) <= 300.0


def test_policy_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("V2V_WEBHOOK_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("V2V_WEBHOOK_BACKOFF_BASE_S", "0.2")
    monkeypatch.setenv("V2V_WEBHOOK_BACKOFF_MAX_S", "60")
    monkeypatch.setenv("V2V_WEBHOOK_TIMEOUT_S", "2.5")
    policy = NotificationSettings().webhook_policy
    assert (policy.max_attempts, policy.backoff_base_s, policy.backoff_max_s, policy.timeout_s) == (
        4,
        0.2,
        60,
        2.5,
    )
    for name in ("MAX_ATTEMPTS", "BACKOFF_BASE_S", "BACKOFF_MAX_S", "TIMEOUT_S"):
        monkeypatch.delenv(f"V2V_WEBHOOK_{name}")
    assert NotificationSettings().webhook_policy == DeliveryPolicy()
