"""Site use cases: the registry (seeded, published to others) and bookings into a site's plan."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from v2v_contracts import (
    BookingConfirmedV1,
    CloudEvent,
    SiteApproval,
    SiteRegisteredV1,
    SlotReservedV1,
    new_event,
    parse_data,
)
from v2v_messaging import Tx, UnitOfWork
from v2v_observability import get_logger

log = get_logger(__name__)
SEED = Path(__file__).parent / "seed" / "sites.yaml"


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
    )


async def upsert_site(tx: Tx, site: SiteRegisteredV1) -> bool:
    """Store the site; publish `site.registered` when it is new or changed. Returns whether it changed."""
    current = await tx.conn.fetchrow("SELECT * FROM sites WHERE site_id = $1 FOR UPDATE", site.site_id)
    row = _as_row(site)
    if (
        current is not None
        and tuple(
            current[k]
            for k in (
                "site_id",
                "name",
                "country",
                "region",
                "timezone",
                "operator",
                "active",
                "approvals",
                "daily_capacity",
            )
        )
        == row
    ):
        return False
    await tx.conn.execute(
        """INSERT INTO sites (site_id, name, country, region, timezone, operator, active, approvals,
                              daily_capacity)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb)
           ON CONFLICT (site_id) DO UPDATE SET name = $2, country = $3, region = $4, timezone = $5,
               operator = $6, active = $7, approvals = $8::jsonb, daily_capacity = $9::jsonb,
               updated_at = now()""",
        *row,
    )
    await tx.outbox.add(new_event(site, subject=site.site_id))
    return True


async def load_seed(uow: UnitOfWork, path: Path = SEED) -> int:
    changed = 0
    entries = yaml.safe_load(path.read_text())  # noqa: ASYNC240 - a small seed file, once at start
    async with uow.begin() as tx:
        for entry in entries:
            changed += await upsert_site(tx, site_from_seed(entry))
    log.info("site registry loaded", changed=changed)
    return changed


async def list_sites(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch("SELECT * FROM sites ORDER BY site_id")]


async def on_slot_reserved(tx: Tx, event: CloudEvent) -> None:
    slot = parse_data(event, SlotReservedV1)
    existing = await tx.conn.fetchval("SELECT booking_id FROM bookings WHERE slot_id = $1", slot.slot_id)
    if existing is not None:
        return
    booking_id = uuid.uuid4()
    await tx.conn.execute(
        """INSERT INTO bookings (booking_id, order_id, coi, slot_id, site_id, manufacturing_start_date,
                                 apheresis_date, status)
           VALUES ($1, $2, $3, $4, $5, $6, $7, 'confirmed')""",
        booking_id,
        slot.order_id,
        slot.coi,
        slot.slot_id,
        slot.site_id,
        slot.manufacturing_start_date,
        slot.apheresis_date,
    )
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


def handlers(_rt: Any) -> dict[str, Any]:
    return {SlotReservedV1.TYPE: on_slot_reserved}
