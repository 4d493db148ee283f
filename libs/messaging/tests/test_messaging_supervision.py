"""Unit tests (no I/O): supervised background loops and the two classes of failure."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiokafka import errors as kafka_errors

from v2v_messaging import Heartbeat, PoisonMessage, Supervisor, current_heartbeat, is_transient
from v2v_messaging.failures import refused_by_broker


async def wait_until(check: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_crashed_loop_is_restarted_with_backoff_counted_and_shown_dead_meanwhile() -> None:
    supervisor = Supervisor(backoff_initial_s=0.3, backoff_max_s=0.3, stall_after_s=60)
    runs: list[int] = []
    release = asyncio.Event()

    async def flaky(heartbeat: Heartbeat) -> None:
        runs.append(len(runs) + 1)
        if len(runs) == 1:  # its database call fails once
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        assert current_heartbeat() is heartbeat  # what `rt.heartbeat()` hands a job
        while True:
            heartbeat.beat()
            await asyncio.sleep(0.01)
            if release.is_set():
                raise RuntimeError("crashed again")

    supervisor.spawn("flaky", flaky)
    await wait_until(lambda: runs == [1])
    await asyncio.sleep(0.05)
    health = supervisor.health()["flaky"]
    assert health.state == "backoff" and health.restarts == 1
    problems = supervisor.problems()
    assert problems["flaky"].startswith("dead: ConnectionDoesNotExistError")
    await wait_until(lambda: len(runs) == 2)  # restarted after the backoff
    await wait_until(lambda: supervisor.problems() == {})
    assert supervisor.health()["flaky"].state == "running"

    release.set()  # crashes again: dead until it is restarted once more
    await wait_until(lambda: "flaky" in supervisor.problems())
    assert "RuntimeError: crashed again" in supervisor.problems()["flaky"]
    assert supervisor.health()["flaky"].restarts == 2
    await supervisor.stop()
    assert supervisor.health()["flaky"].state == "stopped"


async def test_a_loop_that_stops_beating_is_stuck_and_one_that_returns_is_finished() -> None:
    supervisor = Supervisor(stall_after_s=0.2)
    hang = asyncio.Event()

    async def beating(heartbeat: Heartbeat) -> None:
        while not hang.is_set():
            heartbeat.beat()
            await asyncio.sleep(0.02)
        await asyncio.sleep(3600)  # stuck in a call that never returns

    async def quiet(heartbeat: Heartbeat) -> None:  # never beats: no stuck detection for it
        await asyncio.sleep(3600)

    async def one_shot(heartbeat: Heartbeat) -> None:
        return None

    supervisor.spawn("beating", beating)
    supervisor.spawn("quiet", quiet)
    supervisor.spawn("promised", quiet, beats=True)  # promised to beat, and does not
    supervisor.spawn("one-shot", one_shot)
    await asyncio.sleep(0.4)
    problems = supervisor.problems()
    assert set(problems) == {"promised"}
    assert problems["promised"].startswith("stuck: no heartbeat for")
    assert supervisor.health()["one-shot"].state == "finished"

    hang.set()
    await wait_until(lambda: "beating" in supervisor.problems(), timeout=2)
    assert supervisor.problems()["beating"].startswith("stuck")
    assert supervisor.health()["beating"].restarts == 0
    await supervisor.stop()


async def test_the_restart_backoff_grows_and_is_capped() -> None:
    supervisor = Supervisor(backoff_initial_s=0.02, backoff_max_s=0.08, healthy_after_s=60)
    waits: list[float] = []  # the backoff before each restart

    async def always_fails(heartbeat: Heartbeat) -> None:
        waits.append(supervisor.health()["doomed"].last_backoff_s)
        raise OSError("connection refused")

    supervisor.spawn("doomed", always_fails)
    await wait_until(lambda: len(waits) >= 6, timeout=5)
    await supervisor.stop()
    backoffs = waits[1:]  # jittered by +-25%: 0.02, 0.04, 0.08, 0.08, ...
    assert 0.015 <= backoffs[0] <= 0.025
    assert 0.03 <= backoffs[1] <= 0.05
    assert all(0.06 <= b <= 0.1 for b in backoffs[2:])
    assert supervisor.health()["doomed"].restarts >= 5


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError("db down"),
        TimeoutError(),
        OSError("network unreachable"),
        asyncpg.ConnectionDoesNotExistError("closed"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CrashShutdownError("terminating connection because of crash of another server process"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.DiskFullError("could not extend file"),
        asyncpg.OutOfMemoryError("out of memory"),
        asyncpg.TooManyConnectionsError("too many clients"),
        asyncpg.LockNotAvailableError("canceling statement due to lock timeout"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.IdleInTransactionSessionTimeoutError("idle-in-transaction timeout"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.InterfaceError("pool is closing"),
        # seen when a backend is terminated in the middle of a statement (a CI run of the read-only test)
        asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
        kafka_errors.KafkaConnectionError("broker down"),
        kafka_errors.KafkaTimeoutError(),
        kafka_errors.NotLeaderForPartitionError(),
        # the deployment's grants, ACLs and credentials: an operator fixes them, the message waits
        asyncpg.InsufficientPrivilegeError("permission denied for table outbox"),
        kafka_errors.TopicAuthorizationFailedError(),
        kafka_errors.GroupAuthorizationFailedError(),
        kafka_errors.SaslAuthenticationFailed(),
        RuntimeError("wrapped"),  # raised from a transient one, below
    ],
    ids=lambda e: type(e).__name__,
)
def test_unavailable_infrastructure_is_transient(exc: BaseException) -> None:
    if type(exc) is RuntimeError:
        try:
            raise RuntimeError("wrapped") from asyncpg.AdminShutdownError("shutting down")
        except RuntimeError as wrapped:
            exc = wrapped
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        KeyError("x"),
        PoisonMessage("payload does not match"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.ForeignKeyViolationError("violates foreign key"),
        asyncpg.UndefinedTableError("relation does not exist"),
        asyncpg.DataError("invalid input syntax"),
        asyncpg.TransactionIntegrityConstraintViolationError("deferred constraint"),
        kafka_errors.MessageSizeTooLargeError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_else_is_the_message_s_own_failure(exc: BaseException) -> None:
    assert not is_transient(exc)


def test_a_record_the_broker_refuses_is_told_apart() -> None:
    assert refused_by_broker(kafka_errors.MessageSizeTooLargeError())
    assert refused_by_broker(kafka_errors.RecordTooLargeError())
    assert not refused_by_broker(kafka_errors.KafkaConnectionError())
    assert not refused_by_broker(ValueError())
