"""Reads behind the HTTP API: shipments, their status history, chain of custody and temperature log.

Each read takes the caller's `Tenant` (None: not confined): a shipment outside it is NotFound, exactly
like one that does not exist. Lists are pages: at most MAX_PAGE rows from an offset of at most MAX_OFFSET.
"""

from __future__ import annotations

import uuid
from typing import Final

from logistics_service.adapters.repository import LogisticsTx
from logistics_service.domain.carriers import Tenant
from logistics_service.domain.shipment import CustodyEvent, Shipment, StatusChange, TemperatureReading
from v2v_contracts.errors import NotFound
from v2v_messaging import AbstractUnitOfWork

MAX_PAGE: Final = 200
DEFAULT_PAGE: Final = 100
MAX_OFFSET: Final = 10_000


def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:
        raise ValueError(f"page out of bounds: limit {limit}, offset {offset}")


async def shipments(
    uow: AbstractUnitOfWork[LogisticsTx],
    order_id: uuid.UUID | None,
    *,
    tenant: Tenant | None = None,
    limit: int = DEFAULT_PAGE,
    offset: int = 0,
) -> list[Shipment]:
    """The shipments the tenant may see (of one order), oldest first: one page."""
    _check_page(limit, offset)
    async with uow.read() as tx:
        return await tx.shipments.search(order_id, tenant=tenant, limit=limit, offset=offset)


async def shipment(
    uow: AbstractUnitOfWork[LogisticsTx], shipment_id: uuid.UUID, *, tenant: Tenant | None = None
) -> tuple[Shipment, list[StatusChange]]:
    """One shipment and its status history; NotFound when there is none the tenant may see."""
    async with uow.read() as tx:
        found = await tx.shipments.get(shipment_id, tenant=tenant)
        if found is None:
            raise NotFound("Shipment", shipment_id)
        return found, await tx.shipments.history(shipment_id)


async def custody_log(
    uow: AbstractUnitOfWork[LogisticsTx],
    shipment_id: uuid.UUID,
    *,
    tenant: Tenant | None = None,
    limit: int = MAX_PAGE,
    offset: int = 0,
) -> list[CustodyEvent]:
    """The chain of custody of a shipment (one page); NotFound when there is none the tenant may see."""
    _check_page(limit, offset)
    async with uow.read() as tx:
        if not await tx.shipments.exists(shipment_id, tenant=tenant):
            raise NotFound("Shipment", shipment_id)
        return await tx.custody.of_shipment(shipment_id, limit=limit, offset=offset)


async def temperature_log(
    uow: AbstractUnitOfWork[LogisticsTx],
    shipment_id: uuid.UUID,
    *,
    tenant: Tenant | None = None,
    limit: int = MAX_PAGE,
    offset: int = 0,
) -> list[TemperatureReading]:
    """The temperature readings of a shipment in measurement order (one page); NotFound when there is
    none the tenant may see."""
    _check_page(limit, offset)
    async with uow.read() as tx:
        if not await tx.shipments.exists(shipment_id, tenant=tenant):
            raise NotFound("Shipment", shipment_id)
        return await tx.readings.of_shipment(shipment_id, limit=limit, offset=offset)
