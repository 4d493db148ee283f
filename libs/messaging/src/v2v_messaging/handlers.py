"""Typed event handlers, registered by event type.

A service declares its handlers once, on a registry:

    handlers = HandlerRegistry[SchedulingTx]()

    @handlers.on(OrderSubmittedV1)
    async def reserve(tx: SchedulingTx, event: OrderSubmittedV1, meta: EventMeta) -> None: ...

The consumer routes each CloudEvent by its `type` to the handler registered for its model; the handler
receives the parsed, validated model (never a dict to parse) and the envelope's metadata. A payload that
does not validate against its model is poison (`PoisonMessage`): it is dead-lettered, never retried. A type
with no handler is recorded and skipped by the consumer.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from v2v_contracts import CloudEvent, EventData

TxT = TypeVar("TxT")
E = TypeVar("E", bound=EventData)


class PoisonMessage(Exception):
    """The message itself is wrong (not a CloudEvent, payload does not match its type): never retried."""


@dataclass(frozen=True)
class EventMeta:
    """The envelope of the event being handled (its payload is the typed model)."""

    id: uuid.UUID
    type: str
    source: str
    time: datetime
    subject: str | None
    coi: str | None
    envelope: CloudEvent  # the whole CloudEvent, for handlers that keep it (parking, forwarding)

    @classmethod
    def of(cls, event: CloudEvent) -> EventMeta:
        return cls(event.id, event.type, event.source, event.time, event.subject, event.coi, event)


TypedHandler = Callable[[TxT, Any, EventMeta], Awaitable[None]]


@dataclass(frozen=True)
class Registration(Generic[TxT]):
    model: type[EventData]
    handler: TypedHandler[TxT]


class HandlerRegistry(Generic[TxT]):
    def __init__(self) -> None:
        self._by_type: dict[str, Registration[TxT]] = {}

    def on(
        self, *models: type[E]
    ) -> Callable[
        [Callable[[TxT, E, EventMeta], Awaitable[None]]], Callable[[TxT, E, EventMeta], Awaitable[None]]
    ]:
        """Register the decorated coroutine for every given event model (one handler per type)."""

        def register(
            fn: Callable[[TxT, E, EventMeta], Awaitable[None]],
        ) -> Callable[[TxT, E, EventMeta], Awaitable[None]]:
            for model in models:
                self.add(model, fn)
            return fn

        return register

    def add(self, model: type[EventData], fn: Callable[[TxT, Any, EventMeta], Awaitable[None]]) -> None:
        if model.TYPE in self._by_type:
            raise ValueError(f"a handler for {model.TYPE} is already registered")
        self._by_type[model.TYPE] = Registration(model, fn)

    def include(self, other: HandlerRegistry[TxT]) -> HandlerRegistry[TxT]:
        for reg in other._by_type.values():
            self.add(reg.model, reg.handler)
        return self

    @property
    def types(self) -> list[str]:
        return sorted(self._by_type)

    def handles(self, event_type: str) -> bool:
        return event_type in self._by_type

    def model_of(self, event_type: str) -> type[EventData] | None:
        """The contract registered for `event_type`, if any."""
        reg = self._by_type.get(event_type)
        return reg.model if reg is not None else None

    def models(self) -> Iterable[type[EventData]]:
        return [r.model for r in self._by_type.values()]

    def parse(self, event: CloudEvent) -> EventData:
        reg = self._by_type[event.type]
        try:
            return reg.model.model_validate(event.data)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) or "data" for e in exc.errors())
            raise PoisonMessage(f"{event.type}: payload does not match its contract ({fields})") from None

    async def dispatch(self, tx: TxT, event: CloudEvent) -> bool:
        """Run the handler for `event` in `tx`; False when no handler is registered for its type."""
        reg = self._by_type.get(event.type)
        if reg is None:
            return False
        await reg.handler(tx, self.parse(event), EventMeta.of(event))
        return True
