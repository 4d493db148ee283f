"""Scheduling's event handlers: orders ask for slots (submitted, rebook, a remanufacture at the site that
holds the material), give them back (cancelled, failed), the registry changes sites (capacity, approvals,
outages, active), the site books and receives, the centre collects the material (its date, kept on the
live slot).

`build_handlers(planning)` registers them with the scheduling parameters and product facts read at
start-up. Each runs in the consumer's transaction (one `SchedulingTx`), with the inbox record.
"""

from __future__ import annotations

from datetime import UTC

from scheduling_service.adapters.repository import SchedulingTx
from scheduling_service.domain.reasons import code_or
from scheduling_service.domain.selection import Choice
from scheduling_service.domain.slots import Planning, SlotRequest, registered_site
from scheduling_service.service_layer.booking import (
    audit_waitlist_left,
    audit_waitlisted,
    lock_order,
    move_off_site,
    rebook,
    release_live_slot,
    reserve_remanufacture,
    serve_waitlist,
    tell_waitlisted,
    try_reserve,
)
from v2v_audit import AuditedHandlers
from v2v_contracts import (
    ApheresisCompletedV1,
    BookingConfirmedV1,
    MaterialReceivedV1,
    OrderCancelledV1,
    OrderFailedV1,
    OrderSubmittedV1,
    RebookRequestedV1,
    RemanufactureRequestedV1,
    SiteRegisteredV1,
)
from v2v_messaging import EventMeta, HandlerRegistry
from v2v_observability import get_logger

log = get_logger(__name__)


async def close_order(
    tx: SchedulingTx, planning: Planning, order: OrderCancelledV1 | OrderFailedV1, status: str
) -> None:
    """Compensation: release the live slot, leave the waitlist, remember the order is over."""
    reason = code_or(order.reason, status)
    await tx.orders.close(order.order_id, status, reason)
    tx.audit("order.closed", "order", order.order_id, new={"status": status}, reason=reason)
    await lock_order(tx, order.order_id)
    released = await release_live_slot(tx, order, status)
    if await tx.waitlist.remove(order.order_id):
        audit_waitlist_left(tx, order.order_id, status)
        log.info("order left the waitlist", status=status)
    if released is not None:
        await serve_waitlist(tx, planning, [released.product_code])


def build_handlers(planning: Planning) -> HandlerRegistry[SchedulingTx]:
    # entries written by these handlers name the consumer as actor and the event as cause
    handlers: HandlerRegistry[SchedulingTx] = AuditedHandlers[SchedulingTx]("scheduling.slots")

    @handlers.on(OrderSubmittedV1)
    async def on_order_submitted(tx: SchedulingTx, order: OrderSubmittedV1, meta: EventMeta) -> None:
        """Book the earliest-delivering slot, or wait (told why: no capacity, no approved site...)."""
        # the product's lock comes with the check (taken only when the order is not over)
        if closed := await tx.closed_else_lock(order.order_id, [order.product_code]):
            log.info("order already closed, request ignored", status=closed, event_type=meta.type)
            return
        req = SlotRequest.submitted(order)
        result = await try_reserve(tx, planning, req, req.reserved_reason(from_waitlist=False))
        if isinstance(result, Choice):
            return
        if await tx.waitlist.add(order, result.reason):
            audit_waitlisted(tx, order.order_id, order.product_code, result.reason)
            await tell_waitlisted(tx, req, result)

    @handlers.on(RebookRequestedV1)
    async def on_rebook_requested(tx: SchedulingTx, request: RebookRequestedV1, meta: EventMeta) -> None:
        """Release the live slot, then book anew for the new apheresis date (never at the excluded site)."""
        if closed := await tx.orders.closed(request.order_id):
            log.info("order already closed, rebook ignored", status=closed)
            return
        await lock_order(tx, request.order_id, also=[request.product_code])
        released = await rebook(tx, planning, request)
        if released is not None:
            await serve_waitlist(tx, planning, [released.product_code])

    @handlers.on(RemanufactureRequestedV1)
    async def on_remanufacture_requested(
        tx: SchedulingTx, request: RemanufactureRequestedV1, meta: EventMeta
    ) -> None:
        """A new run from retained material: a new slot at the site that holds it (issue 10)."""
        if closed := await tx.orders.closed(request.order_id):
            log.info("order already closed, remanufacture ignored", status=closed)
            return
        await reserve_remanufacture(tx, planning, request)

    @handlers.on(OrderCancelledV1)
    async def on_order_cancelled(tx: SchedulingTx, order: OrderCancelledV1, meta: EventMeta) -> None:
        await close_order(tx, planning, order, "cancelled")

    @handlers.on(OrderFailedV1)
    async def on_order_failed(tx: SchedulingTx, order: OrderFailedV1, meta: EventMeta) -> None:
        await close_order(tx, planning, order, "failed")

    @handlers.on(SiteRegisteredV1)
    async def on_site_registered(tx: SchedulingTx, event: SiteRegisteredV1, meta: EventMeta) -> None:
        """Keep the site copy (capacity, approvals, outages, active); move live slots off the site when it
        may no longer make their order's product; serve the waitlist for its products."""
        site = registered_site(event)
        # before the copy changes: a booking for these products (the new copy's and the old one's) sees
        # either the old copy or the new one and, when it had to wait, is served here
        products = await tx.lock_site_products(site.site_id, site.products)
        old = await tx.sites.get(site.site_id)  # changed meanwhile? then its products too (out of order)
        if old is not None and not old.products <= products:
            products |= old.products
            await tx.locks.take(products)
        live = await tx.replace_site(event)
        tx.audit(
            "site.copy_replaced",
            "site",
            site.site_id,
            old={"active": old.active, "products": sorted(old.products)} if old is not None else None,
            new={
                "active": event.active,
                "approvals": sorted(f"{a.regulator}/{a.use}/{a.product_code}" for a in event.approvals),
                "daily_capacity": event.daily_capacity,
                "as_of": meta.time,
            },
            reason=meta.type,
        )
        await move_off_site(tx, planning, site, meta.time.date(), live)
        await serve_waitlist(tx, planning, products)

    @handlers.on(BookingConfirmedV1)
    async def on_booking_confirmed(tx: SchedulingTx, event: BookingConfirmedV1, meta: EventMeta) -> None:
        if await tx.slots.confirm(event.slot_id):
            tx.audit(
                "slot.confirmed",
                "slot",
                event.slot_id,
                old={"status": "held"},
                new={"status": "confirmed", "booking_id": event.booking_id},
                reason=meta.type,
            )

    @handlers.on(ApheresisCompletedV1)
    async def on_apheresis_completed(tx: SchedulingTx, event: ApheresisCompletedV1, meta: EventMeta) -> None:
        """Issue 11: the material exists. The live slot remembers its collection date (the UTC date of
        `collected_at`; a recollection's replaces the first), so that a move off its site (lost approval,
        site inactive) keeps that date as collected material. Under the order's product locks: a move off
        the site in another transaction sees the slot before or after, never half."""
        await lock_order(tx, event.order_id)
        at = event.collected_at
        collected_on = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).astimezone(UTC).date()
        before = await tx.slots.record_collection(event.order_id, collected_on)
        if before is None:
            log.info(
                "apheresis completed without a live slot: nothing to remember", collection=event.collection
            )
            return
        if before.collected_on == collected_on:
            return  # a replay, or the same date again
        tx.audit(
            "slot.collection_recorded",
            "slot",
            before.slot_id,
            old={"collected_on": before.collected_on},
            new={"collected_on": collected_on, "collection": event.collection},
            reason=meta.type,
        )

    @handlers.on(MaterialReceivedV1)
    async def on_material_received(tx: SchedulingTx, event: MaterialReceivedV1, meta: EventMeta) -> None:
        """Manufacturing can start: the slot is consumed and its day's capacity stays used."""
        consumed = await tx.slots.consume(event.order_id, event.site_id)
        if consumed is None:
            log.warning("material received without a live slot at that site", site_id=event.site_id)
        else:
            tx.audit(
                "slot.consumed",
                "slot",
                consumed,
                new={"status": "consumed", "order_id": event.order_id, "site_id": event.site_id},
                reason=meta.type,
            )
            log.info("slot consumed", site_id=event.site_id)

    return handlers
