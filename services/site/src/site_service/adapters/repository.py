"""All the site service's SQL: one repository per aggregate (sites with their outages, bookings,
manufacturing runs with their step history), an abstract base each and a Postgres implementation, and
the service's `SiteTx` (the repositories of one transaction) with the `site_tx` factory the unit of work
uses. The seed file is read here too (at start-up, never at import).

Tenancy: a site's own principal (its MES) is confined to its site. Every read and change the API makes
passes `tenant` (the caller's site id, or None for QA, admin and ops) down to these repositories, whose
queries then find nothing of another site (`AND ($n::text IS NULL OR site_id = $n)`): the API answers 404.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from site_service.domain.manufacturing import Manufacture, Manufacturing, State
from site_service.domain.registry import Booking, OrderFacts, Site
from v2v_audit import AuditedTx, AuditTrail
from v2v_contracts import Outage, SiteApproval, SiteRegisteredV1
from v2v_messaging.uow import EventSink
from v2v_servicekit.signatures import Signature, SignatureRepository, SignedRecord, Signer

SITES_SEED = Path(__file__).parent.parent / "seed" / "sites.yaml"


def read_sites_seed(path: Path = SITES_SEED) -> list[dict[str, Any]]:
    """The seed's site entries, as written (a small file, read once at start-up)."""
    entries: list[dict[str, Any]] = yaml.safe_load(path.read_text())
    return entries


# ---- the abstract repositories -------------------------------------------------------------------------


class SiteRepository(ABC):
    """The registry: one row per site (its published entry, outages included, and `api_managed`).
    `tenant`: the caller's own site (None: any site)."""

    @abstractmethod
    async def get(self, site_id: str, *, lock: bool = False, tenant: str | None = None) -> Site | None: ...

    @abstractmethod
    async def exists(self, site_id: str, *, tenant: str | None = None) -> bool: ...

    @abstractmethod
    async def save(self, entry: SiteRegisteredV1) -> bool:
        """Store the entry when it is new or differs from the stored one; whether it changed."""

    @abstractmethod
    async def set_api_managed(self, site_id: str, managed: Iterable[str]) -> None: ...

    @abstractmethod
    async def outages(self, site_id: str) -> list[Outage]: ...

    @abstractmethod
    async def view(self, site_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        """The stored row, as the API shows it."""

    @abstractmethod
    async def views(
        self, *, tenant: str | None = None, limit: int = 200, offset: int = 0
    ) -> list[dict[str, Any]]:
        """The stored rows (only the tenant's own), by site id: one page."""


class BookingRepository(ABC):
    @abstractmethod
    async def add(self, booking: Booking, *, origin_trace: dict[str, str]) -> None: ...

    @abstractmethod
    async def by_slot(self, slot_id: uuid.UUID, *, lock: bool = False) -> Booking | None: ...

    @abstractmethod
    async def latest_confirmed(
        self, order_id: uuid.UUID, site_id: str, *, tenant: str | None = None
    ) -> Booking | None:
        """The order's latest confirmed booking at the site, locked."""

    @abstractmethod
    async def latest_open(
        self, order_id: uuid.UUID, site_id: str, *, tenant: str | None = None
    ) -> Booking | None:
        """The order's latest booking at the site that is not cancelled."""

    @abstractmethod
    async def for_order(self, order_id: uuid.UUID) -> list[Booking]:
        """Every booking of the order, oldest first, locked."""

    @abstractmethod
    async def awaiting_material_in(self, site_id: str, start: date, end: date) -> list[Booking]:
        """Confirmed bookings starting manufacture in [start, end] whose material has not arrived yet,
        in plan order, locked."""

    @abstractmethod
    async def confirmed_from(
        self, site_id: str, products: list[str], day: date
    ) -> list[tuple[Booking, bool]]:
        """Confirmed bookings of these products starting on `day` or later, with whether their material
        has arrived, ordered by product, day, arrived first, then as booked; locked."""

    @abstractmethod
    async def cancel(self, booking_id: uuid.UUID, reason: str) -> bool:
        """Cancel a booking that is not cancelled yet; whether it was cancelled now."""

    @abstractmethod
    async def affect(self, booking_id: uuid.UUID, reason: str) -> bool:
        """Mark a confirmed booking affected; whether it was confirmed."""

    @abstractmethod
    async def origin_trace(self, order_id: uuid.UUID) -> dict[str, str] | None:
        """The order's first trace, as remembered with its latest booking."""


class ManufacturingRepository(ABC):
    @abstractmethod
    async def add(
        self, booking: Booking, *, received_at: datetime, reason: str | None, din: str | None = None
    ) -> Manufacture:
        """Start the booking's manufacture (awaiting material, run 0; `din` as verified at receipt)."""

    @abstractmethod
    async def next_lot_number(self) -> int:
        """A new lot sequence number (never reused)."""

    @abstractmethod
    async def latest_for_order(self, order_id: uuid.UUID, *, lock: bool = False) -> Manufacture | None:
        """The order's latest manufacture at any site."""

    @abstractmethod
    async def set_qc(
        self, booking_id: uuid.UUID, results: dict[str, Any] | None, coa_reference: str | None
    ) -> None:
        """The current run's QC summary and certificate-of-analysis reference."""

    @abstractmethod
    async def for_booking(self, booking_id: uuid.UUID) -> Manufacture | None:
        """The booking's manufacture, locked."""

    @abstractmethod
    async def latest(
        self, order_id: uuid.UUID, site_id: str, *, lock: bool = False, tenant: str | None = None
    ) -> Manufacture | None:
        """The order's latest manufacture at the site."""

    @abstractmethod
    async def for_order(self, order_id: uuid.UUID) -> list[Manufacture]:
        """Every manufacture of the order, oldest first, locked."""

    @abstractmethod
    async def live_at(self, site_id: str, states: Iterable[str]) -> list[Manufacture]:
        """The manufactures at a site in one of `states` (material there, a run waiting or in progress),
        oldest first."""

    @abstractmethod
    async def update(self, booking_id: uuid.UUID, state: Manufacturing, reason: str | None) -> None:
        """Write the new state (a None reason keeps the stored one)."""

    @abstractmethod
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
        """One history entry: `reason` a reason code, `reference` the site's own document id (opaque)."""

    @abstractmethod
    async def history(self, booking_id: uuid.UUID) -> list[dict[str, Any]]:
        """The manufacture's history entries, as recorded."""


class OrderFactsRepository(ABC):
    """What the site learns of an order from the order service: its market and its latest DIN."""

    @abstractmethod
    async def get(self, order_id: uuid.UUID) -> OrderFacts | None: ...

    @abstractmethod
    async def record_market(
        self, order_id: uuid.UUID, *, regulator: str, order_type: str, country: str, region: str
    ) -> None: ...

    @abstractmethod
    async def record_din(self, order_id: uuid.UUID, din: str | None, collection: int) -> bool:
        """Remember a collection and its DIN (None: its event carried none, so none is checked) unless a
        later collection is known; whether it changed."""


class SignatureStore(ABC):
    """The signatures of one transaction (`v2v_servicekit.signatures`)."""

    @abstractmethod
    async def record(self, signer: Signer, record: SignedRecord) -> Signature: ...

    @abstractmethod
    async def of(self, object_type: str, object_id: str) -> list[Signature]: ...

    async def current_meanings(self, record: SignedRecord) -> set[str]:
        """The meanings whose signature matches `record` as it is now (a changed record: none)."""
        return {s.meaning for s in await self.of(record.object_type, record.object_id) if s.matches(record)}


# ---- Postgres ------------------------------------------------------------------------------------------

# the tenant filter of a query whose second parameter is the tenant (None: any site)
_TENANT_2 = "($2::text IS NULL OR site_id = $2)"
_TENANT_3 = "($3::text IS NULL OR site_id = $3)"

_SITE_COLUMNS = (
    "site_id",
    "name",
    "country",
    "region",
    "timezone",
    "operator",
    "active",
    "approvals",
    "daily_capacity",
    "outages",
    "manufacturer",
)


def site_row(entry: SiteRegisteredV1) -> tuple[Any, ...]:
    """The entry as the `sites` columns of `_SITE_COLUMNS` hold it (JSON values as decoded)."""
    return (
        entry.site_id,
        entry.name,
        entry.country,
        entry.region,
        entry.timezone,
        entry.operator,
        entry.active,
        [a.model_dump(exclude_none=True) for a in entry.approvals],
        entry.daily_capacity,
        [o.model_dump(mode="json") for o in entry.outages],
        entry.manufacturer,
    )


def _site(row: asyncpg.Record) -> Site:
    entry = SiteRegisteredV1(
        site_id=row["site_id"],
        name=row["name"],
        country=row["country"],
        region=row["region"],
        timezone=row["timezone"],
        operator=row["operator"],
        active=row["active"],
        approvals=[SiteApproval(**a) for a in row["approvals"]],
        daily_capacity=dict(row["daily_capacity"]),
        outages=[Outage(**o) for o in row["outages"]],
        manufacturer=row["manufacturer"],
    )
    return Site(entry, frozenset(row["api_managed"]))


class PgSiteRepository(SiteRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def get(self, site_id: str, *, lock: bool = False, tenant: str | None = None) -> Site | None:
        sql = f"SELECT * FROM sites WHERE site_id = $1 AND {_TENANT_2}" + (" FOR UPDATE" if lock else "")
        row = await self.conn.fetchrow(sql, site_id, tenant)
        return None if row is None else _site(row)

    async def exists(self, site_id: str, *, tenant: str | None = None) -> bool:
        return bool(
            await self.conn.fetchval(
                f"SELECT 1 FROM sites WHERE site_id = $1 AND {_TENANT_2}", site_id, tenant
            )
        )

    async def save(self, entry: SiteRegisteredV1) -> bool:
        current = await self.conn.fetchrow("SELECT * FROM sites WHERE site_id = $1 FOR UPDATE", entry.site_id)
        row = site_row(entry)
        if current is not None and tuple(current[k] for k in _SITE_COLUMNS) == row:
            return False
        await self.conn.execute(
            """INSERT INTO sites (site_id, name, country, region, timezone, operator, active, approvals,
                                  daily_capacity, outages, manufacturer)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10::jsonb, $11)
               ON CONFLICT (site_id) DO UPDATE SET name = $2, country = $3, region = $4, timezone = $5,
                   operator = $6, active = $7, approvals = $8::jsonb, daily_capacity = $9::jsonb,
                   outages = $10::jsonb, manufacturer = $11, updated_at = now()""",
            *row,
        )
        return True

    async def set_api_managed(self, site_id: str, managed: Iterable[str]) -> None:
        await self.conn.execute(
            "UPDATE sites SET api_managed = $2 WHERE site_id = $1", site_id, sorted(managed)
        )

    async def outages(self, site_id: str) -> list[Outage]:
        rows = await self.conn.fetchval("SELECT outages FROM sites WHERE site_id = $1", site_id) or []
        return [Outage(**o) for o in rows]

    async def view(self, site_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        row = await self.conn.fetchrow(
            f"SELECT * FROM sites WHERE site_id = $1 AND {_TENANT_2}", site_id, tenant
        )
        return None if row is None else dict(row)

    async def views(
        self, *, tenant: str | None = None, limit: int = 200, offset: int = 0
    ) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            """SELECT * FROM sites WHERE ($1::text IS NULL OR site_id = $1)
               ORDER BY site_id LIMIT $2 OFFSET $3""",
            tenant,
            limit,
            offset,
        )
        return [dict(r) for r in rows]


def _booking(row: asyncpg.Record) -> Booking:
    return Booking(
        booking_id=row["booking_id"],
        order_id=row["order_id"],
        coi=row["coi"],
        slot_id=row["slot_id"],
        site_id=row["site_id"],
        manufacturing_start_date=row["manufacturing_start_date"],
        apheresis_date=row["apheresis_date"],
        status=row["status"],
        treatment_center_id=row["treatment_center_id"],
        product_code=row["product_code"],
        run=row["run"],
    )


BOOKING_INSERT = """INSERT INTO bookings (booking_id, order_id, coi, slot_id, site_id,
                                      manufacturing_start_date, apheresis_date, status,
                                      treatment_center_id, product_code, origin_trace, run)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12)"""


def booking_row(booking: Booking, origin_trace: dict[str, str]) -> tuple[Any, ...]:
    """`BOOKING_INSERT`'s parameters."""
    return (
        booking.booking_id,
        booking.order_id,
        booking.coi,
        booking.slot_id,
        booking.site_id,
        booking.manufacturing_start_date,
        booking.apheresis_date,
        booking.status,
        booking.treatment_center_id,
        booking.product_code,
        origin_trace,
        booking.run,
    )


class PgBookingRepository(BookingRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(self, booking: Booking, *, origin_trace: dict[str, str]) -> None:
        await self.conn.execute(BOOKING_INSERT, *booking_row(booking, origin_trace))

    async def by_slot(self, slot_id: uuid.UUID, *, lock: bool = False) -> Booking | None:
        sql = "SELECT * FROM bookings WHERE slot_id = $1" + (" FOR UPDATE" if lock else "")
        row = await self.conn.fetchrow(sql, slot_id)
        return None if row is None else _booking(row)

    async def latest_confirmed(
        self, order_id: uuid.UUID, site_id: str, *, tenant: str | None = None
    ) -> Booking | None:
        row = await self.conn.fetchrow(
            f"""SELECT * FROM bookings WHERE order_id = $1 AND site_id = $2 AND status = 'confirmed'
                  AND {_TENANT_3}
                ORDER BY created_at DESC, booking_id LIMIT 1 FOR UPDATE""",
            order_id,
            site_id,
            tenant,
        )
        return None if row is None else _booking(row)

    async def latest_open(
        self, order_id: uuid.UUID, site_id: str, *, tenant: str | None = None
    ) -> Booking | None:
        row = await self.conn.fetchrow(
            f"""SELECT * FROM bookings WHERE order_id = $1 AND site_id = $2 AND status <> 'cancelled'
                  AND {_TENANT_3}
                ORDER BY created_at DESC, booking_id LIMIT 1""",
            order_id,
            site_id,
            tenant,
        )
        return None if row is None else _booking(row)

    async def for_order(self, order_id: uuid.UUID) -> list[Booking]:
        rows = await self.conn.fetch(
            "SELECT * FROM bookings WHERE order_id = $1 ORDER BY created_at, booking_id FOR UPDATE", order_id
        )
        return [_booking(r) for r in rows]

    async def awaiting_material_in(self, site_id: str, start: date, end: date) -> list[Booking]:
        rows = await self.conn.fetch(
            """SELECT b.* FROM bookings b
               WHERE b.site_id = $1 AND b.status = 'confirmed' AND b.run IS NULL
                 AND b.manufacturing_start_date BETWEEN $2 AND $3
                 AND NOT EXISTS (SELECT 1 FROM manufacturing m WHERE m.booking_id = b.booking_id)
               ORDER BY b.manufacturing_start_date, b.created_at, b.booking_id
               FOR UPDATE OF b""",
            site_id,
            start,
            end,
        )
        return [_booking(r) for r in rows]

    async def confirmed_from(
        self, site_id: str, products: list[str], day: date
    ) -> list[tuple[Booking, bool]]:
        rows = await self.conn.fetch(
            """SELECT b.*, b.run IS NOT NULL OR EXISTS (
                       SELECT 1 FROM manufacturing m WHERE m.booking_id = b.booking_id) AS arrived
               FROM bookings b
               WHERE b.site_id = $1 AND b.status = 'confirmed' AND b.product_code = ANY($2::text[])
                 AND b.manufacturing_start_date >= $3
               ORDER BY b.product_code, b.manufacturing_start_date, arrived DESC, b.created_at, b.booking_id
               FOR UPDATE OF b""",
            site_id,
            products,
            day,
        )
        return [(_booking(r), bool(r["arrived"])) for r in rows]

    async def cancel(self, booking_id: uuid.UUID, reason: str) -> bool:
        return bool(
            await self.conn.fetchval(
                """UPDATE bookings SET status = 'cancelled', status_reason = $2, updated_at = now()
                   WHERE booking_id = $1 AND status <> 'cancelled' RETURNING true""",
                booking_id,
                reason,
            )
        )

    async def affect(self, booking_id: uuid.UUID, reason: str) -> bool:
        return bool(
            await self.conn.fetchval(
                """UPDATE bookings SET status = 'affected', status_reason = $2, updated_at = now()
                   WHERE booking_id = $1 AND status = 'confirmed' RETURNING true""",
                booking_id,
                reason,
            )
        )

    async def origin_trace(self, order_id: uuid.UUID) -> dict[str, str] | None:
        origin: dict[str, str] | None = await self.conn.fetchval(
            "SELECT origin_trace FROM bookings WHERE order_id = $1 ORDER BY created_at DESC LIMIT 1", order_id
        )
        return origin


def _manufacture(row: asyncpg.Record) -> Manufacture:
    return Manufacture(
        booking_id=row["booking_id"],
        order_id=row["order_id"],
        coi=row["coi"],
        treatment_center_id=row["treatment_center_id"] or "",
        site_id=row["site_id"],
        product_code=row["product_code"],
        state=Manufacturing(
            state=State(row["state"]),
            run=row["run"],
            steps_completed=row["steps_completed"],
            failed_step=row["failed_step"],
            retained_material=row["retained_material"],
            lot=row["lot"],
            exceptional=row["exceptional"],
        ),
        received_at=row["received_at"],
        qc_results=row["qc_results"],
        coa_reference=row["coa_reference"],
        din=row["din"],
    )


class PgManufacturingRepository(ManufacturingRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(
        self, booking: Booking, *, received_at: datetime, reason: str | None, din: str | None = None
    ) -> Manufacture:
        row = await self.conn.fetchrow(
            """INSERT INTO manufacturing (booking_id, order_id, coi, treatment_center_id, site_id,
                                          product_code, state, run, steps_completed, received_at, reason,
                                          din)
               VALUES ($1, $2, $3, $4, $5, $6, 'awaiting_material', 0, 0, $7, $8, $9) RETURNING *""",
            booking.booking_id,
            booking.order_id,
            booking.coi,
            booking.treatment_center_id or "",
            booking.site_id,
            booking.product_code,
            received_at,
            reason,
            din,
        )
        assert row is not None
        return _manufacture(row)

    async def next_lot_number(self) -> int:
        return int(await self.conn.fetchval("SELECT nextval('lot_numbers')"))

    async def latest_for_order(self, order_id: uuid.UUID, *, lock: bool = False) -> Manufacture | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM manufacturing WHERE order_id = $1 ORDER BY created_at DESC, booking_id LIMIT 1"
            + (" FOR UPDATE" if lock else ""),
            order_id,
        )
        return None if row is None else _manufacture(row)

    async def set_qc(
        self, booking_id: uuid.UUID, results: dict[str, Any] | None, coa_reference: str | None
    ) -> None:
        await self.conn.execute(
            """UPDATE manufacturing SET qc_results = $2::jsonb, coa_reference = $3, updated_at = now()
               WHERE booking_id = $1""",
            booking_id,
            results,
            coa_reference,
        )

    async def for_booking(self, booking_id: uuid.UUID) -> Manufacture | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM manufacturing WHERE booking_id = $1 FOR UPDATE", booking_id
        )
        return None if row is None else _manufacture(row)

    async def latest(
        self, order_id: uuid.UUID, site_id: str, *, lock: bool = False, tenant: str | None = None
    ) -> Manufacture | None:
        row = await self.conn.fetchrow(
            f"""SELECT * FROM manufacturing WHERE order_id = $1 AND site_id = $2 AND {_TENANT_3}
                ORDER BY created_at DESC, booking_id LIMIT 1"""
            + (" FOR UPDATE" if lock else ""),
            order_id,
            site_id,
            tenant,
        )
        return None if row is None else _manufacture(row)

    async def for_order(self, order_id: uuid.UUID) -> list[Manufacture]:
        rows = await self.conn.fetch(
            "SELECT * FROM manufacturing WHERE order_id = $1 ORDER BY created_at, booking_id FOR UPDATE",
            order_id,
        )
        return [_manufacture(r) for r in rows]

    async def live_at(self, site_id: str, states: Iterable[str]) -> list[Manufacture]:
        rows = await self.conn.fetch(
            """SELECT * FROM manufacturing WHERE site_id = $1 AND state = ANY($2::text[])
               ORDER BY created_at, booking_id""",
            site_id,
            sorted(states),
        )
        return [_manufacture(r) for r in rows]

    async def update(self, booking_id: uuid.UUID, state: Manufacturing, reason: str | None) -> None:
        await self.conn.execute(
            """UPDATE manufacturing SET state = $2, run = $3, steps_completed = $4, failed_step = $5,
                      retained_material = $6, reason = COALESCE($7, reason), lot = $8, exceptional = $9,
                      updated_at = now()
               WHERE booking_id = $1""",
            booking_id,
            state.state.value,
            state.run,
            state.steps_completed,
            state.failed_step,
            state.retained_material,
            reason,
            state.lot,
            state.exceptional,
        )

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
        await self.conn.execute(
            """INSERT INTO manufacturing_history (booking_id, order_id, site_id, run, action, step,
                                                  state_before, state_after, reason, occurred_at, reference,
                                                  lot)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
            m.booking_id,
            m.order_id,
            m.site_id,
            run,
            action,
            step,
            state_before.value,
            state_after.value,
            reason,
            occurred_at,
            reference,
            lot,
        )

    async def history(self, booking_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            """SELECT run, lot, action, step, state_before, state_after, reason, reference, occurred_at,
                      recorded_at
               FROM manufacturing_history WHERE booking_id = $1 ORDER BY id""",
            booking_id,
        )
        return [dict(r) for r in rows]


class PgOrderFactsRepository(OrderFactsRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def get(self, order_id: uuid.UUID) -> OrderFacts | None:
        row = await self.conn.fetchrow("SELECT * FROM order_facts WHERE order_id = $1", order_id)
        if row is None:
            return None
        return OrderFacts(
            order_id=row["order_id"],
            regulator=row["regulator"],
            order_type=row["order_type"],
            country=row["country"],
            region=row["region"],
            din=row["din"],
            collection=row["collection"],
        )

    async def record_market(
        self, order_id: uuid.UUID, *, regulator: str, order_type: str, country: str, region: str
    ) -> None:
        await self.conn.execute(
            """INSERT INTO order_facts (order_id, regulator, order_type, country, region)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (order_id) DO UPDATE SET regulator = $2, order_type = $3, country = $4,
                   region = $5, updated_at = now()""",
            order_id,
            regulator,
            order_type,
            country,
            region,
        )

    async def record_din(self, order_id: uuid.UUID, din: str | None, collection: int) -> bool:
        return bool(
            await self.conn.fetchval(
                """INSERT INTO order_facts (order_id, din, collection) VALUES ($1, $2, $3)
                   ON CONFLICT (order_id) DO UPDATE SET din = $2, collection = $3, updated_at = now()
                   WHERE order_facts.collection IS NULL OR order_facts.collection <= $3
                   RETURNING true""",
                order_id,
                din,
                collection,
            )
        )


class PgSignatureStore(SignatureStore):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.repo = SignatureRepository(conn)

    async def record(self, signer: Signer, record: SignedRecord) -> Signature:
        return await self.repo.record(signer, record)

    async def of(self, object_type: str, object_id: str) -> list[Signature]:
        return await self.repo.of(object_type, object_id)


# ---- the transaction -----------------------------------------------------------------------------------


class SiteTx(AuditedTx):
    """One transaction of the site service: its repositories, its outbox and its audit trail
    (`tx.audit(...)`: ids, codes and opaque references only, appended at commit)."""

    def __init__(
        self,
        conn: asyncpg.Connection | None,
        outbox: EventSink,
        *,
        sites: SiteRepository,
        bookings: BookingRepository,
        manufacturing: ManufacturingRepository,
        orders: OrderFactsRepository,
        signatures: SignatureStore,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(conn, outbox, audit=audit)
        self.sites = sites
        self.bookings = bookings
        self.manufacturing = manufacturing
        self.orders = orders
        self.signatures = signatures

    async def book_slot(self, booking: Booking, *, origin_trace: dict[str, str]) -> list[Outage] | None:
        """The slot's booking, unless the slot has one already (then None, nothing changes); else the
        site's outages as they are (a slot taken from a stale registry copy may fall into one)."""
        if await self.bookings.by_slot(booking.slot_id) is not None:
            return None
        await self.bookings.add(booking, origin_trace=origin_trace)
        return await self.sites.outages(booking.site_id)


class PgSiteTx(SiteTx):
    """The Postgres transaction: what `SiteTx` does in several steps, in one statement."""

    async def book_slot(self, booking: Booking, *, origin_trace: dict[str, str]) -> list[Outage] | None:
        assert self.conn is not None
        row = await self.conn.fetchrow(
            f"""{BOOKING_INSERT}
               ON CONFLICT (slot_id) DO NOTHING
               RETURNING (SELECT outages FROM sites WHERE site_id = $5) AS outages""",
            *booking_row(booking, origin_trace),
        )
        if row is None:  # the slot has its booking
            return None
        return [Outage(**o) for o in row["outages"] or []]


def site_tx(conn: asyncpg.Connection, outbox: EventSink) -> SiteTx:
    """The unit of work's Tx factory: the Postgres repositories on the transaction's connection."""
    return PgSiteTx(
        conn,
        outbox,
        sites=PgSiteRepository(conn),
        bookings=PgBookingRepository(conn),
        manufacturing=PgManufacturingRepository(conn),
        orders=PgOrderFactsRepository(conn),
        signatures=PgSignatureStore(conn),
    )
