"""All the SQL of the logistics schema: one repository per aggregate (an abstract base and its Postgres
class), and the service's `Tx` (the repositories of one transaction) with the factory the runtime uses.

Every method runs on the transaction's connection: the state change and the events it causes (outbox)
commit together. Temperatures are `numeric` columns: they come back as floats.

Tenancy lives here: every read of a shipment takes the caller's `Tenant` (None: not confined) and a
shipment outside it is simply not there (the service layer answers 404, never revealing it exists).
"""

from __future__ import annotations

import abc
import dataclasses
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from logistics_service.domain.carriers import Tenant
from logistics_service.domain.shipment import (
    CustodyEvent,
    Leg,
    Shipment,
    StatusChange,
    TemperatureReading,
)
from v2v_audit import AuditedTx, AuditTrail
from v2v_messaging import EventSink

# ---- abstract repositories (what the service layer sees) ------------------------------------------


class ShipmentRepository(abc.ABC):
    @abc.abstractmethod
    async def serialise_order(self, order_id: uuid.UUID) -> None:
        """One transaction at a time per order (across replicas too), until this transaction ends."""

    @abc.abstractmethod
    async def get(
        self, shipment_id: uuid.UUID, *, lock: bool = False, tenant: Tenant | None = None
    ) -> Shipment | None:
        """The shipment, if there is one the tenant may see."""

    @abc.abstractmethod
    async def of_order(
        self, order_id: uuid.UUID, *, leg: Leg | None = None, lock: bool = False
    ) -> list[Shipment]:
        """The order's shipments (of one leg), oldest first."""

    @abc.abstractmethod
    async def search(
        self,
        order_id: uuid.UUID | None = None,
        *,
        tenant: Tenant | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Shipment]:
        """The shipments the tenant may see (of one order), oldest first: one page."""

    @abc.abstractmethod
    async def exists(self, shipment_id: uuid.UUID, *, tenant: Tenant | None = None) -> bool: ...

    @abc.abstractmethod
    async def add(self, shipment: Shipment) -> None:
        """Insert a new shipment and its first status-history line."""

    @abc.abstractmethod
    async def save(self, shipment: Shipment) -> None:
        """Write a shipment's pending changes (status, reason, set fields) and log its status changes."""

    @abc.abstractmethod
    async def history(self, shipment_id: uuid.UUID) -> list[StatusChange]: ...


class CustodyRepository(abc.ABC):
    @abc.abstractmethod
    async def add(self, event: CustodyEvent) -> int:
        """Append a custody event; returns its id."""

    @abc.abstractmethod
    async def of_shipment(
        self, shipment_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
    ) -> list[CustodyEvent]:
        """The chain of custody, in the order things happened (one page of it when `limit` is given)."""


class ReadingRepository(abc.ABC):
    @abc.abstractmethod
    async def add(self, reading: TemperatureReading) -> int:
        """Append a temperature reading; returns its id."""

    @abc.abstractmethod
    async def of_shipment(
        self, shipment_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
    ) -> list[TemperatureReading]:
        """Every reading, in measurement order (one page of them when `limit` is given)."""


class EndedOrderRepository(abc.ABC):
    """Orders that were cancelled or failed: a late fact crossing the end plans nothing for them."""

    @abc.abstractmethod
    async def add(self, order_id: uuid.UUID, outcome: str, reason: str) -> None:
        """Record the end (the first one counts)."""

    @abc.abstractmethod
    async def ended(self, order_id: uuid.UUID) -> bool: ...


class OrderProductRepository(abc.ABC):
    """The product of each order, learnt from `order.submitted` and `site.booking_confirmed`: whose
    shipping limits its outbound leg travels by (`site.product_released` does not name the product)."""

    @abc.abstractmethod
    async def remember(self, order_id: uuid.UUID, product_code: str, as_of: datetime) -> None:
        """Record an order's product (a fact older than the one recorded is ignored)."""

    @abc.abstractmethod
    async def product_of(self, order_id: uuid.UUID) -> str | None: ...


LocationKind = Literal["site", "centre"]


class RegionRepository(abc.ABC):
    """The region of each site and treatment centre, learnt from `site.registered` and `order.submitted`:
    what the choice of a leg's carrier needs."""

    @abc.abstractmethod
    async def remember(self, location_id: str, kind: LocationKind, region: str, as_of: datetime) -> None:
        """Record a location's region (a fact older than the one recorded is ignored)."""

    @abc.abstractmethod
    async def region_of(self, location_id: str) -> str | None: ...


class LogisticsTx(AuditedTx):
    """One transaction of the logistics service: its repositories, its outbox and its audit trail
    (`tx.audit(...)`: ids, codes and opaque references only, appended at commit)."""

    def __init__(
        self,
        conn: asyncpg.Connection | None,
        outbox: EventSink,
        *,
        shipments: ShipmentRepository,
        custody: CustodyRepository,
        readings: ReadingRepository,
        ended_orders: EndedOrderRepository,
        regions: RegionRepository,
        order_products: OrderProductRepository,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(conn, outbox, audit=audit)
        self.shipments = shipments
        self.custody = custody
        self.readings = readings
        self.ended_orders = ended_orders
        self.regions = regions
        self.order_products = order_products

    async def remember_order(
        self, order_id: uuid.UUID, product_code: str, centre_id: str, region: str, as_of: datetime
    ) -> None:
        """What `order.submitted` teaches: the order's product and its centre's region."""
        await self.regions.remember(centre_id, "centre", region, as_of)
        await self.order_products.remember(order_id, product_code, as_of)

    async def leg_state(
        self,
        order_id: uuid.UUID,
        leg: Leg,
        ends: tuple[str, str],
        *,
        product: tuple[str, datetime] | None = None,
    ) -> LegState:
        """Under the order's lock (`shipments.serialise_order`), what planning a leg reads: whether the
        order ended, its shipments of the leg (locked, oldest first; none read when it ended) and the
        regions of the leg's two ends. `product` (code, as of): the order's product learnt first."""
        if product is not None:
            await self.order_products.remember(order_id, product[0], product[1])
        if await self.ended_orders.ended(order_id):
            return LegState(True, [], None, None)
        shipments = await self.shipments.of_order(order_id, leg=leg, lock=True)
        return LegState(
            False, shipments, await self.regions.region_of(ends[0]), await self.regions.region_of(ends[1])
        )


@dataclasses.dataclass(frozen=True)
class LegState:
    """`LogisticsTx.leg_state`: what planning a leg reads under the order's lock."""

    ended: bool
    shipments: list[Shipment]
    origin_region: str | None
    destination_region: str | None


# ---- Postgres ---------------------------------------------------------------------------------------


def _values(row: asyncpg.Record, cls: type[Any]) -> dict[str, Any]:
    """A row as the dataclass's fields: numerics (temperatures) as floats."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in row.items() if k in names}


def _shipment(row: asyncpg.Record) -> Shipment:
    return Shipment(**_values(row, Shipment))


# the tenant filter of every shipment read: $n is the carrier id, $n+1 the location id (both may be NULL)
def _tenant_sql(n: int) -> str:
    return (
        f" AND (${n}::text IS NULL OR carrier_id = ${n})"
        f" AND (${n + 1}::text IS NULL OR origin = ${n + 1} OR destination = ${n + 1})"
    )


def _tenant_args(tenant: Tenant | None) -> tuple[str | None, str | None]:
    return (None, None) if tenant is None else (tenant.carrier_id, tenant.location_id)


def _page(limit: int | None, offset: int, n: int) -> tuple[str, tuple[int | None, int]]:
    """LIMIT/OFFSET as parameters $n, $n+1 (no limit: every row)."""
    return f" LIMIT ${n} OFFSET ${n + 1}", (limit, offset)


def _with_log(write: str, n: int) -> str:
    """The write of a shipment ($1 its id) and the status-history lines of its pending changes ($n, $n+1,
    $n+2: the befores, afters and reasons, in order) in one statement."""
    return f"""WITH written AS ({write})
        INSERT INTO shipment_status_log (shipment_id, status_before, status_after, reason)
        SELECT $1, c.status_before, c.status_after, c.reason
        FROM unnest(${n}::text[], ${n + 1}::text[], ${n + 2}::text[]) WITH ORDINALITY
            AS c(status_before, status_after, reason, i)
        ORDER BY c.i"""


def _log_args(shipment: Shipment) -> tuple[list[str | None], list[str], list[str]]:
    changes = shipment.pending
    return (
        [c.status_before for c in changes],
        [c.status_after for c in changes],
        [c.reason for c in changes],
    )


class PostgresShipments(ShipmentRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def serialise_order(self, order_id: uuid.UUID) -> None:
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"logistics-order:{order_id}"
        )

    async def get(
        self, shipment_id: uuid.UUID, *, lock: bool = False, tenant: Tenant | None = None
    ) -> Shipment | None:
        sql = (
            "SELECT * FROM shipments WHERE shipment_id = $1"
            + _tenant_sql(2)
            + (" FOR UPDATE" if lock else "")
        )
        row = await self.conn.fetchrow(sql, shipment_id, *_tenant_args(tenant))
        return None if row is None else _shipment(row)

    async def of_order(
        self, order_id: uuid.UUID, *, leg: Leg | None = None, lock: bool = False
    ) -> list[Shipment]:
        rows = await self.conn.fetch(
            """SELECT * FROM shipments WHERE order_id = $1 AND ($2::text IS NULL OR leg = $2)
               ORDER BY created_at"""
            + (" FOR UPDATE" if lock else ""),
            order_id,
            leg,
        )
        return [_shipment(r) for r in rows]

    async def search(
        self,
        order_id: uuid.UUID | None = None,
        *,
        tenant: Tenant | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Shipment]:
        page, page_args = _page(limit, offset, 4)
        rows = await self.conn.fetch(
            "SELECT * FROM shipments WHERE ($1::uuid IS NULL OR order_id = $1)"
            + _tenant_sql(2)
            + " ORDER BY created_at, shipment_id"
            + page,
            order_id,
            *_tenant_args(tenant),
            *page_args,
        )
        return [_shipment(r) for r in rows]

    async def exists(self, shipment_id: uuid.UUID, *, tenant: Tenant | None = None) -> bool:
        return bool(
            await self.conn.fetchval(
                "SELECT 1 FROM shipments WHERE shipment_id = $1" + _tenant_sql(2),
                shipment_id,
                *_tenant_args(tenant),
            )
        )

    async def add(self, shipment: Shipment) -> None:
        s = shipment
        await self.conn.execute(
            _with_log(
                """INSERT INTO shipments (shipment_id, order_id, coi, leg, origin, destination,
                                          material_condition, min_temp_c, max_temp_c, planned_pickup_date,
                                          status, origin_trace, booking_id, run, status_reason, carrier_id,
                                          product_code, excursion_tolerance_min, din, lot)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14, $15, $16,
                           $17, $18, $19, $20)""",
                21,
            ),
            s.shipment_id,
            s.order_id,
            s.coi,
            s.leg,
            s.origin,
            s.destination,
            s.material_condition,
            s.min_temp_c,
            s.max_temp_c,
            s.planned_pickup_date,
            s.status,
            s.origin_trace,
            s.booking_id,
            s.run,
            s.status_reason,
            s.carrier_id,
            s.product_code,
            s.excursion_tolerance_min,
            s.din,
            s.lot,
            *_log_args(shipment),
        )
        shipment.saved()

    async def save(self, shipment: Shipment) -> None:
        if not shipment.dirty and not shipment.pending:
            return
        s = shipment
        await self.conn.execute(
            _with_log(
                """UPDATE shipments SET status = $2, status_reason = $3, ready_for_pickup_at = $4,
                                        excursion_at = $5, held_from_status = $6, quarantine_decision = $7,
                                        picked_up_at = $8, delivered_at = $9, excursion_minutes = $10,
                                        din = $11, destination = $12, booking_id = $13, updated_at = now()
                   WHERE shipment_id = $1""",
                14,
            ),
            s.shipment_id,
            s.status,
            s.status_reason,
            s.ready_for_pickup_at,
            s.excursion_at,
            s.held_from_status,
            s.quarantine_decision,
            s.picked_up_at,
            s.delivered_at,
            s.excursion_minutes,
            s.din,
            s.destination,
            s.booking_id,
            *_log_args(shipment),
        )
        shipment.saved()

    async def history(self, shipment_id: uuid.UUID) -> list[StatusChange]:
        rows = await self.conn.fetch(
            """SELECT status_before, status_after, reason, changed_at FROM shipment_status_log
               WHERE shipment_id = $1 ORDER BY id""",
            shipment_id,
        )
        return [StatusChange(**dict(r)) for r in rows]


class PostgresCustody(CustodyRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(self, event: CustodyEvent) -> int:
        return int(
            await self.conn.fetchval(
                """INSERT INTO custody_events (shipment_id, milestone, occurred_at, location, handled_by,
                                               received_from, temperature_c, coi_verified, din, lot,
                                               pair_verified)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id""",
                event.shipment_id,
                event.milestone,
                event.occurred_at,
                event.location,
                event.handled_by,
                event.received_from,
                event.temperature_c,
                event.coi_verified,
                event.din,
                event.lot,
                event.pair_verified,
            )
        )

    async def of_shipment(
        self, shipment_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
    ) -> list[CustodyEvent]:
        page, page_args = _page(limit, offset, 2)
        rows = await self.conn.fetch(
            "SELECT * FROM custody_events WHERE shipment_id = $1 ORDER BY occurred_at, id" + page,
            shipment_id,
            *page_args,
        )
        return [CustodyEvent(**_values(r, CustodyEvent)) for r in rows]


class PostgresReadings(ReadingRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(self, reading: TemperatureReading) -> int:
        r = reading
        return int(
            await self.conn.fetchval(
                """INSERT INTO temperature_readings (shipment_id, reading_c, measured_at, source,
                                                     custody_event_id, min_c, max_c, in_range, coi_verified)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id""",
                r.shipment_id,
                r.reading_c,
                r.measured_at,
                r.source,
                r.custody_event_id,
                r.min_c,
                r.max_c,
                r.in_range,
                r.coi_verified,
            )
        )

    async def of_shipment(
        self, shipment_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
    ) -> list[TemperatureReading]:
        page, page_args = _page(limit, offset, 2)
        rows = await self.conn.fetch(
            "SELECT * FROM temperature_readings WHERE shipment_id = $1 ORDER BY measured_at, id" + page,
            shipment_id,
            *page_args,
        )
        return [TemperatureReading(**_values(r, TemperatureReading)) for r in rows]


class PostgresEndedOrders(EndedOrderRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(self, order_id: uuid.UUID, outcome: str, reason: str) -> None:
        await self.conn.execute(
            """INSERT INTO ended_orders (order_id, outcome, reason) VALUES ($1, $2, $3)
               ON CONFLICT (order_id) DO NOTHING""",
            order_id,
            outcome,
            reason,
        )

    async def ended(self, order_id: uuid.UUID) -> bool:
        return bool(await self.conn.fetchval("SELECT 1 FROM ended_orders WHERE order_id = $1", order_id))


class PostgresRegions(RegionRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def remember(self, location_id: str, kind: LocationKind, region: str, as_of: datetime) -> None:
        await self.conn.execute(
            """INSERT INTO location_regions (location_id, kind, region, as_of) VALUES ($1, $2, $3, $4)
               ON CONFLICT (location_id) DO UPDATE SET kind = $2, region = $3, as_of = $4
               WHERE location_regions.as_of <= EXCLUDED.as_of""",
            location_id,
            kind,
            region,
            as_of,
        )

    async def region_of(self, location_id: str) -> str | None:
        found = await self.conn.fetchval(
            "SELECT region FROM location_regions WHERE location_id = $1", location_id
        )
        return None if found is None else str(found)


class PostgresOrderProducts(OrderProductRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def remember(self, order_id: uuid.UUID, product_code: str, as_of: datetime) -> None:
        await self.conn.execute(
            """INSERT INTO order_products (order_id, product_code, as_of) VALUES ($1, $2, $3)
               ON CONFLICT (order_id) DO UPDATE SET product_code = $2, as_of = $3
               WHERE order_products.as_of <= EXCLUDED.as_of""",
            order_id,
            product_code,
            as_of,
        )

    async def product_of(self, order_id: uuid.UUID) -> str | None:
        found = await self.conn.fetchval(
            "SELECT product_code FROM order_products WHERE order_id = $1", order_id
        )
        return None if found is None else str(found)


class PostgresLogisticsTx(LogisticsTx):
    """The Postgres transaction: what `LogisticsTx` reads or writes in several steps, in one statement."""

    async def remember_order(
        self, order_id: uuid.UUID, product_code: str, centre_id: str, region: str, as_of: datetime
    ) -> None:
        assert self.conn is not None
        await self.conn.execute(
            f"""WITH centre AS ({REMEMBER_REGION.format(location="$3", kind="'centre'", region="$4")})
                {REMEMBER_PRODUCT}""",
            order_id,
            product_code,
            centre_id,
            region,
            as_of,
        )

    async def leg_state(
        self,
        order_id: uuid.UUID,
        leg: Leg,
        ends: tuple[str, str],
        *,
        product: tuple[str, datetime] | None = None,
    ) -> LegState:
        assert self.conn is not None
        code, as_of = product if product is not None else (None, None)
        rows = await self.conn.fetch(LEG_STATE, order_id, code, as_of, leg, ends[0], ends[1])
        first = rows[0]
        if first["order_ended"]:
            return LegState(True, [], None, None)
        return LegState(
            False,
            [_shipment(r) for r in rows if r["shipment_id"] is not None],
            first["origin_region"],
            first["destination_region"],
        )


# the upserts of `PostgresRegions.remember` and `PostgresOrderProducts.remember` (order $1, product $2,
# as of $5; the region's parameters are named by the caller)
REMEMBER_REGION = """INSERT INTO location_regions (location_id, kind, region, as_of)
    VALUES ({location}, {kind}, {region}, $5)
    ON CONFLICT (location_id) DO UPDATE SET kind = EXCLUDED.kind, region = EXCLUDED.region,
        as_of = EXCLUDED.as_of
    WHERE location_regions.as_of <= EXCLUDED.as_of"""
REMEMBER_PRODUCT = """INSERT INTO order_products (order_id, product_code, as_of) VALUES ($1, $2, $5)
    ON CONFLICT (order_id) DO UPDATE SET product_code = EXCLUDED.product_code, as_of = EXCLUDED.as_of
    WHERE order_products.as_of <= EXCLUDED.as_of"""

# `PostgresLogisticsTx.leg_state`, run under the order's lock: the product learnt (when $2 is given),
# the order's shipments of leg $4 locked (the columns of each; one row of NULLs when it has none), and on
# every row whether the order ended and the regions of the ends $5, $6
LEG_STATE = """WITH product AS (
        INSERT INTO order_products (order_id, product_code, as_of)
        SELECT $1::uuid, $2::text, $3::timestamptz WHERE $2::text IS NOT NULL
        ON CONFLICT (order_id) DO UPDATE SET product_code = EXCLUDED.product_code, as_of = EXCLUDED.as_of
        WHERE order_products.as_of <= EXCLUDED.as_of),
    locked AS (
        SELECT * FROM shipments WHERE order_id = $1 AND leg = $4::text
        AND NOT EXISTS (SELECT 1 FROM ended_orders WHERE order_id = $1) FOR UPDATE)
    SELECT l.*,
        EXISTS (SELECT 1 FROM ended_orders WHERE order_id = $1) AS order_ended,
        (SELECT region FROM location_regions WHERE location_id = $5) AS origin_region,
        (SELECT region FROM location_regions WHERE location_id = $6) AS destination_region
    FROM (SELECT 1) AS one LEFT JOIN locked AS l ON true
    ORDER BY l.created_at"""


def tx_factory(conn: asyncpg.Connection, outbox: EventSink) -> LogisticsTx:
    """The runtime's `Tx` for the logistics schema: Postgres repositories on the transaction's connection."""
    return PostgresLogisticsTx(
        conn,
        outbox,
        shipments=PostgresShipments(conn),
        custody=PostgresCustody(conn),
        readings=PostgresReadings(conn),
        ended_orders=PostgresEndedOrders(conn),
        regions=PostgresRegions(conn),
        order_products=PostgresOrderProducts(conn),
    )
