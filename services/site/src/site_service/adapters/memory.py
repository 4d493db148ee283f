"""In-memory repositories of the site service and a FakeUnitOfWork built on them, for unit tests of the
service layer: the same methods as the Postgres repositories, the same orderings and filters, no I/O.

    store = MemoryStore()
    uow = fake_uow(store)
    await commands.load_seed(uow)
    await FakeInbox(uow, handlers).deliver(new_event(SlotReservedV1(...)))
    assert uow.types() == ["site.registered.v1", ..., "site.booking_confirmed.v1"]

A transaction that raises leaves the store as it was (snapshot and restore).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any

from site_service.adapters.repository import (
    BookingRepository,
    ManufacturingRepository,
    OrderFactsRepository,
    SignatureStore,
    SiteRepository,
    SiteTx,
    site_row,
)
from site_service.domain.manufacturing import Manufacture, Manufacturing, State
from site_service.domain.registry import Booking, OrderFacts, Site
from v2v_audit import MemoryAuditTrail, Record
from v2v_contracts import Outage, SiteRegisteredV1
from v2v_messaging.fakes import FakeOutbox, FakeUnitOfWork
from v2v_servicekit.signatures import Signature, SignedRecord, Signer


def _now() -> datetime:
    return datetime.now(UTC)


def _mine(site_id: str, tenant: str | None) -> bool:
    """The tenant filter of every query: None sees every site, a site only itself."""
    return tenant is None or site_id == tenant


@dataclass
class _SiteRow:
    entry: SiteRegisteredV1
    api_managed: list[str] = field(default_factory=list)
    updated_at: datetime = field(default_factory=_now)


@dataclass
class _BookingRow:
    booking: Booking
    seq: int  # creation order (created_at)
    origin_trace: dict[str, str]
    status_reason: str | None = None


@dataclass
class _ManufactureRow:
    m: Manufacture
    seq: int
    reason: str | None = None


@dataclass
class MemoryStore:
    """The state of the whole `site` schema, shared by every transaction of one fake unit of work."""

    sites: dict[str, _SiteRow] = field(default_factory=dict)
    bookings: dict[uuid.UUID, _BookingRow] = field(default_factory=dict)
    manufacturing: dict[uuid.UUID, _ManufactureRow] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    audit: list[Record] = field(default_factory=list)  # the audit trail, chained as in Postgres
    orders: dict[uuid.UUID, OrderFacts] = field(default_factory=dict)
    signatures: list[Signature] = field(default_factory=list)
    lots: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def copy(self) -> MemoryStore:
        """An independent store holding the same state (e.g. a seeded network reused by many tests)."""
        sites, bookings, manufacturing, history, audit, orders, signatures = self.snapshot()
        return MemoryStore(
            sites,
            bookings,
            manufacturing,
            history,
            itertools.count(next(self.seq)),
            audit,
            orders,
            signatures,
            itertools.count(next(self.lots)),
        )

    def snapshot(self) -> tuple[Any, ...]:
        """The state as it is (the rows hold immutable values: copying the rows is enough)."""
        return (
            {k: replace(v, api_managed=list(v.api_managed)) for k, v in self.sites.items()},
            {k: replace(v, origin_trace=dict(v.origin_trace)) for k, v in self.bookings.items()},
            {k: replace(v) for k, v in self.manufacturing.items()},
            list(self.history),
            list(self.audit),
            dict(self.orders),
            list(self.signatures),
        )

    def restore(self, saved: tuple[Any, ...]) -> None:
        (
            self.sites,
            self.bookings,
            self.manufacturing,
            self.history,
            self.audit,
            self.orders,
            self.signatures,
        ) = saved

    def booking(self, slot_id: uuid.UUID) -> Booking:
        """The booking of a slot (for assertions)."""
        return next(r.booking for r in self.bookings.values() if r.booking.slot_id == slot_id)

    def arrived(self, booking_id: uuid.UUID) -> bool:
        row = self.bookings.get(booking_id)
        return booking_id in self.manufacturing or (row is not None and row.booking.run is not None)


class MemorySiteRepository(SiteRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def get(self, site_id: str, *, lock: bool = False, tenant: str | None = None) -> Site | None:
        row = self.store.sites.get(site_id) if _mine(site_id, tenant) else None
        return None if row is None else Site(row.entry, frozenset(row.api_managed))

    async def exists(self, site_id: str, *, tenant: str | None = None) -> bool:
        return site_id in self.store.sites and _mine(site_id, tenant)

    async def save(self, entry: SiteRegisteredV1) -> bool:
        current = self.store.sites.get(entry.site_id)
        if current is not None and site_row(current.entry) == site_row(entry):
            return False
        if current is None:
            self.store.sites[entry.site_id] = _SiteRow(entry)
        else:
            current.entry, current.updated_at = entry, _now()
        return True

    async def set_api_managed(self, site_id: str, managed: Iterable[str]) -> None:
        self.store.sites[site_id].api_managed = sorted(managed)

    async def outages(self, site_id: str) -> list[Outage]:
        row = self.store.sites.get(site_id)
        return [] if row is None else list(row.entry.outages)

    def _view(self, row: _SiteRow) -> dict[str, Any]:
        """The row as `SELECT *` gives it."""
        e = row.entry
        return {
            "site_id": e.site_id,
            "name": e.name,
            "country": e.country,
            "region": e.region,
            "timezone": e.timezone,
            "operator": e.operator,
            "manufacturer": e.manufacturer,
            "active": e.active,
            "approvals": [a.model_dump(exclude_none=True) for a in e.approvals],
            "daily_capacity": dict(e.daily_capacity),
            "updated_at": row.updated_at,
            "outages": [o.model_dump(mode="json") for o in e.outages],
            "api_managed": list(row.api_managed),
        }

    async def view(self, site_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        row = self.store.sites.get(site_id) if _mine(site_id, tenant) else None
        return None if row is None else self._view(row)

    async def views(
        self, *, tenant: str | None = None, limit: int = 200, offset: int = 0
    ) -> list[dict[str, Any]]:
        keys = [k for k in sorted(self.store.sites) if _mine(k, tenant)]
        return [self._view(self.store.sites[k]) for k in keys[offset : offset + limit]]


class MemoryBookingRepository(BookingRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def _rows(self) -> list[_BookingRow]:
        return sorted(self.store.bookings.values(), key=lambda r: r.seq)

    async def add(self, booking: Booking, *, origin_trace: dict[str, str]) -> None:
        if any(r.booking.slot_id == booking.slot_id for r in self.store.bookings.values()):
            raise ValueError("bookings.slot_id is unique")
        self.store.bookings[booking.booking_id] = _BookingRow(
            booking, next(self.store.seq), dict(origin_trace)
        )

    async def by_slot(self, slot_id: uuid.UUID, *, lock: bool = False) -> Booking | None:
        return next((r.booking for r in self._rows() if r.booking.slot_id == slot_id), None)

    def _latest(self, order_id: uuid.UUID, site_id: str, statuses: Iterable[str]) -> Booking | None:
        wanted = set(statuses)
        found = [
            r.booking
            for r in self._rows()
            if r.booking.order_id == order_id and r.booking.site_id == site_id and r.booking.status in wanted
        ]
        return found[-1] if found else None

    async def latest_confirmed(
        self, order_id: uuid.UUID, site_id: str, *, tenant: str | None = None
    ) -> Booking | None:
        return self._latest(order_id, site_id, ["confirmed"]) if _mine(site_id, tenant) else None

    async def latest_open(
        self, order_id: uuid.UUID, site_id: str, *, tenant: str | None = None
    ) -> Booking | None:
        return self._latest(order_id, site_id, ["confirmed", "affected"]) if _mine(site_id, tenant) else None

    async def for_order(self, order_id: uuid.UUID) -> list[Booking]:
        return [r.booking for r in self._rows() if r.booking.order_id == order_id]

    async def awaiting_material_in(self, site_id: str, start: date, end: date) -> list[Booking]:
        rows = [
            r
            for r in self._rows()
            if r.booking.site_id == site_id
            and r.booking.status == "confirmed"
            and start <= r.booking.manufacturing_start_date <= end
            and not self.store.arrived(r.booking.booking_id)
        ]
        return [r.booking for r in sorted(rows, key=lambda r: (r.booking.manufacturing_start_date, r.seq))]

    async def confirmed_from(
        self, site_id: str, products: list[str], day: date
    ) -> list[tuple[Booking, bool]]:
        rows = [
            (r, self.store.arrived(r.booking.booking_id))
            for r in self._rows()
            if r.booking.site_id == site_id
            and r.booking.status == "confirmed"
            and r.booking.product_code in products
            and r.booking.manufacturing_start_date >= day
        ]
        rows.sort(
            key=lambda ra: (
                ra[0].booking.product_code or "",
                ra[0].booking.manufacturing_start_date,
                not ra[1],
                ra[0].seq,
            )
        )
        return [(r.booking, arrived) for r, arrived in rows]

    def _set_status(self, booking_id: uuid.UUID, status: str, reason: str) -> None:
        row = self.store.bookings[booking_id]
        row.booking = replace(row.booking, status=status)
        row.status_reason = reason

    async def cancel(self, booking_id: uuid.UUID, reason: str) -> bool:
        row = self.store.bookings.get(booking_id)
        if row is None or row.booking.status == "cancelled":
            return False
        self._set_status(booking_id, "cancelled", reason)
        return True

    async def affect(self, booking_id: uuid.UUID, reason: str) -> bool:
        row = self.store.bookings.get(booking_id)
        if row is None or row.booking.status != "confirmed":
            return False
        self._set_status(booking_id, "affected", reason)
        return True

    async def origin_trace(self, order_id: uuid.UUID) -> dict[str, str] | None:
        found = [r.origin_trace for r in self._rows() if r.booking.order_id == order_id]
        return found[-1] if found else None


class MemoryManufacturingRepository(ManufacturingRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def _rows(self) -> list[_ManufactureRow]:
        return sorted(self.store.manufacturing.values(), key=lambda r: r.seq)

    async def add(
        self, booking: Booking, *, received_at: datetime, reason: str | None, din: str | None = None
    ) -> Manufacture:
        if booking.booking_id in self.store.manufacturing:
            raise ValueError("manufacturing.booking_id is unique")
        m = Manufacture(
            booking_id=booking.booking_id,
            order_id=booking.order_id,
            coi=booking.coi,
            treatment_center_id=booking.treatment_center_id or "",
            site_id=booking.site_id,
            product_code=booking.product_code,
            state=Manufacturing(),
            received_at=received_at,
            din=din,
        )
        self.store.manufacturing[booking.booking_id] = _ManufactureRow(m, next(self.store.seq), reason)
        return m

    async def for_booking(self, booking_id: uuid.UUID) -> Manufacture | None:
        row = self.store.manufacturing.get(booking_id)
        return None if row is None else row.m

    async def next_lot_number(self) -> int:
        return next(self.store.lots)

    async def latest_for_order(self, order_id: uuid.UUID, *, lock: bool = False) -> Manufacture | None:
        found = [r.m for r in self._rows() if r.m.order_id == order_id]
        return found[-1] if found else None

    async def set_qc(
        self, booking_id: uuid.UUID, results: dict[str, Any] | None, coa_reference: str | None
    ) -> None:
        row = self.store.manufacturing[booking_id]
        row.m = replace(row.m, qc_results=results, coa_reference=coa_reference)

    async def latest(
        self, order_id: uuid.UUID, site_id: str, *, lock: bool = False, tenant: str | None = None
    ) -> Manufacture | None:
        found = [
            r.m
            for r in self._rows()
            if r.m.order_id == order_id and r.m.site_id == site_id and _mine(r.m.site_id, tenant)
        ]
        return found[-1] if found else None

    async def for_order(self, order_id: uuid.UUID) -> list[Manufacture]:
        return [r.m for r in self._rows() if r.m.order_id == order_id]

    async def live_at(self, site_id: str, states: Iterable[str]) -> list[Manufacture]:
        wanted = set(states)
        return [r.m for r in self._rows() if r.m.site_id == site_id and r.m.state.state in wanted]

    async def update(self, booking_id: uuid.UUID, state: Manufacturing, reason: str | None) -> None:
        row = self.store.manufacturing[booking_id]
        row.m = replace(row.m, state=state)
        row.reason = reason if reason is not None else row.reason

    async def append_history(
        self,
        m: Manufacture,
        *,
        run: int,
        action: str,
        step: str | None,
        state_before: State,
        state_after: State,
        reason: str | None,
        occurred_at: datetime,
        reference: str | None = None,
        lot: str | None = None,
    ) -> None:
        self.store.history.append(
            {
                "booking_id": m.booking_id,
                "run": run,
                "lot": lot,
                "action": action,
                "step": step,
                "state_before": state_before.value,
                "state_after": state_after.value,
                "reason": reason,
                "reference": reference,
                "occurred_at": occurred_at,
                "recorded_at": _now(),
            }
        )

    async def history(self, booking_id: uuid.UUID) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in h.items() if k != "booking_id"}
            for h in self.store.history
            if h["booking_id"] == booking_id
        ]


class MemoryOrderFactsRepository(OrderFactsRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def get(self, order_id: uuid.UUID) -> OrderFacts | None:
        return self.store.orders.get(order_id)

    async def record_market(
        self, order_id: uuid.UUID, *, regulator: str, order_type: str, country: str, region: str
    ) -> None:
        current = self.store.orders.get(order_id) or OrderFacts(order_id)
        self.store.orders[order_id] = replace(
            current, regulator=regulator, order_type=order_type, country=country, region=region
        )

    async def record_din(self, order_id: uuid.UUID, din: str | None, collection: int) -> bool:
        current = self.store.orders.get(order_id) or OrderFacts(order_id)
        if current.collection is not None and current.collection > collection:
            return False
        self.store.orders[order_id] = replace(current, din=din, collection=collection)
        return True


class MemorySignatureStore(SignatureStore):
    """Signatures as `record_signature` would store them (the server's time: now)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def record(self, signer: Signer, record: SignedRecord) -> Signature:
        if any(s.token_id == signer.token_id for s in self.store.signatures):
            raise ValueError("signatures.token_jti is unique")
        signature = Signature.of(signer, record, _now())
        self.store.signatures.append(signature)
        return signature

    async def of(self, object_type: str, object_id: str) -> list[Signature]:
        return [s for s in self.store.signatures if (s.object_type, s.object_id) == (object_type, object_id)]


def memory_tx(store: MemoryStore, outbox: FakeOutbox) -> SiteTx:
    return SiteTx(
        None,
        outbox,
        sites=MemorySiteRepository(store),
        bookings=MemoryBookingRepository(store),
        manufacturing=MemoryManufacturingRepository(store),
        orders=MemoryOrderFactsRepository(store),
        signatures=MemorySignatureStore(store),
        audit=MemoryAuditTrail(store.audit, "site"),
    )


def fake_uow(store: MemoryStore | None = None) -> FakeUnitOfWork[SiteTx]:
    """A fake unit of work on `store` (a new empty one by default): committed events in `uow.committed`."""
    mem = store if store is not None else MemoryStore()
    return FakeUnitOfWork(lambda outbox: memory_tx(mem, outbox), snapshot=mem.snapshot, restore=mem.restore)
