"""The messaging policy every service shares: outbox + relay, inbox consumers, retries, dead letters."""

from pathlib import Path

from v2v_messaging.consumer import ConsumerPolicy, EventConsumer
from v2v_messaging.handlers import EventMeta, HandlerRegistry, PoisonMessage
from v2v_messaging.kafka import KafkaSettings, ensure_topics, make_broker, topic_is_empty
from v2v_messaging.outbox import Outbox, OutboxRelay, notify_channel
from v2v_messaging.uow import AbstractUnitOfWork, EventSink, Tx, UnitOfWork

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

__all__ = [
    "MIGRATIONS_DIR",
    "AbstractUnitOfWork",
    "ConsumerPolicy",
    "EventConsumer",
    "EventMeta",
    "EventSink",
    "HandlerRegistry",
    "KafkaSettings",
    "Outbox",
    "OutboxRelay",
    "PoisonMessage",
    "Tx",
    "UnitOfWork",
    "ensure_topics",
    "make_broker",
    "notify_channel",
    "topic_is_empty",
]
