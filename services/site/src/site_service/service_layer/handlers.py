"""The site's event handlers: bookings into a site's plan from scheduling's slots, and the site's answers
to the order's compensations (cancel, fail); a remanufacture starts from its slot. Each runs in the
consumer's transaction, with the inbox entry that makes a redelivery a no-op.

The reasons the site stores and publishes here are codes: the order's reason is kept only when it is a
reason code itself (`order_cancelled:<code>`), never as free text (`domain.reasons`)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

from site_service.adapters.repository import SiteTx
from site_service.domain import manufacturing as mfg
from site_service.domain import registry
from site_service.domain.reasons import code_or, qualified
from site_service.domain.registry import Booking
from site_service.service_layer.commands import affect_bookings, new_lot, record_transition
from site_service.service_layer.products import rules_for
from v2v_audit import AuditedHandlers
from v2v_contracts import (
    ApheresisCompletedV1,
    BookingCancelledV1,
    BookingConfirmedV1,
    ManufacturingStoppedV1,
    MaterialReceivedV1,
    OrderCancelledV1,
    OrderFailedV1,
    OrderSubmittedV1,
    SlotReleasedV1,
    SlotReservedV1,
)
from v2v_contracts.coi import coi_problem
from v2v_contracts.events import DispositionDecidedV1
from v2v_contracts.fields import CODE_PATTERN
from v2v_messaging import EventMeta
from v2v_observability import current_traceparent, get_logger

log = get_logger(__name__)

# entries written by these handlers name the consumer (`site.bookings`) as actor and the event as cause
handlers = AuditedHandlers[SiteTx]("site.bookings")
_CODE = re.compile(CODE_PATTERN)


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


# ---- bookings ----------------------------------------------------------------------------------------


async def cancel_booking(tx: SiteTx, booking: Booking, reason: str) -> bool:
    """Take a live booking out of the site's plan (`booking_cancelled`); False when already cancelled."""
    if not await tx.bookings.cancel(booking.booking_id, reason):
        return False
    tx.audit(
        "booking.cancelled",
        "booking",
        booking.booking_id,
        old={"status": booking.status},
        new={"status": "cancelled", "order_id": booking.order_id, "slot_id": booking.slot_id},
        reason=reason,
    )
    await tx.publish(
        BookingCancelledV1(
            **booking.ref(),
            booking_id=booking.booking_id,
            slot_id=booking.slot_id,
            site_id=booking.site_id,
            reason=reason,
        )
    )
    log.info("booking cancelled", site_id=booking.site_id, booking_id=str(booking.booking_id))
    return True


@handlers.on(SlotReservedV1)
async def on_slot_reserved(tx: SiteTx, slot: SlotReservedV1, meta: EventMeta) -> None:
    """Scheduling reserved a slot: it becomes a confirmed booking in the site's plan (once per slot)."""
    booking = Booking(
        booking_id=uuid.uuid4(),
        order_id=slot.order_id,
        coi=slot.coi,
        slot_id=slot.slot_id,
        site_id=slot.site_id,
        manufacturing_start_date=slot.manufacturing_start_date,
        apheresis_date=slot.apheresis_date,
        status="confirmed",
        treatment_center_id=slot.treatment_center_id,
        product_code=slot.product_code,
        run=slot.run if slot.reason == "remanufacture" else None,
    )
    outages = await tx.book_slot(booking, origin_trace=current_traceparent())
    if outages is None:  # the slot has its booking already
        return
    tx.audit(
        "booking.confirmed",
        "booking",
        booking.booking_id,
        new={
            "status": booking.status,
            "order_id": booking.order_id,
            "slot_id": booking.slot_id,
            "site_id": booking.site_id,
            "product_code": booking.product_code,
            "manufacturing_start_date": booking.manufacturing_start_date,
            "apheresis_date": booking.apheresis_date,
        },
        reason=slot.reason,
    )
    if slot.reason == "remanufacture" and slot.run is not None:
        # issue 10: a remanufacture's slot at this site (in use at once in scheduling; no material moves,
        # so no booking confirmation for logistics to plan an inbound leg from): its run starts from the
        # retained material
        await start_remanufacture(tx, slot.order_id, slot.site_id, slot.run, "remanufacture")
        return
    await tx.publish(
        BookingConfirmedV1(
            order_id=slot.order_id,
            coi=slot.coi,
            treatment_center_id=slot.treatment_center_id,
            booking_id=booking.booking_id,
            slot_id=slot.slot_id,
            site_id=slot.site_id,
            product_code=slot.product_code,
            manufacturing_start_date=slot.manufacturing_start_date,
            apheresis_date=slot.apheresis_date,
        )
    )
    log.info("booking confirmed into site plan", site_id=slot.site_id)
    # a slot taken from a stale copy of the registry may fall into an outage the site already declared
    outage = registry.outage_on(outages, slot.manufacturing_start_date)
    if outage is not None:
        await affect_bookings(tx, [booking], registry.outage_reason(outage.reason))


@handlers.on(SlotReleasedV1)
async def on_slot_released(tx: SiteTx, data: SlotReleasedV1, meta: EventMeta) -> None:
    booking = await tx.bookings.by_slot(data.slot_id, lock=True)
    if booking is None or booking.status == "cancelled":
        return
    await cancel_booking(tx, booking, code_or(data.reason, "slot_released"))


# ---- the order's compensations and commands -------------------------------------------------------


async def stop_order(tx: SiteTx, order_id: uuid.UUID, reason: str, *, now: datetime | None = None) -> int:
    """Stop every running manufacture of the order (`manufacturing_stopped`); returns how many."""
    stopped = 0
    for m in await tx.manufacturing.for_order(order_id):
        t = mfg.stop(m.state)
        if not t.changed:
            continue
        event = ManufacturingStoppedV1(**m.ref(), site_id=m.site_id, reason=reason)
        await record_transition(tx, m, t, action="stop", occurred_at=_now(now), reason=reason, event=event)
        log.info("manufacturing stopped", site_id=m.site_id, run=t.after.run)
        stopped += 1
    return stopped


async def _order_ended(tx: SiteTx, order_id: uuid.UUID, reason: str) -> None:
    # lock order everywhere: site, then bookings, then manufacturing (as a receipt does)
    bookings = await tx.bookings.for_order(order_id)
    await stop_order(tx, order_id, reason)
    for booking in bookings:
        if booking.live:
            await cancel_booking(tx, booking, reason)


@handlers.on(OrderCancelledV1)
async def on_order_cancelled(tx: SiteTx, data: OrderCancelledV1, meta: EventMeta) -> None:
    await _order_ended(tx, data.order_id, qualified("order_cancelled", data.reason))


@handlers.on(OrderFailedV1)
async def on_order_failed(tx: SiteTx, data: OrderFailedV1, meta: EventMeta) -> None:
    await _order_ended(tx, data.order_id, qualified("order_failed", data.reason))


async def start_remanufacture(
    tx: SiteTx, order_id: uuid.UUID, site_id: str, run: int, reason: str, *, now: datetime | None = None
) -> bool:
    """A new run from retained material at the same site; False when there is nothing to start."""
    m = await tx.manufacturing.latest(order_id, site_id, lock=True)
    if m is None:
        log.warning("remanufacture requested, but no material of the order is at the site", site_id=site_id)
        return False
    try:
        t = mfg.remanufacture(m.state, run, rules_for(m.product_code))
    except mfg.ManufacturingConflict as exc:
        log.warning("remanufacture request not applicable", site_id=site_id, run=run, why=exc.reason)
        return False
    if not t.changed:
        return False
    t = await new_lot(tx, site_id, t)  # a new run, a new lot
    await record_transition(tx, m, t, action="remanufacture", occurred_at=_now(now), reason=reason)
    log.info("remanufacture started from retained material", site_id=site_id, run=run, lot=t.after.lot)
    return True


# ---- issue 10: what the site learns of an order, and QA's disposition of material at risk --------------


@handlers.on(OrderSubmittedV1)
async def on_order_submitted(tx: SiteTx, data: OrderSubmittedV1, meta: EventMeta) -> None:
    """The order's market (regulator, use, country, region): who must sign its lot's release."""
    await tx.orders.record_market(
        data.order_id,
        regulator=data.regulator,
        order_type=data.order_type,
        country=data.country,
        region=data.region,
    )
    tx.audit(
        "order.market_learned",
        "order",
        data.order_id,
        new={"regulator": data.regulator, "order_type": data.order_type, "country": data.country},
        reason="order_submitted",
    )


@handlers.on(ApheresisCompletedV1)
async def on_apheresis_completed(tx: SiteTx, data: ApheresisCompletedV1, meta: EventMeta) -> None:
    """A collection of the order and its DIN (a recollection's replaces the earlier one): the site receives
    no material of the order before it knows of a collection, and a receipt must present the latest
    collection's DIN beside the COI. An event without a DIN (older producers) makes the collection known
    and its DIN unchecked."""
    din = getattr(data, "din", None)
    collection = getattr(data, "collection", 1)
    if not isinstance(din, str) or coi_problem(din) is not None:
        din = None
    if not isinstance(collection, int) or isinstance(collection, bool) or collection < 1:
        collection = 1
    if await tx.orders.record_din(data.order_id, din, collection):
        tx.audit(
            "order.din_learned",
            "order",
            data.order_id,
            new={"din": din, "collection": collection},
            reason="apheresis_completed",
        )


@handlers.on(DispositionDecidedV1)
async def on_disposition_decided(tx: SiteTx, data: DispositionDecidedV1, meta: EventMeta) -> None:
    """QA's disposition of material at risk at this site: a refused receipt released starts run 1 (a new
    lot, `site.material_received`) or, rejected, is `rejected`; an OOS run released (or released on the
    physician's request) waits in `qc_passed` for the signed release; an OOS reject changes nothing here
    (the order asks for a remanufacture or a recollection). Excursions are logistics' business."""
    if data.cause == "excursion" or data.site_id is None:
        return
    m = await tx.manufacturing.latest(data.order_id, data.site_id, lock=True)
    if m is None:
        log.warning("disposition for an order with no material at the site", site_id=data.site_id)
        return
    reason = code_or(data.reason, "disposition")
    try:
        if data.cause == "receipt":
            t = mfg.decide_receipt(m.state, data.outcome)
        else:
            t = mfg.decide_oos(m.state, data.outcome, data.run if data.run is not None else m.state.run)
    except mfg.ManufacturingConflict as exc:
        log.warning("disposition not applicable", site_id=data.site_id, cause=data.cause, why=exc.reason)
        return
    if not t.changed:
        return
    event = None
    if data.cause == "receipt" and data.outcome == "release":
        t = await new_lot(tx, data.site_id, t)
        event = MaterialReceivedV1(
            **m.ref(),
            site_id=m.site_id,
            received_at=m.received_at or _now(None),
            lot=t.after.lot,
        )
    await record_transition(
        tx,
        m,
        t,
        action="disposition",
        occurred_at=_now(None),
        reason=reason,
        event=event,
        reference=data.document_reference if _is_ref(data.document_reference) else None,
    )
    log.info(
        "disposition applied",
        site_id=m.site_id,
        cause=data.cause,
        outcome=data.outcome,
        state=t.after.state,
    )


def _is_ref(value: object) -> bool:
    """An opaque document id (a `Code`): kept; anything else (free text) is not stored at the site."""
    return isinstance(value, str) and _CODE.fullmatch(value) is not None
