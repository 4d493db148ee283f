"""Service layer: the use cases of the order service, each one unit of work."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from order_service.adapters import repository as repo
from order_service.domain.coi import make_coi
from order_service.domain.order import OrderStatus, decide
from v2v_contracts import CloudEvent, OrderSubmittedV1, new_event
from v2v_messaging import Tx, UnitOfWork
from v2v_observability import bind_order, get_logger, set_order_attributes
from v2v_servicekit import invalid

log = get_logger(__name__)


@dataclass(frozen=True)
class PlaceOrder:
    treatment_center_id: str
    product_code: str
    order_type: str
    patient_ref: str
    requested_apheresis_date: date


async def place_order(
    uow: UnitOfWork, cmd: PlaceOrder, facility_id: str, now: datetime | None = None
) -> uuid.UUID:
    now = now or datetime.now(UTC)
    async with uow.begin() as tx:
        centre = await repo.get_centre(tx.conn, cmd.treatment_center_id)
        if centre is None:
            raise invalid(
                "treatment_center_id", f"unknown or uncertified treatment centre '{cmd.treatment_center_id}'"
            )
        product = await repo.get_product(tx.conn, cmd.product_code)
        if product is None:
            raise invalid("product_code", f"unknown product '{cmd.product_code}'")
        centre_today = now.astimezone(ZoneInfo(centre["timezone"])).date()
        if cmd.requested_apheresis_date < centre_today:
            raise invalid(
                "requested_apheresis_date",
                f"{cmd.requested_apheresis_date.isoformat()} is in the past (today at the centre is "
                f"{centre_today.isoformat()})",
            )
        order_id = uuid.uuid4()
        year = now.year
        coi = make_coi(facility_id, year, await repo.next_coi_sequence(tx.conn, year))
        bind_order(order_id)
        set_order_attributes(order_id, coi)
        await repo.insert_order(
            tx.conn,
            order_id=order_id,
            coi=coi,
            treatment_center_id=cmd.treatment_center_id,
            product_code=cmd.product_code,
            order_type=cmd.order_type,
            patient_ref=cmd.patient_ref,
            requested_apheresis_date=cmd.requested_apheresis_date,
            status=OrderStatus.SUBMITTED.value,
        )
        event = new_event(
            OrderSubmittedV1(
                order_id=order_id,
                coi=coi,
                treatment_center_id=cmd.treatment_center_id,
                product_code=cmd.product_code,
                order_type=cmd.order_type,  # type: ignore[arg-type]
                regulator=centre["regulator"],
                country=centre["country"],
                region=centre["region"],
                requested_apheresis_date=cmd.requested_apheresis_date,
            )
        )
        await tx.outbox.add(event)
        await repo.add_timeline(
            tx.conn,
            order_id=order_id,
            event_id=event.id,
            event_type=event.type,
            source=event.source,
            occurred_at=event.time,
            status_before=None,
            status_after=OrderStatus.SUBMITTED.value,
            reason="order placed by treatment centre",
        )
    log.info("order placed", order_id=str(order_id), product_code=cmd.product_code)
    return order_id


async def apply_fact(tx: Tx, event: CloudEvent) -> None:
    """A fact from scheduling, site or logistics: record it on the timeline, move the state if allowed."""
    order_id = uuid.UUID(str(event.data["order_id"]))
    order = await repo.get_order(tx.conn, order_id, lock=True)
    if order is None:
        raise LookupError(f"event {event.type} for unknown order {order_id}")
    if event.coi and event.coi != order["coi"]:
        raise ValueError(f"COI mismatch on {event.type}: event {event.coi} vs order {order['coi']}")
    current = OrderStatus(order["status"])
    decision = decide(current, event.type)
    fields: dict[str, object] = {}
    data = event.data
    if decision.new_status is not None:
        fields["status"] = decision.new_status.value
        if event.type == "scheduling.slot_reserved.v1":
            fields.update(
                site_id=data["site_id"],
                slot_id=uuid.UUID(str(data["slot_id"])),
                apheresis_date=date.fromisoformat(data["apheresis_date"]),
                manufacturing_start_date=date.fromisoformat(data["manufacturing_start_date"]),
            )
        await repo.update_order(tx.conn, order_id, **fields)
    reason = str(data.get("reason") or decision.reason)
    await repo.add_timeline(
        tx.conn,
        order_id=order_id,
        event_id=event.id,
        event_type=event.type,
        source=event.source,
        occurred_at=event.time,
        status_before=current.value,
        status_after=(decision.new_status or current).value,
        reason=reason,
    )
    log.info(
        "order fact applied",
        event_type=event.type,
        status=(decision.new_status or current).value,
        changed=decision.new_status is not None,
    )
