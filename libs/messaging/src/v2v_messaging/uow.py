"""Unit of work: one Postgres transaction carrying the state change and the events it produces."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from v2v_messaging.outbox import Outbox


@dataclass
class Tx:
    conn: asyncpg.Connection
    outbox: Outbox


class UnitOfWork:
    def __init__(self, pool: asyncpg.Pool, own_topic: str, channel: str) -> None:
        self.pool = pool
        self.own_topic = own_topic
        self.channel = channel

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Tx]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield Tx(conn, Outbox(conn, self.own_topic, self.channel))

    @asynccontextmanager
    async def on(self, conn: asyncpg.Connection) -> AsyncIterator[Tx]:
        """A Tx on a connection whose transaction the caller already opened."""
        yield Tx(conn, Outbox(conn, self.own_topic, self.channel))
