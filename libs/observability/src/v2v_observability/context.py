"""The order a piece of work is about, carried in a context variable.

`bind_order` sets it for the current task: every log line then carries `order_id`, and every span
started afterwards in that context gets `v2v.order_id` / `v2v.coi` (see OrderAttributesProcessor).
"""

from __future__ import annotations

from contextvars import ContextVar

import structlog

_order: ContextVar[tuple[str | None, str | None]] = ContextVar("v2v_order", default=(None, None))


def bind_order(order_id: object | None, coi: str | None = None) -> None:
    oid = str(order_id) if order_id is not None else None
    _order.set((oid, coi))
    structlog.contextvars.bind_contextvars(order_id=oid)


def current_order() -> tuple[str | None, str | None]:
    return _order.get()
