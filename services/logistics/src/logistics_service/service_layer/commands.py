"""Courier inputs behind the HTTP API: milestones of a shipment (chain of custody) and temperature
readings. Each one is a unit of work.

A courier scan is a later input for an order: it starts its own trace, carries the order id and COI
as span attributes, and links to the order's first trace (stored with the shipment when it was planned).

Every input that carries a COI checks its check character (Invalid, 422 naming `coi`) and that it is the
shipment's. A mismatch refuses the input (CoiMismatch, 409), and in a transaction of its own that commits
before the refusal, stops the shipment and publishes `logistics.coi_mismatch_detected.v1`.

A handoff (milestone) checks the PAIR its label carries (issue 10): COI + DIN on an inbound leg (the
collection's DIN, learnt from `order.apheresis_completed`), COI + lot on an outbound leg (the run's lot,
learnt from `site.product_released`). Where logistics knows the expected value, a missing one is refused
(422 naming `din`/`lot`) and another one is a mismatch exactly as a COI mismatch (stop, alert with
`identifier`, 409 naming the field). Where it does not, the presented value is recorded unverified (never
guessed).

Temperature readings (domain/shipment.py): accepted in transit, or as a logger download after delivery;
the product's excursion rule (limit and cumulative time outside it) decides whether an excursion is
published, not one reading.

A tenant-bound caller (a carrier) reports on its own shipments only: another's is NotFound (404), checked
before anything else about the shipment, so a foreign shipment is neither revealed nor stopped.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Final, TypedDict

from opentelemetry import trace

from logistics_service.adapters.repository import LogisticsTx
from logistics_service.domain.carriers import Tenant
from logistics_service.domain.shipment import (
    CustodyEvent,
    ReadingSource,
    Sample,
    Shipment,
    TemperatureReading,
    check_pair,
    pair_field,
    worst_reading,
)
from v2v_contracts import (
    CoiMismatchDetectedV1,
    ShipmentExcursionV1,
    ShipmentMilestoneV1,
)
from v2v_contracts.coi import coi_problem
from v2v_contracts.errors import CoiMismatch, Invalid, NotFound
from v2v_messaging import AbstractUnitOfWork
from v2v_observability import get_logger, links_to, names, set_order_attributes

log = get_logger(__name__)
tracer = trace.get_tracer(names.TRACER_CUSTODY)

TEMPERATURE_WHERE: Final = "temperature-reading"  # `where` of a mismatch reported with a logger reading


def coi_mismatch(field: str = "coi") -> CoiMismatch:
    what = {"coi": "chain of identity", "din": "collection (DIN)", "lot": "lot"}[field]
    return CoiMismatch(
        reason="does not match the shipment",
        field=field,
        detail=f"{field}: does not match the shipment's {what}; the handoff is refused",
    )


def _check_pair_input(ship: Shipment, din: str | None, lot: str | None) -> str | None:
    """The second id a handoff presented (refused when it is the other leg's kind, or missing while the
    expected one is known); returns the presented value."""
    wanted = pair_field(ship.leg)
    other, other_value = ("lot", lot) if wanted == "din" else ("din", din)
    if other_value is not None:
        leg = (
            "an inbound leg carries the collection's DIN"
            if wanted == "din"
            else ("an outbound leg carries the run's lot")
        )
        raise Invalid(other, f"not on this shipment's label: {leg}")
    presented = din if wanted == "din" else lot
    expected = ship.din if wanted == "din" else ship.lot
    if check_pair(expected, presented) == "missing":
        raise Invalid(wanted, f"required: this shipment's {wanted} is known; read it from the label")
    return presented


class MilestoneRecorded(TypedDict):
    shipment_id: uuid.UUID
    milestone: str
    status: str
    custody_event_id: int
    temperature_in_range: bool | None
    excursion_published: bool
    pair_verified: bool  # the DIN (inbound) or lot (outbound) checked against a known one


class ReadingRecorded(TypedDict):
    reading_id: int
    shipment_id: uuid.UUID
    reading_c: float
    measured_at: datetime
    in_range: bool
    min_c: float
    max_c: float
    source: ReadingSource
    minutes_outside: float  # cumulative, this shipment's readings so far
    excursion_tolerance_min: float
    excursion_published: bool
    shipment_status: str


def audit_shipment(tx: LogisticsTx, ship: Shipment) -> None:
    """Audit what a save of `ship` is about to write: each status change (with its reason code), else a
    change of its other fields. Called right before `tx.shipments.add/save`."""
    refs = {"order_id": ship.order_id, "leg": ship.leg}
    for change in ship.pending:
        if change.status_before is None:
            tx.audit(
                "shipment.planned",
                "shipment",
                ship.shipment_id,
                new={
                    **refs,
                    "status": change.status_after,
                    "origin": ship.origin,
                    "destination": ship.destination,
                    "carrier_id": ship.carrier_id,
                    "material_condition": ship.material_condition,
                    "temperature_range_c": [ship.min_temp_c, ship.max_temp_c],
                    "excursion_tolerance_min": ship.excursion_tolerance_min,
                    "product_code": ship.product_code,
                    "lot": ship.lot,
                    "planned_pickup_date": ship.planned_pickup_date,
                    "booking_id": ship.booking_id,
                    "run": ship.run,
                },
                reason=change.reason,
            )
        else:
            tx.audit(
                "shipment.status_changed",
                "shipment",
                ship.shipment_id,
                old={"status": change.status_before},
                new={**refs, "status": change.status_after, **_window(ship, change.status_after)},
                reason=change.reason,
            )
    if ship.dirty and not ship.pending:
        tx.audit(
            "shipment.updated",
            "shipment",
            ship.shipment_id,
            new={
                **refs,
                "status": ship.status,
                "quarantine_decision": ship.quarantine_decision,
                "held_from_status": ship.held_from_status,
                "ready_for_pickup_at": ship.ready_for_pickup_at,
                "excursion_at": ship.excursion_at,
                "excursion_minutes": ship.excursion_minutes,
                "picked_up_at": ship.picked_up_at,
                "delivered_at": ship.delivered_at,
                "din": ship.din,
            },
            reason=ship.status_reason,
        )


def _window(ship: Shipment, status: str) -> dict[str, Any]:
    """What a status change sets beside the status (pickup and delivery times, the excursion)."""
    if status == "compromised" and ship.excursion_at is not None:
        return {"excursion_at": ship.excursion_at, "excursion_minutes": ship.excursion_minutes}
    found: dict[str, Any] = {}
    if status in ("picked_up", "in_transit", "delivered") and ship.picked_up_at is not None:
        found["picked_up_at"] = ship.picked_up_at
    if status == "delivered" and ship.delivered_at is not None:
        found["delivered_at"] = ship.delivered_at
    return found


async def save_shipment(tx: LogisticsTx, ship: Shipment) -> None:
    """Audit, then write, a shipment's pending changes (one transaction: `tx`)."""
    audit_shipment(tx, ship)
    await tx.shipments.save(ship)


def _check_coi(coi: str, field: str = "coi") -> None:
    problem = coi_problem(coi)
    if problem:
        raise Invalid(field, problem)


async def _lock(tx: LogisticsTx, shipment_id: uuid.UUID, tenant: Tenant | None) -> Shipment:
    ship = await tx.shipments.get(shipment_id, lock=True, tenant=tenant)
    if ship is None:
        raise NotFound("Shipment", shipment_id)
    set_order_attributes(ship.order_id, ship.coi)
    return ship


def _mark_mismatch_span() -> None:
    trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, "COI mismatch"))


async def record_milestone(
    uow: AbstractUnitOfWork[LogisticsTx],
    shipment_id: uuid.UUID,
    *,
    milestone: str,
    occurred_at: datetime,
    location: str,
    handled_by: str,
    received_from: str | None,
    coi: str,
    temperature_c: float | None,
    din: str | None = None,
    lot: str | None = None,
    tenant: Tenant | None = None,
) -> MilestoneRecorded:
    """A courier milestone: custody recorded, status moved, `shipment_milestone` published; a reading it
    carries (picked up, in transit, delivered: never `booked`, before pickup) is checked like any other."""
    _check_coi(coi)
    if din is not None:
        _check_coi(din, "din")  # a DIN has the COI's shape (ISBT 128 + ISO 7064 MOD 37-2)
    if milestone == "booked" and temperature_c is not None:
        raise Invalid("temperature_c", "a reading before pickup is not the shipment's: `booked` carries none")
    result: MilestoneRecorded | None = None
    mismatch = "coi"
    async with uow.begin() as tx:
        ship = await _lock(tx, shipment_id, tenant)
        with tracer.start_as_current_span(
            "courier milestone",
            links=links_to(ship.origin_trace),
            attributes={names.MILESTONE: milestone},
        ):
            presented = _check_pair_input(ship, din, lot) if coi == ship.coi else None
            pair = check_pair(ship.din if ship.leg == "inbound_apheresis" else ship.lot, presented)
            if coi != ship.coi or pair == "mismatch":
                mismatch = "coi" if coi != ship.coi else pair_field(ship.leg)
                _mark_mismatch_span()
                await _stop_on_coi_mismatch(tx, ship, where=location, identifier=mismatch)
                # committed when the block ends; the 409 is raised after the commit
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
                    presented=presented,
                    pair_verified=pair == "verified",
                )
    if result is None:
        raise coi_mismatch(mismatch)
    return result


async def _apply_milestone(
    tx: LogisticsTx,
    ship: Shipment,
    *,
    milestone: str,
    occurred_at: datetime,
    location: str,
    handled_by: str,
    received_from: str | None,
    temperature_c: float | None,
    presented: str | None,
    pair_verified: bool,
) -> MilestoneRecorded:
    ship.take_milestone(milestone, occurred_at)  # refused: Invalid (goes back) or Conflict (halted)
    second = pair_field(ship.leg)
    custody_id = await tx.custody.add(
        CustodyEvent(
            shipment_id=ship.shipment_id,
            milestone=milestone,
            occurred_at=occurred_at,
            location=location,
            handled_by=handled_by,
            received_from=received_from,
            temperature_c=temperature_c,
            coi_verified=True,
            din=presented if second == "din" else None,
            lot=presented if second == "lot" else None,
            pair_verified=pair_verified,
        )
    )
    tx.audit(
        "custody.recorded",
        "shipment",
        ship.shipment_id,
        new={
            "custody_event_id": custody_id,
            "milestone": milestone,
            "occurred_at": occurred_at,
            "location": location,
            "handled_by": handled_by,  # opaque courier or staff reference
            "received_from": received_from,
            "temperature_c": temperature_c,
            "coi_verified": True,
            second: presented,
            "pair_verified": pair_verified,
        },
        reason=milestone,
    )
    await save_shipment(tx, ship)
    await tx.publish(
        ShipmentMilestoneV1(
            **ship.refs(),
            shipment_id=ship.shipment_id,
            leg=ship.leg,
            milestone=milestone,  # type: ignore[arg-type]
            occurred_at=occurred_at,
            location=location,
            handled_by=handled_by,
            received_from=received_from,
            temperature_c=temperature_c,
        )
    )
    log.info("custody milestone recorded", milestone=milestone, shipment_id=str(ship.shipment_id))
    reading: ReadingRecorded | None = None
    if temperature_c is not None:  # the reading a milestone carries gets the same check as any other
        reading = await _record_reading(
            tx,
            ship,
            reading_c=temperature_c,
            measured_at=occurred_at,
            source="milestone",
            coi_verified=True,
            custody_event_id=custody_id,
        )
    return {
        "shipment_id": ship.shipment_id,
        "milestone": milestone,
        "status": ship.status,
        "custody_event_id": custody_id,
        "temperature_in_range": None if reading is None else reading["in_range"],
        "excursion_published": bool(reading and reading["excursion_published"]),
        "pair_verified": pair_verified,
    }


async def record_temperature(
    uow: AbstractUnitOfWork[LogisticsTx],
    shipment_id: uuid.UUID,
    *,
    reading_c: float,
    measured_at: datetime,
    coi: str | None = None,
    source: ReadingSource = "courier",
    tenant: Tenant | None = None,
) -> ReadingRecorded:
    """A temperature logger reading (`courier`: live, in transit; `logger_download`: after delivery):
    refused outside the shipment's window, else recorded; beyond the product's excursion rule, the
    shipment is compromised and the excursion published."""
    if coi is not None:
        _check_coi(coi)
    result: ReadingRecorded | None = None
    async with uow.begin() as tx:
        ship = await _lock(tx, shipment_id, tenant)
        with tracer.start_as_current_span(
            "courier temperature reading",
            links=links_to(ship.origin_trace),
            attributes={names.TEMPERATURE_C: reading_c},
        ):
            if coi is not None and coi != ship.coi:
                _mark_mismatch_span()
                await _stop_on_coi_mismatch(tx, ship, where=TEMPERATURE_WHERE)
            else:
                ship.check_reading_allowed(source, measured_at)  # outside the window: 409 / 422
                result = await _record_reading(
                    tx,
                    ship,
                    reading_c=reading_c,
                    measured_at=measured_at,
                    source=source,
                    coi_verified=coi is not None,
                )
    if result is None:
        raise coi_mismatch()
    return result


async def _record_reading(
    tx: LogisticsTx,
    ship: Shipment,
    *,
    reading_c: float,
    measured_at: datetime,
    source: ReadingSource,
    coi_verified: bool,
    custody_event_id: int | None = None,
) -> ReadingRecorded:
    """Record one temperature reading on `ship` (as it is now in this transaction). With the readings
    recorded before it, the product's excursion rule is judged: beyond the tolerance, the first time,
    the shipment handles the excursion and `shipment_excursion` is published (with its duration and
    the reading furthest outside the limit)."""
    lo, hi = ship.min_temp_c, ship.max_temp_c
    recorded = [
        Sample(r.measured_at, r.reading_c, r.in_range)
        for r in await tx.readings.of_shipment(ship.shipment_id)
    ]
    sample = Sample(measured_at, reading_c, ship.in_limit(reading_c))
    outcome = ship.take_reading(sample, recorded)
    reading_id = await tx.readings.add(
        TemperatureReading(
            shipment_id=ship.shipment_id,
            reading_c=reading_c,
            measured_at=measured_at,
            source=source,
            custody_event_id=custody_event_id,
            min_c=lo,
            max_c=hi,
            in_range=outcome.in_range,
            coi_verified=coi_verified,
        )
    )
    tx.audit(
        "reading.recorded",
        "shipment",
        ship.shipment_id,
        new={
            "reading_id": reading_id,
            "reading_c": reading_c,
            "measured_at": measured_at,
            "source": source,
            "range_c": [lo, hi],
            "in_range": outcome.in_range,
            "coi_verified": coi_verified,
            "minutes_outside": round(outcome.minutes_outside, 3),
            "excursion_tolerance_min": ship.excursion_tolerance_min,
        },
        reason="in_range" if outcome.in_range else "out_of_range",
    )
    await save_shipment(tx, ship)  # pickup/delivery times set by a milestone, the excursion
    if outcome.publish_excursion:
        worst = worst_reading([*recorded, sample], lo, hi) or sample
        await tx.publish(
            ShipmentExcursionV1(
                **ship.refs(),
                shipment_id=ship.shipment_id,
                leg=ship.leg,
                reading_c=worst.reading_c,
                min_c=lo,
                max_c=hi,
                measured_at=ship.excursion_at or measured_at,
                duration_min=ship.excursion_minutes,
            )
        )
        log.warning(
            "temperature excursion beyond the product's tolerance: shipment compromised",
            shipment_id=str(ship.shipment_id),
            leg=ship.leg,
            reading_c=worst.reading_c,
            min_c=lo,
            max_c=hi,
            minutes_outside=ship.excursion_minutes,
            tolerance_min=ship.excursion_tolerance_min,
            status=ship.status,
        )
    elif not outcome.in_range:
        log.warning(
            "temperature outside the limit: recorded (within the tolerance, or already reported)",
            shipment_id=str(ship.shipment_id),
            reading_c=reading_c,
            minutes_outside=round(outcome.minutes_outside, 3),
            tolerance_min=ship.excursion_tolerance_min,
        )
    return {
        "reading_id": reading_id,
        "shipment_id": ship.shipment_id,
        "reading_c": reading_c,
        "measured_at": measured_at,
        "in_range": outcome.in_range,
        "min_c": lo,
        "max_c": hi,
        "source": source,
        "minutes_outside": round(outcome.minutes_outside, 3),
        "excursion_tolerance_min": ship.excursion_tolerance_min,
        "excursion_published": outcome.publish_excursion,
        "shipment_status": ship.status,
    }


async def _stop_on_coi_mismatch(tx: LogisticsTx, ship: Shipment, where: str, identifier: str = "coi") -> None:
    """A handoff presented another order's COI (or another collection's DIN, another run's lot): stop
    the shipment and raise the alert.

    The caller commits this transaction before it refuses the request (409), so neither the stop nor the
    alert is rolled back with the refusal.
    """
    ship.stop_on_coi_mismatch()
    await save_shipment(tx, ship)
    await tx.publish(
        CoiMismatchDetectedV1(
            **ship.refs(),
            shipment_id=ship.shipment_id,
            where=where,
            identifier=identifier,  # type: ignore[arg-type]
        )
    )
    log.error(
        "identity mismatch at custody handoff: shipment stopped, alert raised",
        shipment_id=str(ship.shipment_id),
        where=where,
        identifier=identifier,
        status=ship.status,
    )
