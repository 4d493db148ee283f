"""What the HTTP API asks of scheduling: reads of the slots and of the waitlist (each on one pooled
connection; scheduling's API changes nothing, the events do), one page at a time and only what the
caller's tenancy lets it see (`Tenancy`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from scheduling_service.adapters.repository import SchedulingTx
from v2v_messaging import AbstractUnitOfWork


@dataclass(frozen=True)
class Tenancy:
    """Whose rows a caller reads: a treatment centre its own orders' (`centre`), a site its own site's
    slots (`site`); `nothing` for a tenant with no rows here (a carrier). Not confined: `Tenancy()`."""

    centre: str | None = None
    site: str | None = None
    nothing: bool = False


EVERYTHING = Tenancy()


async def list_slots(
    uow: AbstractUnitOfWork[SchedulingTx],
    *,
    order_id: uuid.UUID | None = None,
    statuses: list[str] | None = None,
    product_code: str | None = None,
    site_id: str | None = None,
    limit: int = 200,
    offset: int = 0,
    tenancy: Tenancy = EVERYTHING,
) -> list[dict[str, Any]]:
    """Slots, optionally filtered, in booking order: one page."""
    if tenancy.nothing:
        return []
    async with uow.read() as tx:
        return await tx.slots.view(
            order_id,
            statuses,
            product_code,
            site_id,
            limit,
            offset,
            centre=tenancy.centre,
            site=tenancy.site,
        )


async def list_waitlist(
    uow: AbstractUnitOfWork[SchedulingTx], *, limit: int = 200, offset: int = 0, tenancy: Tenancy = EVERYTHING
) -> list[dict[str, Any]]:
    """Orders waiting for a slot, first come first served, with what each waits for: one page. A waiting
    order has no site yet, so a site sees none."""
    if tenancy.nothing or tenancy.site is not None:
        return []
    async with uow.read() as tx:
        return await tx.waitlist.view(limit, offset, centre=tenancy.centre)
