"""The pool's reset on release (`v2v_persistence.db._reset_on_release`): what asyncpg's full reset query
did that the platform relies on still happens, without a round trip on every release."""

from __future__ import annotations

import asyncpg
import pytest

from v2v_harness.pytest_plugin import TestDatabase
from v2v_persistence import create_pool
from v2v_persistence.db import PooledConnection

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(test_db: TestDatabase) -> asyncpg.Pool:
    p = await create_pool(test_db.urls["order"], min_size=1, max_size=1)  # one connection: always the same
    try:
        yield p
    finally:
        await p.close()


async def _backend(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT pg_backend_pid()"))


async def test_a_connection_given_back_still_listening_is_unlistened(pool: asyncpg.Pool) -> None:
    pid = await _backend(pool)
    async with pool.acquire() as conn:
        await conn.add_listener("v2v_pool_test", lambda *_: None)  # and never removed (a failed removal)
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid  # the same session
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        assert not conn._con.listened  # type: ignore[attr-defined]


async def test_an_open_transaction_is_rolled_back_and_its_advisory_lock_released(pool: asyncpg.Pool) -> None:
    pid = await _backend(pool)
    async with pool.acquire() as conn:
        tr = conn.transaction()
        await tr.start()
        await conn.execute("SELECT pg_advisory_xact_lock(424242)")
        # given back without COMMIT or ROLLBACK
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        assert not conn.is_in_transaction()
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        assert await conn.fetchval(held) == 0


async def test_a_release_sends_no_reset_query(pool: asyncpg.Pool) -> None:
    statements: list[str] = []
    async with pool.acquire() as conn:
        raw = conn._con  # type: ignore[attr-defined]
        assert isinstance(raw, PooledConnection)
        raw.add_query_logger(lambda record: statements.append(record.query))
        await conn.execute("SELECT 1")
    async with pool.acquire() as conn:
        await conn.execute("SELECT 2")
    assert statements == ["SELECT 1", "SELECT 2"], f"sent on release: {statements[1:-1]}"
