"""Site use cases: the registry (seeded, published to others) and bookings into a site's plan, and the
site's answers to the order's compensations (cancel, fail) and commands (remanufacture)."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from site_service import mes
from v2v_contracts import (
    BookingAffectedV1,
    BookingCancelledV1,
    BookingConfirmedV1,
    CloudEvent,
    OrderCancelledV1,
    OrderFailedV1,
    Outage,
    RemanufactureRequestedV1,
    SiteApproval,
    SiteRegisteredV1,
    SlotReleasedV1,
    SlotReservedV1,
    new_event,
    parse_data,
)
from v2v_messaging import Tx, UnitOfWork
from v2v_observability import current_traceparent, get_logger

log = get_logger(__name__)
SEED = Path(__file__).parent / "seed" / "sites.yaml"
LIVE = ("confirmed", "affected")  # booking statuses that still hold a place in a site's plan


# ---- the registry -----------------------------------------------------------------------------------


def site_from_seed(entry: dict[str, Any]) -> SiteRegisteredV1:
    approvals = [
        SiteApproval(regulator=a["regulator"], use=a["use"], product_code=p)
        for a in entry["approvals"]
        for p in a["products"]
    ]
    return SiteRegisteredV1(
        site_id=entry["site_id"],
        name=entry["name"],
        country=entry["country"],
        region=entry["region"],
        timezone=entry["timezone"],
        operator=entry["operator"],
        active=bool(entry["active"]),
        approvals=approvals,
        daily_capacity={k: int(v) for k, v in entry["daily_capacity"].items()},
    )


def site_from_row(row: asyncpg.Record) -> SiteRegisteredV1:
    return SiteRegisteredV1(
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
    )


def merge_seed(seeded: SiteRegisteredV1, current: asyncpg.Record | None) -> SiteRegisteredV1:
    """The seed entry, keeping what was changed over the registry API since (and every outage)."""
    if current is None:
        return seeded
    managed = set(current["api_managed"])
    capacity = dict(seeded.daily_capacity)
    for product, n in dict(current["daily_capacity"]).items():
        if f"daily_capacity:{product}" in managed:
            capacity[product] = int(n)
    return seeded.model_copy(
        update={
            "active": current["active"] if "active" in managed else seeded.active,
            "approvals": [SiteApproval(**a) for a in current["approvals"]]
            if "approvals" in managed
            else seeded.approvals,
            "daily_capacity": capacity,
            "outages": [Outage(**o) for o in current["outages"]],
        }
    )


_COLUMNS = (
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
)


def _as_row(site: SiteRegisteredV1) -> tuple[Any, ...]:
    return (
        site.site_id,
        site.name,
        site.country,
        site.region,
        site.timezone,
        site.operator,
        site.active,
        [a.model_dump() for a in site.approvals],
        site.daily_capacity,
        [o.model_dump(mode="json") for o in site.outages],
    )


async def upsert_site(tx: Tx, site: SiteRegisteredV1) -> bool:
    """Store the site; publish `site.registered` when it is new or changed. Returns whether it changed."""
    current = await tx.conn.fetchrow("SELECT * FROM sites WHERE site_id = $1 FOR UPDATE", site.site_id)
    row = _as_row(site)
    if current is not None and tuple(current[k] for k in _COLUMNS) == row:
        return False
    await tx.conn.execute(
        """INSERT INTO sites (site_id, name, country, region, timezone, operator, active, approvals,
                              daily_capacity, outages)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10::jsonb)
           ON CONFLICT (site_id) DO UPDATE SET name = $2, country = $3, region = $4, timezone = $5,
               operator = $6, active = $7, approvals = $8::jsonb, daily_capacity = $9::jsonb,
               outages = $10::jsonb, updated_at = now()""",
        *row,
    )
    await tx.outbox.add(new_event(site, subject=site.site_id))
    return True


async def load_seed(uow: UnitOfWork, path: Path = SEED) -> int:
    changed = 0
    entries = yaml.safe_load(path.read_text())  # noqa: ASYNC240 - a small seed file, once at start
    async with uow.begin() as tx:
        for entry in entries:
            seeded = site_from_seed(entry)
            current = await tx.conn.fetchrow(
                "SELECT * FROM sites WHERE site_id = $1 FOR UPDATE", seeded.site_id
            )
            changed += await upsert_site(tx, merge_seed(seeded, current))
    log.info("site registry loaded", changed=changed)
    return changed


async def list_sites(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch("SELECT * FROM sites ORDER BY site_id")]


# ---- bookings -----------------------------------------------------------------------------------------


def _ref(booking: asyncpg.Record) -> dict[str, Any]:
    return {
        "order_id": booking["order_id"],
        "coi": booking["coi"],
        "treatment_center_id": booking["treatment_center_id"] or "",
    }


async def cancel_booking(tx: Tx, booking: asyncpg.Record, reason: str) -> bool:
    """Take a live booking out of the site's plan (`booking_cancelled`); False when already cancelled."""
    updated = await tx.conn.fetchval(
        """UPDATE bookings SET status = 'cancelled', status_reason = $2, updated_at = now()
           WHERE booking_id = $1 AND status <> 'cancelled' RETURNING true""",
        booking["booking_id"],
        reason,
    )
    if not updated:
        return False
    await tx.outbox.add(
        new_event(
            BookingCancelledV1(
                **_ref(booking),
                booking_id=booking["booking_id"],
                slot_id=booking["slot_id"],
                site_id=booking["site_id"],
                reason=reason,
            )
        )
    )
    log.info("booking cancelled", site_id=booking["site_id"], booking_id=str(booking["booking_id"]))
    return True


async def affect_bookings(tx: Tx, bookings: list[asyncpg.Record], reason: str) -> list[uuid.UUID]:
    """Mark confirmed bookings `affected` (they must move elsewhere) and publish `booking_affected`."""
    affected: list[uuid.UUID] = []
    for booking in bookings:
        updated = await tx.conn.fetchval(
            """UPDATE bookings SET status = 'affected', status_reason = $2, updated_at = now()
               WHERE booking_id = $1 AND status = 'confirmed' RETURNING true""",
            booking["booking_id"],
            reason,
        )
        if not updated:
            continue
        await tx.outbox.add(
            new_event(
                BookingAffectedV1(
                    **_ref(booking),
                    booking_id=booking["booking_id"],
                    site_id=booking["site_id"],
                    reason=reason,
                )
            )
        )
        log.warning(
            "booking affected, it must move to another site",
            site_id=booking["site_id"],
            booking_id=str(booking["booking_id"]),
            reason=reason,
        )
        affected.append(booking["booking_id"])
    return affected


async def bookings_in_window(tx: Tx, site_id: str, start: date, end: date) -> list[asyncpg.Record]:
    """Confirmed bookings starting manufacture in [start, end] whose material has not arrived yet."""
    return list(
        await tx.conn.fetch(
            """SELECT b.* FROM bookings b
               WHERE b.site_id = $1 AND b.status = 'confirmed'
                 AND b.manufacturing_start_date BETWEEN $2 AND $3
                 AND NOT EXISTS (SELECT 1 FROM manufacturing m WHERE m.booking_id = b.booking_id)
               ORDER BY b.manufacturing_start_date, b.created_at, b.booking_id
               FOR UPDATE OF b""",
            site_id,
            start,
            end,
        )
    )


def outage_reason(reason: str) -> str:
    return f"outage:{reason}"


async def on_slot_reserved(tx: Tx, event: CloudEvent) -> None:
    slot = parse_data(event, SlotReservedV1)
    existing = await tx.conn.fetchval("SELECT booking_id FROM bookings WHERE slot_id = $1", slot.slot_id)
    if existing is not None:
        return
    booking_id = uuid.uuid4()
    booking = await tx.conn.fetchrow(
        """INSERT INTO bookings (booking_id, order_id, coi, slot_id, site_id, manufacturing_start_date,
                                 apheresis_date, status, treatment_center_id, product_code, origin_trace)
           VALUES ($1, $2, $3, $4, $5, $6, $7, 'confirmed', $8, $9, $10::jsonb) RETURNING *""",
        booking_id,
        slot.order_id,
        slot.coi,
        slot.slot_id,
        slot.site_id,
        slot.manufacturing_start_date,
        slot.apheresis_date,
        slot.treatment_center_id,
        slot.product_code,
        current_traceparent(),
    )
    assert booking is not None
    await tx.outbox.add(
        new_event(
            BookingConfirmedV1(
                order_id=slot.order_id,
                coi=slot.coi,
                treatment_center_id=slot.treatment_center_id,
                booking_id=booking_id,
                slot_id=slot.slot_id,
                site_id=slot.site_id,
                product_code=slot.product_code,
                manufacturing_start_date=slot.manufacturing_start_date,
                apheresis_date=slot.apheresis_date,
            )
        )
    )
    log.info("booking confirmed into site plan", site_id=slot.site_id)
    # a slot taken from a stale copy of the registry may fall into an outage the site already declared
    outages = await tx.conn.fetchval("SELECT outages FROM sites WHERE site_id = $1", slot.site_id) or []
    for outage in (Outage(**o) for o in outages):
        if outage.start_date <= slot.manufacturing_start_date <= outage.end_date:
            await affect_bookings(tx, [booking], outage_reason(outage.reason))
            break


async def on_slot_released(tx: Tx, event: CloudEvent) -> None:
    data = parse_data(event, SlotReleasedV1)
    booking = await tx.conn.fetchrow("SELECT * FROM bookings WHERE slot_id = $1 FOR UPDATE", data.slot_id)
    if booking is None or booking["status"] == "cancelled":
        return
    await cancel_booking(tx, booking, data.reason)


# ---- the order's compensations and commands -------------------------------------------------------


async def _order_ended(tx: Tx, order_id: uuid.UUID, reason: str) -> None:
    # lock order everywhere: site, then bookings, then manufacturing (as a receipt does)
    bookings = await tx.conn.fetch(
        "SELECT * FROM bookings WHERE order_id = $1 ORDER BY created_at, booking_id FOR UPDATE", order_id
    )
    await mes.stop_order(tx, order_id, reason)
    for booking in bookings:
        if booking["status"] in LIVE:
            await cancel_booking(tx, booking, reason)


async def on_order_cancelled(tx: Tx, event: CloudEvent) -> None:
    data = parse_data(event, OrderCancelledV1)
    await _order_ended(tx, data.order_id, f"order cancelled: {data.reason}")


async def on_order_failed(tx: Tx, event: CloudEvent) -> None:
    data = parse_data(event, OrderFailedV1)
    await _order_ended(tx, data.order_id, f"order failed: {data.reason}")


async def on_remanufacture_requested(tx: Tx, event: CloudEvent) -> None:
    data = parse_data(event, RemanufactureRequestedV1)
    await mes.start_remanufacture(tx, data.order_id, data.site_id, data.run, data.reason)


def handlers(_rt: Any) -> dict[str, Any]:
    return {
        SlotReservedV1.TYPE: on_slot_reserved,
        SlotReleasedV1.TYPE: on_slot_released,
        OrderCancelledV1.TYPE: on_order_cancelled,
        OrderFailedV1.TYPE: on_order_failed,
        RemanufactureRequestedV1.TYPE: on_remanufacture_requested,
    }
