"""What the HTTP API asks of scheduling: reads of the slots and of the waitlist (each on one pooled
connection), one page at a time and only what the caller's tenancy lets it see (`Tenancy`); and (issue
11) availability, a centre's holds on offers (taken, released, expired by the sweeper) and an explicit
waitlist priority, each in one transaction under the product's lock."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from scheduling_service.adapters.repository import SchedulingTx
from scheduling_service.domain.planning import EVERY_DAY, today_at
from scheduling_service.domain.selection import Choice, NoChoice, offers, plans
from scheduling_service.domain.slots import Hold, Planning, plan_request
from scheduling_service.service_layer import booking
from v2v_contracts.errors import Conflict, Invalid, NotFound
from v2v_messaging import AbstractUnitOfWork


@dataclass(frozen=True)
class Tenancy:
    """Whose rows a caller reads: a treatment centre its own orders' (`centre`), a site its own site's
    slots (`site`); `nothing` for a tenant with no rows here (a carrier). Not confined: `Tenancy()`."""

    centre: str | None = None
    site: str | None = None
    nothing: bool = False


EVERYTHING = Tenancy()


async def list_slots(
    uow: AbstractUnitOfWork[SchedulingTx],
    *,
    order_id: uuid.UUID | None = None,
    statuses: list[str] | None = None,
    product_code: str | None = None,
    site_id: str | None = None,
    limit: int = 200,
    offset: int = 0,
    tenancy: Tenancy = EVERYTHING,
) -> list[dict[str, Any]]:
    """Slots, optionally filtered, in booking order: one page."""
    if tenancy.nothing:
        return []
    async with uow.read() as tx:
        return await tx.slots.view(
            order_id,
            statuses,
            product_code,
            site_id,
            limit,
            offset,
            centre=tenancy.centre,
            site=tenancy.site,
        )


async def list_waitlist(
    uow: AbstractUnitOfWork[SchedulingTx], *, limit: int = 200, offset: int = 0, tenancy: Tenancy = EVERYTHING
) -> list[dict[str, Any]]:
    """Orders waiting for a slot, first come first served, with what each waits for: one page. A waiting
    order has no site yet, so a site sees none."""
    if tenancy.nothing or tenancy.site is not None:
        return []
    async with uow.read() as tx:
        return await tx.waitlist.view(limit, offset, centre=tenancy.centre)


# ---- offers and holds (issue 11) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Market:
    """What availability is asked for: a product for a market (use, regulator) and a centre's region."""

    product_code: str
    order_type: str
    regulator: str
    region: str


def _product_known(planning: Planning, product_code: str) -> None:
    if product_code not in planning.products:
        raise Invalid("product_code", "not a product of the catalogue")


def _offer_view(market: Market, choice: Choice) -> dict[str, Any]:
    return {
        "site_id": choice.site_id,
        "product_code": market.product_code,
        "order_type": market.order_type,
        "regulator": market.regulator,
        "region": market.region,
        "apheresis_date": choice.apheresis_date,
        "manufacturing_start_date": choice.manufacturing_start_date,
        "predicted_release": choice.predicted_release,
        "predicted_delivery": choice.predicted_delivery,
        "predicted_delivery_p90": choice.predicted_delivery_p90,
    }


async def availability(
    uow: AbstractUnitOfWork[SchedulingTx],
    planning: Planning,
    market: Market,
    *,
    apheresis_from: date,
    apheresis_to: date | None = None,
    per_site: int = 3,
    centre: str | None = None,
) -> list[dict[str, Any]]:
    """Offers for the market: per approved site its earliest predicted delivery and `per_site - 1`
    alternatives, with apheresis dates in the window (none before today at the site), within the
    centre's quota when the caller is a centre with one. Best predicted delivery first."""
    _product_known(planning, market.product_code)
    if apheresis_to is not None and apheresis_to < apheresis_from:
        raise Invalid("apheresis_to", "is before apheresis_from")
    now = planning.clock()
    since = min(apheresis_from, today_at("UTC", now) - timedelta(days=1))
    request = plan_request(
        planning.products.get(market.product_code),
        market.product_code,
        market.order_type,
        market.regulator,
        market.region,
        apheresis_from,
    )
    async with uow.read() as tx:
        sites = await tx.sites.all()
        used = await tx.slots.usage(market.product_code, since)
        gate = await booking.quota_gate(tx, planning, centre, market.product_code, since)
    found = offers(
        sites,
        used,
        request,
        planning.params,
        per_site=per_site,
        now=now,
        calendars=planning.calendars,
        allowed=gate,
        apheresis_until=apheresis_to,
    )
    if isinstance(found, NoChoice):
        return []
    return [_offer_view(market, c) for c in found]


def _hold_view(hold: Hold) -> dict[str, Any]:
    return {
        "offer_id": hold.hold_id,  # what the order carries (order.submitted's offer_id)
        "status": hold.status,
        "expires_at": hold.expires_at,
        "treatment_center_id": hold.treatment_center_id,
        "site_id": hold.site_id,
        "product_code": hold.product_code,
        "order_type": hold.order_type,
        "regulator": hold.regulator,
        "region": hold.region,
        "apheresis_date": hold.apheresis_date,
        "manufacturing_start_date": hold.manufacturing_start_date,
        "predicted_delivery": hold.predicted_delivery,
        "order_id": hold.order_id,
    }


async def hold_offer(
    uow: AbstractUnitOfWork[SchedulingTx],
    planning: Planning,
    market: Market,
    *,
    centre: str,
    site_id: str,
    manufacturing_start_date: date,
    apheresis_date: date,
    ttl_s: int,
) -> dict[str, Any]:
    """The centre holds one offer (as availability gave it) until an order claims it or it expires.
    Planned again under the product's lock: an offer that is no longer free (taken, outage, quota, past,
    fresh window) is a conflict, never an oversold day."""
    _product_known(planning, market.product_code)
    request = plan_request(
        planning.products.get(market.product_code),
        market.product_code,
        market.order_type,
        market.regulator,
        market.region,
        apheresis_date,
    )
    async with uow.begin() as tx:
        await tx.locks.take([market.product_code])
        now = planning.clock()
        since = min(apheresis_date, today_at("UTC", now) - timedelta(days=1))
        site = await tx.sites.get(site_id)
        plan: Choice | None = None
        if site is not None and site.approves(market.regulator, market.order_type, market.product_code):
            gate = await booking.quota_gate(tx, planning, centre, market.product_code, since)
            for candidate in plans(
                site,
                await tx.slots.usage(market.product_code, since),
                request,
                planning.params,
                now=now,
                calendar=planning.calendars.get(site_id, EVERY_DAY),
                allowed=gate,
            ):
                if candidate.manufacturing_start_date > manufacturing_start_date:
                    break
                if (
                    candidate.manufacturing_start_date == manufacturing_start_date
                    and candidate.apheresis_date == apheresis_date
                ):
                    plan = candidate
                    break
        if plan is None:
            raise Conflict("offer", "no longer available: ask for availability again")
        hold = Hold(
            hold_id=uuid.uuid4(),
            treatment_center_id=centre,
            site_id=site_id,
            product_code=market.product_code,
            order_type=market.order_type,
            regulator=market.regulator,
            region=market.region,
            manufacturing_start_date=manufacturing_start_date,
            apheresis_date=apheresis_date,
            status="active",
            expires_at=now + timedelta(seconds=ttl_s),
            predicted_delivery=plan.predicted_delivery,
        )
        await tx.holds.add(hold)
        tx.audit(
            "hold.created",
            "hold",
            hold.hold_id,
            new={
                "treatment_center_id": centre,
                "site_id": site_id,
                "product_code": market.product_code,
                "manufacturing_start_date": manufacturing_start_date,
                "apheresis_date": apheresis_date,
                "expires_at": hold.expires_at,
            },
            reason="offer_held",
        )
    return _hold_view(hold)


async def get_hold(
    uow: AbstractUnitOfWork[SchedulingTx], hold_id: uuid.UUID, *, centre: str | None
) -> dict[str, Any]:
    async with uow.read() as tx:
        hold = await tx.holds.get(hold_id, centre=centre)
    if hold is None:
        raise NotFound("Offer", hold_id)
    return _hold_view(hold)


async def _end_holds(tx: SchedulingTx, planning: Planning, holds: list[Hold], status: str) -> int:
    """Active holds of one product → released | expired: their days return to the pool, then the
    waitlist is served once (the first waiting order gets the best of the days returned)."""
    if not holds:
        return 0
    await tx.locks.take({h.product_code for h in holds})
    ended = 0
    for hold in holds:
        if await tx.holds.close(hold.hold_id, status) is None:
            continue  # claimed or ended meanwhile
        ended += 1
        tx.audit(
            "hold." + status,
            "hold",
            hold.hold_id,
            old={"status": "active"},
            new={"status": status},
            reason=status,
        )
    if ended:
        await booking.serve_waitlist(tx, planning, {h.product_code for h in holds})
    return ended


async def release_hold(
    uow: AbstractUnitOfWork[SchedulingTx], planning: Planning, hold_id: uuid.UUID, *, centre: str | None
) -> dict[str, Any]:
    """The centre gives the offer back before it expires."""
    async with uow.begin() as tx:
        hold = await tx.holds.get(hold_id, centre=centre)
        if hold is None:
            raise NotFound("Offer", hold_id)
        if hold.status != "active" or not await _end_holds(tx, planning, [hold], "released"):
            raise Conflict("offer", f"is {hold.status}, not active")
        hold = await tx.holds.get(hold_id) or hold
    return _hold_view(hold)


async def expire_holds(uow: AbstractUnitOfWork[SchedulingTx], planning: Planning, limit: int = 100) -> int:
    """Holds past their expiry → expired, one transaction per product; each serves its waitlist."""
    async with uow.read() as tx:
        due = await tx.holds.due(planning.clock(), limit)
    by_product: dict[str, list[Hold]] = {}
    for hold in due:
        by_product.setdefault(hold.product_code, []).append(hold)
    expired = 0
    for product in sorted(by_product):
        async with uow.begin() as tx:
            await tx.locks.take([product])
            now = planning.clock()
            current = [
                h for h in by_product[product] if (c := await tx.holds.get(h.hold_id)) and c.expires_at <= now
            ]
            expired += await _end_holds(tx, planning, current, "expired")
    return expired


async def set_priority(
    uow: AbstractUnitOfWork[SchedulingTx], planning: Planning, order_id: uuid.UUID, priority: int
) -> dict[str, Any]:
    """Ops put a waiting order at an explicit priority (0..9, highest served first)."""
    async with uow.begin() as tx:
        await booking.lock_order(tx, order_id)
        old = await tx.waitlist.set_priority(order_id, priority)
        if old is None:
            raise NotFound("Waiting order", order_id)
        tx.audit(
            "waitlist.priority_set",
            "waitlist",
            order_id,
            old={"priority": old},
            new={"priority": priority},
            reason="ops_priority",
        )
    return {"order_id": order_id, "priority": priority, "previous_priority": old}
