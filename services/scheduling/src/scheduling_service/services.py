"""Scheduling use cases: reserve, release and rebook manufacturing slots, keep the site copy, serve the
waitlist.

Never oversold, with any number of replicas: every transaction that reads a product's capacity use and
books against it first takes that product's advisory lock (`v2v-slots:<product>`, transaction-scoped).
A transaction that needs several products' locks takes them in one global order (by lock key), so two
transactions never wait on each other in a cycle. State and the events it causes commit together.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from scheduling_service.domain.selection import (
    Approval,
    Choice,
    NoChoice,
    Parameters,
    Request,
    Site,
    Window,
    select_site,
)
from v2v_contracts import (
    BookingConfirmedV1,
    CloudEvent,
    MaterialReceivedV1,
    OrderCancelledV1,
    OrderEventData,
    OrderFailedV1,
    OrderSubmittedV1,
    OrderType,
    RebookRequestedV1,
    SiteRegisteredV1,
    SlotReleasedV1,
    SlotReservedV1,
    SlotUnavailableV1,
    new_event,
    parse_data,
)
from v2v_messaging import Tx
from v2v_observability import get_logger

log = get_logger(__name__)
SEED = Path(__file__).parent / "seed" / "scheduling.yaml"
PARAMETERS_ENV = "V2V_SCHEDULING_PARAMETERS"  # another parameters file (same format as the seed)
LIVE = ("held", "confirmed")  # a slot the order still holds: at most one per order


def load_parameters(path: Path = SEED) -> Parameters:
    cfg = yaml.safe_load(path.read_text())
    transit = cfg["inbound_transit_days"]
    lanes = {
        (lane["from"], lane["to"], material): int(days)
        for lane in cfg.get("lanes", [])
        for material, days in lane["days"].items()
    }
    return Parameters(
        same_region_transit_days=int(transit["same_region"]),
        cross_region_transit_days=int(transit["cross_region"]),
        horizon_days=int(cfg["booking_horizon_days"]),
        lanes=lanes,
    )


def load_products(path: Path = SEED) -> dict[str, tuple[str, int]]:
    """Product code -> (apheresis material, manufacturing + QC days)."""
    cfg = yaml.safe_load(path.read_text())
    return {
        code: (p["apheresis_material"], int(p["manufacturing_days"]) + int(p["qc_days"]))
        for code, p in (cfg.get("products") or {}).items()
    }


def _parameters_path() -> Path:
    configured = os.environ.get(PARAMETERS_ENV)
    return Path(configured) if configured else SEED


PARAMS = load_parameters(_parameters_path())
PRODUCTS = load_products()  # from the seed: material and durations are product facts, not tuning


# ---- what a reservation needs ------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotRequest:
    """A request for a slot, from `order.submitted` or `order.rebook_requested` (no patient data)."""

    order_id: uuid.UUID
    coi: str
    treatment_center_id: str
    product_code: str
    order_type: OrderType
    regulator: str
    region: str
    apheresis_date: date
    exclude_site_id: str | None = None
    rebook_kind: str | None = None  # set for a rebook: reschedule | recollection | site_outage

    @classmethod
    def submitted(cls, o: OrderSubmittedV1) -> SlotRequest:
        return cls(
            o.order_id,
            o.coi,
            o.treatment_center_id,
            o.product_code,
            o.order_type,
            o.regulator,
            o.region,
            o.requested_apheresis_date,
        )

    @classmethod
    def rebook(cls, r: RebookRequestedV1) -> SlotRequest:
        return cls(
            r.order_id,
            r.coi,
            r.treatment_center_id,
            r.product_code,
            r.order_type,
            r.regulator,
            r.region,
            r.apheresis_date,
            exclude_site_id=r.exclude_site_id,
            rebook_kind=r.kind,
        )

    def selection(self) -> Request:
        material, processing = PRODUCTS.get(self.product_code, ("fresh", 0))
        return Request(
            self.product_code,
            self.order_type,
            self.regulator,
            self.region,
            self.apheresis_date,
            material=material,
            processing_days=processing,
        )

    def reserved_reason(self, *, from_waitlist: bool) -> str:
        """`slot_reserved` reason: a rebook stays a rebook even when it had to wait."""
        if self.rebook_kind is not None:
            return f"rebook:{self.rebook_kind}"
        return "waitlist" if from_waitlist else "initial"


def waitlisted_request(row: asyncpg.Record) -> SlotRequest:
    """The request a waitlist row remembers (the data of the event that asked for the slot)."""
    if row["request_type"] == RebookRequestedV1.TYPE:
        return SlotRequest.rebook(RebookRequestedV1.model_validate(row["request"]))
    return SlotRequest.submitted(OrderSubmittedV1.model_validate(row["request"]))


# ---- locks -------------------------------------------------------------------------------------------


class ProductLocks:
    """The per-product advisory locks one transaction holds (released when it ends)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.held: set[str] = set()

    async def take(self, products: Iterable[str]) -> None:
        missing = sorted(set(products) - self.held)
        if not missing:
            return
        # the same key as `pg_advisory_xact_lock(hashtext('v2v-slots:' || product))`, in key order
        keys = await self.conn.fetch(
            """SELECT DISTINCT hashtext('v2v-slots:' || p)::bigint AS k FROM unnest($1::text[]) AS p
               ORDER BY k""",
            missing,
        )
        for row in keys:
            await self.conn.execute("SELECT pg_advisory_xact_lock($1::bigint)", row["k"])
        self.held.update(missing)


async def _order_products(conn: asyncpg.Connection, order_id: uuid.UUID) -> set[str]:
    rows = await conn.fetch(
        """SELECT product_code FROM slots WHERE order_id = $1 AND status IN ('held', 'confirmed')
           UNION SELECT product_code FROM waitlist WHERE order_id = $1""",
        order_id,
    )
    return {r["product_code"] for r in rows}


async def lock_order(locks: ProductLocks, order_id: uuid.UUID, also: Iterable[str] = ()) -> None:
    """Lock every product the order holds a slot or waits for (and `also`), then re-check under the locks:
    waitlist serving in another transaction may have booked it meanwhile."""
    await locks.take({*also, *await _order_products(locks.conn, order_id)})
    while missing := await _order_products(locks.conn, order_id) - locks.held:
        await locks.take(missing)  # out of key order, but only if the order changed product meanwhile


# ---- reading ------------------------------------------------------------------------------------------


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
    )


async def _usage(conn: asyncpg.Connection, product: str, since: date) -> dict[tuple[str, str, date], int]:
    """Slots using capacity per (site, product, day): held, confirmed and consumed (manufacturing)."""
    rows = await conn.fetch(
        """SELECT site_id, manufacturing_start_date AS day, count(*) AS n FROM slots
           WHERE product_code = $1 AND manufacturing_start_date >= $2
             AND status IN ('held', 'confirmed', 'consumed')
           GROUP BY site_id, manufacturing_start_date""",
        product,
        since,
    )
    return {(r["site_id"], product, r["day"]): int(r["n"]) for r in rows}


async def _closed(conn: asyncpg.Connection, order_id: uuid.UUID) -> str | None:
    status: str | None = await conn.fetchval("SELECT status FROM closed_orders WHERE order_id = $1", order_id)
    return status


# ---- reserve, release, waitlist ----------------------------------------------------------------------


async def try_reserve(tx: Tx, locks: ProductLocks, req: SlotRequest, reason: str) -> Choice | NoChoice:
    """Book the best slot for the request under the product's lock, or say why not."""
    conn = tx.conn
    await locks.take([req.product_code])
    live = await conn.fetchrow(
        "SELECT * FROM slots WHERE order_id = $1 AND status IN ('held', 'confirmed')", req.order_id
    )
    if live is not None:  # already booked (a redelivered or overtaken request): nothing new
        await conn.execute("DELETE FROM waitlist WHERE order_id = $1", req.order_id)
        return Choice(live["site_id"], live["manufacturing_start_date"])
    sites = [_site(r) for r in await conn.fetch("SELECT * FROM sites")]
    result = select_site(
        sites,
        await _usage(conn, req.product_code, req.apheresis_date),
        req.selection(),
        PARAMS,
        exclude_site_id=req.exclude_site_id,
    )
    if not isinstance(result, Choice):
        return result
    slot_id = uuid.uuid4()
    await conn.execute(
        """INSERT INTO slots (slot_id, order_id, coi, treatment_center_id, site_id, product_code,
                              manufacturing_start_date, apheresis_date, status, reserved_reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'held', $9)""",
        slot_id,
        req.order_id,
        req.coi,
        req.treatment_center_id,
        result.site_id,
        req.product_code,
        result.manufacturing_start_date,
        req.apheresis_date,
        reason,
    )
    await conn.execute("DELETE FROM waitlist WHERE order_id = $1", req.order_id)
    await tx.outbox.add(
        new_event(
            SlotReservedV1(
                order_id=req.order_id,
                coi=req.coi,
                treatment_center_id=req.treatment_center_id,
                slot_id=slot_id,
                site_id=result.site_id,
                product_code=req.product_code,
                order_type=req.order_type,
                apheresis_date=req.apheresis_date,
                manufacturing_start_date=result.manufacturing_start_date,
                reason=reason,
            )
        )
    )
    log.info(
        "slot reserved",
        site_id=result.site_id,
        day=result.manufacturing_start_date.isoformat(),
        reason=reason,
    )
    return result


async def _unavailable(tx: Tx, req: SlotRequest, result: NoChoice) -> None:
    await tx.outbox.add(
        new_event(
            SlotUnavailableV1(
                order_id=req.order_id,
                coi=req.coi,
                treatment_center_id=req.treatment_center_id,
                reason=result.reason,
                detail=result.detail,
                waitlisted=True,
            )
        )
    )
    log.info("order waitlisted", reason=result.reason, exclude_site_id=req.exclude_site_id)


async def release_live_slot(tx: Tx, order: OrderEventData, reason: str) -> asyncpg.Record | None:
    """The order's held or confirmed slot → released, with `slot_released`. Caller holds its lock."""
    row = await tx.conn.fetchrow(
        """UPDATE slots SET status = 'released', release_reason = $2, released_at = now(), updated_at = now()
           WHERE order_id = $1 AND status IN ('held', 'confirmed')
           RETURNING slot_id, site_id, product_code, manufacturing_start_date""",
        order.order_id,
        reason,
    )
    if row is None:
        return None
    await tx.outbox.add(
        new_event(
            SlotReleasedV1(
                order_id=order.order_id,
                coi=order.coi,
                treatment_center_id=order.treatment_center_id,
                slot_id=row["slot_id"],
                site_id=row["site_id"],
                reason=reason,
            )
        )
    )
    log.info("slot released", site_id=row["site_id"], reason=reason)
    return row


async def serve_waitlist(tx: Tx, locks: ProductLocks, products: Iterable[str]) -> int:
    """Book waiting orders for these products first come, first served, as far as capacity allows."""
    wanted = sorted(set(products))
    if not wanted:
        return 0
    await locks.take(wanted)
    rows = await tx.conn.fetch(
        """SELECT * FROM waitlist
           WHERE product_code = ANY($1::text[])
             AND NOT EXISTS (SELECT 1 FROM closed_orders c WHERE c.order_id = waitlist.order_id)
           ORDER BY enqueued_at, order_id""",
        wanted,
    )
    booked = 0
    for row in rows:
        req = waitlisted_request(row)
        if isinstance(await try_reserve(tx, locks, req, req.reserved_reason(from_waitlist=True)), Choice):
            booked += 1
    if booked:
        log.info("waitlist served", booked=booked, waiting=len(rows) - booked)
    return booked


# ---- handlers -----------------------------------------------------------------------------------------


async def on_order_submitted(tx: Tx, event: CloudEvent) -> None:
    order = parse_data(event, OrderSubmittedV1)
    if closed := await _closed(tx.conn, order.order_id):
        log.info("order already closed, request ignored", status=closed, event_type=event.type)
        return
    req = SlotRequest.submitted(order)
    result = await try_reserve(tx, ProductLocks(tx.conn), req, req.reserved_reason(from_waitlist=False))
    if isinstance(result, Choice):
        return
    inserted = await tx.conn.fetchval(
        """INSERT INTO waitlist (order_id, request, request_type, product_code, reason)
           VALUES ($1, $2::jsonb, $3, $4, $5)
           ON CONFLICT (order_id) DO NOTHING RETURNING true""",
        order.order_id,
        order.model_dump(mode="json"),
        OrderSubmittedV1.TYPE,
        order.product_code,
        result.reason,
    )
    if inserted:
        await _unavailable(tx, req, result)


async def on_rebook_requested(tx: Tx, event: CloudEvent) -> None:
    """Release the live slot, then book anew for the new apheresis date (never at the excluded site)."""
    rebook = parse_data(event, RebookRequestedV1)
    if closed := await _closed(tx.conn, rebook.order_id):
        log.info("order already closed, rebook ignored", status=closed)
        return
    locks = ProductLocks(tx.conn)
    await lock_order(locks, rebook.order_id, also=[rebook.product_code])
    released = await release_live_slot(tx, rebook, rebook.reason)
    req = SlotRequest.rebook(rebook)
    result = await try_reserve(tx, locks, req, req.reserved_reason(from_waitlist=False))
    if not isinstance(result, Choice):
        # waits with its rebook context; an order already waiting keeps its place in the queue
        await tx.conn.execute(
            """INSERT INTO waitlist (order_id, request, request_type, product_code, exclude_site_id,
                                     rebook_kind, reason)
               VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7)
               ON CONFLICT (order_id) DO UPDATE SET request = EXCLUDED.request,
                   request_type = EXCLUDED.request_type, product_code = EXCLUDED.product_code,
                   exclude_site_id = EXCLUDED.exclude_site_id, rebook_kind = EXCLUDED.rebook_kind,
                   reason = EXCLUDED.reason""",
            rebook.order_id,
            rebook.model_dump(mode="json"),
            RebookRequestedV1.TYPE,
            rebook.product_code,
            rebook.exclude_site_id,
            rebook.kind,
            result.reason,
        )
        await _unavailable(tx, req, result)
    if released is not None:
        await serve_waitlist(tx, locks, [released["product_code"]])


async def _close_order(tx: Tx, order: OrderCancelledV1 | OrderFailedV1, status: str) -> None:
    """Compensation: release the live slot, leave the waitlist, remember the order is over."""
    await tx.conn.execute(
        """INSERT INTO closed_orders (order_id, status, reason) VALUES ($1, $2, $3)
           ON CONFLICT (order_id) DO NOTHING""",
        order.order_id,
        status,
        order.reason,
    )
    locks = ProductLocks(tx.conn)
    await lock_order(locks, order.order_id)
    released = await release_live_slot(tx, order, status)
    left = await tx.conn.fetchval("DELETE FROM waitlist WHERE order_id = $1 RETURNING true", order.order_id)
    if left:
        log.info("order left the waitlist", status=status)
    if released is not None:
        await serve_waitlist(tx, locks, [released["product_code"]])


async def on_order_cancelled(tx: Tx, event: CloudEvent) -> None:
    await _close_order(tx, parse_data(event, OrderCancelledV1), "cancelled")


async def on_order_failed(tx: Tx, event: CloudEvent) -> None:
    await _close_order(tx, parse_data(event, OrderFailedV1), "failed")


async def on_site_registered(tx: Tx, event: CloudEvent) -> None:
    """Keep the site copy (capacity, approvals, outages); serve the waitlist for its products."""
    site = parse_data(event, SiteRegisteredV1)
    old = await tx.conn.fetchrow(
        "SELECT daily_capacity, approvals FROM sites WHERE site_id = $1", site.site_id
    )
    products = {*site.daily_capacity, *(a.product_code for a in site.approvals)}
    if old is not None:
        products |= {*old["daily_capacity"], *(a["product_code"] for a in old["approvals"])}
    locks = ProductLocks(tx.conn)
    # before the copy changes: a booking for these products sees either the old copy or the new one
    # and, when it had to wait, is served here
    await locks.take(products)
    await tx.conn.execute(
        """INSERT INTO sites (site_id, region, timezone, active, approvals, daily_capacity, outages)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7::jsonb)
           ON CONFLICT (site_id) DO UPDATE SET region = $2, timezone = $3, active = $4, approvals = $5::jsonb,
                                               daily_capacity = $6::jsonb, outages = $7::jsonb,
                                               updated_at = now()""",
        site.site_id,
        site.region,
        site.timezone,
        site.active,
        [a.model_dump() for a in site.approvals],
        site.daily_capacity,
        [o.model_dump(mode="json") for o in site.outages],
    )
    await serve_waitlist(tx, locks, products)


async def on_booking_confirmed(tx: Tx, event: CloudEvent) -> None:
    data = parse_data(event, BookingConfirmedV1)
    await tx.conn.execute(
        "UPDATE slots SET status = 'confirmed', updated_at = now() WHERE slot_id = $1 AND status = 'held'",
        data.slot_id,
    )


async def on_material_received(tx: Tx, event: CloudEvent) -> None:
    """Manufacturing can start: the slot is consumed and its day's capacity stays used."""
    data = parse_data(event, MaterialReceivedV1)
    slot_id = await tx.conn.fetchval(
        """UPDATE slots SET status = 'consumed', updated_at = now()
           WHERE order_id = $1 AND site_id = $2 AND status IN ('held', 'confirmed') RETURNING slot_id""",
        data.order_id,
        data.site_id,
    )
    if slot_id is None:
        log.warning("material received without a live slot at that site", site_id=data.site_id)
    else:
        log.info("slot consumed", site_id=data.site_id)


def handlers(_rt: Any) -> dict[str, Any]:
    return {
        OrderSubmittedV1.TYPE: on_order_submitted,
        RebookRequestedV1.TYPE: on_rebook_requested,
        OrderCancelledV1.TYPE: on_order_cancelled,
        OrderFailedV1.TYPE: on_order_failed,
        SiteRegisteredV1.TYPE: on_site_registered,
        BookingConfirmedV1.TYPE: on_booking_confirmed,
        MaterialReceivedV1.TYPE: on_material_received,
    }
