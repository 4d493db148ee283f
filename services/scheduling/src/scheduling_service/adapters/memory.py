"""In-memory repositories (the twins of `repository.py`) and a unit of work on them, for unit tests.

store = SchedulingStore()
uow = fake_uow(store)
await FakeInbox(uow, build_handlers(planning)).deliver(new_event(OrderSubmittedV1(...)))
assert uow.types() == ["scheduling.slot_reserved.v1"]
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from scheduling_service.adapters.repository import (
    HoldRepository,
    OrderRepository,
    ProductLocks,
    SchedulingTx,
    SiteRepository,
    SlotRepository,
    Usage,
    WaitlistRepository,
)
from scheduling_service.domain.selection import Site
from scheduling_service.domain.slots import (
    IN_USE,
    LIVE,
    Hold,
    Slot,
    Waiting,
    WaitingRequest,
    registered_site,
)
from v2v_audit import MemoryAuditTrail, Record
from v2v_contracts import OrderSubmittedV1, RebookRequestedV1, SiteRegisteredV1
from v2v_messaging import EventSink
from v2v_messaging.fakes import FakeOutbox, FakeUnitOfWork


@dataclass
class SlotRow:
    slot: Slot
    created_at: datetime
    updated_at: datetime
    release_reason: str | None = None
    released_at: datetime | None = None


@dataclass
class WaitRow:
    request: WaitingRequest
    reason: str
    enqueued_at: datetime
    priority: int = 0

    @property
    def request_type(self) -> str:
        return self.request.TYPE


@dataclass
class SchedulingStore:
    """What the scheduling schema holds, in memory."""

    sites: dict[str, Site] = field(default_factory=dict)
    slots: dict[uuid.UUID, SlotRow] = field(default_factory=dict)  # in booking order
    waitlist: dict[uuid.UUID, WaitRow] = field(default_factory=dict)
    closed: dict[uuid.UUID, tuple[str, str]] = field(default_factory=dict)  # order -> (status, reason)
    holds: dict[uuid.UUID, Hold] = field(default_factory=dict)  # in creation order
    locked: list[list[str]] = field(default_factory=list)  # every batch of product locks taken, in order
    ticks: int = 0
    audit: list[Record] = field(default_factory=list)  # the audit trail, chained as in Postgres

    def now(self) -> datetime:
        """A clock that moves forward at every call (keeps first-come-first-served deterministic)."""
        self.ticks += 1
        return datetime(2030, 1, 1, tzinfo=UTC) + timedelta(microseconds=self.ticks)

    def snapshot(self) -> Any:
        return copy.deepcopy((self.sites, self.slots, self.waitlist, self.closed, self.audit, self.holds))

    def restore(self, saved: Any) -> None:
        self.sites, self.slots, self.waitlist, self.closed, self.audit, self.holds = saved


class MemoryProductLocks(ProductLocks):
    def __init__(self, store: SchedulingStore) -> None:
        super().__init__()
        self.store = store

    async def _lock(self, products: list[str]) -> None:
        self.store.locked.append(list(products))


class MemorySlots(SlotRepository):
    def __init__(self, store: SchedulingStore) -> None:
        self.store = store

    def _live_row(self, order_id: uuid.UUID) -> SlotRow | None:
        return next(
            (r for r in self.store.slots.values() if r.slot.order_id == order_id and r.slot.status in LIVE),
            None,
        )

    async def live(self, order_id: uuid.UUID) -> Slot | None:
        row = self._live_row(order_id)
        return row.slot if row is not None else None

    async def live_at(self, site_id: str) -> list[Slot]:
        return [
            r.slot for r in self.store.slots.values() if r.slot.site_id == site_id and r.slot.status in LIVE
        ]

    async def usage(self, product: str, since: date) -> Usage:
        used: Usage = {}
        for row in self.store.slots.values():
            s = row.slot
            if s.product_code == product and s.manufacturing_start_date >= since and s.status in IN_USE:
                key = (s.site_id, product, s.manufacturing_start_date)
                used[key] = used.get(key, 0) + 1
        for h in self.store.holds.values():
            if h.product_code == product and h.manufacturing_start_date >= since and h.status == "active":
                key = (h.site_id, product, h.manufacturing_start_date)
                used[key] = used.get(key, 0) + 1
        return used

    async def centre_usage(self, centre: str, product: str, since: date) -> dict[date, int]:
        days = [
            r.slot.manufacturing_start_date
            for r in self.store.slots.values()
            if r.slot.treatment_center_id == centre
            and r.slot.product_code == product
            and r.slot.status in IN_USE
        ] + [
            h.manufacturing_start_date
            for h in self.store.holds.values()
            if h.treatment_center_id == centre and h.product_code == product and h.status == "active"
        ]
        taken: dict[date, int] = {}
        for day in days:
            if day >= since:
                taken[day] = taken.get(day, 0) + 1
        return taken

    async def add(self, slot: Slot) -> None:
        if slot.status in LIVE and self._live_row(slot.order_id) is not None:
            raise ValueError("one live slot per order")  # the unique index of the real schema
        now = self.store.now()
        self.store.slots[slot.slot_id] = SlotRow(slot, now, now)

    def _set(self, row: SlotRow, status: str) -> None:
        row.slot = dataclasses.replace(row.slot, status=status)
        row.updated_at = self.store.now()

    async def release_live(self, order_id: uuid.UUID, reason: str) -> Slot | None:
        row = self._live_row(order_id)
        if row is None:
            return None
        self._set(row, "released")
        row.release_reason, row.released_at = reason, row.updated_at
        return row.slot

    async def confirm(self, slot_id: uuid.UUID) -> bool:
        row = self.store.slots.get(slot_id)
        if row is None or row.slot.status != "held":
            return False
        self._set(row, "confirmed")
        return True

    async def record_collection(self, order_id: uuid.UUID, collected_on: date) -> Slot | None:
        row = self._live_row(order_id)
        if row is None:
            return None
        before = row.slot
        if before.collected_on != collected_on:
            row.slot = dataclasses.replace(before, collected_on=collected_on)
            row.updated_at = self.store.now()
        return before

    async def consume(self, order_id: uuid.UUID, site_id: str) -> uuid.UUID | None:
        row = self._live_row(order_id)
        if row is None or row.slot.site_id != site_id:
            return None
        self._set(row, "consumed")
        return row.slot.slot_id

    async def view(
        self,
        order_id: uuid.UUID | None,
        statuses: list[str] | None,
        product_code: str | None,
        site_id: str | None,
        limit: int,
        offset: int = 0,
        *,
        centre: str | None = None,
        site: str | None = None,
    ) -> list[dict[str, Any]]:
        out = []
        for row in self.store.slots.values():
            s = row.slot
            if (
                (order_id is None or s.order_id == order_id)
                and (statuses is None or s.status in statuses)
                and (product_code is None or s.product_code == product_code)
                and (site_id is None or s.site_id == site_id)
                and (centre is None or s.treatment_center_id == centre)
                and (site is None or s.site_id == site)
            ):
                out.append(
                    {
                        "slot_id": s.slot_id,
                        "order_id": s.order_id,
                        "coi": s.coi,
                        "site_id": s.site_id,
                        "product_code": s.product_code,
                        "manufacturing_start_date": s.manufacturing_start_date,
                        "apheresis_date": s.apheresis_date,
                        "status": s.status,
                        "created_at": row.created_at,
                        "updated_at": row.updated_at,
                        "treatment_center_id": s.treatment_center_id,
                        "reserved_reason": s.reserved_reason,
                        "release_reason": row.release_reason,
                        "released_at": row.released_at,
                    }
                )
        return out[offset : offset + limit]


class MemoryWaitlist(WaitlistRepository):
    def __init__(self, store: SchedulingStore) -> None:
        self.store = store

    async def add(self, request: OrderSubmittedV1, reason: str) -> bool:
        if request.order_id in self.store.waitlist:
            return False
        self.store.waitlist[request.order_id] = WaitRow(request, reason, self.store.now())
        return True

    async def put(self, request: RebookRequestedV1, reason: str, priority: int = 0) -> None:
        row = self.store.waitlist.get(request.order_id)
        enqueued = row.enqueued_at if row is not None else self.store.now()
        kept = max(priority, row.priority) if row is not None else priority
        self.store.waitlist[request.order_id] = WaitRow(request, reason, enqueued, kept)

    async def set_priority(self, order_id: uuid.UUID, priority: int) -> int | None:
        row = self.store.waitlist.get(order_id)
        if row is None:
            return None
        old, row.priority = row.priority, priority
        return old

    async def remove(self, order_id: uuid.UUID) -> bool:
        return self.store.waitlist.pop(order_id, None) is not None

    async def waiting(self, products: list[str]) -> list[Waiting]:
        rows = sorted(
            (
                r
                for oid, r in self.store.waitlist.items()
                if r.request.product_code in products and oid not in self.store.closed
            ),
            key=lambda r: (-r.priority, r.enqueued_at, r.request.order_id),
        )
        return [Waiting(r.request, r.reason, r.priority) for r in rows]

    async def set_reason(self, order_id: uuid.UUID, reason: str) -> None:
        row = self.store.waitlist.get(order_id)
        if row is not None:
            row.reason = reason

    async def view(
        self, limit: int = 200, offset: int = 0, *, centre: str | None = None
    ) -> list[dict[str, Any]]:
        rows = sorted(
            (
                r
                for r in self.store.waitlist.values()
                if centre is None or r.request.treatment_center_id == centre
            ),
            key=lambda r: (-r.priority, r.enqueued_at, r.request.order_id),
        )[offset : offset + limit]
        out = []
        for r in rows:
            rebook = r.request if isinstance(r.request, RebookRequestedV1) else None
            out.append(
                {
                    "order_id": r.request.order_id,
                    "product_code": r.request.product_code,
                    "apheresis_date": rebook.apheresis_date
                    if rebook is not None
                    else r.request.requested_apheresis_date,  # type: ignore[union-attr]
                    "reason": r.reason,
                    "request_type": r.request_type,
                    "exclude_site_id": rebook.exclude_site_id if rebook is not None else None,
                    "rebook_kind": rebook.kind if rebook is not None else None,
                    "enqueued_at": r.enqueued_at,
                    "priority": r.priority,
                }
            )
        return out


class MemoryHolds(HoldRepository):
    def __init__(self, store: SchedulingStore) -> None:
        self.store = store

    async def add(self, hold: Hold) -> None:
        self.store.holds[hold.hold_id] = hold

    async def get(self, hold_id: uuid.UUID, *, centre: str | None = None) -> Hold | None:
        hold = self.store.holds.get(hold_id)
        if hold is None or (centre is not None and hold.treatment_center_id != centre):
            return None
        return hold

    async def close(self, hold_id: uuid.UUID, status: str, order_id: uuid.UUID | None = None) -> Hold | None:
        hold = self.store.holds.get(hold_id)
        if hold is None or hold.status != "active":
            return None
        hold = dataclasses.replace(hold, status=status, order_id=order_id or hold.order_id)
        self.store.holds[hold_id] = hold
        return hold

    async def due(self, now: datetime, limit: int) -> list[Hold]:
        due = [h for h in self.store.holds.values() if h.status == "active" and h.expires_at <= now]
        return sorted(due, key=lambda h: (h.expires_at, h.hold_id))[:limit]


class MemorySites(SiteRepository):
    def __init__(self, store: SchedulingStore) -> None:
        self.store = store

    async def all(self) -> list[Site]:
        return list(self.store.sites.values())

    async def get(self, site_id: str) -> Site | None:
        return self.store.sites.get(site_id)

    async def upsert(self, site: SiteRegisteredV1) -> None:
        self.store.sites[site.site_id] = registered_site(site)


class MemoryOrders(OrderRepository):
    def __init__(self, store: SchedulingStore) -> None:
        self.store = store

    async def closed(self, order_id: uuid.UUID) -> str | None:
        entry = self.store.closed.get(order_id)
        return entry[0] if entry is not None else None

    async def close(self, order_id: uuid.UUID, status: str, reason: str) -> None:
        self.store.closed.setdefault(order_id, (status, reason))

    async def products(self, order_id: uuid.UUID) -> set[str]:
        live = {
            r.slot.product_code
            for r in self.store.slots.values()
            if r.slot.order_id == order_id and r.slot.status in LIVE
        }
        waiting = self.store.waitlist.get(order_id)
        return live | ({waiting.request.product_code} if waiting is not None else set())


def memory_tx(store: SchedulingStore, outbox: EventSink) -> SchedulingTx:
    return SchedulingTx(
        None,
        outbox,
        slots=MemorySlots(store),
        waitlist=MemoryWaitlist(store),
        sites=MemorySites(store),
        orders=MemoryOrders(store),
        locks=MemoryProductLocks(store),
        holds=MemoryHolds(store),
        audit=MemoryAuditTrail(store.audit, "scheduling"),
    )


def fake_uow(store: SchedulingStore | None = None) -> FakeUnitOfWork[SchedulingTx]:
    """A unit of work on the in-memory store; a transaction that raises leaves the store as it was."""
    store = store if store is not None else SchedulingStore()

    def make_tx(outbox: FakeOutbox) -> SchedulingTx:
        return memory_tx(store, outbox)

    return FakeUnitOfWork(make_tx, snapshot=store.snapshot, restore=store.restore)
