"""Booking against capacity: reserve, release, rebook, move off a site, serve the waitlist.

Never oversold, with any number of replicas: every transaction that reads a product's capacity use and
books against it first takes that product's lock (`tx.locks`: a transaction-scoped advisory lock per
product). A transaction that needs several products' locks takes them in one global order (by lock key),
so two transactions never wait on each other in a cycle. State and the events it causes commit together.

Reasons are codes: a rebook's reason is kept (released slot, waitlist entry) only when it is a reason code,
else it becomes `rebook:<kind>` (`domain.reasons`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from datetime import date, timedelta

from scheduling_service.adapters.repository import BookingState, SchedulingTx
from scheduling_service.domain.planning import EVERY_DAY, today_at
from scheduling_service.domain.reasons import code_or
from scheduling_service.domain.selection import (
    Choice,
    DayFilter,
    NoChoice,
    Site,
    remanufacture_plan,
    select_site,
)
from scheduling_service.domain.slots import (
    NO_APPROVED_SITE,
    Hold,
    Planning,
    Slot,
    SlotRequest,
    move_off,
)
from v2v_contracts import (
    OrderEventData,
    RebookRequestedV1,
    RemanufactureRequestedV1,
    SlotReleasedV1,
    SlotReservedV1,
    SlotUnavailableV1,
)
from v2v_observability import get_logger

log = get_logger(__name__)


async def lock_order(tx: SchedulingTx, order_id: uuid.UUID, also: Iterable[str] = ()) -> None:
    """Lock every product the order holds a slot or waits for (and `also`), then re-check under the locks:
    waitlist serving in another transaction may have booked it meanwhile."""
    await tx.locks.take({*also, *await tx.orders.products(order_id)})
    while missing := await tx.orders.products(order_id) - tx.locks.held:
        await tx.locks.take(missing)  # out of key order, but only if the order changed product meanwhile


def quota_centre(planning: Planning, centre: str | None, product: str) -> str | None:
    """The centre when it has a quota for the product (its use then counts), else None."""
    if centre is None or planning.allocation.quota(centre, product) is None:
        return None
    return centre


async def quota_gate(
    tx: SchedulingTx, planning: Planning, centre: str | None, product: str, since: date
) -> DayFilter | None:
    """The centre's quota for the product as a day filter (None: no quota)."""
    if (centre := quota_centre(planning, centre, product)) is None:
        return None
    taken = await tx.slots.centre_usage(centre, product, since)
    return planning.allocation.gate(centre, product, taken)


async def claim_offer(tx: SchedulingTx, planning: Planning, req: SlotRequest) -> Hold | None:
    """The centre's hold named by the order, claimed for it when it is still good: active, not expired,
    the order's centre, product and market, its site still approved and open that day. A hold that is no
    longer good is left as it is (the sweeper expires it); the order is then booked as any other."""
    if req.offer_id is None:
        return None
    hold = await tx.holds.get(req.offer_id, centre=req.treatment_center_id)
    if hold is None or not hold.usable_for(req, planning.clock()):
        log.info("offer not usable, booking as usual", offer_id=str(req.offer_id))
        return None
    site = await tx.sites.get(hold.site_id)
    if site is None or not site.approves(req.regulator, req.order_type, req.product_code):
        return None
    if site.closed_on(hold.manufacturing_start_date):
        return None
    claimed = await tx.holds.close(hold.hold_id, "claimed", req.order_id)
    if claimed is not None:
        tx.audit(
            "hold.claimed",
            "hold",
            hold.hold_id,
            old={"status": "active"},
            new={"status": "claimed", "order_id": req.order_id},
            reason="offer",
        )
    return claimed


async def try_reserve(
    tx: SchedulingTx, planning: Planning, req: SlotRequest, reason: str
) -> Choice | NoChoice:
    """Book the best slot for the request under the product's lock, or say why not.

    The centre's hold on an offer, when the order names one that is still good, is the slot; else the
    plan (issue 11): today at the site at the earliest, on the site's working days, within the centre's
    quota, fresh material started within its window (the apheresis date derived from the manufacturing
    day), the product's start → release days with QC inside."""
    await tx.locks.take([req.product_code])
    centre = quota_centre(planning, req.treatment_center_id, req.product_code)
    state: BookingState | None = None
    if req.offer_id is None:  # the live slot and what the plan needs: one read
        now = planning.clock()
        since = min(req.apheresis_date, today_at("UTC", now) - timedelta(days=1))
        state = await tx.booking_state(req.order_id, req.product_code, since, centre)
        live = state.live
    else:
        live = await tx.slots.live(req.order_id)
    if live is not None:  # already booked (a redelivered or overtaken request): nothing new
        await tx.waitlist.remove(req.order_id)
        return Choice(live.site_id, live.manufacturing_start_date)
    hold = await claim_offer(tx, planning, req)
    if hold is not None:
        result: Choice | NoChoice = Choice(
            hold.site_id, hold.manufacturing_start_date, hold.predicted_delivery, hold.apheresis_date
        )
        reason = "offer" if reason == "initial" else reason
    else:
        if state is None:  # an offer not claimed: read the plan's inputs now
            now = planning.clock()
            since = min(req.apheresis_date, today_at("UTC", now) - timedelta(days=1))
            state = BookingState(
                None,
                await tx.sites.all(),
                await tx.slots.usage(req.product_code, since),
                None if centre is None else await tx.slots.centre_usage(centre, req.product_code, since),
            )
        result = select_site(
            state.sites,
            state.usage,
            req.plan(planning.products),
            planning.params,
            exclude_site_id=req.exclude_site_id,
            now=now,
            calendars=planning.calendars,
            allowed=None
            if centre is None or state.centre_usage is None
            else planning.allocation.gate(centre, req.product_code, state.centre_usage),
        )
    if not isinstance(result, Choice):
        return result
    slot = Slot.booked(
        uuid.uuid4(), req, result.site_id, result.manufacturing_start_date, reason, result.apheresis_date
    )
    left_waitlist = await tx.add_slot(slot)  # the slot, and the order off the waitlist
    await record_slot_reserved(tx, req, slot, reason)
    if left_waitlist:
        audit_waitlist_left(tx, req.order_id, "slot_reserved")
    log.info(
        "slot reserved",
        site_id=result.site_id,
        day=result.manufacturing_start_date.isoformat(),
        reason=reason,
    )
    return result


REMANUFACTURE = "remanufacture"


async def reserve_remanufacture(
    tx: SchedulingTx, planning: Planning, request: RemanufactureRequestedV1
) -> None:
    """Issue 10: a remanufacture gets a new slot at the site that holds the retained material, on the
    site's first free working day from today (or, with none within the horizon, beyond the day's capacity:
    the run cannot move elsewhere). The slot is in use at once (the material is at the site, nothing is
    to be received): it counts against the day's capacity and is never moved off the site. The site
    starts the run from `slot_reserved` (reason `remanufacture`, with the run)."""
    if request.product_code is None or request.order_type is None:
        log.warning("remanufacture request without its product: no slot booked", site_id=request.site_id)
        return
    await tx.locks.take([request.product_code])
    site = await tx.sites.get(request.site_id)
    if site is None:
        log.warning(
            "remanufacture at a site scheduling does not know: no slot booked", site_id=request.site_id
        )
        return
    req = SlotRequest.remanufacture(request)
    now = planning.clock()
    since = today_at("UTC", now) - timedelta(days=1)
    choice, within_capacity = remanufacture_plan(
        site,
        await tx.slots.usage(req.product_code, since),
        req.plan(planning.products),
        planning.params,
        now=now,
        calendar=planning.calendars.get(site.site_id, EVERY_DAY),
    )
    assert choice.apheresis_date is not None
    slot = dataclasses.replace(
        Slot.booked(
            uuid.uuid4(),
            req,
            site.site_id,
            choice.manufacturing_start_date,
            REMANUFACTURE,
            choice.apheresis_date,
        ),
        status="consumed",
    )
    await tx.slots.add(slot)
    await record_slot_reserved(
        tx, req, slot, REMANUFACTURE, run=request.run, audit_extra={"within_capacity": within_capacity}
    )
    if within_capacity:
        log.info("remanufacture slot reserved", site_id=site.site_id, run=request.run)
    else:
        log.warning(
            "remanufacture slot reserved beyond the day's capacity: no free day within the horizon",
            site_id=site.site_id,
            run=request.run,
            day=slot.manufacturing_start_date.isoformat(),
        )


async def record_slot_reserved(
    tx: SchedulingTx,
    req: SlotRequest,
    slot: Slot,
    reason: str,
    *,
    run: int | None = None,
    audit_extra: dict[str, object] | None = None,
) -> None:
    """A slot just booked: its audit record and `scheduling.slot_reserved.v1` (with the run, for a
    remanufacture's)."""
    new: dict[str, object] = {
        "order_id": slot.order_id,
        "site_id": slot.site_id,
        "product_code": slot.product_code,
        "apheresis_date": slot.apheresis_date,
        "manufacturing_start_date": slot.manufacturing_start_date,
        "status": slot.status,
    }
    if run is not None:
        new["run"] = run
    tx.audit("slot.reserved", "slot", slot.slot_id, new={**new, **(audit_extra or {})}, reason=reason)
    await tx.publish(
        SlotReservedV1(
            order_id=req.order_id,
            coi=req.coi,
            treatment_center_id=req.treatment_center_id,
            slot_id=slot.slot_id,
            site_id=slot.site_id,
            product_code=req.product_code,
            order_type=req.order_type,
            apheresis_date=slot.apheresis_date,
            manufacturing_start_date=slot.manufacturing_start_date,
            reason=reason,
            run=run,
        )
    )


def audit_waitlist_left(tx: SchedulingTx, order_id: uuid.UUID, reason: str) -> None:
    tx.audit(
        "waitlist.left", "waitlist", order_id, old={"waiting": True}, new={"waiting": False}, reason=reason
    )


def audit_waitlisted(tx: SchedulingTx, order_id: uuid.UUID, product_code: str, reason: str) -> None:
    tx.audit(
        "waitlist.entered",
        "waitlist",
        order_id,
        old={"waiting": False},
        new={"waiting": True, "product_code": product_code},
        reason=reason,
    )


async def tell_waitlisted(tx: SchedulingTx, req: SlotRequest, result: NoChoice) -> None:
    """`slot_unavailable`: the order waits, and why."""
    await tx.publish(
        SlotUnavailableV1(
            order_id=req.order_id,
            coi=req.coi,
            treatment_center_id=req.treatment_center_id,
            reason=result.reason,
            detail=result.detail,
            waitlisted=True,
        )
    )
    log.info("order waitlisted", reason=result.reason, exclude_site_id=req.exclude_site_id)


async def release_live_slot(tx: SchedulingTx, order: OrderEventData, reason: str) -> Slot | None:
    """The order's held or confirmed slot → released, with `slot_released`. Caller holds its lock."""
    slot = await tx.slots.release_live(order.order_id, reason)
    if slot is None:
        return None
    tx.audit(
        "slot.released",
        "slot",
        slot.slot_id,
        old={"live": True},  # held or confirmed
        new={"live": False, "status": "released", "order_id": slot.order_id, "site_id": slot.site_id},
        reason=reason,
    )
    await tx.publish(
        SlotReleasedV1(
            order_id=order.order_id,
            coi=order.coi,
            treatment_center_id=order.treatment_center_id,
            slot_id=slot.slot_id,
            site_id=slot.site_id,
            reason=reason,
        )
    )
    log.info("slot released", site_id=slot.site_id, reason=reason)
    return slot


async def rebook(tx: SchedulingTx, planning: Planning, request: RebookRequestedV1) -> Slot | None:
    """Release the live slot, then book anew for the request (never at its excluded site), or wait with
    the rebook's context (an order already waiting keeps its place). Caller holds the order's locks;
    returns the released slot."""
    request = request.model_copy(update={"reason": code_or(request.reason, f"rebook:{request.kind}")})
    released = await release_live_slot(tx, request, request.reason)
    req = SlotRequest.rebook(request)
    result = await try_reserve(tx, planning, req, req.reserved_reason(from_waitlist=False))
    if not isinstance(result, Choice):
        await tx.waitlist.put(request, result.reason, req.waitlist_priority)
        audit_waitlisted(tx, request.order_id, request.product_code, result.reason)
        await tell_waitlisted(tx, req, result)
    return released


async def move_off_site(
    tx: SchedulingTx, planning: Planning, site: Site, today: date, live: list[Slot] | None = None
) -> list[Slot]:
    """Live slots at a site that is now inactive or no longer approved for their order's market move
    elsewhere as a site outage rebook would (or wait, told why). Caller holds the site's product locks
    (and may give the live slots at the site, read under them); returns the released slots."""
    moved: list[Slot] = []
    for slot in live if live is not None else await tx.slots.live_at(site.site_id):
        if move_off(slot, site, today) is None:
            continue
        await lock_order(tx, slot.order_id, also=[slot.product_code])
        current = await tx.slots.live(slot.order_id)
        if current is None or current.slot_id != slot.slot_id:
            continue  # moved or released meanwhile (its product was not locked yet): nothing to do here
        request = move_off(current, site, today)  # as it is under the lock (its collection, issue 11)
        if request is None:
            continue
        released = await rebook(tx, planning, request)
        if released is not None:
            moved.append(released)
            log.warning("slot moved off its site", site_id=site.site_id, reason=request.reason)
    return moved


async def serve_waitlist(tx: SchedulingTx, planning: Planning, products: Iterable[str]) -> int:
    """Book waiting orders for these products, highest priority first (a patient moved by a
    recollection or a site before new orders), then first come, first served, as far as capacity allows.
    Each is planned again from today: a requested apheresis date that has passed meanwhile is not kept.

    An order that still waits keeps the latest reason; when that becomes `no_approved_site` (its market
    lost its last approved site), the centre is told once with `slot_unavailable`.
    """
    wanted = sorted(set(products))
    if not wanted:
        return 0
    await tx.locks.take(wanted)
    entries = await tx.waitlist.waiting(wanted)
    booked = 0
    for entry in entries:
        req = entry.slot_request()
        result = await try_reserve(tx, planning, req, req.reserved_reason(from_waitlist=True))
        if isinstance(result, Choice):
            booked += 1
        elif result.reason != entry.reason:
            await tx.waitlist.set_reason(entry.order_id, result.reason)
            tx.audit(
                "waitlist.reason_changed",
                "waitlist",
                entry.order_id,
                old={"reason": entry.reason},
                new={"reason": result.reason},
                reason=result.reason,
            )
            if result.reason == NO_APPROVED_SITE:
                await tell_waitlisted(tx, req, result)
    if booked:
        log.info("waitlist served", booked=booked, waiting=len(entries) - booked)
    return booked
