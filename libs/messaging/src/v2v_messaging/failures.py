"""Which failures are the infrastructure's (retry, never dead-letter) and which are the message's own.

Transient — the database or the broker is unavailable, or busy: connection errors; Postgres shutting
down, crashed, starting up or read-only (a replica after fail-over); out of disk, memory or
connections (class 53); lock and statement timeouts; serialization failures and deadlocks; broker
connection errors and timeouts. Such a failure says nothing about the message: it is retried with
backoff for as long as it lasts and is never dead-lettered. So is a refusal of the deployment's own
rules: the database role lacking a privilege (the runtime role owns nothing and holds only what the
owner granted), the broker's ACLs refusing this service's principal, or its SASL credentials refused:
the message waits, visibly, until an operator fixes the grant, the ACL or the password.

Anything else is the message's own problem (poison): it gets a small budget of attempts, then goes to
the dead letters. A broker that refuses a record (too large, invalid) is neither: the relay moves the
outbox row aside (`refused_by_broker`).
"""

from __future__ import annotations

import asyncio

import asyncpg
from aiokafka import errors as kafka_errors

# SQLSTATE classes and codes that mean "the database is unavailable or busy", not "the statement is wrong"
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "58"})  # 57: operator intervention, 58: I/O
TRANSIENT_SQLSTATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a standby, or a primary demoted by a fail-over
        "25P03",  # idle_in_transaction_session_timeout: our own session was ended
        "40001",  # serialization_failure
        "40003",  # statement_completion_unknown
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available: lock_timeout
        "57014",  # query_canceled: statement_timeout
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up, or in recovery
        "57P05",  # idle_session_timeout
    }
)

TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError and friends
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # connection closed / pool closing
    # the connection's protocol state broken by a backend terminated mid-operation ("cannot switch to
    # state …; another operation is in progress"): the connection is lost, not the message at fault
    asyncpg.InternalClientError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.LockNotAvailableError,
    asyncpg.IdleInTransactionSessionTimeoutError,
    kafka_errors.KafkaConnectionError,
    kafka_errors.KafkaTimeoutError,
    kafka_errors.NodeNotReadyError,
    kafka_errors.BrokerNotAvailableError,
    kafka_errors.KafkaUnavailableError,
    kafka_errors.RequestTimedOutError,
    kafka_errors.NotLeaderForPartitionError,
    kafka_errors.LeaderNotAvailableError,
    kafka_errors.UnknownTopicOrPartitionError,
    kafka_errors.NotEnoughReplicasError,
    kafka_errors.NotEnoughReplicasAfterAppendError,
    kafka_errors.ProducerClosed,
    # the deployment's grants and credentials, not the message
    asyncpg.InsufficientPrivilegeError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.TransactionalIdAuthorizationFailed,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.AuthenticationFailedError,
)

# the broker will never take this record, however often it is sent
REFUSED_BY_BROKER: tuple[type[BaseException], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidMessageError,
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidTimestampError,
    kafka_errors.InvalidTopicError,
    kafka_errors.UnsupportedForMessageFormatError,
)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its explicit causes (`raise X from Y`), innermost last."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__
    return seen


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, REFUSED_BY_BROKER):
        return False
    if isinstance(exc, TRANSIENT_TYPES):
        return True
    if isinstance(exc, kafka_errors.KafkaError) and getattr(exc, "retriable", False):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError) and isinstance(sqlstate, str):
        return sqlstate in TRANSIENT_SQLSTATES or sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
    return False


def is_transient(exc: BaseException) -> bool:
    """True when `exc` (or what it was raised from) means the database or the broker is unavailable."""
    return any(_transient_one(e) for e in _chain(exc))


def refused_by_broker(exc: BaseException) -> bool:
    """True when the broker (or the client, before sending) refuses the record itself."""
    return isinstance(exc, REFUSED_BY_BROKER)
