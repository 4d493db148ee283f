"""How long a consumer's fetch may be held: the Kafka client gets the service's settings."""

from __future__ import annotations

from typing import Any

from faststream.kafka import KafkaBroker

from v2v_contracts.topics import dead_letter_topic, topic_for
from v2v_messaging import EventConsumer, HandlerRegistry


def _consumer(**settings: Any) -> EventConsumer:
    return EventConsumer(
        service="site",
        purpose="unit",
        topics=[topic_for("scheduling")],
        handlers=HandlerRegistry[Any](),
        uow=object(),  # type: ignore[arg-type]
        broker=KafkaBroker("127.0.0.1:9", logger=None),  # never connected
        dead_letter_topic=dead_letter_topic("site"),
        **settings,
    )


def test_a_fetch_is_answered_as_soon_as_anything_is_there_unless_told_otherwise() -> None:
    args = _consumer(fetch_max_wait_ms=50).subscriber._connection_args
    assert (args["fetch_max_wait_ms"], args["fetch_min_bytes"]) == (50, 1)


def test_a_fetch_held_for_a_few_events_or_the_wait() -> None:
    args = _consumer(fetch_max_wait_ms=50, fetch_min_bytes=8000).subscriber._connection_args
    assert (args["fetch_max_wait_ms"], args["fetch_min_bytes"]) == (50, 8000)
