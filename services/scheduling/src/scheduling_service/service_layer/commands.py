"""What the HTTP API asks of scheduling: reads of the slots and of the waitlist (each on one pooled
connection; scheduling's API changes nothing, the events do)."""

from __future__ import annotations

import uuid
from typing import Any

from scheduling_service.adapters.repository import SchedulingTx
from v2v_messaging import AbstractUnitOfWork


async def list_slots(
    uow: AbstractUnitOfWork[SchedulingTx],
    *,
    order_id: uuid.UUID | None = None,
    statuses: list[str] | None = None,
    product_code: str | None = None,
    site_id: str | None = None,
    limit: int = 500,
) -> list[dict[str, Any]]:
    """Slots, optionally filtered, in booking order."""
    async with uow.read() as tx:
        return await tx.slots.view(order_id, statuses, product_code, site_id, limit)


async def list_waitlist(uow: AbstractUnitOfWork[SchedulingTx]) -> list[dict[str, Any]]:
    """Orders waiting for a slot, first come first served, with what each waits for."""
    async with uow.read() as tx:
        return await tx.waitlist.view()
