"""Reads behind the HTTP API: shipments, their status history, chain of custody and temperature log."""

from __future__ import annotations

import uuid

from logistics_service.adapters.repository import LogisticsTx
from logistics_service.domain.shipment import CustodyEvent, Shipment, StatusChange, TemperatureReading
from v2v_contracts.errors import NotFound
from v2v_messaging import AbstractUnitOfWork

MAX_LISTED = 500


async def shipments(uow: AbstractUnitOfWork[LogisticsTx], order_id: uuid.UUID | None) -> list[Shipment]:
    """Shipments (of one order), oldest first, at most MAX_LISTED."""
    async with uow.read() as tx:
        return await tx.shipments.search(order_id, limit=MAX_LISTED)


async def shipment(
    uow: AbstractUnitOfWork[LogisticsTx], shipment_id: uuid.UUID
) -> tuple[Shipment, list[StatusChange]]:
    """One shipment and its status history; NotFound when there is none."""
    async with uow.read() as tx:
        found = await tx.shipments.get(shipment_id)
        if found is None:
            raise NotFound("Shipment", shipment_id)
        return found, await tx.shipments.history(shipment_id)


async def custody_log(uow: AbstractUnitOfWork[LogisticsTx], shipment_id: uuid.UUID) -> list[CustodyEvent]:
    """The chain of custody of a shipment (empty for an unknown one)."""
    async with uow.read() as tx:
        return await tx.custody.of_shipment(shipment_id)


async def temperature_log(
    uow: AbstractUnitOfWork[LogisticsTx], shipment_id: uuid.UUID
) -> list[TemperatureReading]:
    """Every temperature reading of a shipment, in measurement order; NotFound when there is none."""
    async with uow.read() as tx:
        if not await tx.shipments.exists(shipment_id):
            raise NotFound("Shipment", shipment_id)
        return await tx.readings.of_shipment(shipment_id)
