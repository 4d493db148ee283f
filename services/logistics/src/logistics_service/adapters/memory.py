"""In-memory repositories of the logistics service and a `FakeUnitOfWork` on them, for unit tests.

They behave like the Postgres ones where the service layer can tell: a loaded shipment is a copy (changes
count only once saved), a transaction that raises leaves the store as it was, ids grow, and the partial
unique indexes of the migrations (one live shipment per (order, leg), one live outbound per run) hold.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from logistics_service.adapters.repository import (
    CustodyRepository,
    EndedOrderRepository,
    LocationKind,
    LogisticsTx,
    OrderProductRepository,
    ReadingRepository,
    RegionRepository,
    ShipmentRepository,
)
from logistics_service.domain.carriers import Tenant
from logistics_service.domain.shipment import (
    CANCELLED,
    COMPROMISED,
    CustodyEvent,
    Leg,
    Shipment,
    StatusChange,
    TemperatureReading,
    holds_lane,
)
from v2v_audit import MemoryAuditTrail, Record
from v2v_messaging import EventSink
from v2v_messaging.fakes import FakeUnitOfWork


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class MemoryStore:
    """The logistics schema in memory: what the repositories of every fake transaction share."""

    shipments: dict[uuid.UUID, Shipment] = field(default_factory=dict)  # in insertion (created) order
    status_log: list[tuple[uuid.UUID, StatusChange]] = field(default_factory=list)
    custody: list[CustodyEvent] = field(default_factory=list)
    readings: list[TemperatureReading] = field(default_factory=list)
    ended_orders: dict[uuid.UUID, tuple[str, str]] = field(default_factory=dict)
    regions: dict[str, tuple[LocationKind, str, datetime]] = field(default_factory=dict)
    order_products: dict[uuid.UUID, tuple[str, datetime]] = field(default_factory=dict)
    audit: list[Record] = field(default_factory=list)  # the audit trail, chained as in Postgres
    locked_orders: list[uuid.UUID] = field(default_factory=list)  # serialise_order calls, for tests

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def restore(self, saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            setattr(self, name, value)


class MemoryShipments(ShipmentRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def serialise_order(self, order_id: uuid.UUID) -> None:
        self.store.locked_orders.append(order_id)

    async def get(
        self, shipment_id: uuid.UUID, *, lock: bool = False, tenant: Tenant | None = None
    ) -> Shipment | None:
        found = self.store.shipments.get(shipment_id)
        if found is None or (tenant is not None and not tenant.admits(found)):
            return None
        return copy.deepcopy(found)

    async def of_order(
        self, order_id: uuid.UUID, *, leg: Leg | None = None, lock: bool = False
    ) -> list[Shipment]:
        return [
            copy.deepcopy(s)
            for s in self.store.shipments.values()
            if s.order_id == order_id and (leg is None or s.leg == leg)
        ]

    async def search(
        self,
        order_id: uuid.UUID | None = None,
        *,
        tenant: Tenant | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Shipment]:
        found = [
            s
            for s in self.store.shipments.values()
            if (order_id is None or s.order_id == order_id) and (tenant is None or tenant.admits(s))
        ]
        return copy.deepcopy(found[offset : offset + limit])

    async def exists(self, shipment_id: uuid.UUID, *, tenant: Tenant | None = None) -> bool:
        return await self.get(shipment_id, tenant=tenant) is not None

    async def add(self, shipment: Shipment) -> None:
        if shipment.shipment_id in self.store.shipments:
            raise ValueError(f"duplicate shipment {shipment.shipment_id}")
        now = _now()
        self._check_unique(shipment)
        self._log(shipment, now)
        shipment.saved()
        self.store.shipments[shipment.shipment_id] = dataclasses.replace(
            copy.deepcopy(shipment), created_at=now, updated_at=now
        )

    async def save(self, shipment: Shipment) -> None:
        if not shipment.dirty and not shipment.pending:
            return
        if shipment.shipment_id not in self.store.shipments:
            raise ValueError(f"no shipment {shipment.shipment_id} to save")
        now = _now()
        self._check_unique(shipment)
        self._log(shipment, now)
        shipment.saved()
        stored = self.store.shipments[shipment.shipment_id]
        for name in (
            "status",
            "status_reason",
            "ready_for_pickup_at",
            "excursion_at",
            "held_from_status",
            "quarantine_decision",
            "picked_up_at",
            "delivered_at",
            "excursion_minutes",
            "din",
            "destination",
            "booking_id",
        ):
            setattr(stored, name, getattr(shipment, name))
        stored.updated_at = now

    def _check_unique(self, shipment: Shipment) -> None:
        """The partial unique indexes of migrations 0003 and 0004."""
        for other in self.store.shipments.values():
            if other.shipment_id == shipment.shipment_id or other.order_id != shipment.order_id:
                continue
            if other.leg == shipment.leg and holds_lane(other.status) and holds_lane(shipment.status):
                raise ValueError("unique violation: shipments_one_live_leg_per_order")
            live = {CANCELLED, COMPROMISED}
            if (
                shipment.leg == other.leg == "outbound_product"
                and shipment.run is not None
                and shipment.run == other.run
                and other.status not in live
                and shipment.status not in live
            ):
                raise ValueError("unique violation: shipments_one_live_outbound_per_run")

    def _log(self, shipment: Shipment, now: datetime) -> None:
        for change in shipment.pending:
            self.store.status_log.append((shipment.shipment_id, dataclasses.replace(change, changed_at=now)))

    async def history(self, shipment_id: uuid.UUID) -> list[StatusChange]:
        return [change for sid, change in self.store.status_log if sid == shipment_id]


class MemoryCustody(CustodyRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(self, event: CustodyEvent) -> int:
        if event.shipment_id not in self.store.shipments:
            raise ValueError("foreign key violation: custody_events.shipment_id")
        new_id = len(self.store.custody) + 1
        self.store.custody.append(dataclasses.replace(event, id=new_id, recorded_at=_now()))
        return new_id

    async def of_shipment(
        self, shipment_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
    ) -> list[CustodyEvent]:
        found = [e for e in self.store.custody if e.shipment_id == shipment_id]
        ordered = sorted(found, key=lambda e: (e.occurred_at, e.id or 0))
        return ordered[offset : None if limit is None else offset + limit]


class MemoryReadings(ReadingRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(self, reading: TemperatureReading) -> int:
        if reading.shipment_id not in self.store.shipments:
            raise ValueError("foreign key violation: temperature_readings.shipment_id")
        new_id = len(self.store.readings) + 1
        self.store.readings.append(dataclasses.replace(reading, id=new_id, recorded_at=_now()))
        return new_id

    async def of_shipment(
        self, shipment_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
    ) -> list[TemperatureReading]:
        found = [r for r in self.store.readings if r.shipment_id == shipment_id]
        ordered = sorted(found, key=lambda r: (r.measured_at, r.id or 0))
        return ordered[offset : None if limit is None else offset + limit]


class MemoryEndedOrders(EndedOrderRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(self, order_id: uuid.UUID, outcome: str, reason: str) -> None:
        self.store.ended_orders.setdefault(order_id, (outcome, reason))

    async def ended(self, order_id: uuid.UUID) -> bool:
        return order_id in self.store.ended_orders


class MemoryRegions(RegionRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def remember(self, location_id: str, kind: LocationKind, region: str, as_of: datetime) -> None:
        known = self.store.regions.get(location_id)
        if known is None or known[2] <= as_of:
            self.store.regions[location_id] = (kind, region, as_of)

    async def region_of(self, location_id: str) -> str | None:
        known = self.store.regions.get(location_id)
        return None if known is None else known[1]


class MemoryOrderProducts(OrderProductRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def remember(self, order_id: uuid.UUID, product_code: str, as_of: datetime) -> None:
        known = self.store.order_products.get(order_id)
        if known is None or known[1] <= as_of:
            self.store.order_products[order_id] = (product_code, as_of)

    async def product_of(self, order_id: uuid.UUID) -> str | None:
        known = self.store.order_products.get(order_id)
        return None if known is None else known[0]


def memory_tx(store: MemoryStore, outbox: EventSink) -> LogisticsTx:
    return LogisticsTx(
        None,
        outbox,
        shipments=MemoryShipments(store),
        custody=MemoryCustody(store),
        readings=MemoryReadings(store),
        ended_orders=MemoryEndedOrders(store),
        regions=MemoryRegions(store),
        order_products=MemoryOrderProducts(store),
        audit=MemoryAuditTrail(store.audit, "logistics"),
    )


def fake_uow(store: MemoryStore | None = None) -> tuple[FakeUnitOfWork[LogisticsTx], MemoryStore]:
    """A unit of work on an in-memory store (a new one unless given); a transaction that raises rolls
    the store back."""
    store = store or MemoryStore()
    uow = FakeUnitOfWork(
        lambda outbox: memory_tx(store, outbox),
        snapshot=store.snapshot,
        restore=store.restore,
    )
    return uow, store
