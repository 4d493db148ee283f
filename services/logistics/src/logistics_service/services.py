"""Logistics use cases driven by events: plan, ready, cancel and resume the shipments of an order.

Each handler runs in the consumer's transaction (inbox row + state change + outbox events commit
together) and is idempotent: a fact for a state already left is logged and ignored.
"""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from logistics_service import domain, shipments
from v2v_contracts import (
    ApheresisCompletedV1,
    BookingCancelledV1,
    BookingConfirmedV1,
    CloudEvent,
    OrderCancelledV1,
    OrderFailedV1,
    ProductReleasedV1,
    QuarantineDecidedV1,
    ShipmentPlannedV1,
    new_event,
    parse_data,
)
from v2v_messaging import Tx
from v2v_observability import current_traceparent, get_logger

log = get_logger(__name__)
CONFIG: dict[str, Any] = yaml.safe_load((Path(__file__).parent / "seed" / "logistics.yaml").read_text())


def inbound_condition(product_code: str) -> tuple[str, float, float]:
    condition = CONFIG["apheresis_material"].get(product_code, CONFIG["default_apheresis_material"])
    rng = CONFIG["conditions"][condition]
    return condition, float(rng["min_c"]), float(rng["max_c"])


def outbound_condition() -> tuple[str, float, float]:
    """The released product's lane: cryopreserved, vapour-phase LN2 (seed: `outbound_product`)."""
    lane = CONFIG["outbound_product"]
    return str(lane["condition"]), float(lane["min_c"]), float(lane["max_c"])


async def _serialise_order(conn: asyncpg.Connection, order_id: uuid.UUID) -> None:
    """One handler at a time per order (across replicas too): facts about the same order that arrive on
    different topics (a cancellation crossing a release) are applied one after the other."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"logistics-order:{order_id}")


async def _order_ended(conn: asyncpg.Connection, order_id: uuid.UUID) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM ended_orders WHERE order_id = $1", order_id))


async def _lane_holder(conn: asyncpg.Connection, order_id: uuid.UUID, leg: str) -> asyncpg.Record | None:
    """The shipment that holds the order's lane for this leg (at most one: unique index), if any."""
    rows = await conn.fetch(
        "SELECT * FROM shipments WHERE order_id = $1 AND leg = $2 ORDER BY created_at", order_id, leg
    )
    return next((r for r in rows if domain.holds_lane(r["status"])), None)


async def _plan(
    tx: Tx,
    *,
    order_id: uuid.UUID,
    coi: str,
    treatment_center_id: str,
    leg: domain.Leg,
    origin: str,
    destination: str,
    condition: str,
    lo: float,
    hi: float,
    pickup: date,
    booking_id: uuid.UUID | None = None,
    slot_id: uuid.UUID | None = None,
    run: int | None = None,
    reason: str,
) -> uuid.UUID:
    shipment_id = uuid.uuid4()
    await tx.conn.execute(
        """INSERT INTO shipments (shipment_id, order_id, coi, leg, origin, destination, material_condition,
                                  min_temp_c, max_temp_c, planned_pickup_date, status, origin_trace,
                                  booking_id, run, status_reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'planned', $11::jsonb, $12, $13, $14)""",
        shipment_id,
        order_id,
        coi,
        leg,
        origin,
        destination,
        condition,
        lo,
        hi,
        pickup,
        current_traceparent(),
        booking_id,
        run,
        reason,
    )
    await shipments.log_created(tx.conn, shipment_id, reason)
    await tx.outbox.add(
        new_event(
            ShipmentPlannedV1(
                order_id=order_id,
                coi=coi,
                treatment_center_id=treatment_center_id,
                shipment_id=shipment_id,
                leg=leg,
                origin=origin,
                destination=destination,
                material_condition=condition,  # type: ignore[arg-type]
                temperature_range_c=(lo, hi),
                planned_pickup_date=pickup,
                slot_id=slot_id,
            )
        )
    )
    return shipment_id


async def on_booking_confirmed(tx: Tx, event: CloudEvent) -> None:
    """Plan the inbound leg (centre → site) for a confirmed booking; a recollection gets a new one."""
    booking = parse_data(event, BookingConfirmedV1)
    await _serialise_order(tx.conn, booking.order_id)
    if await _order_ended(tx.conn, booking.order_id):
        log.info(
            "booking confirmed for an ended order: no inbound shipment", booking_id=str(booking.booking_id)
        )
        return
    same_booking = await tx.conn.fetchval(
        "SELECT 1 FROM shipments WHERE order_id = $1 AND leg = 'inbound_apheresis' AND booking_id = $2",
        booking.order_id,
        booking.booking_id,
    )
    holder = await _lane_holder(tx.conn, booking.order_id, "inbound_apheresis")
    if same_booking or holder is not None:
        log.info(
            "inbound shipment already planned",
            booking_id=str(booking.booking_id),
            holder=str(holder["shipment_id"]) if holder else None,
        )
        return
    condition, lo, hi = inbound_condition(booking.product_code)
    await _plan(
        tx,
        order_id=booking.order_id,
        coi=booking.coi,
        treatment_center_id=booking.treatment_center_id,
        leg="inbound_apheresis",
        origin=booking.treatment_center_id,
        destination=booking.site_id,
        condition=condition,
        lo=lo,
        hi=hi,
        pickup=booking.apheresis_date,
        slot_id=booking.slot_id,
        booking_id=booking.booking_id,
        reason=f"booking_confirmed:{booking.booking_id}",
    )
    log.info("inbound shipment planned", site_id=booking.site_id, condition=condition)


async def on_product_released(tx: Tx, event: CloudEvent) -> None:
    """Plan the outbound leg (site → centre) for a released product, cryopreserved (at or below -150 °C)."""
    released = parse_data(event, ProductReleasedV1)
    await _serialise_order(tx.conn, released.order_id)
    if await _order_ended(tx.conn, released.order_id):
        log.info("product released for an ended order: no outbound shipment", run=released.run)
        return
    # a run's outbound that was compromised or cancelled does not count: after a recollection runs
    # start again at 1, and a rejected product is replaced by a new one
    same_run = await tx.conn.fetchval(
        """SELECT 1 FROM shipments WHERE order_id = $1 AND leg = 'outbound_product' AND run = $2
             AND status NOT IN ('compromised', 'cancelled')""",
        released.order_id,
        released.run,
    )
    holder = await _lane_holder(tx.conn, released.order_id, "outbound_product")
    if same_run or holder is not None:
        log.info(
            "outbound shipment already planned",
            run=released.run,
            holder=str(holder["shipment_id"]) if holder else None,
        )
        return
    condition, lo, hi = outbound_condition()
    await _plan(
        tx,
        order_id=released.order_id,
        coi=released.coi,
        treatment_center_id=released.treatment_center_id,
        leg="outbound_product",
        origin=released.site_id,
        destination=released.treatment_center_id,
        condition=condition,
        lo=lo,
        hi=hi,
        pickup=released.released_at.date(),
        run=released.run,
        reason=f"product_released:run {released.run}",
    )
    log.info("outbound shipment planned", site_id=released.site_id, run=released.run, condition=condition)


async def on_apheresis_completed(tx: Tx, event: CloudEvent) -> None:
    """The centre collected the cells: the inbound shipment is ready for pickup (status only)."""
    done = parse_data(event, ApheresisCompletedV1)
    await _serialise_order(tx.conn, done.order_id)
    ship = await tx.conn.fetchrow(
        """SELECT * FROM shipments WHERE order_id = $1 AND leg = 'inbound_apheresis'
                                     AND status = ANY($2::text[])
           ORDER BY created_at DESC LIMIT 1 FOR UPDATE""",
        done.order_id,
        sorted(domain.LIVE),
    )
    if ship is None:
        log.warning("apheresis completed but no live inbound shipment", order_id=str(done.order_id))
        return
    new_status = domain.status_after_apheresis(ship["status"])
    extra = {"ready_for_pickup_at": done.collected_at} if ship["ready_for_pickup_at"] is None else None
    await shipments.set_status(tx.conn, ship, new_status, "apheresis_completed", extra=extra)
    log.info("inbound shipment ready for pickup", shipment_id=str(ship["shipment_id"]), status=new_status)


async def _cancel_order_shipments(tx: Tx, order_id: uuid.UUID, outcome: str, reason: str) -> None:
    await _serialise_order(tx.conn, order_id)
    await tx.conn.execute(
        """INSERT INTO ended_orders (order_id, outcome, reason) VALUES ($1, $2, $3)
           ON CONFLICT (order_id) DO NOTHING""",
        order_id,
        outcome,
        reason,
    )
    rows = await tx.conn.fetch(
        "SELECT * FROM shipments WHERE order_id = $1 ORDER BY created_at FOR UPDATE", order_id
    )
    for ship in rows:
        if domain.cancellable_on_order_end(ship["status"]):
            await shipments.cancel(tx, ship, f"order_{outcome}: {reason}")


async def on_order_cancelled(tx: Tx, event: CloudEvent) -> None:
    cancelled = parse_data(event, OrderCancelledV1)
    await _cancel_order_shipments(tx, cancelled.order_id, "cancelled", cancelled.reason)


async def on_order_failed(tx: Tx, event: CloudEvent) -> None:
    failed = parse_data(event, OrderFailedV1)
    await _cancel_order_shipments(tx, failed.order_id, "failed", failed.reason)


async def on_booking_cancelled(tx: Tx, event: CloudEvent) -> None:
    """The site dropped the booking: its inbound shipment is cancelled if not yet picked up."""
    cancelled = parse_data(event, BookingCancelledV1)
    await _serialise_order(tx.conn, cancelled.order_id)
    rows = await tx.conn.fetch(
        """SELECT * FROM shipments WHERE order_id = $1 AND leg = 'inbound_apheresis'
                                     AND (booking_id = $2 OR booking_id IS NULL)
           ORDER BY created_at FOR UPDATE""",
        cancelled.order_id,
        cancelled.booking_id,
    )
    for ship in rows:
        if domain.cancellable_on_booking_cancelled(ship["leg"], ship["status"]):
            await shipments.cancel(tx, ship, f"booking_cancelled: {cancelled.reason}")
        elif ship["status"] not in (domain.CANCELLED,):
            log.info(
                "booking cancelled but the inbound shipment is past pickup: kept",
                shipment_id=str(ship["shipment_id"]),
                status=ship["status"],
            )


async def on_quarantine_decided(tx: Tx, event: CloudEvent) -> None:
    """QA decided on a product quarantined after an outbound excursion.

    release: the compromised outbound shipment resumes where it was halted (milestones accepted again);
    reject: it stays compromised (the lane is free for a remanufactured product's new shipment).
    """
    decided = parse_data(event, QuarantineDecidedV1)
    await _serialise_order(tx.conn, decided.order_id)
    ship = await tx.conn.fetchrow(
        """SELECT * FROM shipments WHERE order_id = $1 AND leg = 'outbound_product' AND status = 'compromised'
           ORDER BY created_at DESC LIMIT 1 FOR UPDATE""",
        decided.order_id,
    )
    if ship is None:
        log.info("quarantine decided but no compromised outbound shipment", decision=decided.decision)
        return
    reason = f"quarantine_{decided.decision}: {decided.reason}"
    if decided.decision == "reject":
        await shipments.set_status(
            tx.conn, ship, ship["status"], reason, extra={"quarantine_decision": "reject"}
        )
        log.info(
            "quarantine reject: outbound shipment stays compromised", shipment_id=str(ship["shipment_id"])
        )
        return
    resume = domain.status_after_quarantine_release(ship["status"], ship["held_from_status"])
    holder = await _lane_holder(tx.conn, decided.order_id, "outbound_product")
    if holder is not None and domain.holds_lane(resume):
        log.warning(
            "quarantine release, but another outbound shipment holds the lane: not resumed",
            shipment_id=str(ship["shipment_id"]),
            holder=str(holder["shipment_id"]),
        )
        await shipments.set_status(
            tx.conn, ship, ship["status"], reason, extra={"quarantine_decision": "release"}
        )
        return
    await shipments.set_status(tx.conn, ship, resume, reason, extra={"quarantine_decision": "release"})
    log.info(
        "quarantine release: outbound shipment resumed", shipment_id=str(ship["shipment_id"]), status=resume
    )


def handlers(_rt: Any) -> dict[str, Any]:
    return {
        BookingConfirmedV1.TYPE: on_booking_confirmed,
        BookingCancelledV1.TYPE: on_booking_cancelled,
        ProductReleasedV1.TYPE: on_product_released,
        ApheresisCompletedV1.TYPE: on_apheresis_completed,
        OrderCancelledV1.TYPE: on_order_cancelled,
        OrderFailedV1.TYPE: on_order_failed,
        QuarantineDecidedV1.TYPE: on_quarantine_decided,
    }
