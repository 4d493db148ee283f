"""`UnitOfWork.start(first=...)`: a transaction whose BEGIN goes out with its first statement in one
round trip (an event consumer's batch: the BEGIN and the first record's inbox row), on real Postgres."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from v2v_messaging import UnitOfWork, notify_channel

pytestmark = pytest.mark.integration


def inbox_row(event_id: uuid.UUID) -> str:
    return (
        "INSERT INTO inbox (consumer, event_id, event_type, topic, kafka_partition, kafka_offset) "
        f"VALUES ('it.start', '{event_id}', 'x.y.v1', 'v2v.site', 0, 1) ON CONFLICT DO NOTHING"
    )


async def in_inbox(pool: asyncpg.Pool, event_id: uuid.UUID) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM inbox WHERE event_id = $1", event_id))


async def test_the_first_statement_is_in_the_transaction_and_says_what_it_did(messaging_db: Any) -> None:
    pool = messaging_db.pool
    uow = UnitOfWork(pool, "v2v.site", notify_channel(messaging_db.schema))
    kept, dropped = uuid.uuid4(), uuid.uuid4()

    opened = await uow.start(first=inbox_row(kept))
    assert opened.first_status == "INSERT 0 1"
    assert opened.tx.conn is not None and opened.tx.conn.is_in_transaction()
    await opened.commit()
    assert await in_inbox(pool, kept)

    again = await uow.start(first=inbox_row(kept))  # there already: nothing inserted
    assert again.first_status == "INSERT 0 0"
    await again.rollback()

    rolled = await uow.start(first=inbox_row(dropped))
    assert rolled.first_status == "INSERT 0 1"
    await rolled.rollback()  # the first statement goes with the rest
    assert not await in_inbox(pool, dropped)
    assert pool.get_size() - pool.get_idle_size() == 0  # every connection back in the pool


async def test_a_failed_first_statement_leaves_no_transaction_open(messaging_db: Any) -> None:
    pool = messaging_db.pool
    uow = UnitOfWork(pool, "v2v.site", notify_channel(messaging_db.schema))
    with pytest.raises(asyncpg.UndefinedTableError):
        await uow.start(first="INSERT INTO no_such_table VALUES (1)")
    assert pool.get_size() - pool.get_idle_size() == 0
    async with pool.acquire() as conn:
        assert not conn.is_in_transaction()


async def test_a_commit_the_server_turns_into_a_rollback_raises(messaging_db: Any) -> None:
    """A transaction in which a statement failed (its error swallowed) is rolled back by COMMIT: that
    is an error here, not a commit that did not happen."""
    pool = messaging_db.pool
    uow = UnitOfWork(pool, "v2v.site", notify_channel(messaging_db.schema))
    event_id = uuid.uuid4()
    opened = await uow.start(first=inbox_row(event_id))
    assert opened.tx.conn is not None
    with pytest.raises(asyncpg.UndefinedTableError):
        await opened.tx.conn.execute("SELECT * FROM no_such_table")
    with pytest.raises(asyncpg.InterfaceError, match="ROLLBACK"):
        await opened.commit()
    assert not await in_inbox(pool, event_id)
    assert pool.get_size() - pool.get_idle_size() == 0


async def test_a_final_statement_goes_with_the_commit_and_a_failing_one_leaves_nothing(
    messaging_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`commit(final=...)`: a last statement sent with the COMMIT in one round trip (a consumer batch's
    deferred inbox rows); when it fails, nothing of the transaction is kept."""
    pool = messaging_db.pool
    uow = UnitOfWork(pool, "v2v.site", notify_channel(messaging_db.schema))
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    plain = "INSERT INTO inbox (consumer, event_id, event_type, topic, kafka_partition, kafka_offset) VALUES "

    opened = await uow.start(first=inbox_row(first))
    assert opened.begun_together
    sent: list[str] = []
    original = asyncpg.Connection.execute

    async def spy(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(query)
        return await original(self, query, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(asyncpg.Connection, "execute", spy)
        await opened.commit(final=f"{plain}('it.start', '{second}', 'x.y.v1', 'v2v.site', 0, 2)")
    assert sent == [f"{plain}('it.start', '{second}', 'x.y.v1', 'v2v.site', 0, 2); COMMIT"]  # one trip
    assert await in_inbox(pool, first) and await in_inbox(pool, second)

    # a row there already (no ON CONFLICT here): the commit raises and nothing of it is kept
    failing = await uow.start(first=inbox_row(third))
    with pytest.raises(asyncpg.UniqueViolationError):
        await failing.commit(final=f"{plain}('it.start', '{second}', 'x.y.v1', 'v2v.site', 0, 3)")
    assert not await in_inbox(pool, third)
    assert pool.get_size() - pool.get_idle_size() == 0

    # a transaction begun without a first statement runs the final one on its own, then commits
    async with pool.acquire() as check:
        before = await check.fetchval("SELECT count(*) FROM inbox")
    separate = await uow.start()
    assert not separate.begun_together
    await separate.commit(final=f"{plain}('it.start', '{third}', 'x.y.v1', 'v2v.site', 0, 4)")
    assert await in_inbox(pool, third)
    async with pool.acquire() as check:
        assert await check.fetchval("SELECT count(*) FROM inbox") == before + 1
