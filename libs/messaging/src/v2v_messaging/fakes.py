"""In-memory stand-ins for unit tests of a service layer: an outbox that keeps its events and a unit of
work that hands out a service's fake `Tx` (its repositories in memory). No Postgres, no broker.

    uow = FakeUnitOfWork(lambda outbox: OrderTx.fake(outbox, store))
    await commands.place_order(uow, ...)
    assert [e.type for e in uow.committed] == ["order.submitted.v1"]

A transaction that raises keeps none of its events (`committed` only grows on success); fake
repositories may snapshot and restore their state through the `on_rollback` hook when a test needs it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from v2v_contracts import CloudEvent
from v2v_messaging.handlers import HandlerRegistry
from v2v_messaging.outbox import DEFAULT_MAX_EVENT_BYTES, EventTooLarge
from v2v_messaging.provenance import Rejection, check_event

TxT = TypeVar("TxT")


class FakeOutbox:
    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.added: list[CloudEvent] = []
        self.topics: list[str | None] = []
        self.max_event_bytes = max_event_bytes

    async def add(self, event: CloudEvent, *, topic: str | None = None) -> None:
        size = len(event.to_json())
        if size > self.max_event_bytes:  # as the real outbox: refused at write time
            raise EventTooLarge(size, self.max_event_bytes)
        self.added.append(event)
        self.topics.append(topic)


class FakeUnitOfWork(Generic[TxT]):
    """Hands out `make_tx(outbox)`; events of committed transactions are in `committed`, in order."""

    def __init__(
        self,
        make_tx: Callable[[FakeOutbox], TxT],
        *,
        snapshot: Callable[[], Any] | None = None,
        restore: Callable[[Any], None] | None = None,
    ) -> None:
        self.make_tx = make_tx
        self.committed: list[CloudEvent] = []
        self.commits = 0
        self.rollbacks = 0
        self._snapshot = snapshot
        self._restore = restore

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[TxT]:
        outbox = FakeOutbox()
        saved = self._snapshot() if self._snapshot else None
        try:
            yield self.make_tx(outbox)
        except BaseException:
            self.rollbacks += 1
            if self._restore is not None:
                self._restore(saved)
            raise
        self.commits += 1
        self.committed.extend(outbox.added)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[TxT]:
        yield self.make_tx(FakeOutbox())

    def types(self) -> list[str]:
        return [e.type for e in self.committed]

    def take(self) -> list[CloudEvent]:
        """The committed events so far, forgetting them (for step-by-step tests)."""
        out, self.committed = self.committed, []
        return out


@dataclass(frozen=True)
class FakeDeadLetter:
    topic: str
    event: CloudEvent
    rejection: Rejection


class FakeInbox:
    """Delivers events to a handler registry the way the consumer does: one transaction per event,
    duplicates (same event id) dropped.

    `receive(topic, *events)` also runs the consumer's provenance checks (`v2v_messaging.provenance`) as
    if the events had been read from `topic`: a refused event lands in `dead_letters` with its reason,
    is counted in `rejected` and is never handled. `deliver(*events)` hands them over unchecked."""

    def __init__(self, uow: FakeUnitOfWork[TxT], handlers: HandlerRegistry[TxT]) -> None:
        self.uow = uow
        self.handlers = handlers
        self.seen: set[Any] = set()
        self.ignored: list[str] = []
        self.dead_letters: list[FakeDeadLetter] = []
        self.rejected: dict[str, int] = {}

    async def receive(self, topic: str, *events: CloudEvent) -> None:
        for event in events:
            rejection = check_event(event, topic, self.handlers.model_of(event.type))
            if rejection is not None:
                self.dead_letters.append(FakeDeadLetter(topic, event, rejection))
                self.rejected[rejection.code] = self.rejected.get(rejection.code, 0) + 1
                continue
            await self.deliver(event)

    async def deliver(self, *events: CloudEvent) -> None:
        for event in events:
            if event.id in self.seen:
                continue
            if not self.handlers.handles(event.type):
                self.ignored.append(event.type)
                continue
            async with self.uow.begin() as tx:
                await self.handlers.dispatch(tx, event)
            self.seen.add(event.id)
