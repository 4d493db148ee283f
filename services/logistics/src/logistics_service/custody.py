"""Courier inputs: milestones of a shipment (chain of custody) and temperature readings.

A courier scan is a later input for an order: it starts its own trace, carries the order id and COI
as span attributes, and links to the order's first trace (stored with the shipment when it was planned).

Every input that carries a COI checks its check character (422 naming `coi`) and that it is the
shipment's. A mismatch refuses the input (409), and in a transaction of its own that commits before
the refusal, stops the shipment and publishes `logistics.coi_mismatch_detected.v1`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
from opentelemetry import propagate, trace
from opentelemetry.trace import Link

from logistics_service import domain, shipments
from v2v_contracts import ShipmentMilestoneV1, new_event
from v2v_contracts.coi import coi_problem
from v2v_messaging import Tx, UnitOfWork
from v2v_observability import get_logger, set_order_attributes
from v2v_servicekit import Problem, invalid, not_found

log = get_logger(__name__)
tracer = trace.get_tracer("v2v.logistics.custody")

TEMPERATURE_WHERE = "temperature-reading"  # `where` of a mismatch reported with a logger reading


def origin_link(origin: dict[str, str] | None) -> list[Link]:
    if not origin:
        return []
    ctx = trace.get_current_span(propagate.extract(origin)).get_span_context()
    return [Link(ctx, {"v2v.link": "order_origin"})] if ctx.is_valid else []


def coi_mismatch_problem() -> Problem:
    return Problem(
        409,
        "Chain of identity mismatch",
        "coi: does not match the shipment's chain of identity; the handoff is refused",
        kind="coi-mismatch",
        errors=[{"field": "coi", "reason": "does not match the shipment"}],
    )


def refused(refusal: domain.Refusal) -> Problem:
    if refusal.status == 422:
        return invalid(refusal.field, refusal.reason)
    return Problem(
        refusal.status,
        "Shipment cannot take this input",
        f"{refusal.field}: {refusal.reason}",
        kind="shipment-state",
        errors=[{"field": refusal.field, "reason": refusal.reason}],
    )


async def _lock(tx: Tx, shipment_id: uuid.UUID) -> asyncpg.Record:
    ship = await tx.conn.fetchrow("SELECT * FROM shipments WHERE shipment_id = $1 FOR UPDATE", shipment_id)
    if ship is None:
        raise not_found("Shipment", shipment_id)
    set_order_attributes(ship["order_id"], ship["coi"])
    return ship


def _mark_mismatch_span() -> None:
    trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, "COI mismatch"))


async def record_milestone(
    uow: UnitOfWork,
    shipment_id: uuid.UUID,
    *,
    milestone: str,
    occurred_at: datetime,
    location: str,
    handled_by: str,
    received_from: str | None,
    coi: str,
    temperature_c: float | None,
) -> dict[str, Any]:
    problem = coi_problem(coi)
    if problem:
        raise invalid("coi", problem)
    mismatch = False
    result: dict[str, Any] = {}
    async with uow.begin() as tx:
        ship = await _lock(tx, shipment_id)
        with tracer.start_as_current_span(
            "courier milestone",
            links=origin_link(ship["origin_trace"]),
            attributes={"v2v.milestone": milestone},
        ):
            if coi != ship["coi"]:
                _mark_mismatch_span()
                await shipments.stop_on_coi_mismatch(tx, ship, where=location)
                mismatch = True  # committed when the block ends; the 409 is raised after the commit
            else:
                result = await _apply_milestone(
                    tx,
                    ship,
                    milestone=milestone,
                    occurred_at=occurred_at,
                    location=location,
                    handled_by=handled_by,
                    received_from=received_from,
                    temperature_c=temperature_c,
                )
    if mismatch:
        raise coi_mismatch_problem()
    return result


async def _apply_milestone(
    tx: Tx,
    ship: asyncpg.Record,
    *,
    milestone: str,
    occurred_at: datetime,
    location: str,
    handled_by: str,
    received_from: str | None,
    temperature_c: float | None,
) -> dict[str, Any]:
    shipment_id = ship["shipment_id"]
    refusal = domain.milestone_refusal(ship["status"], milestone)
    if refusal:
        raise refused(refusal)
    new_status = domain.status_after_milestone(ship["status"], milestone)
    custody_id = await tx.conn.fetchval(
        """INSERT INTO custody_events (shipment_id, milestone, occurred_at, location, handled_by,
                                       received_from, temperature_c, coi_verified)
           VALUES ($1, $2, $3, $4, $5, $6, $7, true) RETURNING id""",
        shipment_id,
        milestone,
        occurred_at,
        location,
        handled_by,
        received_from,
        temperature_c,
    )
    await shipments.set_status(tx.conn, ship, new_status, f"milestone:{milestone} at {location}")
    await tx.outbox.add(
        new_event(
            ShipmentMilestoneV1(
                **shipments.order_refs(ship),
                shipment_id=shipment_id,
                leg=ship["leg"],
                milestone=milestone,  # type: ignore[arg-type]
                occurred_at=occurred_at,
                location=location,
                handled_by=handled_by,
                received_from=received_from,
                temperature_c=temperature_c,
            )
        )
    )
    log.info("custody milestone recorded", milestone=milestone, shipment_id=str(shipment_id))
    status = new_status
    reading: dict[str, Any] | None = None
    if temperature_c is not None:  # the reading a milestone carries gets the same check as any other
        current = await tx.conn.fetchrow("SELECT * FROM shipments WHERE shipment_id = $1", shipment_id)
        reading = await shipments.record_reading(
            tx,
            current,
            reading_c=temperature_c,
            measured_at=occurred_at,
            source="milestone",
            coi_verified=True,
            custody_event_id=custody_id,
        )
        status = reading["shipment_status"]
    return {
        "shipment_id": shipment_id,
        "milestone": milestone,
        "status": status,
        "custody_event_id": custody_id,
        "temperature_in_range": None if reading is None else reading["in_range"],
        "excursion_published": bool(reading and reading["excursion_published"]),
    }


async def record_temperature(
    uow: UnitOfWork,
    shipment_id: uuid.UUID,
    *,
    reading_c: float,
    measured_at: datetime,
    coi: str | None = None,
) -> dict[str, Any]:
    """A temperature logger reading: recorded; outside the range, the shipment is compromised."""
    if coi is not None:
        problem = coi_problem(coi)
        if problem:
            raise invalid("coi", problem)
    mismatch = False
    result: dict[str, Any] = {}
    async with uow.begin() as tx:
        ship = await _lock(tx, shipment_id)
        with tracer.start_as_current_span(
            "courier temperature reading",
            links=origin_link(ship["origin_trace"]),
            attributes={"v2v.temperature_c": reading_c},
        ):
            if coi is not None and coi != ship["coi"]:
                _mark_mismatch_span()
                await shipments.stop_on_coi_mismatch(tx, ship, where=TEMPERATURE_WHERE)
                mismatch = True
            else:
                refusal = domain.reading_refusal(ship["status"])
                if refusal:
                    raise refused(refusal)
                result = await shipments.record_reading(
                    tx,
                    ship,
                    reading_c=reading_c,
                    measured_at=measured_at,
                    source="courier",
                    coi_verified=coi is not None,
                )
    if mismatch:
        raise coi_mismatch_problem()
    return result
