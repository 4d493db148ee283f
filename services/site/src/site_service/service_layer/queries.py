"""The site service's reads: the registry and one order's manufacture at a site.

`tenant` is the caller's own site when the caller is a site (its MES), else None (QA, admin, ops): the
repositories find nothing of another site, which the API answers with 404.
"""

from __future__ import annotations

import uuid
from typing import Any

from site_service.adapters.repository import SiteTx
from site_service.domain import manufacturing as mfg
from site_service.domain.manufacturing import State
from v2v_contracts.errors import NotFound
from v2v_messaging import AbstractUnitOfWork


async def list_sites(
    uow: AbstractUnitOfWork[SiteTx], *, tenant: str | None = None, limit: int = 200, offset: int = 0
) -> list[dict[str, Any]]:
    async with uow.read() as tx:
        return await tx.sites.views(tenant=tenant, limit=limit, offset=offset)


async def site_view(tx: SiteTx, site_id: str, tenant: str | None = None) -> dict[str, Any]:
    view = await tx.sites.view(site_id, tenant=tenant)
    if view is None:
        raise NotFound("Site", site_id)
    return view


async def get_site(
    uow: AbstractUnitOfWork[SiteTx], site_id: str, *, tenant: str | None = None
) -> dict[str, Any]:
    async with uow.read() as tx:
        return await site_view(tx, site_id, tenant)


async def ensure_site(tx: SiteTx, site_id: str, tenant: str | None = None) -> None:
    if not await tx.sites.exists(site_id, tenant=tenant):
        raise NotFound("Site", site_id)


async def manufacturing_view(
    tx: SiteTx, site_id: str, order_id: uuid.UUID, tenant: str | None = None
) -> dict[str, Any]:
    """The order's latest manufacture at the site (or its booking, awaiting material), with its history."""
    m = await tx.manufacturing.latest(order_id, site_id, tenant=tenant)
    if m is None:
        booking = await tx.bookings.latest_open(order_id, site_id, tenant=tenant)
        if booking is None:
            raise NotFound("Manufacturing", f"{order_id} at {site_id}")
        return {
            "order_id": order_id,
            "site_id": site_id,
            "booking_id": booking.booking_id,
            "product_code": booking.product_code,
            "state": State.AWAITING_MATERIAL.value,
            "run": 0,
            "next_step": None,
            "steps_completed": [],
            "failed_step": None,
            "retained_material": False,
            "received_at": None,
            "history": [],
        }
    s = m.state
    return {
        "order_id": order_id,
        "site_id": site_id,
        "booking_id": m.booking_id,
        "product_code": m.product_code,
        "state": s.state.value,
        "run": s.run,
        "next_step": s.next_step,
        "steps_completed": list(mfg.STEPS[: s.steps_completed]),
        "failed_step": s.failed_step,
        "retained_material": s.retained_material,
        "received_at": m.received_at,
        "history": await tx.manufacturing.history(m.booking_id),
    }


async def get_manufacturing(
    uow: AbstractUnitOfWork[SiteTx], site_id: str, order_id: uuid.UUID, *, tenant: str | None = None
) -> dict[str, Any]:
    async with uow.read() as tx:
        await ensure_site(tx, site_id, tenant)
        return await manufacturing_view(tx, site_id, order_id, tenant)


async def origin_trace(uow: AbstractUnitOfWork[SiteTx], order_id: uuid.UUID) -> dict[str, str] | None:
    """The order's first trace, as remembered with its latest booking (MES reports link to it)."""
    async with uow.read() as tx:
        return await tx.bookings.origin_trace(order_id)
