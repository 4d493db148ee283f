"""The site's use cases behind the HTTP API, each one unit of work: the registry (capacity, active flag,
approvals, outages; the seed load at start-up) and the manufacturing execution system (MES): receipt of
material, steps, QC disposition.

Each MES command verifies what it is given, moves the booking's manufacture through the pure state
machine (`domain.manufacturing`) and writes the new state, its history entry and the event it causes in
one transaction. A repeated report is a no-op answered with the current state.

Reasons are codes (`v2v_contracts.events`: OutageReason, ReceiptRejection, StepFailure, QcFinding), never
free text; an MES report may name the site's own document with an opaque `reference`, kept in the
history only. `tenant` is the caller's own site when the caller is a site (else None): another site's
objects are not found (404) and nothing is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from site_service.adapters.repository import SITES_SEED, SiteTx, read_sites_seed
from site_service.domain import manufacturing as mfg
from site_service.domain import registry
from site_service.domain.manufacturing import Manufacture, Transition
from site_service.domain.registry import Booking
from site_service.service_layer.products import known_products, rules_for
from site_service.service_layer.queries import ensure_site, manufacturing_view, site_view
from v2v_contracts import (
    BookingAffectedV1,
    EventData,
    ManufacturingFailedV1,
    ManufacturingStepCompletedV1,
    MaterialReceivedV1,
    MaterialRejectedV1,
    Outage,
    ProductOutOfSpecificationV1,
    ProductReleasedV1,
    SiteApproval,
    SiteCoiMismatchDetectedV1,
    SiteRegisteredV1,
    new_event,
)
from v2v_contracts.errors import CoiMismatch, Conflict, NotFound
from v2v_messaging import AbstractUnitOfWork
from v2v_observability import get_logger, set_order_attributes

log = get_logger(__name__)

COI_MISMATCH = "does not match the order's chain of identity"


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


# ---- shared by the commands and the event handlers -----------------------------------------------------


def registry_values(entry: SiteRegisteredV1 | None) -> dict[str, Any] | None:
    """What the audit trail keeps of a registry entry: codes, numbers and dates."""
    if entry is None:
        return None
    return {
        "active": entry.active,
        "approvals": sorted(f"{a.regulator}/{a.use}/{a.product_code}" for a in entry.approvals),
        "daily_capacity": dict(entry.daily_capacity),
        "outages": [
            {"outage_id": o.outage_id, "start_date": o.start_date, "end_date": o.end_date, "reason": o.reason}
            for o in entry.outages
        ],
    }


async def store_site(
    tx: SiteTx, entry: SiteRegisteredV1, *, before: SiteRegisteredV1 | None, reason: str
) -> bool:
    """Store the site; publish `site.registered` and audit the change (`before` → `entry`, a reason
    code) when it is new or changed. Returns whether it changed."""
    if not await tx.sites.save(entry):
        return False
    await tx.outbox.add(new_event(entry, subject=entry.site_id))
    tx.audit(
        "site.registry_changed",
        "site",
        entry.site_id,
        old=registry_values(before),
        new=registry_values(entry),
        reason=reason,
    )
    return True


async def affect_bookings(tx: SiteTx, bookings: Iterable[Booking], reason: str) -> list[uuid.UUID]:
    """Mark confirmed bookings `affected` (they must move elsewhere) and publish `booking_affected`."""
    affected: list[uuid.UUID] = []
    for booking in bookings:
        if not await tx.bookings.affect(booking.booking_id, reason):
            continue
        tx.audit(
            "booking.affected",
            "booking",
            booking.booking_id,
            old={"status": booking.status},
            new={"status": "affected", "order_id": booking.order_id, "site_id": booking.site_id},
            reason=reason,
        )
        await tx.publish(
            BookingAffectedV1(
                **booking.ref(), booking_id=booking.booking_id, site_id=booking.site_id, reason=reason
            )
        )
        log.warning(
            "booking affected, it must move to another site",
            site_id=booking.site_id,
            booking_id=str(booking.booking_id),
            reason=reason,
        )
        affected.append(booking.booking_id)
    return affected


async def record_transition(
    tx: SiteTx,
    m: Manufacture,
    t: Transition,
    *,
    action: str,
    occurred_at: datetime,
    step: str | None = None,
    reason: str | None = None,
    event: EventData | None = None,
    reference: str | None = None,
) -> None:
    """Write a changed manufacturing state, its history entry and its event (one transaction: `tx`)."""
    after = t.after
    await tx.manufacturing.update(m.booking_id, after, reason)
    tx.audit(
        f"manufacture.{action}",
        "manufacture",
        m.booking_id,
        old={"state": t.before.state, "run": t.before.run},
        new={
            "state": after.state,
            "run": after.run,
            "order_id": m.order_id,
            "site_id": m.site_id,
            "step": step,
            "reference": reference,  # an opaque reference (batch record, document id)
        },
        reason=reason,
    )
    await tx.manufacturing.append_history(
        m,
        run=after.run,
        action=action,
        step=step,
        state_before=t.before.state,
        state_after=after.state,
        reason=reason,
        occurred_at=occurred_at,
        reference=reference,
    )
    if event is not None:
        await tx.publish(event)


# ---- the registry ----------------------------------------------------------------------------------


async def load_seed(uow: AbstractUnitOfWork[SiteTx], path: Path = SITES_SEED) -> int:
    """Store the seeded network, keeping what the registry API changed since; how many sites changed."""
    entries = read_sites_seed(path)
    changed = 0
    async with uow.begin() as tx:
        for entry in entries:
            seeded = registry.site_from_seed(entry)
            current = await tx.sites.get(seeded.site_id, lock=True)
            changed += await store_site(
                tx,
                registry.merge_seed(seeded, current),
                before=current.entry if current is not None else None,
                reason="seed",
            )
    log.info("site registry loaded", changed=changed)
    return changed


async def _locked_site(tx: SiteTx, site_id: str, tenant: str | None = None) -> registry.Site:
    site = await tx.sites.get(site_id, lock=True, tenant=tenant)
    if site is None:
        raise NotFound("Site", site_id)
    return site


async def update_site(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    *,
    daily_capacity: dict[str, int] | None = None,
    active: bool | None = None,
    approvals: list[SiteApproval] | None = None,
    today: date | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """Change a site's capacity per product (a partial map), whether it is active, and/or its approvals
    (the whole list: per regulator, use and product). Bookings a capacity cut leaves without a place,
    from today on, are affected."""
    if daily_capacity:
        registry.validate_capacity(daily_capacity, known_products())
    if approvals is not None:
        registry.validate_approvals(approvals, known_products())
    async with uow.begin() as tx:
        site = await _locked_site(tx, site_id, tenant)
        patch = registry.patch_site(site, daily_capacity=daily_capacity, active=active, approvals=approvals)
        changed = await store_site(tx, patch.entry, before=site.entry, reason="registry_update")
        await tx.sites.set_api_managed(site_id, patch.api_managed)
        affected: list[uuid.UUID] = []
        if patch.capacity_cut:
            day = today or datetime.now(UTC).date()
            candidates = await tx.bookings.confirmed_from(site_id, patch.capacity_cut, day)
            over = registry.capacity_overflow(candidates, patch.entry.daily_capacity)
            affected = await affect_bookings(tx, over, registry.CAPACITY_CUT)
        log.info("site registry entry updated", site_id=site_id, changed=changed, affected=len(affected))
        return {**await site_view(tx, site_id, tenant), "affected_booking_ids": affected}


async def add_outage(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    *,
    start_date: date,
    end_date: date,
    reason: str,
    today: date | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """Declare a window (inclusive) in which the site starts no manufacturing, with its `OutageReason`
    code; the bookings in it whose material has not arrived are affected (`outage:<code>`)."""
    reason = registry.check_outage(start_date, end_date, reason, today or datetime.now(UTC).date())
    async with uow.begin() as tx:
        site = await _locked_site(tx, site_id, tenant)
        outage = Outage(outage_id=uuid.uuid4(), start_date=start_date, end_date=end_date, reason=reason)
        await store_site(
            tx,
            site.entry.model_copy(update={"outages": [*site.entry.outages, outage]}),
            before=site.entry,
            reason=reason,
        )
        hit = await tx.bookings.awaiting_material_in(site_id, start_date, end_date)
        affected = await affect_bookings(tx, hit, registry.outage_reason(reason))
        log.warning(
            "site outage declared",
            site_id=site_id,
            start_date=start_date.isoformat(),
            end_date=end_date.isoformat(),
            reason=reason,
            affected=len(affected),
        )
        return {**outage.model_dump(), "site_id": site_id, "affected_booking_ids": affected}


# ---- MES: receipt ---------------------------------------------------------------------------------------


async def _confirmed_booking(
    tx: SiteTx, order_id: uuid.UUID, site_id: str, tenant: str | None = None
) -> Booking:
    booking = await tx.bookings.latest_confirmed(order_id, site_id, tenant=tenant)
    if booking is None:
        raise Conflict("order_id", f"the order has no confirmed booking at {site_id}")
    return booking


async def record_receipt(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    *,
    order_id: uuid.UUID,
    coi: str,
    accepted: bool,
    reason: str | None = None,
    received_at: datetime | None = None,
    reference: str | None = None,
    now: datetime | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """The site received (accepted) or refused the order's apheresis material (a `ReceiptRejection`)."""
    reason = mfg.check_receipt(coi, accepted, reason)
    when = received_at or _now(now)
    async with uow.begin() as tx:
        await ensure_site(tx, site_id, tenant)
        booking = await _confirmed_booking(tx, order_id, site_id, tenant)
    set_order_attributes(order_id, booking.coi)
    if coi != booking.coi:
        log.error("COI mismatch at material receipt: material not accepted", site_id=site_id)
        async with uow.begin() as alert:  # the refusal stands; the alert is committed on its own
            await alert.publish(
                SiteCoiMismatchDetectedV1(**booking.ref(), site_id=site_id, where="material receipt")
            )
            alert.audit(
                "material.receipt_refused",
                "booking",
                booking.booking_id,
                new={"order_id": order_id, "site_id": site_id, "accepted": False},
                reason="coi_mismatch",
            )
        raise CoiMismatch(reason=COI_MISMATCH, detail=f"coi: {COI_MISMATCH}; the material is not accepted")
    async with uow.begin() as tx:
        booking = await _confirmed_booking(tx, order_id, site_id, tenant)
        current = await tx.manufacturing.for_booking(booking.booking_id)
        t = mfg.receive(current.state if current else mfg.Manufacturing(), accepted)
        if t.changed:
            m = await tx.manufacturing.add(booking, received_at=when, reason=reason)
            event: EventData = (
                MaterialReceivedV1(**m.ref(), site_id=site_id, received_at=when)
                if accepted
                else MaterialRejectedV1(**m.ref(), site_id=site_id, reason=reason or "other")
            )
            await record_transition(
                tx,
                m,
                t,
                action="receipt",
                occurred_at=when,
                reason=reason,
                event=event,
                reference=reference,
            )
            log.info("material receipt recorded", site_id=site_id, accepted=accepted, reason=reason)
        return await manufacturing_view(tx, site_id, order_id, tenant)


# ---- MES: steps and QC ---------------------------------------------------------------------------------


async def _current(tx: SiteTx, site_id: str, order_id: uuid.UUID, tenant: str | None = None) -> Manufacture:
    """The order's latest manufacture at the site, locked."""
    await ensure_site(tx, site_id, tenant)
    m = await tx.manufacturing.latest(order_id, site_id, lock=True, tenant=tenant)
    if m is None:
        raise Conflict("order_id", f"no material of this order has been received at {site_id}")
    return m


def lost_event(m: Manufacture, after: mfg.Manufacturing, reason: str) -> ManufacturingFailedV1:
    return ManufacturingFailedV1(
        **m.ref(), site_id=m.site_id, run=after.run, reason=reason, retained_material=after.retained_material
    )


async def record_step(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    order_id: uuid.UUID,
    *,
    step: str,
    completed_at: datetime | None = None,
    failed: bool = False,
    reason: str | None = None,
    reference: str | None = None,
    now: datetime | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """The MES reports a manufacturing step completed (or failed, with a `StepFailure` code) for the
    order's current run."""
    reason = mfg.check_step_report(step, failed, reason)
    when = completed_at or _now(now)
    async with uow.begin() as tx:
        m = await _current(tx, site_id, order_id, tenant)
        set_order_attributes(order_id, m.coi)
        t = (
            mfg.fail_step(m.state, step, rules_for(m.product_code))
            if failed
            else mfg.complete_step(m.state, step)
        )
        if t.changed:
            event: EventData
            if failed:
                event = lost_event(m, t.after, mfg.step_failed_reason(step, reason or "other"))
            else:
                event = ManufacturingStepCompletedV1(
                    **m.ref(), site_id=site_id, step=step, run=t.after.run, completed_at=when
                )
            await record_transition(
                tx,
                m,
                t,
                action="step_failed" if failed else "step",
                occurred_at=when,
                step=step,
                reason=reason,
                event=event,
                reference=reference,
            )
            log.info(
                "manufacturing step recorded",
                site_id=site_id,
                step=step,
                failed=failed,
                reason=reason,
                run=t.after.run,
            )
        return await manufacturing_view(tx, site_id, order_id, tenant)


async def record_qc(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    order_id: uuid.UUID,
    *,
    disposition: str,
    reason: str | None = None,
    decided_at: datetime | None = None,
    reference: str | None = None,
    now: datetime | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """QC's disposition of the current run's product: released, out of specification or failed (with a
    `QcFinding` code)."""
    reason = mfg.check_qc_report(disposition, reason)
    when = decided_at or _now(now)
    async with uow.begin() as tx:
        m = await _current(tx, site_id, order_id, tenant)
        set_order_attributes(order_id, m.coi)
        t = mfg.qc(m.state, disposition, rules_for(m.product_code))
        if t.changed:
            after = t.after
            event: EventData
            if disposition == "released":
                event = ProductReleasedV1(**m.ref(), site_id=site_id, run=after.run, released_at=when)
            elif disposition == "out_of_specification":
                event = ProductOutOfSpecificationV1(
                    **m.ref(),
                    site_id=site_id,
                    run=after.run,
                    reason=reason or "other",
                    retained_material=after.retained_material,
                )
            else:
                event = lost_event(m, after, mfg.qc_failed_reason(reason or "other"))
            await record_transition(
                tx, m, t, action="qc", occurred_at=when, reason=reason, event=event, reference=reference
            )
            log.info(
                "QC disposition recorded",
                site_id=site_id,
                disposition=disposition,
                reason=reason,
                run=after.run,
            )
        return await manufacturing_view(tx, site_id, order_id, tenant)
