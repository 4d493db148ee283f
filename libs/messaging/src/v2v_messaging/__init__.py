"""The messaging policy every service shares: outbox + relay, inbox consumers, retries, dead letters,
supervised background loops."""

from pathlib import Path

from v2v_messaging.consumer import ConsumerPolicy, EventConsumer
from v2v_messaging.dead_letters import RELAY_CONSUMER, DeadLetter, DeadLetters, record_dead_letter
from v2v_messaging.failures import is_transient, refused_by_broker
from v2v_messaging.handlers import EventMeta, HandlerRegistry, PoisonMessage
from v2v_messaging.kafka import (
    BrokerState,
    KafkaSettings,
    describe_broker,
    ensure_topics,
    make_broker,
    topic_is_empty,
)
from v2v_messaging.outbox import (
    DEFAULT_MAX_EVENT_BYTES,
    EventTooLarge,
    Outbox,
    OutboxRelay,
    RelayBackoff,
    notify_channel,
)
from v2v_messaging.provenance import Rejection, check_event, publisher_of
from v2v_messaging.supervisor import Heartbeat, LoopHealth, Supervisor, current_heartbeat
from v2v_messaging.uow import AbstractUnitOfWork, EventSink, Tx, UnitOfWork

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "MIGRATIONS_DIR",
    "RELAY_CONSUMER",
    "AbstractUnitOfWork",
    "BrokerState",
    "ConsumerPolicy",
    "DeadLetter",
    "DeadLetters",
    "EventConsumer",
    "EventMeta",
    "EventSink",
    "EventTooLarge",
    "HandlerRegistry",
    "Heartbeat",
    "KafkaSettings",
    "LoopHealth",
    "Outbox",
    "OutboxRelay",
    "PoisonMessage",
    "Rejection",
    "RelayBackoff",
    "Supervisor",
    "Tx",
    "UnitOfWork",
    "check_event",
    "current_heartbeat",
    "describe_broker",
    "ensure_topics",
    "is_transient",
    "make_broker",
    "notify_channel",
    "publisher_of",
    "record_dead_letter",
    "refused_by_broker",
    "topic_is_empty",
]
