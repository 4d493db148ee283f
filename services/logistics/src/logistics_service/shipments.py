"""Shipment persistence shared by the event handlers (services.py) and the courier inputs (custody.py).

Every function works inside the caller's transaction (`Tx`): the state change and the events it causes
commit together.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from logistics_service import domain
from v2v_contracts import (
    CoiMismatchDetectedV1,
    ShipmentCancelledV1,
    ShipmentExcursionV1,
    new_event,
)
from v2v_messaging import Tx
from v2v_observability import get_logger

log = get_logger(__name__)


def order_refs(ship: asyncpg.Record) -> dict[str, Any]:
    """The opaque references every shipment event carries (order id, COI, treatment centre id)."""
    return {
        "order_id": ship["order_id"],
        "coi": ship["coi"],
        "treatment_center_id": domain.treatment_center_of(ship["leg"], ship["origin"], ship["destination"]),
    }


async def set_status(
    conn: asyncpg.Connection,
    ship: asyncpg.Record,
    new_status: str,
    reason: str,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Move a shipment to `new_status` (checked against domain.TRANSITIONS) and log it with its reason.

    `extra` sets further columns of the shipment in the same statement (names are ours, never input).
    """
    before = ship["status"]
    if not domain.can_transition(before, new_status):
        raise ValueError(f"shipment {ship['shipment_id']}: {before} -> {new_status} is not allowed")
    columns = dict(extra or {})
    if before == new_status and not columns:
        return
    if before != new_status:
        assignments = ["status = $2", "status_reason = $3", "updated_at = now()"]
        values: list[Any] = [ship["shipment_id"], new_status, reason]
    else:  # the status stays (and so does the reason it got it for): only the extra columns change
        assignments = ["updated_at = now()"]
        values = [ship["shipment_id"]]
    for name, value in columns.items():
        values.append(value)
        assignments.append(f"{name} = ${len(values)}")
    await conn.execute(f"UPDATE shipments SET {', '.join(assignments)} WHERE shipment_id = $1", *values)
    if before != new_status:
        await conn.execute(
            """INSERT INTO shipment_status_log (shipment_id, status_before, status_after, reason)
               VALUES ($1, $2, $3, $4)""",
            ship["shipment_id"],
            before,
            new_status,
            reason,
        )


async def log_created(conn: asyncpg.Connection, shipment_id: uuid.UUID, reason: str) -> None:
    await conn.execute(
        """INSERT INTO shipment_status_log (shipment_id, status_before, status_after, reason)
           VALUES ($1, NULL, $2, $3)""",
        shipment_id,
        domain.PLANNED,
        reason,
    )


async def cancel(tx: Tx, ship: asyncpg.Record, reason: str) -> None:
    """Cancel one shipment and publish `logistics.shipment_cancelled.v1` in the same transaction."""
    await set_status(tx.conn, ship, domain.CANCELLED, reason)
    await tx.outbox.add(
        new_event(
            ShipmentCancelledV1(
                **order_refs(ship), shipment_id=ship["shipment_id"], leg=ship["leg"], reason=reason
            )
        )
    )
    log.info(
        "shipment cancelled",
        shipment_id=str(ship["shipment_id"]),
        leg=ship["leg"],
        status_before=ship["status"],
        reason=reason,
    )


async def record_reading(
    tx: Tx,
    ship: asyncpg.Record,
    *,
    reading_c: float,
    measured_at: datetime,
    source: str,
    coi_verified: bool,
    custody_event_id: int | None = None,
) -> dict[str, Any]:
    """Record one temperature reading; outside the shipment's range, handle the excursion.

    `ship` is the shipment row as locked by the caller (its status may have been changed by the caller
    in this transaction already: pass the current row).
    """
    lo, hi = float(ship["min_temp_c"]), float(ship["max_temp_c"])
    outcome = domain.after_reading(
        ship["status"], reading_c, lo, hi, excursion_reported=ship["excursion_at"] is not None
    )
    reading_id = await tx.conn.fetchval(
        """INSERT INTO temperature_readings (shipment_id, reading_c, measured_at, source, custody_event_id,
                                             min_c, max_c, in_range, coi_verified)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id""",
        ship["shipment_id"],
        reading_c,
        measured_at,
        source,
        custody_event_id,
        lo,
        hi,
        outcome.in_range,
        coi_verified,
    )
    status = ship["status"]
    if outcome.publish_excursion:
        extra: dict[str, Any] = {"excursion_at": measured_at}
        if outcome.new_status != status:
            extra["held_from_status"] = status
        reason = f"excursion: {reading_c} °C outside [{lo}, {hi}]"
        await set_status(tx.conn, ship, outcome.new_status, reason, extra=extra)
        await tx.outbox.add(
            new_event(
                ShipmentExcursionV1(
                    **order_refs(ship),
                    shipment_id=ship["shipment_id"],
                    leg=ship["leg"],
                    reading_c=reading_c,
                    min_c=lo,
                    max_c=hi,
                    measured_at=measured_at,
                )
            )
        )
        log.warning(
            "temperature excursion: shipment compromised",
            shipment_id=str(ship["shipment_id"]),
            leg=ship["leg"],
            reading_c=reading_c,
            min_c=lo,
            max_c=hi,
            status=outcome.new_status,
        )
        status = outcome.new_status
    elif not outcome.in_range:
        log.warning(
            "temperature out of range again (excursion already reported)",
            shipment_id=str(ship["shipment_id"]),
            reading_c=reading_c,
        )
    return {
        "reading_id": reading_id,
        "shipment_id": ship["shipment_id"],
        "reading_c": reading_c,
        "measured_at": measured_at,
        "in_range": outcome.in_range,
        "min_c": lo,
        "max_c": hi,
        "excursion_published": outcome.publish_excursion,
        "shipment_status": status,
    }


async def stop_on_coi_mismatch(tx: Tx, ship: asyncpg.Record, where: str) -> str:
    """A handoff presented another order's COI: stop the shipment and raise the alert.

    Runs in a transaction of its own that the caller commits before it refuses the request (409), so
    neither the stop nor the alert is rolled back with the refusal. Returns the shipment's status.
    """
    new_status = domain.status_after_coi_mismatch(ship["status"])
    extra = {"held_from_status": ship["status"]} if new_status != ship["status"] else None
    await set_status(tx.conn, ship, new_status, f"coi_mismatch at {where}", extra=extra)
    await tx.outbox.add(
        new_event(CoiMismatchDetectedV1(**order_refs(ship), shipment_id=ship["shipment_id"], where=where))
    )
    log.error(
        "COI mismatch at custody handoff: shipment stopped, alert raised",
        shipment_id=str(ship["shipment_id"]),
        where=where,
        status=new_status,
    )
    return new_status
