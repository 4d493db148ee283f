"""All of scheduling's SQL: one repository per aggregate (an abstract base and its Postgres class), the
per-product advisory locks, and the `SchedulingTx` a unit of work hands to the service layer.

Every repository runs on the transaction's connection; `adapters/memory.py` has the in-memory twins.

The HTTP reads take the caller's tenancy: `centre` (a treatment centre's own orders only) and `site` (one
site's slots only), None when the caller is not confined (ops). The filters are in the queries.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from scheduling_service.domain.selection import Approval, Site, Window
from scheduling_service.domain.slots import Hold, Slot, Waiting, WaitingRequest
from v2v_audit import AuditedTx, AuditTrail
from v2v_contracts import OrderSubmittedV1, RebookRequestedV1, SiteRegisteredV1
from v2v_messaging import EventSink

Usage = dict[tuple[str, str, date], int]  # (site, product, day) -> slots using that day's capacity

# the columns of a slot as the HTTP API shows them (the market columns of 0003 stay internal)
SLOT_VIEW = (
    "slot_id, order_id, coi, site_id, product_code, manufacturing_start_date, apheresis_date, status, "
    "created_at, updated_at, treatment_center_id, reserved_reason, release_reason, released_at"
)


# ---- locks -------------------------------------------------------------------------------------------


class ProductLocks(ABC):
    """The per-product locks one transaction holds (released when it ends). Taken in one global order
    (by lock key) so that two transactions never wait on each other in a cycle."""

    def __init__(self) -> None:
        self.held: set[str] = set()

    async def take(self, products: Iterable[str]) -> None:
        missing = sorted(set(products) - self.held)
        if not missing:
            return
        await self._lock(missing)
        self.held.update(missing)

    @abstractmethod
    async def _lock(self, products: list[str]) -> None: ...


class PostgresProductLocks(ProductLocks):
    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__()
        self.conn = conn

    async def _lock(self, products: list[str]) -> None:
        await self.conn.execute(LOCK_PRODUCTS, products)


# one round trip for any number of products: the key of `pg_advisory_xact_lock(hashtext('v2v-slots:' ||
# product))`, each taken once, in key order (the sorted subquery cannot be flattened: DISTINCT; the locks
# are taken as its rows come out of the sort)
LOCK_PRODUCTS = """SELECT pg_advisory_xact_lock(k) FROM (
    SELECT DISTINCT hashtext('v2v-slots:' || p)::bigint AS k FROM unnest($1::text[]) AS p ORDER BY k
) AS keys"""


# ---- slots -------------------------------------------------------------------------------------------


class SlotRepository(ABC):
    @abstractmethod
    async def live(self, order_id: uuid.UUID) -> Slot | None:
        """The order's held or confirmed slot."""

    @abstractmethod
    async def live_at(self, site_id: str) -> list[Slot]:
        """Held and confirmed slots at a site, oldest first."""

    @abstractmethod
    async def usage(self, product: str, since: date) -> Usage:
        """Slots using capacity per (site, product, day) from `since`: held, confirmed and consumed, and
        the centres' active holds."""

    @abstractmethod
    async def centre_usage(self, centre: str, product: str, since: date) -> dict[date, int]:
        """What one centre takes of a product per manufacturing day from `since` (its slots in use and
        its active holds): what its quota counts."""

    @abstractmethod
    async def add(self, slot: Slot) -> None: ...

    @abstractmethod
    async def release_live(self, order_id: uuid.UUID, reason: str) -> Slot | None:
        """The order's live slot → released (with the reason); None when it has none."""

    @abstractmethod
    async def confirm(self, slot_id: uuid.UUID) -> bool:
        """held → confirmed."""

    @abstractmethod
    async def record_collection(self, order_id: uuid.UUID, collected_on: date) -> Slot | None:
        """The order's live slot remembers the date its material was collected (a recollection's date
        replaces the first); the slot as it was before, None when the order has no live slot."""

    @abstractmethod
    async def consume(self, order_id: uuid.UUID, site_id: str) -> uuid.UUID | None:
        """The order's live slot at that site → consumed (its day's capacity stays used)."""

    @abstractmethod
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
        """Slots for the HTTP API, in booking order: one page, only the tenant's (`centre`, `site`)."""


def _slot(row: asyncpg.Record) -> Slot:
    return Slot(
        slot_id=row["slot_id"],
        order_id=row["order_id"],
        coi=row["coi"],
        treatment_center_id=row["treatment_center_id"],
        site_id=row["site_id"],
        product_code=row["product_code"],
        manufacturing_start_date=row["manufacturing_start_date"],
        apheresis_date=row["apheresis_date"],
        status=row["status"],
        reserved_reason=row["reserved_reason"],
        order_type=row["order_type"],
        regulator=row["regulator"],
        region=row["region"],
        collected_on=row["collected_on"],
    )


SLOT_INSERT = """INSERT INTO slots (slot_id, order_id, coi, treatment_center_id, site_id, product_code,
                                   manufacturing_start_date, apheresis_date, status, reserved_reason,
                                   order_type, regulator, region, collected_on)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"""


def slot_row(slot: Slot) -> tuple[Any, ...]:
    """`SLOT_INSERT`'s parameters."""
    return (
        slot.slot_id,
        slot.order_id,
        slot.coi,
        slot.treatment_center_id,
        slot.site_id,
        slot.product_code,
        slot.manufacturing_start_date,
        slot.apheresis_date,
        slot.status,
        slot.reserved_reason,
        slot.order_type,
        slot.regulator,
        slot.region,
        slot.collected_on,
    )


class PostgresSlots(SlotRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def live(self, order_id: uuid.UUID) -> Slot | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM slots WHERE order_id = $1 AND status IN ('held', 'confirmed')", order_id
        )
        return _slot(row) if row is not None else None

    async def live_at(self, site_id: str) -> list[Slot]:
        rows = await self.conn.fetch(
            """SELECT * FROM slots WHERE site_id = $1 AND status IN ('held', 'confirmed')
               ORDER BY created_at, slot_id""",
            site_id,
        )
        return [_slot(r) for r in rows]

    async def usage(self, product: str, since: date) -> Usage:
        rows = await self.conn.fetch(
            """SELECT site_id, day, n FROM capacity_used
               WHERE product_code = $1 AND day >= $2 AND n > 0""",
            product,
            since,
        )
        return {(r["site_id"], product, r["day"]): int(r["n"]) for r in rows}

    async def centre_usage(self, centre: str, product: str, since: date) -> dict[date, int]:
        rows = await self.conn.fetch(
            """SELECT day, n FROM centre_capacity_used
               WHERE treatment_center_id = $1 AND product_code = $2 AND day >= $3 AND n > 0""",
            centre,
            product,
            since,
        )
        return {r["day"]: int(r["n"]) for r in rows}

    async def add(self, slot: Slot) -> None:
        await self.conn.execute(SLOT_INSERT, *slot_row(slot))

    async def release_live(self, order_id: uuid.UUID, reason: str) -> Slot | None:
        row = await self.conn.fetchrow(
            """UPDATE slots SET status = 'released', release_reason = $2, released_at = now(),
                                updated_at = now()
               WHERE order_id = $1 AND status IN ('held', 'confirmed')
               RETURNING *""",
            order_id,
            reason,
        )
        return _slot(row) if row is not None else None

    async def confirm(self, slot_id: uuid.UUID) -> bool:
        done = await self.conn.fetchval(
            """UPDATE slots SET status = 'confirmed', updated_at = now()
               WHERE slot_id = $1 AND status = 'held' RETURNING true""",
            slot_id,
        )
        return bool(done)

    async def record_collection(self, order_id: uuid.UUID, collected_on: date) -> Slot | None:
        row = await self.conn.fetchrow(
            """SELECT * FROM slots WHERE order_id = $1 AND status IN ('held', 'confirmed') FOR UPDATE""",
            order_id,
        )
        if row is None:
            return None
        if row["collected_on"] != collected_on:
            await self.conn.execute(
                "UPDATE slots SET collected_on = $2, updated_at = now() WHERE slot_id = $1",
                row["slot_id"],
                collected_on,
            )
        return _slot(row)

    async def consume(self, order_id: uuid.UUID, site_id: str) -> uuid.UUID | None:
        slot_id: uuid.UUID | None = await self.conn.fetchval(
            """UPDATE slots SET status = 'consumed', updated_at = now()
               WHERE order_id = $1 AND site_id = $2 AND status IN ('held', 'confirmed') RETURNING slot_id""",
            order_id,
            site_id,
        )
        return slot_id

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
        rows = await self.conn.fetch(
            f"""SELECT {SLOT_VIEW} FROM slots
                WHERE ($1::uuid IS NULL OR order_id = $1)
                  AND ($2::text[] IS NULL OR status = ANY($2::text[]))
                  AND ($3::text IS NULL OR product_code = $3)
                  AND ($4::text IS NULL OR site_id = $4)
                  AND ($7::text IS NULL OR treatment_center_id = $7)
                  AND ($8::text IS NULL OR site_id = $8)
                ORDER BY created_at, slot_id LIMIT $5 OFFSET $6""",
            order_id,
            statuses,
            product_code,
            site_id,
            limit,
            offset,
            centre,
            site,
        )
        return [dict(r) for r in rows]


# ---- the waitlist ------------------------------------------------------------------------------------


class WaitlistRepository(ABC):
    @abstractmethod
    async def add(self, request: OrderSubmittedV1, reason: str) -> bool:
        """Enqueue a submitted order; False (and nothing changes) when it already waits."""

    @abstractmethod
    async def put(self, request: RebookRequestedV1, reason: str, priority: int = 0) -> None:
        """Enqueue a rebook with its context; an order already waiting keeps its place in the queue (and
        the higher of its priorities)."""

    @abstractmethod
    async def set_priority(self, order_id: uuid.UUID, priority: int) -> int | None:
        """An explicit priority (ops); the previous one, or None when the order does not wait."""

    @abstractmethod
    async def remove(self, order_id: uuid.UUID) -> bool:
        """Leave the waitlist; True when the order was waiting."""

    @abstractmethod
    async def waiting(self, products: list[str]) -> list[Waiting]:
        """Entries for these products, highest priority first, then first come first served, without
        orders that are over."""

    @abstractmethod
    async def set_reason(self, order_id: uuid.UUID, reason: str) -> None: ...

    @abstractmethod
    async def view(
        self, limit: int = 200, offset: int = 0, *, centre: str | None = None
    ) -> list[dict[str, Any]]:
        """The waitlist for the HTTP API, in booking order, with what each order waits for: one page, only
        the centre's own orders when `centre` is given."""


def declared(request: WaitingRequest) -> dict[str, Any]:
    """What the waitlist keeps of the request: the contract's own fields only (an event may carry extra
    members; scheduling stores none of them)."""
    return request.model_dump(mode="json", include=set(type(request).model_fields))


def _waiting(row: asyncpg.Record) -> Waiting:
    request: WaitingRequest
    if row["request_type"] == RebookRequestedV1.TYPE:
        request = RebookRequestedV1.model_validate(row["request"])
    else:
        request = OrderSubmittedV1.model_validate(row["request"])
    return Waiting(request, row["reason"], row["priority"])


class PostgresWaitlist(WaitlistRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(self, request: OrderSubmittedV1, reason: str) -> bool:
        inserted = await self.conn.fetchval(
            # enqueued when this statement runs, not when its transaction began: a consumer's batch
            # waitlists several orders in one transaction, and they keep the order they came in
            """INSERT INTO waitlist (order_id, request, request_type, product_code, reason, enqueued_at)
               VALUES ($1, $2::jsonb, $3, $4, $5, clock_timestamp())
               ON CONFLICT (order_id) DO NOTHING RETURNING true""",
            request.order_id,
            declared(request),
            OrderSubmittedV1.TYPE,
            request.product_code,
            reason,
        )
        return bool(inserted)

    async def put(self, request: RebookRequestedV1, reason: str, priority: int = 0) -> None:
        await self.conn.execute(
            """INSERT INTO waitlist (order_id, request, request_type, product_code, exclude_site_id,
                                     rebook_kind, reason, priority, enqueued_at)
               VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7, $8, clock_timestamp())
               ON CONFLICT (order_id) DO UPDATE SET request = EXCLUDED.request,
                   request_type = EXCLUDED.request_type, product_code = EXCLUDED.product_code,
                   exclude_site_id = EXCLUDED.exclude_site_id, rebook_kind = EXCLUDED.rebook_kind,
                   reason = EXCLUDED.reason,
                   priority = GREATEST(waitlist.priority, EXCLUDED.priority)""",
            request.order_id,
            declared(request),
            RebookRequestedV1.TYPE,
            request.product_code,
            request.exclude_site_id,
            request.kind,
            reason,
            priority,
        )

    async def set_priority(self, order_id: uuid.UUID, priority: int) -> int | None:
        old: int | None = await self.conn.fetchval(
            """UPDATE waitlist w SET priority = $2 FROM waitlist o
               WHERE w.order_id = $1 AND o.order_id = w.order_id RETURNING o.priority""",
            order_id,
            priority,
        )
        return old

    async def remove(self, order_id: uuid.UUID) -> bool:
        left = await self.conn.fetchval("DELETE FROM waitlist WHERE order_id = $1 RETURNING true", order_id)
        return bool(left)

    async def waiting(self, products: list[str]) -> list[Waiting]:
        rows = await self.conn.fetch(
            """SELECT * FROM waitlist
               WHERE product_code = ANY($1::text[])
                 AND NOT EXISTS (SELECT 1 FROM closed_orders c WHERE c.order_id = waitlist.order_id)
               ORDER BY priority DESC, enqueued_at, order_id""",
            products,
        )
        return [_waiting(r) for r in rows]

    async def set_reason(self, order_id: uuid.UUID, reason: str) -> None:
        await self.conn.execute("UPDATE waitlist SET reason = $2 WHERE order_id = $1", order_id, reason)

    async def view(
        self, limit: int = 200, offset: int = 0, *, centre: str | None = None
    ) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            """SELECT order_id, product_code,
                      COALESCE(request ->> 'apheresis_date', request ->> 'requested_apheresis_date')::date
                          AS apheresis_date,
                      reason, request_type, exclude_site_id, rebook_kind, enqueued_at, priority
               FROM waitlist
               WHERE ($3::text IS NULL OR request ->> 'treatment_center_id' = $3)
               ORDER BY priority DESC, enqueued_at, order_id LIMIT $1 OFFSET $2""",
            limit,
            offset,
            centre,
        )
        return [dict(r) for r in rows]


# ---- holds on offers (issue 11) ----------------------------------------------------------------------


class HoldRepository(ABC):
    @abstractmethod
    async def add(self, hold: Hold) -> None: ...

    @abstractmethod
    async def get(self, hold_id: uuid.UUID, *, centre: str | None = None) -> Hold | None:
        """The hold; only the centre's own when `centre` is given."""

    @abstractmethod
    async def close(self, hold_id: uuid.UUID, status: str, order_id: uuid.UUID | None = None) -> Hold | None:
        """active → claimed (by `order_id`) | released | expired; None when it was not active."""

    @abstractmethod
    async def due(self, now: datetime, limit: int) -> list[Hold]:
        """Active holds whose expiry has passed, oldest expiry first."""


HOLD_COLUMNS = (
    "hold_id, treatment_center_id, site_id, product_code, order_type, regulator, region, "
    "manufacturing_start_date, apheresis_date, status, expires_at, order_id, predicted_delivery"
)


def _hold(row: asyncpg.Record) -> Hold:
    return Hold(**{k: row[k] for k in HOLD_COLUMNS.split(", ")})


class PostgresHolds(HoldRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(self, hold: Hold) -> None:
        await self.conn.execute(
            f"""INSERT INTO holds ({HOLD_COLUMNS})
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)""",
            *(getattr(hold, k) for k in HOLD_COLUMNS.split(", ")),
        )

    async def get(self, hold_id: uuid.UUID, *, centre: str | None = None) -> Hold | None:
        row = await self.conn.fetchrow(
            f"""SELECT {HOLD_COLUMNS} FROM holds
                WHERE hold_id = $1 AND ($2::text IS NULL OR treatment_center_id = $2)""",
            hold_id,
            centre,
        )
        return _hold(row) if row is not None else None

    async def close(self, hold_id: uuid.UUID, status: str, order_id: uuid.UUID | None = None) -> Hold | None:
        row = await self.conn.fetchrow(
            f"""UPDATE holds SET status = $2, order_id = COALESCE($3, order_id), updated_at = now()
                WHERE hold_id = $1 AND status = 'active' RETURNING {HOLD_COLUMNS}""",
            hold_id,
            status,
            order_id,
        )
        return _hold(row) if row is not None else None

    async def due(self, now: datetime, limit: int) -> list[Hold]:
        rows = await self.conn.fetch(
            f"""SELECT {HOLD_COLUMNS} FROM holds WHERE status = 'active' AND expires_at <= $1
                ORDER BY expires_at, hold_id LIMIT $2""",
            now,
            limit,
        )
        return [_hold(r) for r in rows]


# ---- the site copy -----------------------------------------------------------------------------------


class SiteRepository(ABC):
    @abstractmethod
    async def all(self) -> list[Site]: ...

    @abstractmethod
    async def get(self, site_id: str) -> Site | None: ...

    @abstractmethod
    async def upsert(self, site: SiteRegisteredV1) -> None:
        """Keep the registry's latest word on the site: capacity, approvals, outages, active."""


def _site(row: asyncpg.Record) -> Site:
    return Site(
        site_id=row["site_id"],
        region=row["region"],
        active=row["active"],
        approvals=frozenset(Approval(a["regulator"], a["use"], a["product_code"]) for a in row["approvals"]),
        daily_capacity={k: int(v) for k, v in row["daily_capacity"].items()},
        outages=tuple(
            Window(date.fromisoformat(o["start_date"]), date.fromisoformat(o["end_date"]))
            for o in row["outages"]
        ),
        timezone=row["timezone"],
    )


class PostgresSites(SiteRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def all(self) -> list[Site]:
        return [_site(r) for r in await self.conn.fetch("SELECT * FROM sites")]

    async def get(self, site_id: str) -> Site | None:
        row = await self.conn.fetchrow("SELECT * FROM sites WHERE site_id = $1", site_id)
        return _site(row) if row is not None else None

    async def upsert(self, site: SiteRegisteredV1) -> None:
        await self.conn.execute(UPSERT_SITE, *_site_args(site))


UPSERT_SITE = """INSERT INTO sites (site_id, region, timezone, active, approvals, daily_capacity, outages)
    VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7::jsonb)
    ON CONFLICT (site_id) DO UPDATE SET region = $2, timezone = $3, active = $4,
                                        approvals = $5::jsonb, daily_capacity = $6::jsonb,
                                        outages = $7::jsonb, updated_at = now()"""


def _site_args(site: SiteRegisteredV1) -> tuple[Any, ...]:
    return (
        site.site_id,
        site.region,
        site.timezone,
        site.active,
        [a.model_dump() for a in site.approvals],
        site.daily_capacity,
        [o.model_dump(mode="json") for o in site.outages],
    )


# ---- orders as scheduling knows them -----------------------------------------------------------------


class OrderRepository(ABC):
    @abstractmethod
    async def closed(self, order_id: uuid.UUID) -> str | None:
        """`cancelled` or `failed` when the order is over for scheduling, else None."""

    @abstractmethod
    async def close(self, order_id: uuid.UUID, status: str, reason: str) -> None:
        """Remember the order is over (the first word stays)."""

    @abstractmethod
    async def products(self, order_id: uuid.UUID) -> set[str]:
        """Products the order holds a live slot for or waits for."""


class PostgresOrders(OrderRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def closed(self, order_id: uuid.UUID) -> str | None:
        status: str | None = await self.conn.fetchval(
            "SELECT status FROM closed_orders WHERE order_id = $1", order_id
        )
        return status

    async def close(self, order_id: uuid.UUID, status: str, reason: str) -> None:
        await self.conn.execute(
            """INSERT INTO closed_orders (order_id, status, reason) VALUES ($1, $2, $3)
               ON CONFLICT (order_id) DO NOTHING""",
            order_id,
            status,
            reason,
        )

    async def products(self, order_id: uuid.UUID) -> set[str]:
        rows = await self.conn.fetch(
            """SELECT product_code FROM slots WHERE order_id = $1 AND status IN ('held', 'confirmed')
               UNION SELECT product_code FROM waitlist WHERE order_id = $1""",
            order_id,
        )
        return {r["product_code"] for r in rows}


# ---- the transaction ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BookingState:
    """What a booking reads under its product's lock: the order's live slot and, when it has none, the
    site copy, the product's capacity use from a day, and the centre's use when a quota counts it."""

    live: Slot | None
    sites: list[Site]
    usage: Usage
    centre_usage: dict[date, int] | None


class SchedulingTx(AuditedTx):
    """One transaction of scheduling: its repositories, its product locks, its outbox and its audit
    trail (`tx.audit(...)`: ids and codes only, appended at commit)."""

    def __init__(
        self,
        conn: asyncpg.Connection | None,
        outbox: EventSink,
        *,
        slots: SlotRepository,
        waitlist: WaitlistRepository,
        sites: SiteRepository,
        orders: OrderRepository,
        locks: ProductLocks,
        holds: HoldRepository,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(conn, outbox, audit=audit)
        self.holds = holds
        self.slots = slots
        self.waitlist = waitlist
        self.sites = sites
        self.orders = orders
        self.locks = locks

    async def lock_site_products(self, site_id: str, products: Iterable[str]) -> set[str]:
        """Take the locks of these products and of every product of the site's copy as it is now; the
        products locked."""
        old = await self.sites.get(site_id)
        wanted = set(products) | (old.products if old is not None else set())
        await self.locks.take(wanted)
        return wanted

    async def replace_site(self, site: SiteRegisteredV1) -> list[Slot]:
        """Keep the registry's latest word on the site (`sites.upsert`); the live slots at the site
        (`slots.live_at`)."""
        await self.sites.upsert(site)
        return await self.slots.live_at(site.site_id)

    async def closed_else_lock(self, order_id: uuid.UUID, products: Iterable[str]) -> str | None:
        """`cancelled` or `failed` when the order is over for scheduling (nothing is locked then), else
        None, with the products' locks taken."""
        if closed := await self.orders.closed(order_id):
            return closed
        await self.locks.take(products)
        return None

    async def booking_state(
        self, order_id: uuid.UUID, product: str, since: date, centre: str | None
    ) -> BookingState:
        """Read under the product's lock: the order's live slot; when it has none, every site, the
        product's capacity use from `since` and, for `centre` (None: no quota counts), the centre's."""
        live = await self.slots.live(order_id)
        if live is not None:
            return BookingState(live, [], {}, None)
        return BookingState(
            None,
            await self.sites.all(),
            await self.slots.usage(product, since),
            None if centre is None else await self.slots.centre_usage(centre, product, since),
        )

    async def add_slot(self, slot: Slot) -> bool:
        """Book the slot and take its order off the waitlist; True when the order was waiting."""
        await self.slots.add(slot)
        return await self.waitlist.remove(slot.order_id)


class PostgresSchedulingTx(SchedulingTx):
    """The Postgres transaction: what `SchedulingTx` reads or writes in several steps, in one statement."""

    async def lock_site_products(self, site_id: str, products: Iterable[str]) -> set[str]:
        assert self.conn is not None
        rows = await self.conn.fetch(LOCK_SITE_PRODUCTS, site_id, sorted(set(products)))
        wanted = {p for row in rows for p in row["products"]}
        self.locks.held.update(wanted)
        return wanted

    async def replace_site(self, site: SiteRegisteredV1) -> list[Slot]:
        assert self.conn is not None
        rows = await self.conn.fetch(
            f"""WITH replaced AS ({UPSERT_SITE})
                SELECT * FROM slots WHERE site_id = $1 AND status IN ('held', 'confirmed')
                ORDER BY created_at, slot_id""",
            *_site_args(site),
        )
        return [_slot(r) for r in rows]

    async def closed_else_lock(self, order_id: uuid.UUID, products: Iterable[str]) -> str | None:
        assert self.conn is not None
        missing = sorted(set(products) - self.locks.held)
        if missing and await self.conn.fetch(LOCK_PRODUCTS_UNLESS_CLOSED, order_id, missing):
            self.locks.held.update(missing)  # not closed, and locked: the usual case, one round trip
            return None
        # closed (no lock taken), or nothing to lock
        return await super().closed_else_lock(order_id, missing)

    async def booking_state(
        self, order_id: uuid.UUID, product: str, since: date, centre: str | None
    ) -> BookingState:
        assert self.conn is not None
        row = await self.conn.fetchrow(BOOKING_STATE, order_id, product, since, centre)
        if row["slot_id"] is not None:
            return BookingState(_slot(row), [], {}, None)
        return BookingState(
            None,
            [_site(r) for r in row["site_copy"]],
            {(site, product, date.fromisoformat(day)): int(n) for site, day, n in row["product_usage"]},
            None
            if row["centre_usage"] is None
            else {date.fromisoformat(day): int(n) for day, n in row["centre_usage"]},
        )

    async def add_slot(self, slot: Slot) -> bool:
        assert self.conn is not None
        left = await self.conn.fetchval(
            f"""WITH booked AS ({SLOT_INSERT})
               DELETE FROM waitlist WHERE order_id = $2 RETURNING true""",
            *slot_row(slot),
        )
        return bool(left)


# LOCK_PRODUCTS for products $2 and every product of site $1's copy (capacity or approval) as it is when
# the statement starts: a row per key (in key order) with the products it locks (a key may be shared);
# a lock this transaction holds already is taken again (no wait)
LOCK_SITE_PRODUCTS = """SELECT pg_advisory_xact_lock(k), products FROM (
    SELECT hashtext('v2v-slots:' || p)::bigint AS k, array_agg(DISTINCT p) AS products FROM (
        SELECT unnest($2::text[]) AS p
        UNION SELECT jsonb_object_keys(daily_capacity) FROM sites WHERE site_id = $1
        UNION SELECT a ->> 'product_code' FROM sites, jsonb_array_elements(approvals) AS a
              WHERE site_id = $1
    ) AS wanted WHERE p IS NOT NULL GROUP BY 1 ORDER BY 1
) AS keys"""

# LOCK_PRODUCTS unless the order is closed: a row per key locked, none when closed
LOCK_PRODUCTS_UNLESS_CLOSED = """SELECT pg_advisory_xact_lock(k) FROM (
    SELECT DISTINCT hashtext('v2v-slots:' || p)::bigint AS k FROM unnest($2::text[]) AS p
    WHERE NOT EXISTS (SELECT 1 FROM closed_orders WHERE order_id = $1) ORDER BY k
) AS keys"""

# `PostgresSchedulingTx.booking_state`: the order's live slot (its columns, NULL when it has none) and,
# only when it has none, the site copy, the product's use and the centre's (with $4) as JSON; the
# usage reads are those of `PostgresSlots.usage` and `.centre_usage` (the counts of migration 0006)
BOOKING_STATE = """SELECT s.*,
    CASE WHEN s.slot_id IS NULL THEN
        (SELECT coalesce(json_agg(c), '[]') FROM sites AS c) END AS site_copy,
    CASE WHEN s.slot_id IS NULL THEN
        (SELECT coalesce(json_agg(json_build_array(u.site_id, u.day, u.n)), '[]') FROM capacity_used AS u
         WHERE u.product_code = $2 AND u.day >= $3 AND u.n > 0) END AS product_usage,
    CASE WHEN s.slot_id IS NULL AND $4::text IS NOT NULL THEN
        (SELECT coalesce(json_agg(json_build_array(u.day, u.n)), '[]') FROM centre_capacity_used AS u
         WHERE u.treatment_center_id = $4 AND u.product_code = $2 AND u.day >= $3 AND u.n > 0)
    END AS centre_usage
FROM (SELECT 1) AS one
LEFT JOIN slots AS s ON s.order_id = $1 AND s.status IN ('held', 'confirmed')"""


def postgres_tx(conn: asyncpg.Connection, outbox: EventSink) -> SchedulingTx:
    """The `tx_factory` of the unit of work: repositories on the transaction's connection."""
    return PostgresSchedulingTx(
        conn,
        outbox,
        slots=PostgresSlots(conn),
        waitlist=PostgresWaitlist(conn),
        sites=PostgresSites(conn),
        orders=PostgresOrders(conn),
        locks=PostgresProductLocks(conn),
        holds=PostgresHolds(conn),
    )
