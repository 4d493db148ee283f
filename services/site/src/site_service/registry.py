"""The registry API: capacity, active flag and outages of a site, changed over HTTP.

Every change is stored and re-published as `site.registered` (with its outages) in one transaction
with its consequences: bookings an outage or a capacity cut leaves without a place are marked
`affected` and announced (`site.booking_affected`), so the order can move to another site; the booking
is cancelled once scheduling releases its slot.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from site_service import services
from site_service.catalog import known_products
from v2v_contracts import Outage, SiteApproval
from v2v_messaging import Tx, UnitOfWork
from v2v_observability import get_logger
from v2v_servicekit import invalid, not_found

log = get_logger(__name__)
CAPACITY_CUT = "capacity_cut"


def _today(today: date | None) -> date:
    return today or datetime.now(UTC).date()


async def _locked_site(tx: Tx, site_id: str) -> asyncpg.Record:
    row = await tx.conn.fetchrow("SELECT * FROM sites WHERE site_id = $1 FOR UPDATE", site_id)
    if row is None:
        raise not_found("Site", site_id)
    return row


async def get_site(conn: asyncpg.Pool | asyncpg.Connection, site_id: str) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM sites WHERE site_id = $1", site_id)
    if row is None:
        raise not_found("Site", site_id)
    return dict(row)


def validate_capacity(daily_capacity: dict[str, int]) -> None:
    products = known_products()
    for product, n in daily_capacity.items():
        field = f"daily_capacity.{product}"
        if product not in products:
            raise invalid(field, f"unknown product; known: {', '.join(sorted(products))}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise invalid(field, "must be a whole number")
        if n < 0:
            raise invalid(field, "must be 0 or more")


async def capacity_overflow(
    tx: Tx, site_id: str, capacity: dict[str, int], products: list[str], today: date
) -> list[asyncpg.Record]:
    """Bookings beyond a day's capacity, from today on: the latest booked go first, never ones whose
    material has arrived (they keep their place and count against the capacity first)."""
    rows = await tx.conn.fetch(
        """SELECT b.*, EXISTS (SELECT 1 FROM manufacturing m WHERE m.booking_id = b.booking_id) AS arrived
           FROM bookings b
           WHERE b.site_id = $1 AND b.status = 'confirmed' AND b.product_code = ANY($2::text[])
             AND b.manufacturing_start_date >= $3
           ORDER BY b.product_code, b.manufacturing_start_date, arrived DESC, b.created_at, b.booking_id
           FOR UPDATE OF b""",
        site_id,
        products,
        today,
    )
    per_day: dict[tuple[str, date], list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        per_day[(row["product_code"], row["manufacturing_start_date"])].append(row)
    over: list[asyncpg.Record] = []
    for (product, _day), day_rows in per_day.items():
        over += [r for r in day_rows[capacity.get(product, 0) :] if not r["arrived"]]
    return over


async def update_site(
    uow: UnitOfWork,
    site_id: str,
    *,
    daily_capacity: dict[str, int] | None = None,
    active: bool | None = None,
    approvals: list[SiteApproval] | None = None,
    today: date | None = None,
) -> dict[str, Any]:
    """Change a site's capacity per product (a partial map), whether it is active, and/or its approvals
    (the whole list: per regulator, use and product)."""
    if daily_capacity:
        validate_capacity(daily_capacity)
    if approvals is not None:
        products = known_products()
        for i, approval in enumerate(approvals):
            if approval.product_code not in products:
                raise invalid(
                    f"approvals.{i}.product_code", f"unknown product; known: {', '.join(sorted(products))}"
                )
    async with uow.begin() as tx:
        row = await _locked_site(tx, site_id)
        site = services.site_from_row(row)
        capacity = {**site.daily_capacity, **(daily_capacity or {})}
        managed = set(row["api_managed"]) | {f"daily_capacity:{p}" for p in daily_capacity or {}}
        if active is not None:
            managed.add("active")
        if approvals is not None:
            managed.add("approvals")
        new = site.model_copy(
            update={
                "daily_capacity": capacity,
                "active": site.active if active is None else active,
                "approvals": site.approvals if approvals is None else list(dict.fromkeys(approvals)),
            }
        )
        changed = await services.upsert_site(tx, new)
        await tx.conn.execute(
            "UPDATE sites SET api_managed = $2 WHERE site_id = $1", site_id, sorted(managed)
        )
        cut = [p for p, n in (daily_capacity or {}).items() if n < site.daily_capacity.get(p, 0)]
        affected: list[uuid.UUID] = []
        if cut:
            over = await capacity_overflow(tx, site_id, capacity, cut, _today(today))
            affected = await services.affect_bookings(tx, over, CAPACITY_CUT)
        log.info("site registry entry updated", site_id=site_id, changed=changed, affected=len(affected))
        return {**await get_site(tx.conn, site_id), "affected_booking_ids": affected}


async def add_outage(
    uow: UnitOfWork, site_id: str, *, start_date: date, end_date: date, reason: str
) -> dict[str, Any]:
    """Declare a window (inclusive) in which the site starts no manufacturing."""
    if end_date < start_date:
        raise invalid("end_date", "must be on or after start_date")
    reason = reason.strip()
    if not reason:
        raise invalid("reason", "is required")
    async with uow.begin() as tx:
        row = await _locked_site(tx, site_id)
        site = services.site_from_row(row)
        outage = Outage(outage_id=uuid.uuid4(), start_date=start_date, end_date=end_date, reason=reason)
        await services.upsert_site(tx, site.model_copy(update={"outages": [*site.outages, outage]}))
        hit = await services.bookings_in_window(tx, site_id, start_date, end_date)
        affected = await services.affect_bookings(tx, hit, services.outage_reason(reason))
        log.warning(
            "site outage declared",
            site_id=site_id,
            start_date=start_date.isoformat(),
            end_date=end_date.isoformat(),
            affected=len(affected),
        )
        return {**outage.model_dump(), "site_id": site_id, "affected_booking_ids": affected}
