"""Scheduling use cases: reserve a slot for a submitted order, keep the site copy, serve the waitlist."""

from __future__ import annotations

import json
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from scheduling_service.domain.selection import Approval, Choice, Parameters, Request, Site, select_site
from v2v_contracts import (
    BookingConfirmedV1,
    CloudEvent,
    OrderSubmittedV1,
    SiteRegisteredV1,
    SlotReservedV1,
    SlotUnavailableV1,
    new_event,
    parse_data,
)
from v2v_messaging import Tx
from v2v_observability import get_logger

log = get_logger(__name__)
SEED = Path(__file__).parent / "seed" / "scheduling.yaml"


def load_parameters(path: Path = SEED) -> Parameters:
    cfg = yaml.safe_load(path.read_text())
    transit = cfg["inbound_transit_days"]
    return Parameters(
        same_region_transit_days=int(transit["same_region"]),
        cross_region_transit_days=int(transit["cross_region"]),
        horizon_days=int(cfg["booking_horizon_days"]),
    )


PARAMS = load_parameters()


def _site(row: asyncpg.Record) -> Site:
    return Site(
        site_id=row["site_id"],
        region=row["region"],
        active=row["active"],
        approvals=frozenset(Approval(a["regulator"], a["use"], a["product_code"]) for a in row["approvals"]),
        daily_capacity={k: int(v) for k, v in row["daily_capacity"].items()},
    )


async def _usage(conn: asyncpg.Connection, product: str, since: date) -> dict[tuple[str, str, date], int]:
    rows = await conn.fetch(
        """SELECT site_id, manufacturing_start_date AS day, count(*) AS n FROM slots
           WHERE product_code = $1 AND manufacturing_start_date >= $2 AND status IN ('held', 'confirmed')
           GROUP BY site_id, manufacturing_start_date""",
        product,
        since,
    )
    return {(r["site_id"], product, r["day"]): int(r["n"]) for r in rows}


async def try_reserve(tx: Tx, order: OrderSubmittedV1) -> Choice | tuple[str, str]:
    """Book the best slot for the order, or say why not. Serialised per product: never oversold."""
    conn = tx.conn
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('v2v-slots:' || $1::text))", order.product_code)
    live = await conn.fetchrow(
        "SELECT * FROM slots WHERE order_id = $1 AND status IN ('held', 'confirmed')", order.order_id
    )
    if live is not None:
        return Choice(live["site_id"], live["manufacturing_start_date"])
    sites = [_site(r) for r in await conn.fetch("SELECT * FROM sites")]
    req = Request(
        order.product_code, order.order_type, order.regulator, order.region, order.requested_apheresis_date
    )
    result = select_site(
        sites, await _usage(conn, order.product_code, order.requested_apheresis_date), req, PARAMS
    )
    if not isinstance(result, Choice):
        return (result.reason, result.detail)
    slot_id = uuid.uuid4()
    await conn.execute(
        """INSERT INTO slots (slot_id, order_id, coi, site_id, product_code, manufacturing_start_date,
                              apheresis_date, status)
           VALUES ($1, $2, $3, $4, $5, $6, $7, 'held')""",
        slot_id,
        order.order_id,
        order.coi,
        result.site_id,
        order.product_code,
        result.manufacturing_start_date,
        order.requested_apheresis_date,
    )
    await conn.execute("DELETE FROM waitlist WHERE order_id = $1", order.order_id)
    await tx.outbox.add(
        new_event(
            SlotReservedV1(
                order_id=order.order_id,
                coi=order.coi,
                treatment_center_id=order.treatment_center_id,
                slot_id=slot_id,
                site_id=result.site_id,
                product_code=order.product_code,
                order_type=order.order_type,
                apheresis_date=order.requested_apheresis_date,
                manufacturing_start_date=result.manufacturing_start_date,
            )
        )
    )
    log.info("slot reserved", site_id=result.site_id, day=result.manufacturing_start_date.isoformat())
    return result


async def on_order_submitted(tx: Tx, event: CloudEvent) -> None:
    order = parse_data(event, OrderSubmittedV1)
    result = await try_reserve(tx, order)
    if isinstance(result, Choice):
        return
    reason, detail = result
    inserted = await tx.conn.fetchval(
        """INSERT INTO waitlist (order_id, request, reason) VALUES ($1, $2::jsonb, $3)
           ON CONFLICT (order_id) DO NOTHING RETURNING true""",
        order.order_id,
        json.loads(order.model_dump_json()),
        reason,
    )
    if inserted:
        await tx.outbox.add(
            new_event(
                SlotUnavailableV1(
                    order_id=order.order_id,
                    coi=order.coi,
                    treatment_center_id=order.treatment_center_id,
                    reason=reason,
                    detail=detail,
                    waitlisted=True,
                )
            )
        )
        log.info("order waitlisted", reason=reason)


async def on_site_registered(tx: Tx, event: CloudEvent) -> None:
    site = parse_data(event, SiteRegisteredV1)
    await tx.conn.execute(
        """INSERT INTO sites (site_id, region, timezone, active, approvals, daily_capacity)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)
           ON CONFLICT (site_id) DO UPDATE SET region = $2, timezone = $3, active = $4, approvals = $5::jsonb,
                                               daily_capacity = $6::jsonb, updated_at = now()""",
        site.site_id,
        site.region,
        site.timezone,
        site.active,
        [a.model_dump() for a in site.approvals],
        site.daily_capacity,
    )
    await serve_waitlist(tx)


async def serve_waitlist(tx: Tx) -> int:
    """Book waiting orders first come, first served, as far as capacity now allows."""
    booked = 0
    rows = await tx.conn.fetch("SELECT order_id, request FROM waitlist ORDER BY enqueued_at, order_id")
    for row in rows:
        order = OrderSubmittedV1.model_validate(row["request"])
        if isinstance(await try_reserve(tx, order), Choice):
            booked += 1
    return booked


async def on_booking_confirmed(tx: Tx, event: CloudEvent) -> None:
    data = parse_data(event, BookingConfirmedV1)
    await tx.conn.execute(
        "UPDATE slots SET status = 'confirmed', updated_at = now() WHERE slot_id = $1 AND status = 'held'",
        data.slot_id,
    )


def handlers(_rt: Any) -> dict[str, Any]:
    return {
        OrderSubmittedV1.TYPE: on_order_submitted,
        SiteRegisteredV1.TYPE: on_site_registered,
        BookingConfirmedV1.TYPE: on_booking_confirmed,
    }
