"""Courier inputs: milestones of a shipment, recorded as chain-of-custody entries.

A courier scan is a later input for an order: it starts its own trace, carries the order id and COI
as span attributes, and links to the order's first trace (stored with the shipment when it was planned).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Link

from v2v_contracts import ShipmentMilestoneV1, new_event
from v2v_contracts.coi import coi_problem
from v2v_messaging import UnitOfWork
from v2v_observability import get_logger, set_order_attributes
from v2v_servicekit import Problem, invalid, not_found

log = get_logger(__name__)
tracer = trace.get_tracer("v2v.logistics.custody")

ORDER = ["booked", "picked_up", "in_transit", "delivered"]


def origin_link(origin: dict[str, str] | None) -> list[Link]:
    if not origin:
        return []
    ctx = trace.get_current_span(propagate.extract(origin)).get_span_context()
    return [Link(ctx, {"v2v.link": "order_origin"})] if ctx.is_valid else []


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
    async with uow.begin() as tx:
        ship = await tx.conn.fetchrow(
            "SELECT * FROM shipments WHERE shipment_id = $1 FOR UPDATE", shipment_id
        )
        if ship is None:
            raise not_found("Shipment", shipment_id)
        set_order_attributes(ship["order_id"], ship["coi"])
        with tracer.start_as_current_span(
            "courier milestone",
            links=origin_link(ship["origin_trace"]),
            attributes={"v2v.milestone": milestone},
        ):
            if coi != ship["coi"]:
                log.error("COI mismatch at custody handoff: shipment stopped", shipment_id=str(shipment_id))
                trace.get_current_span().set_status(trace.Status(trace.StatusCode.ERROR, "COI mismatch"))
                raise Problem(
                    409,
                    "Chain of identity mismatch",
                    "coi: does not match the shipment's chain of identity; the handoff is refused",
                    kind="coi-mismatch",
                    errors=[{"field": "coi", "reason": "does not match the shipment"}],
                )
            if ship["status"] in ORDER and ORDER.index(milestone) < ORDER.index(ship["status"]):
                raise invalid(
                    "milestone", f"shipment is already {ship['status']}; cannot go back to {milestone}"
                )
            await tx.conn.execute(
                """INSERT INTO custody_events (shipment_id, milestone, occurred_at, location, handled_by,
                                               received_from, temperature_c, coi_verified)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, true)""",
                shipment_id,
                milestone,
                occurred_at,
                location,
                handled_by,
                received_from,
                temperature_c,
            )
            await tx.conn.execute(
                "UPDATE shipments SET status = $2 WHERE shipment_id = $1", shipment_id, milestone
            )
            await tx.outbox.add(
                new_event(
                    ShipmentMilestoneV1(
                        order_id=ship["order_id"],
                        coi=ship["coi"],
                        treatment_center_id=ship["origin"]
                        if ship["leg"] == "inbound_apheresis"
                        else ship["destination"],
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
    return {"shipment_id": shipment_id, "status": milestone}
