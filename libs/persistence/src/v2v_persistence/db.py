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


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pool's connection that remembers whether it ever ran LISTEN (see `_reset_on_release`)."""

    listened = False

    async def add_listener(self, channel: str, callback: Any) -> None:
        self.listened = True
        await super().add_listener(channel, callback)


async def _reset_on_release(conn: asyncpg.Connection) -> None:
    """What a connection given back to the pool needs, and no more: usually no round trip at all.

    asyncpg's default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`
    on every release: one round trip per transaction (7.7 % of the order service's CPU under load,
    docs/BENCHMARKS.md, optimisation round 4). Before calling this, asyncpg still rolls back a
    transaction left open and drops the connection's Python-side listeners (`Connection._reset`). As for
    the rest, what the platform's code does on pooled connections:

    - advisory locks: only `pg_advisory_xact_lock` (the audit trail's chain lock, scheduling's slot
      locks, logistics' order lock), released by COMMIT or ROLLBACK; no session-level
      `pg_advisory_lock` anywhere, so `pg_advisory_unlock_all()` has nothing to release;
    - cursors: none (asyncpg's own cursors live inside a transaction and end with it; no `WITH HOLD`),
      so nothing for `CLOSE ALL`;
    - session settings: none changed after connecting (no `SET` or `set_config(..., false)`; the
      timeouts and search_path come in the startup packet or the role, which `RESET ALL` would keep
      anyway), so nothing for `RESET ALL`;
    - LISTEN: the outbox relay's listener and notification's two dispatch listeners hold a pooled
      connection and remove their listener before giving it back, but the removal may fail (it is
      bounded and its errors suppressed). Such a connection is marked (`PooledConnection.listened`) and
      gets `UNLISTEN *` here, so no connection goes back to the pool still registered on a channel.

    Whoever adds session state to a pooled connection (`SET`, a session advisory lock, a holdable
    cursor, a temporary table) must undo it before release, or add it here."""
    if isinstance(conn, PooledConnection) and conn.listened:
        await conn.execute("UNLISTEN *")
        conn.listened = False


async def create_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeouts: DbTimeouts | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A pool whose every connection carries `timeouts` (the defaults when not given), reset on release
    by `_reset_on_release` rather than asyncpg's full reset query."""
    server_settings = _server_settings(timeouts, kwargs.pop("server_settings", None))
    kwargs.setdefault("connection_class", PooledConnection)
    kwargs.setdefault("reset", _reset_on_release)
    # a service runs 100+ distinct statements (its own, the outbox, inbox, audit and edge ones): more than
    # asyncpg's default cache of 100 prepared statements, and an evicted one costs a Parse round trip
    kwargs.setdefault("statement_cache_size", 1024)
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
