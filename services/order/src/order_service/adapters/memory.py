"""In-memory repositories of the order service and a `FakeUnitOfWork` over them, for unit tests.

    store = MemoryStore.with_reference_data()
    uow = fake_uow(store)
    order_id = await commands.place_order(uow, ...)

A transaction that raises leaves the store as it was (the fake unit of work snapshots it).
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from order_service.adapters.repository import (
    NOTIFY_WITHIN,
    ORDER_COLUMNS,
    SCHEMA,
    AuditLogRepository,
    CatalogueRepository,
    CollectionRepository,
    DecisionRepository,
    Intake,
    MaterialDispositionRepository,
    NetworkRepository,
    OrderHistory,
    OrderRepository,
    OrderTx,
    ParkedFactRepository,
    SignatureLog,
    TaskRepository,
    TimelineRepository,
    read_centres,
)
from order_service.domain.coi import make_coi
from order_service.domain.market import Approval
from order_service.domain.records import (
    AuthorityTask,
    Centre,
    MaterialDisposition,
    OrderRecord,
    TimelineEntry,
    open_order_exists,
)
from v2v_audit import MemoryAuditTrail, Record
from v2v_contracts import CloudEvent
from v2v_contracts.reference import load_products
from v2v_messaging.fakes import FakeOutbox, FakeUnitOfWork
from v2v_servicekit.signatures import (
    Signature,
    SignatureCheck,
    SignedRecord,
    Signer,
)


@dataclass
class NetworkSite:
    active: bool
    approvals: set[Approval]
    as_of: datetime


@dataclass
class MemoryStore:
    """Everything the repositories keep, in one place (so a failed transaction can be undone)."""

    orders: dict[uuid.UUID, OrderRecord] = field(default_factory=dict)
    coi_sequences: dict[int, int] = field(default_factory=dict)
    timeline: list[TimelineEntry] = field(default_factory=list)
    parked: dict[int, tuple[uuid.UUID, CloudEvent]] = field(default_factory=dict)
    parked_ids: int = 0
    centres: dict[str, Centre] = field(default_factory=dict)
    products: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    sites: dict[str, NetworkSite] = field(default_factory=dict)
    audit: list[Record] = field(default_factory=list)  # the audit trail, chained as in Postgres
    placements: dict[tuple[str, str], uuid.UUID] = field(default_factory=dict)  # (client, key) -> order
    collections: dict[tuple[uuid.UUID, int], tuple[str, datetime]] = field(default_factory=dict)
    tasks: dict[uuid.UUID, AuthorityTask] = field(default_factory=dict)
    signatures: list[Signature] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    materials: list[MaterialDisposition] = field(default_factory=list)

    @classmethod
    def with_reference_data(cls) -> MemoryStore:
        """The seeded centres and the shared product catalogue, as the service loads them at start."""
        store = cls()
        store.centres = {c.id: c for c in read_centres()}
        store.products = {p.code: (p.name, p.rules()) for p in load_products()}
        return store


class MemoryOrders(OrderRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(
        self,
        *,
        order_id: uuid.UUID,
        facility_id: str,
        year: int,
        treatment_center_id: str,
        product_code: str,
        order_type: str,
        patient_ref: str,
        requested_apheresis_date: date,
        status: str,
        first_trace: dict[str, str],
        placement: tuple[str, str] | None = None,
        indication: str | None = None,
        weight_kg: float | None = None,
    ) -> str:
        if placement is not None and placement in self.store.placements:
            raise ValueError("duplicate placement (unique index)")
        if order_id in self.store.orders:
            raise ValueError("duplicate order id")
        if treatment_center_id not in self.store.centres or product_code not in self.store.products:
            raise ValueError("unknown centre or product (foreign key)")
        if any(  # the partial unique index of migration 0006
            o.is_open()
            and (o.treatment_center_id, o.patient_ref, o.product_code)
            == (treatment_center_id, patient_ref, product_code)
            for o in self.store.orders.values()
        ):
            raise open_order_exists()
        coi = make_coi(facility_id, year, await self.next_coi_sequence(year))
        if any(o.coi == coi for o in self.store.orders.values()):
            raise ValueError("duplicate COI")
        now = datetime.now(UTC)
        self.store.orders[order_id] = OrderRecord(
            order_id=order_id,
            coi=coi,
            treatment_center_id=treatment_center_id,
            product_code=product_code,
            order_type=order_type,
            patient_ref=patient_ref,
            requested_apheresis_date=requested_apheresis_date,
            status=status,
            created_at=now,
            updated_at=now,
            first_trace=dict(first_trace),
            indication=indication,
            weight_kg=weight_kg,
        )
        if placement is not None:
            self.store.placements[placement] = order_id
        return coi

    async def by_placement(self, placed_by: str, key: str) -> uuid.UUID | None:
        return self.store.placements.get((placed_by, key))

    async def get(
        self, order_id: uuid.UUID, *, lock: bool = False, centre: str | None = None
    ) -> OrderRecord | None:
        order = self.store.orders.get(order_id)
        if order is None or (centre is not None and order.treatment_center_id != centre):
            return None
        return order

    async def update(self, order_id: uuid.UUID, **fields: Any) -> None:
        if not fields:
            return
        unknown = set(fields) - ORDER_COLUMNS
        if unknown:
            raise ValueError(f"not order columns: {sorted(unknown)}")
        order = self.store.orders[order_id]
        self.store.orders[order_id] = dataclasses.replace(
            order, **fields, updated_at=datetime.now(UTC), version=order.version + 1
        )

    async def page(
        self, *, tenant: str | None, centre: str | None, limit: int, offset: int
    ) -> tuple[list[OrderRecord], int]:
        found = sorted(
            (
                o
                for o in self.store.orders.values()
                if (tenant is None or o.treatment_center_id == tenant)
                and (centre is None or o.treatment_center_id == centre)
            ),
            key=lambda o: (o.created_at, o.order_id),
        )
        return found[offset : offset + limit], len(found)

    async def next_coi_sequence(self, year: int) -> int:
        self.store.coi_sequences[year] = self.store.coi_sequences.get(year, 0) + 1
        return self.store.coi_sequences[year]

    async def intake(
        self,
        centre_id: str,
        product_code: str,
        order_type: str,
        placement: tuple[str, str] | None,
    ) -> Intake:
        catalogue, network = MemoryCatalogue(self.store), MemoryNetwork(self.store)
        centre = await catalogue.centre(centre_id)
        placed = await self.by_placement(*placement) if placement is not None else None
        has_product = await catalogue.has_product(product_code)
        known = await network.known()
        served = centre is not None and await network.serves(
            Approval(centre.regulator, order_type, product_code)
        )
        return Intake(
            placed=placed, centre=centre, has_product=has_product, network_known=known, served=served
        )

    async def get_with_centre(
        self, order_id: uuid.UUID, *, centre: str | None = None
    ) -> tuple[OrderRecord, Centre | None] | None:
        order = await self.get(order_id, lock=True, centre=centre)
        if order is None:
            return None
        found = await MemoryCatalogue(self.store).centre(order.treatment_center_id, certified_only=False)
        return order, found

    async def record(self, order_id: uuid.UUID, fields: dict[str, Any], entry: TimelineEntry) -> bool:
        if entry.order_id != order_id:
            raise ValueError("a timeline entry of another order")
        await self.update(order_id, **fields)
        await MemoryTimeline(self.store).add(entry)
        return bool(await MemoryParkedFacts(self.store).of(order_id))

    async def history(self, order_id: uuid.UUID, *, centre: str | None = None) -> OrderHistory | None:
        order = await self.get(order_id, centre=centre)
        if order is None:
            return None
        found = await MemoryCatalogue(self.store).centre(order.treatment_center_id, certified_only=False)
        return OrderHistory(
            order=order,
            region=found.region if found is not None else None,
            timeline=await MemoryTimeline(self.store).of(order_id),
            collections=await MemoryCollections(self.store).of(order_id),
            materials=await MemoryMaterialDispositions(self.store).of_order(order_id),
            tasks=await MemoryTasks(self.store).of_order(order_id),
            decisions=await MemoryDecisions(self.store).of_order(order_id),
        )


class MemoryTimeline(TimelineRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(self, entry: TimelineEntry) -> None:
        if any(e.order_id == entry.order_id and e.event_id == entry.event_id for e in self.store.timeline):
            return
        self.store.timeline.append(entry)

    async def settle(
        self,
        order_id: uuid.UUID,
        event_id: uuid.UUID,
        *,
        status_before: str,
        status_after: str,
        reason: str,
    ) -> None:
        self.store.timeline = [
            dataclasses.replace(e, status_before=status_before, status_after=status_after, reason=reason)
            if e.order_id == order_id and e.event_id == event_id
            else e
            for e in self.store.timeline
        ]

    async def of(self, order_id: uuid.UUID) -> list[TimelineEntry]:
        mine = [(e.occurred_at, i, e) for i, e in enumerate(self.store.timeline) if e.order_id == order_id]
        return [e for _, _, e in sorted(mine, key=lambda t: (t[0], t[1]))]


class MemoryParkedFacts(ParkedFactRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def park(self, order_id: uuid.UUID, event: CloudEvent) -> None:
        if any(o == order_id and e.id == event.id for o, e in self.store.parked.values()):
            return
        self.store.parked_ids += 1
        self.store.parked[self.store.parked_ids] = (order_id, event)

    async def of(self, order_id: uuid.UUID) -> list[tuple[int, CloudEvent]]:
        return [(i, e) for i, (o, e) in sorted(self.store.parked.items()) if o == order_id]

    async def drop(self, parked_id: int) -> None:
        self.store.parked.pop(parked_id, None)

    async def drop_all(self, order_id: uuid.UUID) -> None:
        self.store.parked = {i: (o, e) for i, (o, e) in self.store.parked.items() if o != order_id}


class MemoryCatalogue(CatalogueRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def centre(self, centre_id: str, *, certified_only: bool = True) -> Centre | None:
        centre = self.store.centres.get(centre_id)
        if centre is None or (certified_only and not centre.certified):
            return None
        return centre

    async def centres(self) -> list[Centre]:
        return [self.store.centres[k] for k in sorted(self.store.centres)]

    async def has_product(self, code: str) -> bool:
        return code in self.store.products

    async def products(self) -> list[dict[str, Any]]:
        return [
            {"code": code, "name": name, **attrs}
            for code, (name, attrs) in sorted(self.store.products.items())
        ]

    async def save_centres(self, centres: Iterable[Centre]) -> None:
        for c in centres:
            old = self.store.centres.get(c.id)
            self.store.centres[c.id] = dataclasses.replace(c, certified=old.certified if old else True)

    async def save_products(self, products: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
        for code, name, attrs in products:
            self.store.products[code] = (name, dict(attrs))


class MemoryNetwork(NetworkRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def replace_site(
        self, site_id: str, *, active: bool, approvals: Iterable[Approval], as_of: datetime
    ) -> bool:
        old = self.store.sites.get(site_id)
        if old is not None and old.as_of > as_of:
            return False
        self.store.sites[site_id] = NetworkSite(active, set(approvals), as_of)
        return True

    async def known(self) -> bool:
        return bool(self.store.sites)

    async def serves(self, approval: Approval) -> bool:
        return any(s.active and approval in s.approvals for s in self.store.sites.values())


class MemoryAuditLog(AuditLogRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def of_order(self, order_id: uuid.UUID, *, limit: int, offset: int) -> tuple[list[Record], int]:
        mine = [r for r in self.store.audit if (r.object_type, r.object_id) == ("order", str(order_id))]
        return mine[offset : offset + limit], len(mine)


class MemoryCollections(CollectionRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(self, order_id: uuid.UUID, collection: int, din: str, collected_at: datetime) -> None:
        if (order_id, collection) in self.store.collections or any(
            d == din for d, _ in self.store.collections.values()
        ):
            raise ValueError("duplicate collection or DIN (unique)")
        self.store.collections[(order_id, collection)] = (din, collected_at)

    async def of(self, order_id: uuid.UUID) -> list[dict[str, Any]]:
        return [
            {"collection": n, "din": din, "collected_at": at}
            for (o, n), (din, at) in sorted(self.store.collections.items(), key=lambda kv: kv[0][1])
            if o == order_id
        ]


class MemoryTasks(TaskRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def open_notification(
        self, order_id: uuid.UUID, *, regulator: str, cause: str, run: int
    ) -> uuid.UUID:
        for t in self.store.tasks.values():
            if (t.order_id, t.kind, t.run) == (order_id, "authority_notification", run):
                return t.task_id
        task = AuthorityTask(
            task_id=uuid.uuid4(),
            order_id=order_id,
            kind="authority_notification",
            regulator=regulator,
            cause=cause,
            run=run,
            created_at=datetime.now(UTC),
        )
        self.store.tasks[task.task_id] = task
        return task.task_id

    async def administered(self, order_id: uuid.UUID, at: datetime) -> list[uuid.UUID]:
        due = [
            t
            for t in self.store.tasks.values()
            if t.order_id == order_id and t.state == "open" and not t.due_at
        ]
        for t in due:
            self.store.tasks[t.task_id] = dataclasses.replace(
                t, administered_at=at, due_at=at + NOTIFY_WITHIN
            )
        return [t.task_id for t in due]

    async def get(self, task_id: uuid.UUID, *, lock: bool = False) -> AuthorityTask | None:
        return self.store.tasks.get(task_id)

    async def of_order(self, order_id: uuid.UUID) -> list[AuthorityTask]:
        return sorted(
            (t for t in self.store.tasks.values() if t.order_id == order_id),
            key=lambda t: (t.created_at, t.task_id),
        )

    async def page(
        self, *, state: str | None, overdue_at: datetime | None, limit: int, offset: int
    ) -> tuple[list[AuthorityTask], int]:
        found = sorted(
            (
                t
                for t in self.store.tasks.values()
                if (state is None or t.state == state) and (overdue_at is None or t.overdue(overdue_at))
            ),
            key=lambda t: (t.due_at is None, t.due_at or t.created_at, t.created_at, t.task_id),
        )
        return found[offset : offset + limit], len(found)

    async def complete(self, task_id: uuid.UUID, *, by: str, reference: str, at: datetime) -> None:
        t = self.store.tasks[task_id]
        self.store.tasks[task_id] = dataclasses.replace(
            t, state="done", completed_at=at, completed_by=by, reference=reference
        )


class MemorySignatures(SignatureLog):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def record(self, signer: Signer, record: SignedRecord) -> Signature:
        if any(s.token_id == signer.token_id for s in self.store.signatures):
            raise ValueError("signing token used twice (unique)")
        signature = Signature.of(signer, record, datetime.now(UTC))
        self.store.signatures.append(signature)
        return signature

    async def of(self, object_type: str, object_id: str, meaning: str | None = None) -> list[Signature]:
        return [
            s
            for s in self.store.signatures
            if (s.object_type, s.object_id) == (object_type, object_id) and meaning in (None, s.meaning)
        ]

    async def check(self, record: SignedRecord, meaning: str | None = None) -> SignatureCheck:
        found = await self.of(record.object_type, record.object_id, meaning)
        return SignatureCheck(
            current=tuple(s for s in found if s.matches(record)),
            stale=tuple(s for s in found if not s.matches(record)),
        )


class MemoryDecisions(DecisionRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(
        self, decision_id: uuid.UUID, order_id: uuid.UUID, meaning: str, fields: dict[str, Any]
    ) -> None:
        self.store.decisions.append(
            {
                "decision_id": decision_id,
                "order_id": order_id,
                "meaning": meaning,
                "fields": copy.deepcopy(fields),
                "decided_at": datetime.now(UTC),
            }
        )

    async def of_order(self, order_id: uuid.UUID) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in d.items() if k != "order_id"}
            for d in self.store.decisions
            if d["order_id"] == order_id
        ]


class MemoryMaterialDispositions(MaterialDispositionRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(self, record: MaterialDisposition) -> None:
        if any((r.order_id, r.material) == (record.order_id, record.material) for r in self.store.materials):
            raise ValueError("duplicate material disposition (unique index)")
        self.store.materials.append(record)

    async def of_order(self, order_id: uuid.UUID) -> list[MaterialDisposition]:
        return [r for r in self.store.materials if r.order_id == order_id]


def memory_tx(store: MemoryStore, outbox: FakeOutbox) -> OrderTx:
    return OrderTx(
        None,
        outbox,
        orders=MemoryOrders(store),
        timeline=MemoryTimeline(store),
        parked=MemoryParkedFacts(store),
        catalogue=MemoryCatalogue(store),
        network=MemoryNetwork(store),
        audit_log=MemoryAuditLog(store),
        collections=MemoryCollections(store),
        tasks=MemoryTasks(store),
        signatures=MemorySignatures(store),
        decisions=MemoryDecisions(store),
        materials=MemoryMaterialDispositions(store),
        audit=MemoryAuditTrail(store.audit, SCHEMA),
    )


class MemoryUnitOfWork(FakeUnitOfWork[OrderTx]):
    """A `FakeUnitOfWork` handing out `OrderTx`s on one `MemoryStore`; a failed transaction is undone."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        super().__init__(
            lambda outbox: memory_tx(store, outbox),
            snapshot=lambda: copy.deepcopy(store),
            restore=self._restore,
        )

    def _restore(self, saved: MemoryStore) -> None:
        for f in dataclasses.fields(MemoryStore):
            setattr(self.store, f.name, getattr(saved, f.name))


def fake_uow(store: MemoryStore | None = None) -> MemoryUnitOfWork:
    """A unit of work on `store` (the seeded centres and the product catalogue when None)."""
    return MemoryUnitOfWork(store if store is not None else MemoryStore.with_reference_data())
