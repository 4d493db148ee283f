"""Logistics use cases: plan the shipments of an order."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import yaml

from v2v_contracts import BookingConfirmedV1, CloudEvent, ShipmentPlannedV1, new_event, parse_data
from v2v_messaging import Tx
from v2v_observability import current_traceparent, get_logger

log = get_logger(__name__)
CONFIG: dict[str, Any] = yaml.safe_load((Path(__file__).parent / "seed" / "logistics.yaml").read_text())


def inbound_condition(product_code: str) -> tuple[str, float, float]:
    condition = CONFIG["apheresis_material"].get(product_code, CONFIG["default_apheresis_material"])
    rng = CONFIG["conditions"][condition]
    return condition, float(rng["min_c"]), float(rng["max_c"])


async def on_booking_confirmed(tx: Tx, event: CloudEvent) -> None:
    booking = parse_data(event, BookingConfirmedV1)
    exists = await tx.conn.fetchval(
        "SELECT 1 FROM shipments WHERE order_id = $1 AND leg = 'inbound_apheresis' AND status <> 'cancelled'",
        booking.order_id,
    )
    if exists:
        return
    condition, lo, hi = inbound_condition(booking.product_code)
    shipment_id = uuid.uuid4()
    await tx.conn.execute(
        """INSERT INTO shipments (shipment_id, order_id, coi, leg, origin, destination, material_condition,
                                  min_temp_c, max_temp_c, planned_pickup_date, status, origin_trace)
           VALUES ($1, $2, $3, 'inbound_apheresis', $4, $5, $6, $7, $8, $9, 'planned', $10::jsonb)""",
        shipment_id,
        booking.order_id,
        booking.coi,
        booking.treatment_center_id,
        booking.site_id,
        condition,
        lo,
        hi,
        booking.apheresis_date,
        current_traceparent(),
    )
    await tx.outbox.add(
        new_event(
            ShipmentPlannedV1(
                order_id=booking.order_id,
                coi=booking.coi,
                treatment_center_id=booking.treatment_center_id,
                shipment_id=shipment_id,
                leg="inbound_apheresis",
                origin=booking.treatment_center_id,
                destination=booking.site_id,
                material_condition=condition,  # type: ignore[arg-type]
                temperature_range_c=(lo, hi),
                planned_pickup_date=booking.apheresis_date,
            )
        )
    )
    log.info("inbound shipment planned", site_id=booking.site_id, condition=condition)


def handlers(_rt: Any) -> dict[str, Any]:
    return {BookingConfirmedV1.TYPE: on_booking_confirmed}
