"""Unit of work: one Postgres transaction carrying the state change and the events it produces.

A service gives the unit of work a `Tx` subclass whose attributes are its repositories (`tx.orders`,
`tx.slots`, ...), each bound to the transaction's connection; service-layer code talks to those and to
`tx.outbox`, never to the connection. `v2v_messaging.fakes` has the in-memory counterpart for unit tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar

import asyncpg

from v2v_contracts import CloudEvent, EventData, new_event
from v2v_messaging.outbox import DEFAULT_MAX_EVENT_BYTES, Outbox


class LocalRelay(Protocol):
    """What a unit of work needs of its process's outbox relay (`OutboxRelay`)."""

    def leads(self) -> bool: ...

    def wake(self) -> None: ...


class EventSink(Protocol):
    """What service-layer code sees of an outbox: add an event to the current transaction."""

    added: list[CloudEvent]

    async def add(self, event: CloudEvent, *, topic: str | None = None) -> None: ...


class Tx:
    """One open transaction: its connection (for repositories and the messaging library), its outbox."""

    def __init__(self, conn: asyncpg.Connection | None, outbox: EventSink) -> None:
        self.conn = conn  # None in a fake Tx (unit tests): repositories are in memory there
        self.outbox = outbox

    async def publish(self, data: EventData) -> CloudEvent:
        """Wrap `data` in a CloudEvent from this service and add it to the outbox; returns the event."""
        event = new_event(data)
        await self.outbox.add(event)
        return event

    async def before_commit(self) -> None:
        """Called by the unit of work right before COMMIT, inside the transaction, once the service-layer
        code is done: the last writes of the transaction (the audit trail appends its buffered entries
        here, so that its chain lock is held as briefly as possible). Nothing by default."""


TxT = TypeVar("TxT", bound=Tx)
TxT_co = TypeVar("TxT_co", bound=Tx, covariant=True)


class AbstractUnitOfWork(Protocol[TxT_co]):
    def begin(self) -> AbstractAsyncContextManager[TxT_co]: ...

    def read(self) -> AbstractAsyncContextManager[TxT_co]: ...


class _BegunTogether:
    """The transaction of a connection whose BEGIN went out with its first statement, in one simple-query
    round trip (`UnitOfWork.start(first=...)`): ended with plain COMMIT / ROLLBACK. A COMMIT that the
    server answers with ROLLBACK (the transaction had failed) raises rather than passing for one."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def commit(self, final: str | None = None) -> None:
        status = await self._conn.execute("COMMIT" if final is None else f"{final}; COMMIT")
        if status != "COMMIT":
            raise asyncpg.InterfaceError(f"the server ended the transaction with {status!r}, not COMMIT")

    async def rollback(self) -> None:
        await self._conn.execute("ROLLBACK")


class OpenTransaction(Generic[TxT]):
    """A transaction opened and ended by explicit calls rather than a `with` block: an event consumer
    spreads one over the records of a poll (`EventConsumer._consume`). `commit()` runs the Tx's
    `before_commit` first, as `UnitOfWork.begin` does; either way the connection goes back to the pool."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        conn: asyncpg.Connection,
        transaction: Any,
        tx: TxT,
        first_status: str | None = None,
        committed: Callable[[EventSink], None] | None = None,
    ) -> None:
        self._pool = pool
        self._conn: asyncpg.Connection | None = conn
        self._transaction = transaction
        self.tx = tx
        self.first_status = first_status  # the status of `start(first=...)`'s statement ("INSERT 0 1")
        self._committed = committed

    @property
    def begun_together(self) -> bool:
        """Whether its BEGIN went out with its first statement (`UnitOfWork.start(first=...)`): then
        `commit(final=...)` sends the final statement with the COMMIT, in one round trip."""
        return isinstance(self._transaction, _BegunTogether)

    async def commit(self, final: str | None = None) -> None:
        """`final`: a last statement without parameters (values written in, by a caller that vouches for
        them), run after the Tx's `before_commit`: with the COMMIT in one simple-query round trip when the
        transaction was begun together with its first statement, else on its own right before it."""
        try:
            await self.tx.before_commit()
            if self.begun_together:
                await self._transaction.commit(final)
            else:
                if final is not None:
                    assert self._conn is not None
                    await self._conn.execute(final)
                await self._transaction.commit()
        except BaseException:
            await self.rollback()
            raise
        await self._release()
        if self._committed is not None:
            self._committed(self.tx.outbox)

    async def rollback(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(Exception):  # a broken connection has nothing left to roll back
            await self._transaction.rollback()
        await self._release()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)


class UnitOfWork(Generic[TxT]):
    def __init__(
        self,
        pool: asyncpg.Pool,
        own_topic: str,
        channel: str,
        tx_factory: Callable[[asyncpg.Connection, Outbox], TxT] = Tx,  # type: ignore[assignment]
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,  # larger events are refused (EventTooLarge)
    ) -> None:
        self.pool = pool
        self.own_topic = own_topic
        self.channel = channel
        self.tx_factory = tx_factory
        self.max_event_bytes = max_event_bytes
        self.relay: LocalRelay | None = None

    def attach_relay(self, relay: LocalRelay) -> None:
        """This process's outbox relay: while it leads (`relay.leads()`), a transaction that added events
        wakes it in-process once committed, and sends no NOTIFY (a NOTIFY wakes every backend listening
        in the database, whichever channel, and this process's listener connection). While another
        replica's relay leads, the NOTIFY goes out as before."""
        self.relay = relay

    def _outbox(self, conn: asyncpg.Connection, *, local: bool = True) -> Outbox:
        relay = self.relay if local else None
        return Outbox(
            conn,
            self.own_topic,
            self.channel,
            max_event_bytes=self.max_event_bytes,
            needs_notify=(lambda: not relay.leads()) if relay is not None else None,
        )

    def _committed(self, outbox: EventSink) -> None:
        if self.relay is not None and outbox.added and not getattr(outbox, "notified", True):
            self.relay.wake()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[TxT]:
        async with self.pool.acquire() as conn:
            outbox = self._outbox(conn)
            async with conn.transaction():
                tx = self.tx_factory(conn, outbox)
                yield tx
                await tx.before_commit()
            self._committed(outbox)  # after COMMIT: the relay then sees the rows

    async def start(self, first: str | None = None) -> OpenTransaction[TxT]:
        """Open a transaction on a pooled connection; the caller commits or rolls it back.

        `first`: a statement without parameters (its values written in, by a caller that vouches for
        them) to run first in the transaction, sent with its BEGIN in one simple-query round trip instead
        of two; its status is the transaction's `first_status`."""
        conn = await self.pool.acquire()
        status: str | None = None
        try:
            if first is None:
                transaction: Any = conn.transaction()
                await transaction.start()
            else:
                transaction = _BegunTogether(conn)
                try:
                    status = await conn.execute(f"BEGIN; {first}")
                except BaseException:
                    if conn.is_in_transaction():
                        with contextlib.suppress(Exception):
                            await transaction.rollback()
                    raise
        except BaseException:
            with contextlib.suppress(Exception):
                await self.pool.release(conn)
            raise
        tx = self.tx_factory(conn, self._outbox(conn))
        return OpenTransaction(
            self.pool, conn, transaction, tx, first_status=status, committed=self._committed
        )

    @asynccontextmanager
    async def on(self, conn: asyncpg.Connection) -> AsyncIterator[TxT]:
        """A Tx on a connection whose transaction the caller already opened (and commits): its events
        NOTIFY the relay (the commit is the caller's)."""
        tx = self.tx_factory(conn, self._outbox(conn, local=False))
        yield tx
        await tx.before_commit()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[TxT]:
        """A Tx for reads: a pooled connection, no explicit transaction (its outbox must stay unused)."""
        async with self.pool.acquire() as conn:
            yield self.tx_factory(conn, self._outbox(conn))
