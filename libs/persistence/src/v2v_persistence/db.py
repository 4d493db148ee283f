"""The asyncpg pool every service uses, with the timeouts every connection must carry.

No connection may wait forever: `statement_timeout` bounds a statement, `lock_timeout` a wait for a lock
(a row, an advisory lock), and `idle_in_transaction_session_timeout` makes Postgres end a session that
sits in an open transaction (a paused or hung replica), which releases its locks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg


@dataclass(frozen=True)
class DbTimeouts:
    """Server-side timeouts for every session (milliseconds; 0 turns one off)."""

    statement_ms: int = 15_000
    lock_ms: int = 5_000
    idle_in_transaction_ms: int = 30_000

    def server_settings(self) -> dict[str, str]:
        return {
            "statement_timeout": str(int(self.statement_ms)),
            "lock_timeout": str(int(self.lock_ms)),
            "idle_in_transaction_session_timeout": str(int(self.idle_in_transaction_ms)),
        }


DEFAULT_TIMEOUTS = DbTimeouts()


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _server_settings(timeouts: DbTimeouts | None, extra: dict[str, str] | None) -> dict[str, str]:
    return {**(timeouts or DEFAULT_TIMEOUTS).server_settings(), **(extra or {})}


async def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeouts: DbTimeouts | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A pool whose every connection carries `timeouts` (the defaults when not given)."""
    server_settings = _server_settings(timeouts, kwargs.pop("server_settings", None))
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        server_settings=server_settings,
        **kwargs,
    )
    assert pool is not None
    return pool


async def connect(url: str, *, timeouts: DbTimeouts | None = None, **kwargs: Any) -> asyncpg.Connection:
    """One connection outside any pool (a listener, a tool), with the same timeouts and codecs."""
    server_settings = _server_settings(timeouts, kwargs.pop("server_settings", None))
    conn = await asyncpg.connect(url, server_settings=server_settings, **kwargs)
    await _init_connection(conn)
    return conn


async def schema_of(pool: asyncpg.Pool) -> str:
    """The schema the service's role works in (its role's search_path)."""
    return str(await pool.fetchval("SELECT current_schema()"))
