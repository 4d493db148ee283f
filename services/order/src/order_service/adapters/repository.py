"""All SQL of the order service (schema `ordering`): one repository per aggregate, an abstract base and a
Postgres implementation each, and the service's `OrderTx` (the repositories of one transaction).

Every Postgres repository runs on the connection of the unit of work that built it; none opens its own
transaction. `adapters/memory.py` has the in-memory counterparts for unit tests.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import yaml

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
from v2v_audit import AuditedTx, AuditTrail, PgAuditTrail, Record
from v2v_audit import store as audit_store
from v2v_contracts import CloudEvent
from v2v_messaging import EventSink
from v2v_servicekit.signatures import Signature, SignatureCheck, SignatureRepository, SignedRecord, Signer

OPEN_ORDER_INDEX = "orders_one_open_per_patient_product"  # migration 0006
SEED_DIR = Path(__file__).resolve().parent.parent / "seed"
CENTRES_SEED = SEED_DIR / "treatment_centers.yaml"


def read_centres(path: Path = CENTRES_SEED) -> list[Centre]:
    """The certified treatment centres of the seed file (read at start-up, never at import)."""
    return [Centre(**entry) for entry in yaml.safe_load(path.read_text())]


# ---- orders ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Intake:
    """What placing an order checks (`OrderRepository.intake`)."""

    placed: uuid.UUID | None  # the order placed already under the same client and Idempotency-Key
    centre: Centre | None  # the certified centre (None: unknown or uncertified)
    has_product: bool
    network_known: bool  # any manufacturing site known at all
    served: bool  # an active site approved for the centre's regulator, the use and the product


@dataclass(frozen=True)
class OrderHistory:
    """The order with what its view shows (`OrderRepository.history`)."""

    order: OrderRecord
    region: str | None  # its centre's region (None: centre not found)
    timeline: list[TimelineEntry]
    collections: list[dict[str, Any]]
    materials: list[MaterialDisposition]
    tasks: list[AuthorityTask]
    decisions: list[dict[str, Any]]  # as `DecisionRepository.of_order`


class OrderRepository(ABC):
    @abstractmethod
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
        """Record a new order under the next COI of `year` (`make_coi(facility_id, year, n)` with `n` from
        `next_coi_sequence(year)`, taken in the same step, so that the counter is held only from here to
        the transaction's end); returns the COI. `open_order_exists()` (a Conflict) when the centre has
        an open order for the same patient and product already. `placement`: (client id,
        Idempotency-Key) it was placed with."""

    @abstractmethod
    async def by_placement(self, placed_by: str, key: str) -> uuid.UUID | None:
        """The order `placed_by` placed with Idempotency-Key `key`, if any."""

    @abstractmethod
    async def get(
        self, order_id: uuid.UUID, *, lock: bool = False, centre: str | None = None
    ) -> OrderRecord | None:
        """The order; `lock` holds it until the transaction ends (every change of an order does).
        `centre` confines the lookup to that centre's orders (a tenant's): another's is None."""

    @abstractmethod
    async def update(self, order_id: uuid.UUID, **fields: Any) -> None:
        """Set columns of the order; bumps its version and `updated_at`."""

    @abstractmethod
    async def page(
        self, *, tenant: str | None, centre: str | None, limit: int, offset: int
    ) -> tuple[list[OrderRecord], int]:
        """A page of orders (oldest first) and the total count: only the `tenant` centre's when it is
        set (the caller's), narrowed to `centre` when that is set too (another centre: none)."""

    @abstractmethod
    async def next_coi_sequence(self, year: int) -> int:
        """The next identification sequence number of the year (a step of this transaction): COIs and the
        DINs of collections share it, so that no DIN ever equals a COI."""

    # reads and writes that span the order's own tables, each one round trip

    @abstractmethod
    async def intake(
        self,
        centre_id: str,
        product_code: str,
        order_type: str,
        placement: tuple[str, str] | None,
    ) -> Intake:
        """What placing an order checks, read at once: the order placed already with `placement`, the
        certified centre, whether the product is orderable, whether the network is known and whether an
        active site serves the centre's regulator for `order_type` and the product. Reads only: the COI
        sequence number is taken by `add`."""

    @abstractmethod
    async def get_with_centre(
        self, order_id: uuid.UUID, *, centre: str | None = None
    ) -> tuple[OrderRecord, Centre | None] | None:
        """The order, locked until the transaction ends (as `get(lock=True)`), with its treatment centre
        (certified or not); `centre` confines it to that centre's orders."""

    @abstractmethod
    async def record(self, order_id: uuid.UUID, fields: dict[str, Any], entry: TimelineEntry) -> bool:
        """`update(order_id, **fields)` and `TimelineRepository.add(entry)` (an entry of the order) at
        once; whether the order has parked facts (as this transaction sees them after both)."""

    @abstractmethod
    async def history(self, order_id: uuid.UUID, *, centre: str | None = None) -> OrderHistory | None:
        """The order with everything its view shows, read at once (one snapshot); `centre` confines it
        to that centre's orders (another's is None)."""


class PgOrders(OrderRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

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
        try:
            # the sequence step and the insert in one statement: the counter's row lock (every placing
            # of the year waits for it) is taken here and held to COMMIT, a few round trips
            row = await self.conn.fetchrow(
                """WITH step AS (
                       INSERT INTO coi_sequences (year, last_value) VALUES ($14, 1)
                       ON CONFLICT (year) DO UPDATE SET last_value = coi_sequences.last_value + 1
                       RETURNING last_value)
                   INSERT INTO orders (order_id, coi, treatment_center_id, product_code, order_type,
                                       patient_ref, requested_apheresis_date, status, first_trace,
                                       placed_by, placement_key, indication, weight_kg)
                   SELECT $1, coi_of($2, $14, step.last_value), $3, $4, $5, $6, $7, $8, $9, $10, $11,
                          $12, $13
                   FROM step
                   RETURNING coi, (SELECT last_value FROM step) AS sequence""",
                order_id,
                facility_id,
                treatment_center_id,
                product_code,
                order_type,
                patient_ref,
                requested_apheresis_date,
                status,
                first_trace,
                placement[0] if placement else None,
                placement[1] if placement else None,
                indication,
                weight_kg,
                year,
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == OPEN_ORDER_INDEX:  # the index's error names the key: not passed on
                raise open_order_exists() from None
            if exc.constraint_name == "orders_by_placement":  # the same key placing it at the same time
                raise open_order_exists() from None
            raise
        coi = make_coi(facility_id, year, row["sequence"])
        if row["coi"] != coi:  # the database's COI function and ours disagree: commit nothing
            raise RuntimeError(f"the database made COI {row['coi']} for {coi}")
        return coi

    async def by_placement(self, placed_by: str, key: str) -> uuid.UUID | None:
        found: uuid.UUID | None = await self.conn.fetchval(
            "SELECT order_id FROM orders WHERE placed_by = $1 AND placement_key = $2", placed_by, key
        )
        return found

    async def get(
        self, order_id: uuid.UUID, *, lock: bool = False, centre: str | None = None
    ) -> OrderRecord | None:
        sql = "SELECT * FROM orders WHERE order_id = $1 AND ($2::text IS NULL OR treatment_center_id = $2)"
        row = await self.conn.fetchrow(sql + (" FOR UPDATE" if lock else ""), order_id, centre)
        return OrderRecord.from_mapping(row) if row is not None else None

    async def update(self, order_id: uuid.UUID, **fields: Any) -> None:
        if not fields:
            return
        unknown = set(fields) - ORDER_COLUMNS
        if unknown:
            raise ValueError(f"not order columns: {sorted(unknown)}")
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=2))
        await self.conn.execute(
            f"UPDATE orders SET {sets}, updated_at = now(), version = version + 1 WHERE order_id = $1",
            order_id,
            *fields.values(),
        )

    async def page(
        self, *, tenant: str | None, centre: str | None, limit: int, offset: int
    ) -> tuple[list[OrderRecord], int]:
        where = """WHERE ($1::text IS NULL OR treatment_center_id = $1)
                     AND ($2::text IS NULL OR treatment_center_id = $2)"""
        rows = await self.conn.fetch(
            f"SELECT * FROM orders {where} ORDER BY created_at, order_id LIMIT $3 OFFSET $4",
            tenant,
            centre,
            limit,
            offset,
        )
        total = await self.conn.fetchval(f"SELECT count(*) FROM orders {where}", tenant, centre)
        return [OrderRecord.from_mapping(r) for r in rows], int(total)

    async def next_coi_sequence(self, year: int) -> int:
        return int(
            await self.conn.fetchval(
                """INSERT INTO coi_sequences (year, last_value) VALUES ($1, 1)
                   ON CONFLICT (year) DO UPDATE SET last_value = coi_sequences.last_value + 1
                   RETURNING last_value""",
                year,
            )
        )

    async def intake(
        self,
        centre_id: str,
        product_code: str,
        order_type: str,
        placement: tuple[str, str] | None,
    ) -> Intake:
        placed_by, key = placement if placement is not None else (None, None)
        row = await self.conn.fetchrow(
            f"""SELECT (SELECT order_id FROM orders WHERE placed_by = $4 AND placement_key = $5) AS placed,
                       {CENTRE_PREFIXED},
                       EXISTS (SELECT 1 FROM products WHERE code = $2) AS has_product,
                       EXISTS (SELECT 1 FROM network_sites) AS network_known,
                       c.id IS NOT NULL AND EXISTS (
                           SELECT 1 FROM site_approvals a JOIN network_sites s USING (site_id)
                           WHERE s.active AND a.regulator = c.regulator AND a.use = $3
                             AND a.product_code = $2) AS served
                FROM (SELECT $1::text AS id) AS wanted
                     LEFT JOIN treatment_centers c ON c.id = wanted.id AND c.certified""",
            centre_id,
            product_code,
            order_type,
            placed_by,
            key,
        )
        return Intake(
            placed=row["placed"],
            centre=_centre_of(row),
            has_product=row["has_product"],
            network_known=row["network_known"],
            served=row["served"],
        )

    async def get_with_centre(
        self, order_id: uuid.UUID, *, centre: str | None = None
    ) -> tuple[OrderRecord, Centre | None] | None:
        # only the order's row is locked (as `get(lock=True)`); the centre is reference data
        row = await self.conn.fetchrow(
            f"""SELECT o.*, {CENTRE_PREFIXED}
                FROM orders o LEFT JOIN treatment_centers c ON c.id = o.treatment_center_id
                WHERE o.order_id = $1 AND ($2::text IS NULL OR o.treatment_center_id = $2)
                FOR UPDATE OF o""",
            order_id,
            centre,
        )
        if row is None:
            return None
        return OrderRecord.from_mapping(row), _centre_of(row)

    async def record(self, order_id: uuid.UUID, fields: dict[str, Any], entry: TimelineEntry) -> bool:
        if entry.order_id != order_id:
            raise ValueError("a timeline entry of another order")
        unknown = set(fields) - ORDER_COLUMNS
        if unknown:
            raise ValueError(f"not order columns: {sorted(unknown)}")
        # data-modifying CTEs run to completion whether or not the query reads them; the EXISTS sees the
        # transaction's state before them (neither touches parked facts). This statement runs after the
        # order was locked, so its snapshot has every fact parked by another transaction that held it.
        n = len(fields)
        sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=2))
        update = (
            f"""updated AS (UPDATE orders SET {sets}, updated_at = now(), version = version + 1
                            WHERE order_id = $1),
            """
            if fields
            else ""
        )
        t = n + 2
        parked = await self.conn.fetchval(
            f"""WITH {update}entry AS (
                    INSERT INTO order_timeline (order_id, event_id, event_type, source, occurred_at,
                                                status_before, status_after, reason, note)
                    VALUES ($1, ${t}, ${t + 1}, ${t + 2}, ${t + 3}, ${t + 4}, ${t + 5}, ${t + 6}, ${t + 7})
                    ON CONFLICT (order_id, event_id) DO NOTHING)
                SELECT EXISTS (SELECT 1 FROM parked_facts WHERE order_id = $1)""",
            order_id,
            *fields.values(),
            entry.event_id,
            entry.event_type,
            entry.source,
            entry.occurred_at,
            entry.status_before,
            entry.status_after,
            entry.reason,
            entry.note,
        )
        return bool(parked)

    async def history(self, order_id: uuid.UUID, *, centre: str | None = None) -> OrderHistory | None:
        # the sub-collections as arrays of anonymous records (native types, the columns' order); jsonb
        # as text (the connection's json codec applies to columns, not to a record's members)
        row = await self.conn.fetchrow(
            f"""SELECT o.*,
                   (SELECT c.region FROM treatment_centers c WHERE c.id = o.treatment_center_id)
                       AS history__region,
                   ARRAY(SELECT ROW({TIMELINE_COLUMNS}) FROM order_timeline t
                         WHERE t.order_id = o.order_id ORDER BY t.occurred_at, t.id) AS history__timeline,
                   ARRAY(SELECT ROW(k.collection, k.din, k.collected_at) FROM collections k
                         WHERE k.order_id = o.order_id ORDER BY k.collection) AS history__collections,
                   ARRAY(SELECT ROW({MATERIAL_DISPOSITION_COLUMNS}) FROM material_dispositions m
                         WHERE m.order_id = o.order_id ORDER BY m.recorded_at, m.disposition_id)
                       AS history__materials,
                   ARRAY(SELECT ROW({TASK_COLUMNS}) FROM authority_tasks a
                         WHERE a.order_id = o.order_id ORDER BY a.created_at, a.task_id) AS history__tasks,
                   ARRAY(SELECT ROW(d.decision_id, d.meaning, d.fields::text, d.decided_at)
                         FROM signed_decisions d
                         WHERE d.order_id = o.order_id ORDER BY d.decided_at, d.decision_id)
                       AS history__decisions
                FROM orders o
                WHERE o.order_id = $1 AND ($2::text IS NULL OR o.treatment_center_id = $2)""",
            order_id,
            centre,
        )
        if row is None:
            return None
        return OrderHistory(
            order=OrderRecord.from_mapping(row),
            region=row["history__region"],
            timeline=[TimelineEntry(*r) for r in row["history__timeline"]],
            collections=[
                {"collection": r[0], "din": r[1], "collected_at": r[2]} for r in row["history__collections"]
            ],
            materials=[MaterialDisposition(*r) for r in row["history__materials"]],
            tasks=[AuthorityTask(*r) for r in row["history__tasks"]],
            decisions=[
                {"decision_id": r[0], "meaning": r[1], "fields": json.loads(r[2]), "decided_at": r[3]}
                for r in row["history__decisions"]
            ],
        )


def _centre_of(row: Any) -> Centre | None:
    """The centre of a row with `CENTRE_PREFIXED` columns (None: no centre joined)."""
    if row["centre__id"] is None:
        return None
    return Centre(**{f: row[f"centre__{f}"] for f in Centre.__dataclass_fields__})


# the columns `update` may set (every field of the record but the ones the database keeps itself)
ORDER_COLUMNS = frozenset(OrderRecord.__dataclass_fields__) - {
    "order_id",
    "created_at",
    "updated_at",
    "version",
}


# ---- timeline --------------------------------------------------------------------------------------


class TimelineRepository(ABC):
    @abstractmethod
    async def add(self, entry: TimelineEntry) -> None:
        """Record an event on the order's timeline (once per event id)."""

    def write_at_commit(self) -> None:  # noqa: B027 - nothing to defer by default (in memory)
        """From here on, `add` writes its entries right before COMMIT, in the audit trail's append (one
        round trip fewer): for a transaction that does not read its timeline back (placing an order,
        whose COI counter is held from its insert to COMMIT). `settle` and `of` then refuse."""

    @abstractmethod
    async def settle(
        self,
        order_id: uuid.UUID,
        event_id: uuid.UUID,
        *,
        status_before: str,
        status_after: str,
        reason: str,
    ) -> None:
        """What a parked fact did once it applied (its entry was written when it arrived)."""

    @abstractmethod
    async def of(self, order_id: uuid.UUID) -> list[TimelineEntry]:
        """The order's timeline, in the order things happened."""


TIMELINE_COLUMNS = ", ".join(TimelineEntry.__dataclass_fields__)


_TIMELINE_INSERT = """INSERT INTO order_timeline (order_id, event_id, event_type, source, occurred_at,
                                                  status_before, status_after, reason, note)
                      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                      ON CONFLICT (order_id, event_id) DO NOTHING"""


class PgTimeline(TimelineRepository):
    def __init__(self, conn: asyncpg.Connection, audit: PgAuditTrail | None = None) -> None:
        self.conn = conn
        self._audit = audit  # the transaction's trail, whose append can carry the entries
        self._at_commit = False

    def write_at_commit(self) -> None:
        if self._audit is None:
            raise RuntimeError("a timeline without its transaction's audit trail writes at once")
        self._at_commit = True

    def _reading(self) -> None:
        if self._at_commit:
            raise RuntimeError("this transaction's timeline entries are written at commit: not read back")

    async def add(self, entry: TimelineEntry) -> None:
        args = (
            entry.order_id,
            entry.event_id,
            entry.event_type,
            entry.source,
            entry.occurred_at,
            entry.status_before,
            entry.status_after,
            entry.reason,
            entry.note,
        )
        if self._at_commit and self._audit is not None:
            self._audit.write_with_append(_TIMELINE_INSERT, *args)
        else:
            await self.conn.execute(_TIMELINE_INSERT, *args)

    async def settle(
        self,
        order_id: uuid.UUID,
        event_id: uuid.UUID,
        *,
        status_before: str,
        status_after: str,
        reason: str,
    ) -> None:
        self._reading()
        await self.conn.execute(
            """UPDATE order_timeline SET status_before = $3, status_after = $4, reason = $5
               WHERE order_id = $1 AND event_id = $2""",
            order_id,
            event_id,
            status_before,
            status_after,
            reason,
        )

    async def of(self, order_id: uuid.UUID) -> list[TimelineEntry]:
        self._reading()
        rows = await self.conn.fetch(
            """SELECT order_id, event_id, event_type, source, occurred_at, status_before, status_after,
                      reason, note
               FROM order_timeline WHERE order_id = $1 ORDER BY occurred_at, id""",
            order_id,
        )
        return [TimelineEntry(**dict(r)) for r in rows]


# ---- parked facts ----------------------------------------------------------------------------------


class ParkedFactRepository(ABC):
    """Facts that arrived before the facts they follow, kept until the order's state admits them."""

    @abstractmethod
    async def park(self, order_id: uuid.UUID, event: CloudEvent) -> None:
        """Keep the fact (once per event id)."""

    @abstractmethod
    async def of(self, order_id: uuid.UUID) -> list[tuple[int, CloudEvent]]:
        """The order's parked facts, oldest first, with their ids."""

    @abstractmethod
    async def drop(self, parked_id: int) -> None: ...

    @abstractmethod
    async def drop_all(self, order_id: uuid.UUID) -> None:
        """Forget every fact parked for the order (a new cycle began: they will never apply)."""


class PgParkedFacts(ParkedFactRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def park(self, order_id: uuid.UUID, event: CloudEvent) -> None:
        await self.conn.execute(
            """INSERT INTO parked_facts (order_id, event_id, event) VALUES ($1, $2, $3)
               ON CONFLICT (order_id, event_id) DO NOTHING""",
            order_id,
            event.id,
            event.to_json(),
        )

    async def of(self, order_id: uuid.UUID) -> list[tuple[int, CloudEvent]]:
        rows = await self.conn.fetch(
            "SELECT id, event FROM parked_facts WHERE order_id = $1 ORDER BY id", order_id
        )
        return [(int(r["id"]), CloudEvent.from_json(bytes(r["event"]))) for r in rows]

    async def drop(self, parked_id: int) -> None:
        await self.conn.execute("DELETE FROM parked_facts WHERE id = $1", parked_id)

    async def drop_all(self, order_id: uuid.UUID) -> None:
        await self.conn.execute("DELETE FROM parked_facts WHERE order_id = $1", order_id)


# ---- catalogue: treatment centres and orderable products -------------------------------------------


class CatalogueRepository(ABC):
    @abstractmethod
    async def centre(self, centre_id: str, *, certified_only: bool = True) -> Centre | None: ...

    @abstractmethod
    async def centres(self) -> list[Centre]: ...

    @abstractmethod
    async def has_product(self, code: str) -> bool: ...

    @abstractmethod
    async def products(self) -> list[dict[str, Any]]:
        """Every orderable product: code, name and its attributes (from the shared catalogue)."""

    @abstractmethod
    async def save_centres(self, centres: Iterable[Centre]) -> None: ...

    @abstractmethod
    async def save_products(self, products: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
        """Upsert (code, name, attributes) rows."""


CENTRE_COLUMNS = ", ".join(Centre.__dataclass_fields__)
# the centre's columns, of `treatment_centers c`, named apart from an order's (`centre__id`, ...)
CENTRE_PREFIXED = ", ".join(f"c.{f} AS centre__{f}" for f in Centre.__dataclass_fields__)


class PgCatalogue(CatalogueRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def centre(self, centre_id: str, *, certified_only: bool = True) -> Centre | None:
        sql = f"SELECT {CENTRE_COLUMNS} FROM treatment_centers WHERE id = $1" + (
            " AND certified" if certified_only else ""
        )
        row = await self.conn.fetchrow(sql, centre_id)
        return Centre(**dict(row)) if row is not None else None

    async def centres(self) -> list[Centre]:
        rows = await self.conn.fetch(f"SELECT {CENTRE_COLUMNS} FROM treatment_centers ORDER BY id")
        return [Centre(**dict(r)) for r in rows]

    async def has_product(self, code: str) -> bool:
        return bool(await self.conn.fetchval("SELECT EXISTS (SELECT 1 FROM products WHERE code = $1)", code))

    async def products(self) -> list[dict[str, Any]]:
        rows = await self.conn.fetch("SELECT code, name, attributes FROM products ORDER BY code")
        return [{"code": r["code"], "name": r["name"], **r["attributes"]} for r in rows]

    async def save_centres(self, centres: Iterable[Centre]) -> None:
        await self.conn.executemany(
            """INSERT INTO treatment_centers (id, name, country, region, regulator, timezone)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (id) DO UPDATE SET name = $2, country = $3, region = $4, regulator = $5,
                                              timezone = $6""",
            [(c.id, c.name, c.country, c.region, c.regulator, c.timezone) for c in centres],
        )

    async def save_products(self, products: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
        await self.conn.executemany(
            """INSERT INTO products (code, name, attributes) VALUES ($1, $2, $3::jsonb)
               ON CONFLICT (code) DO UPDATE SET name = $2, attributes = $3::jsonb""",
            list(products),
        )


# ---- the manufacturing network (a copy fed by site.registered) -------------------------------------


class NetworkRepository(ABC):
    @abstractmethod
    async def replace_site(
        self, site_id: str, *, active: bool, approvals: Iterable[Approval], as_of: datetime
    ) -> bool:
        """Replace the site's active flag and approvals; False (nothing changed) when `as_of` is older
        than what is kept for the site."""

    @abstractmethod
    async def known(self) -> bool:
        """Whether any site is known at all (the network has been seen)."""

    @abstractmethod
    async def serves(self, approval: Approval) -> bool:
        """Whether an active site is approved for that regulator, use and product."""


class PgNetwork(NetworkRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def replace_site(
        self, site_id: str, *, active: bool, approvals: Iterable[Approval], as_of: datetime
    ) -> bool:
        fresh = await self.conn.fetchval(
            """INSERT INTO network_sites (site_id, active, as_of) VALUES ($1, $2, $3)
               ON CONFLICT (site_id) DO UPDATE SET active = $2, as_of = $3, updated_at = now()
                   WHERE network_sites.as_of <= $3
               RETURNING true""",
            site_id,
            active,
            as_of,
        )
        if not fresh:
            return False
        await self.conn.execute("DELETE FROM site_approvals WHERE site_id = $1", site_id)
        await self.conn.executemany(
            """INSERT INTO site_approvals (site_id, regulator, use, product_code) VALUES ($1, $2, $3, $4)
               ON CONFLICT DO NOTHING""",
            [(site_id, a.regulator, a.use, a.product_code) for a in approvals],
        )
        return True

    async def known(self) -> bool:
        return bool(await self.conn.fetchval("SELECT EXISTS (SELECT 1 FROM network_sites)"))

    async def serves(self, approval: Approval) -> bool:
        return bool(
            await self.conn.fetchval(
                """SELECT EXISTS (
                       SELECT 1 FROM site_approvals a JOIN network_sites s USING (site_id)
                       WHERE s.active AND a.regulator = $1 AND a.use = $2 AND a.product_code = $3)""",
                approval.regulator,
                approval.use,
                approval.product_code,
            )
        )


# ---- collections (one DIN each) and QA's authority-notification tasks ------------------------------

NOTIFY_WITHIN = timedelta(hours=48)  # EU GMP for ATMPs Part IV §11.5: within 48 h of administration


class CollectionRepository(ABC):
    @abstractmethod
    async def add(self, order_id: uuid.UUID, collection: int, din: str, collected_at: datetime) -> None:
        """Record a collection and its DIN (unique across the platform)."""

    @abstractmethod
    async def of(self, order_id: uuid.UUID) -> list[dict[str, Any]]:
        """The order's collections: collection number, DIN, collected_at (oldest first)."""


class PgCollections(CollectionRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(self, order_id: uuid.UUID, collection: int, din: str, collected_at: datetime) -> None:
        await self.conn.execute(
            "INSERT INTO collections (order_id, collection, din, collected_at) VALUES ($1, $2, $3, $4)",
            order_id,
            collection,
            din,
            collected_at,
        )

    async def of(self, order_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            """SELECT collection, din, collected_at FROM collections WHERE order_id = $1
               ORDER BY collection""",
            order_id,
        )
        return [dict(r) for r in rows]


class TaskRepository(ABC):
    @abstractmethod
    async def open_notification(
        self, order_id: uuid.UUID, *, regulator: str, cause: str, run: int
    ) -> uuid.UUID:
        """Open the authority-notification task of the order's run (once); its id."""

    @abstractmethod
    async def administered(self, order_id: uuid.UUID, at: datetime) -> list[uuid.UUID]:
        """The product was administered at `at`: the order's open tasks fall due 48 h later."""

    @abstractmethod
    async def get(self, task_id: uuid.UUID, *, lock: bool = False) -> AuthorityTask | None: ...

    @abstractmethod
    async def of_order(self, order_id: uuid.UUID) -> list[AuthorityTask]: ...

    @abstractmethod
    async def page(
        self, *, state: str | None, overdue_at: datetime | None, limit: int, offset: int
    ) -> tuple[list[AuthorityTask], int]:
        """Tasks (the earliest due first, then unscheduled ones), narrowed to a state, or to those overdue
        at `overdue_at`."""

    @abstractmethod
    async def complete(self, task_id: uuid.UUID, *, by: str, reference: str, at: datetime) -> None: ...


TASK_COLUMNS = ", ".join(AuthorityTask.__dataclass_fields__)


class PgTasks(TaskRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def open_notification(
        self, order_id: uuid.UUID, *, regulator: str, cause: str, run: int
    ) -> uuid.UUID:
        task_id: uuid.UUID = await self.conn.fetchval(
            """INSERT INTO authority_tasks (task_id, order_id, kind, regulator, cause, run)
               VALUES ($1, $2, 'authority_notification', $3, $4, $5)
               ON CONFLICT (order_id, kind, run) DO UPDATE SET regulator = authority_tasks.regulator
               RETURNING task_id""",
            uuid.uuid4(),
            order_id,
            regulator,
            cause,
            run,
        )
        return task_id

    async def administered(self, order_id: uuid.UUID, at: datetime) -> list[uuid.UUID]:
        rows = await self.conn.fetch(
            """UPDATE authority_tasks SET administered_at = $2, due_at = $3
               WHERE order_id = $1 AND state = 'open' AND due_at IS NULL RETURNING task_id""",
            order_id,
            at,
            at + NOTIFY_WITHIN,
        )
        return [r["task_id"] for r in rows]

    async def get(self, task_id: uuid.UUID, *, lock: bool = False) -> AuthorityTask | None:
        sql = f"SELECT {TASK_COLUMNS} FROM authority_tasks WHERE task_id = $1" + (
            " FOR UPDATE" if lock else ""
        )
        row = await self.conn.fetchrow(sql, task_id)
        return AuthorityTask.from_mapping(row) if row is not None else None

    async def of_order(self, order_id: uuid.UUID) -> list[AuthorityTask]:
        rows = await self.conn.fetch(
            f"SELECT {TASK_COLUMNS} FROM authority_tasks WHERE order_id = $1 ORDER BY created_at, task_id",
            order_id,
        )
        return [AuthorityTask.from_mapping(r) for r in rows]

    async def page(
        self, *, state: str | None, overdue_at: datetime | None, limit: int, offset: int
    ) -> tuple[list[AuthorityTask], int]:
        where = """WHERE ($1::text IS NULL OR state = $1)
                     AND ($2::timestamptz IS NULL OR (state = 'open' AND due_at < $2))"""
        rows = await self.conn.fetch(
            f"""SELECT {TASK_COLUMNS} FROM authority_tasks {where}
                ORDER BY due_at NULLS LAST, created_at, task_id LIMIT $3 OFFSET $4""",
            state,
            overdue_at,
            limit,
            offset,
        )
        total = await self.conn.fetchval(f"SELECT count(*) FROM authority_tasks {where}", state, overdue_at)
        return [AuthorityTask.from_mapping(r) for r in rows], int(total)

    async def complete(self, task_id: uuid.UUID, *, by: str, reference: str, at: datetime) -> None:
        await self.conn.execute(
            """UPDATE authority_tasks SET state = 'done', completed_at = $2, completed_by = $3, reference = $4
               WHERE task_id = $1""",
            task_id,
            at,
            by,
            reference,
        )


class MaterialDispositionRepository(ABC):
    """What was done with the material or product left when an order ended (once per material)."""

    @abstractmethod
    async def add(self, record: MaterialDisposition) -> None: ...

    @abstractmethod
    async def of_order(self, order_id: uuid.UUID) -> list[MaterialDisposition]:
        """The order's records, oldest first."""


MATERIAL_DISPOSITION_COLUMNS = ", ".join(MaterialDisposition.__dataclass_fields__)


class PgMaterialDispositions(MaterialDispositionRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(self, record: MaterialDisposition) -> None:
        values = [getattr(record, f) for f in MaterialDisposition.__dataclass_fields__]
        marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        await self.conn.execute(
            f"INSERT INTO material_dispositions ({MATERIAL_DISPOSITION_COLUMNS}) VALUES ({marks})", *values
        )

    async def of_order(self, order_id: uuid.UUID) -> list[MaterialDisposition]:
        rows = await self.conn.fetch(
            f"""SELECT {MATERIAL_DISPOSITION_COLUMNS} FROM material_dispositions WHERE order_id = $1
                ORDER BY recorded_at, disposition_id""",
            order_id,
        )
        return [MaterialDisposition.from_mapping(r) for r in rows]


# ---- electronic signatures (v2v_servicekit.signatures, in the service's schema) ---------------------


class SignatureLog(ABC):
    """The signatures of one transaction: recorded with the change they sign (21 CFR 11.70)."""

    @abstractmethod
    async def record(self, signer: Signer, record: SignedRecord) -> Signature: ...

    @abstractmethod
    async def check(self, record: SignedRecord, meaning: str | None = None) -> SignatureCheck: ...

    @abstractmethod
    async def of(self, object_type: str, object_id: str, meaning: str | None = None) -> list[Signature]: ...


class PgSignatures(SignatureLog):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.repo = SignatureRepository(conn)

    async def record(self, signer: Signer, record: SignedRecord) -> Signature:
        return await self.repo.record(signer, record)

    async def check(self, record: SignedRecord, meaning: str | None = None) -> SignatureCheck:
        return await self.repo.check(record, meaning)

    async def of(self, object_type: str, object_id: str, meaning: str | None = None) -> list[Signature]:
        return await self.repo.of(object_type, object_id, meaning)


class DecisionRepository(ABC):
    """Signed decisions on orders: what was decided, as signed (the signature binds these fields)."""

    @abstractmethod
    async def add(
        self, decision_id: uuid.UUID, order_id: uuid.UUID, meaning: str, fields: dict[str, Any]
    ) -> None: ...

    @abstractmethod
    async def of_order(self, order_id: uuid.UUID) -> list[dict[str, Any]]:
        """decision_id, meaning, fields, decided_at (oldest first)."""


class PgDecisions(DecisionRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(
        self, decision_id: uuid.UUID, order_id: uuid.UUID, meaning: str, fields: dict[str, Any]
    ) -> None:
        await self.conn.execute(
            "INSERT INTO signed_decisions (decision_id, order_id, meaning, fields) VALUES ($1, $2, $3, $4)",
            decision_id,
            order_id,
            meaning,
            fields,
        )

    async def of_order(self, order_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            """SELECT decision_id, meaning, fields, decided_at FROM signed_decisions WHERE order_id = $1
               ORDER BY decided_at, decision_id""",
            order_id,
        )
        return [dict(r) for r in rows]


# ---- the transaction -------------------------------------------------------------------------------


# ---- the audit trail, read back ------------------------------------------------------------------------

SCHEMA = "ordering"


class AuditLogRepository(ABC):
    @abstractmethod
    async def of_order(self, order_id: uuid.UUID, *, limit: int, offset: int) -> tuple[list[Record], int]:
        """A page of the order's audit entries (oldest first) and their count."""


class PgAuditLog(AuditLogRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def of_order(self, order_id: uuid.UUID, *, limit: int, offset: int) -> tuple[list[Record], int]:
        return await audit_store.of_objects(
            self.conn, SCHEMA, [("order", str(order_id))], limit=limit, offset=offset
        )


class OrderTx(AuditedTx):
    """One unit of work of the order service: its repositories, its outbox and its audit trail
    (`tx.audit(...)`, appended at commit)."""

    def __init__(
        self,
        conn: asyncpg.Connection | None,
        outbox: EventSink,
        *,
        orders: OrderRepository,
        timeline: TimelineRepository,
        parked: ParkedFactRepository,
        catalogue: CatalogueRepository,
        network: NetworkRepository,
        audit_log: AuditLogRepository,
        collections: CollectionRepository,
        tasks: TaskRepository,
        signatures: SignatureLog,
        decisions: DecisionRepository,
        materials: MaterialDispositionRepository,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(conn, outbox, audit=audit)
        self.materials = materials
        self.audit_log = audit_log
        self.collections = collections
        self.tasks = tasks
        self.signatures = signatures
        self.decisions = decisions
        self.orders = orders
        self.timeline = timeline
        self.parked = parked
        self.catalogue = catalogue
        self.network = network


def tx_factory(conn: asyncpg.Connection, outbox: EventSink) -> OrderTx:
    """The Postgres `OrderTx` of one transaction (`ServiceDefinition.tx_factory`)."""
    audit = PgAuditTrail(conn)
    return OrderTx(
        conn,
        outbox,
        audit=audit,
        orders=PgOrders(conn),
        timeline=PgTimeline(conn, audit),
        parked=PgParkedFacts(conn),
        catalogue=PgCatalogue(conn),
        network=PgNetwork(conn),
        audit_log=PgAuditLog(conn),
        collections=PgCollections(conn),
        tasks=PgTasks(conn),
        signatures=PgSignatures(conn),
        decisions=PgDecisions(conn),
        materials=PgMaterialDispositions(conn),
    )
