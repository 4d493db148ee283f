"""Every Kafka client the platform opens carries the same security settings (no broker needed).

Plaintext stays the default (Tansu, tests); SASL/SCRAM reaches the FastStream broker's producer and
consumers, the admin client and the low-level probes alike, and the password never shows in a repr.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from v2v_messaging import KafkaSettings, make_broker

SCRAM = {
    "security_protocol": "SASL_PLAINTEXT",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "v2v-order",
    "sasl_password": "s3cret-password",
}


def connection_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """What FastStream hands to aiokafka: the producer's kwargs and the consumers' builder."""
    broker = make_broker(settings, "v2v-test", tracer_provider=None)
    producer: dict[str, Any] = dict(broker._connection_kwargs)
    consumer: dict[str, Any] = dict(broker.config.broker_config.builder.keywords)  # type: ignore[attr-defined]
    for key in ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
        assert producer.get(key) == consumer.get(key), key
    return producer


def test_plaintext_by_default() -> None:
    settings = KafkaSettings("127.0.0.1:9092")
    assert settings.security_protocol == "PLAINTEXT"
    assert settings.client_options() == {}
    assert settings.broker_security() is None
    kwargs = connection_kwargs(settings)
    assert kwargs.get("security_protocol", "PLAINTEXT") == "PLAINTEXT"  # aiokafka's default
    assert kwargs.get("sasl_mechanism") is None


def test_sasl_scram_reaches_every_client() -> None:
    settings = KafkaSettings("kafka:9092", **SCRAM)
    assert settings.client_options() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "v2v-order",
        "sasl_plain_password": "s3cret-password",
    }
    kwargs = connection_kwargs(settings)
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "v2v-order"
    assert kwargs["sasl_plain_password"] == "s3cret-password"
    assert "s3cret-password" not in repr(settings)


def test_sasl_over_tls_trusts_the_system_cas() -> None:
    settings = KafkaSettings("kafka:9093", **{**SCRAM, "security_protocol": "SASL_SSL"})
    options = settings.client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    kwargs = connection_kwargs(settings)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(
    "bad",
    [
        {"security_protocol": "SASL_PLAIN"},
        {"security_protocol": "SASL_PLAINTEXT"},  # no mechanism, no principal
        {**SCRAM, "sasl_mechanism": "GSSAPI"},
        {**SCRAM, "sasl_password": None},
        {**SCRAM, "sasl_username": ""},
    ],
)
def test_incomplete_or_unknown_security_settings_are_refused_at_start(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        KafkaSettings("kafka:9092", **bad)


class FakeAdmin:
    """Stands in for aiokafka's admin client: answers CreateTopics with the error code set per topic."""

    codes: dict[str, int] = {}
    options: dict[str, Any] = {}

    def __init__(self, **options: Any) -> None:
        FakeAdmin.options = options

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def _send_request(self, request: Any) -> Any:
        class Metadata:
            def to_object(self) -> dict[str, Any]:
                return {"topics": []}  # nothing exists yet

        return Metadata()

    async def create_partitions(self, *_: Any) -> None:
        raise AssertionError("nothing to grow")

    async def create_topics(self, new_topics: list[Any]) -> Any:
        class Response:
            topic_errors = [(t.name, FakeAdmin.codes.get(t.name, 0), None) for t in new_topics]

        return Response()


async def test_topics_the_principal_may_not_create_are_left_to_their_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ACLs a service may create only its own topics: an authorization error (29) or a topic that
    appeared meanwhile (36) is not counted as created and does not stop the service; any other refusal
    is raised."""
    import v2v_messaging.kafka as kafka_module
    from v2v_messaging import ensure_topics

    monkeypatch.setattr(kafka_module, "AIOKafkaAdminClient", FakeAdmin)
    settings = KafkaSettings("kafka:9092", **SCRAM)
    FakeAdmin.codes = {"v2v.site": 29, "v2v.logistics": 36}
    created = await ensure_topics(settings, ["v2v.order", "v2v.site", "v2v.logistics", "v2v.order.dlq"])
    assert created == ["v2v.order", "v2v.order.dlq"]
    assert FakeAdmin.options["sasl_plain_username"] == "v2v-order"  # the admin client signs in too

    FakeAdmin.codes = {"v2v.order": 37}  # INVALID_PARTITIONS
    with pytest.raises(Exception, match="error code 37"):
        await ensure_topics(settings, ["v2v.order"])


async def test_the_probes_sign_in_like_the_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay's watermark and metadata probes open their own clients: with the same principal."""
    import v2v_messaging.kafka as kafka_module
    from v2v_messaging import describe_broker, topic_is_empty

    seen: list[dict[str, Any]] = []

    class Refused(Exception):
        pass

    def capture(**options: Any) -> Any:
        seen.append(options)
        raise Refused

    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", capture)
    monkeypatch.setattr(kafka_module, "AIOKafkaClient", capture)
    settings = KafkaSettings("kafka:9092", **SCRAM)
    with pytest.raises(Refused):
        await topic_is_empty(settings, "v2v.order")
    with pytest.raises(Refused):
        await describe_broker(settings, ["v2v.order"])
    assert [o["sasl_plain_username"] for o in seen] == ["v2v-order", "v2v-order"]
    assert {o["security_protocol"] for o in seen} == {"SASL_PLAINTEXT"}
