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

import dataclasses
import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from site_service.adapters.repository import SITES_SEED, SiteTx, read_sites_seed
from site_service.domain import manufacturing as mfg
from site_service.domain import registry
from site_service.domain.manufacturing import Manufacture, Transition
from site_service.domain.registry import Booking, OrderFacts
from site_service.domain.release import ReleasePlan, make_lot, missing
from site_service.service_layer.products import known_products, makers, rules_for
from site_service.service_layer.queries import (
    ensure_site,
    lot_record,
    manufacturing_view,
    release_plan_of,
    site_view,
)
from v2v_audit import Actor
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
from v2v_contracts.coi import coi_problem
from v2v_contracts.errors import CoiMismatch, Conflict, Invalid, NotFound
from v2v_contracts.reference import product_catalogue
from v2v_messaging import AbstractUnitOfWork
from v2v_observability import get_logger, set_order_attributes
from v2v_servicekit.auth import Principal
from v2v_servicekit.signatures import SignatureForbidden, Signer

log = get_logger(__name__)

COI_MISMATCH = "does not match the order's chain of identity"
DIN_MISMATCH = "does not match the donation identification number of the order's latest collection"


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


# ---- shared by the commands and the event handlers -----------------------------------------------------


def registry_values(entry: SiteRegisteredV1 | None) -> dict[str, Any] | None:
    """What the audit trail keeps of a registry entry: codes, numbers and dates."""
    if entry is None:
        return None
    return {
        "active": entry.active,
        "approvals": sorted(
            f"{a.regulator}/{a.use}/{a.product_code}"
            + (f"@{a.batch_release_site_id}" if a.batch_release_site_id else "")
            for a in entry.approvals
        ),
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


# a run at the site whose product's turnaround (start → release) is not known is assumed to take this long
DEFAULT_RUN_DAYS = 60


async def report_runs_at(
    tx: SiteTx, site_id: str, start_date: date, reason: str, today: date
) -> list[uuid.UUID]:
    """Issue 11: an outage at a site where orders' material already is (received and waiting for its run,
    or a run in progress) cannot move that material: each such order is reported (`booking_affected` with
    `material_at_site`, its run and state) so that its centre is told, and the run is not forgotten. A run
    that will be finished before the outage starts (its product's manufacturing + QC days from today) is
    not reported."""
    reported: list[uuid.UUID] = []
    for m in await tx.manufacturing.live_at(site_id, mfg.RUNNING):
        product = product_catalogue().get(m.product_code or "")
        days = product.manufacturing_days + product.qc_days if product is not None else DEFAULT_RUN_DAYS
        if start_date > today + timedelta(days=days):
            continue
        tx.audit(
            "manufacturing.outage_reported",
            "manufacturing",
            m.booking_id,
            new={"order_id": m.order_id, "site_id": site_id, "run": m.state.run, "state": m.state.state},
            reason=reason,
        )
        await tx.publish(
            BookingAffectedV1(
                **m.ref(),
                booking_id=m.booking_id,
                site_id=site_id,
                reason=reason,
                material_at_site=True,
                run=m.state.run,
                state=str(m.state.state),
            )
        )
        log.warning("outage at a site holding the material: reported", site_id=site_id, run=m.state.run)
        reported.append(m.booking_id)
    return reported


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
            "lot": after.lot,
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
        lot=after.lot,
    )
    if event is not None:
        await tx.publish(event)


async def new_lot(tx: SiteTx, site_id: str, t: Transition) -> Transition:
    """`t` with a new lot for the run it starts (a lot per run: issued only when the run starts)."""
    lot = make_lot(site_id, await tx.manufacturing.next_lot_number())
    return Transition(t.before, dataclasses.replace(t.after, lot=lot), t.changed)


# ---- the registry ----------------------------------------------------------------------------------


async def load_seed(uow: AbstractUnitOfWork[SiteTx], path: Path = SITES_SEED) -> int:
    """Store the seeded network, keeping what the registry API changed since; how many sites changed."""
    entries = read_sites_seed(path)
    changed = 0
    async with uow.begin() as tx:
        for entry in entries:
            seeded = registry.site_from_seed(entry)
            registry.check_made_by(
                seeded.manufacturer,
                makers(),
                approvals=seeded.approvals,
                daily_capacity=seeded.daily_capacity,
            )
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
        async with uow.read() as rtx:
            known_sites = {v["site_id"] for v in await rtx.sites.views(limit=10_000)}
        registry.validate_approvals(approvals, known_products(), known_sites)
    async with uow.begin() as tx:
        site = await _locked_site(tx, site_id, tenant)
        registry.check_made_by(
            site.entry.manufacturer, makers(), approvals=approvals or (), daily_capacity=daily_capacity
        )
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
        reported = await report_runs_at(
            tx, site_id, start_date, registry.outage_reason(reason), today or datetime.now(UTC).date()
        )
        log.warning(
            "site outage declared",
            site_id=site_id,
            start_date=start_date.isoformat(),
            end_date=end_date.isoformat(),
            reason=reason,
            affected=len(affected),
            reported=len(reported),
        )
        return {
            **outage.model_dump(),
            "site_id": site_id,
            "affected_booking_ids": affected,
            "material_at_site_booking_ids": reported,
        }


# ---- MES: receipt ---------------------------------------------------------------------------------------


async def _confirmed_booking(
    tx: SiteTx, order_id: uuid.UUID, site_id: str, tenant: str | None = None
) -> Booking:
    booking = await tx.bookings.latest_confirmed(order_id, site_id, tenant=tenant)
    if booking is None:
        raise Conflict("order_id", f"the order has no confirmed booking at {site_id}")
    return booking


def _din_mismatch(
    booking: Booking, facts: OrderFacts | None, earlier: Manufacture | None, din: str | None
) -> str | None:
    """What mismatched at receipt, if anything, besides the COI: `"din"` when the bag's DIN is not that
    of the order's latest collection (None: it is, or the collection's event carried none); a plain 409
    while the site cannot know yet (see `record_receipt`)."""
    if facts is None or facts.collection is None:
        raise Conflict(
            "order_id",
            "the site has not learned of this order's collection yet (order.apheresis_completed): "
            "no material is received before it; try again",
        )
    expected = facts.din
    if expected is None:
        return None
    if din is None:
        raise Invalid("din", "is required: the bag's donation identification number (DIN) is checked")
    if din == expected:
        return None
    if earlier is not None and earlier.booking_id != booking.booking_id and earlier.din == expected:
        raise Conflict(
            "din",
            f"the latest collection the site knows of (collection {facts.collection}) was received "
            "already; the site has not learned of the next one yet (order.apheresis_completed): try again",
        )
    return "din"


async def record_receipt(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    *,
    order_id: uuid.UUID,
    coi: str,
    accepted: bool,
    din: str | None = None,
    reason: str | None = None,
    received_at: datetime | None = None,
    reference: str | None = None,
    now: datetime | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """The site received (accepted) or refused the order's apheresis material (a `ReceiptRejection`).

    The bag's pair is checked: the COI against the booking, the DIN against the order's latest collection
    (`order.apheresis_completed`); where the site knows the DIN, a receipt without one is refused (422
    naming `din`), and a DIN that differs halts like a COI mismatch (alert, 409, nothing accepted).
    A refused material is held (`held_at_receipt`) until QA's disposition (`order.disposition_decided`).

    The site checks only what it has learned, so a receipt that comes before the site learned of the
    collection is refused with a plain 409 (no alert; the MES tries again, `expected_din` in the
    manufacturing view shows what the site knows): no collection known yet (else its DIN would go
    unchecked), or, for a recollection, the latest DIN the site knows is that of a bag already received
    and the one presented differs (the new collection's event has not reached the site yet)."""
    reason = mfg.check_receipt(coi, accepted, reason)
    if din is not None and (problem := coi_problem(din)):
        raise Invalid("din", problem)
    when = received_at or _now(now)
    async with uow.begin() as tx:
        await ensure_site(tx, site_id, tenant)
        booking = await _confirmed_booking(tx, order_id, site_id, tenant)
        facts = await tx.orders.get(order_id)
        earlier = await tx.manufacturing.latest_for_order(order_id)
    set_order_attributes(order_id, booking.coi)
    mismatched = "coi" if coi != booking.coi else _din_mismatch(booking, facts, earlier, din)
    if mismatched is not None:
        log.error(
            f"{mismatched.upper()} mismatch at material receipt: material not accepted", site_id=site_id
        )
        async with uow.begin() as alert:  # the refusal stands; the alert is committed on its own
            await alert.publish(
                SiteCoiMismatchDetectedV1(
                    **booking.ref(), site_id=site_id, where="material receipt", mismatched=mismatched
                )
            )
            alert.audit(
                "material.receipt_refused",
                "booking",
                booking.booking_id,
                new={"order_id": order_id, "site_id": site_id, "accepted": False, "mismatched": mismatched},
                reason=f"{mismatched}_mismatch",
            )
        what = COI_MISMATCH if mismatched == "coi" else DIN_MISMATCH
        raise CoiMismatch(
            reason=what, field=mismatched, detail=f"{mismatched}: {what}; the material is not accepted"
        )
    async with uow.begin() as tx:
        booking = await _confirmed_booking(tx, order_id, site_id, tenant)
        current = await tx.manufacturing.for_booking(booking.booking_id)
        t = mfg.receive(current.state if current else mfg.Manufacturing(), accepted)
        if t.changed:
            if accepted:
                t = await new_lot(tx, site_id, t)
            m = await tx.manufacturing.add(booking, received_at=when, reason=reason, din=din)
            event: EventData = (
                MaterialReceivedV1(**m.ref(), site_id=site_id, received_at=when, lot=t.after.lot, din=din)
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
        **m.ref(),
        site_id=m.site_id,
        run=after.run,
        reason=reason,
        retained_material=after.retained_material,
        lot=after.lot,
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
                    **m.ref(), site_id=site_id, step=step, run=t.after.run, completed_at=when, lot=t.after.lot
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
    results: dict[str, Any] | None = None,
    coa_reference: str | None = None,
    decided_at: datetime | None = None,
    reference: str | None = None,
    now: datetime | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """QC's disposition of the current run's product: passed (with its results summary and certificate of
    analysis: the lot then waits for the signed release), out of specification or failed (with a
    `QcFinding` code). `released` is refused: release is a signed step (`sign_release`)."""
    reason = mfg.check_qc_report(disposition, reason)
    mfg.check_qc_evidence(disposition, results, coa_reference)
    when = decided_at or _now(now)
    async with uow.begin() as tx:
        m = await _current(tx, site_id, order_id, tenant)
        set_order_attributes(order_id, m.coi)
        t = mfg.qc(m.state, disposition, rules_for(m.product_code))
        if t.changed:
            if t.after.lot is None:  # a run started before lots were issued gets its lot now
                t = await new_lot(tx, site_id, t)
            after = t.after
            await tx.manufacturing.set_qc(m.booking_id, results, coa_reference)
            event: EventData | None
            if disposition == "passed":
                event = None  # the order still reads qc_pending: the product is released by signature
            elif disposition == "out_of_specification":
                event = ProductOutOfSpecificationV1(
                    **m.ref(),
                    site_id=site_id,
                    run=after.run,
                    reason=reason or "other",
                    retained_material=after.retained_material,
                    lot=after.lot,
                )
            else:
                event = lost_event(m, after, mfg.qc_failed_reason(reason or "other"))
            await record_transition(
                tx, m, t, action="qc", occurred_at=when, reason=reason, event=event, reference=reference
            )
            tx.audit(
                "manufacture.qc_results",
                "lot",
                after.lot,
                new={"disposition": disposition, "results": results, "coa_reference": coa_reference},
                reason=reason or disposition,
            )
            log.info(
                "QC disposition recorded",
                site_id=site_id,
                disposition=disposition,
                reason=reason,
                run=after.run,
            )
        return await manufacturing_view(tx, site_id, order_id, tenant)


# ---- the signed release ----------------------------------------------------------------------------


def signer_actor(signer: Signer) -> Actor:
    """The audit actor of a signed change: the client it came through and the individual who signed."""
    p = signer.principal
    return Actor(client_id=signer.client_id, kind=str(p.kind), entity_id=p.entity_id, user_id=signer.user_id)


async def _for_release(
    tx: SiteTx, site_id: str, order_id: uuid.UUID, *, import_at: bool, tenant: str | None
) -> Manufacture:
    """The manufacture a release signature is for: at the manufacturing site of the path, or (an import
    certification) the order's latest manufacture wherever it was made, locked."""
    if not import_at:
        return await _current(tx, site_id, order_id, tenant)
    await ensure_site(tx, site_id, tenant)
    m = await tx.manufacturing.latest_for_order(order_id, lock=True)
    if m is None:
        raise Conflict("order_id", "no material of this order has been received at any site")
    return m


async def required_signature(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    order_id: uuid.UUID,
    *,
    import_at: bool,
    tenant: str | None = None,
) -> tuple[str, str]:
    """(meaning, role) the next signature on this route needs, read before the signing token is verified:
    on `/release` the market's release (`release` by a quality unit, or `qp-certification` by a QP), on
    `/import-certification` the import certification."""
    async with uow.read() as tx:
        if import_at:
            await ensure_site(tx, site_id, tenant)
            m = await tx.manufacturing.latest_for_order(order_id)
        else:
            await ensure_site(tx, site_id, tenant)
            m = await tx.manufacturing.latest(order_id, site_id, tenant=tenant)
        if m is None:
            raise Conflict("order_id", "no material of this order has been received here")
        plan = await release_plan_of(tx, m)
    req = plan.requirements[-1] if import_at else plan.requirements[0]
    if import_at and req.meaning != "import-certification":
        raise Conflict(
            "order_id",
            "no import certification at a site is needed (made inside the market, or imported by the "
            "market's importer), only the release",
        )
    return req.meaning, req.role


async def sign_release(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    order_id: uuid.UUID,
    signer: Signer,
    *,
    import_at: bool = False,
    reference: str | None = None,
    now: datetime | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """A signature the lot's release needs (`signer.meaning`): recorded with the lot's record (lot, QC
    results, certificate of analysis ...: 21 CFR 11.70); once every signature the market needs is there
    (`domain.release`), the lot is released (`site.product_released`). The signer must be of the site
    the plan names, with its role (else 403 `signature-organisation` / `signature-role`)."""
    when = _now(now)
    async with uow.begin() as tx:
        m = await _for_release(tx, site_id, order_id, import_at=import_at, tenant=tenant)
        set_order_attributes(order_id, m.coi)
        plan = await release_plan_of(tx, m)
        req = plan.for_meaning(signer.meaning)
        if req is None:
            raise Conflict("order_id", f"this lot's release needs no {signer.meaning} signature")
        if import_at and site_id != req.site_id:
            raise Conflict("site_id", f"the import is certified at the batch-release site {req.site_id}")
        if signer.org_kind != "site" or signer.org_id != req.site_id:
            raise SignatureForbidden(
                "signature-organisation", f"the {signer.meaning} is signed by a {req.role} of {req.site_id}"
            )
        if req.role not in signer.roles:
            raise SignatureForbidden("signature-role", f"the {signer.meaning} is signed by a {req.role}")
        state = m.state
        if state.state == mfg.State.RELEASED:
            raise Conflict("order_id", f"lot {state.lot} is already released")
        if state.state != mfg.State.QC_PASSED:
            raise mfg.ManufacturingConflict(
                "state", f"a lot is signed for release only after QC passed; manufacturing is {state.state}"
            )
        record = lot_record(m)
        signed = await tx.signatures.current_meanings(record)
        if signer.meaning in signed:
            raise Conflict("order_id", f"lot {state.lot} already carries a {signer.meaning} signature")
        signature = await tx.signatures.record(signer, record)
        signed.add(signer.meaning)
        actor = signer_actor(signer)
        tx.audit(
            "lot.signed",
            "lot",
            state.lot,
            new={
                "meaning": signer.meaning,
                "signature_id": signature.signature_id,
                "record_sha256": signature.record_sha256,
                "signer_org": signer.org_id,
                "order_id": m.order_id,
                "site_id": m.site_id,
                "run": state.run,
                "reference": reference,
            },
            reason=signer.meaning,
            actor=actor,
        )
        await tx.manufacturing.append_history(
            m,
            run=state.run,
            action="signature",
            step=None,
            state_before=state.state,
            state_after=state.state,
            reason=signer.meaning,
            occurred_at=when,
            reference=reference,
            lot=state.lot,
        )
        if not missing(plan, signed):
            await _release(tx, m, plan, when, actor)
        log.info("lot signed", site_id=m.site_id, meaning=signer.meaning, released=not missing(plan, signed))
        return await manufacturing_view(tx, m.site_id, order_id, None)


async def _release(tx: SiteTx, m: Manufacture, plan: ReleasePlan, when: datetime, actor: Actor) -> None:
    t = mfg.release(m.state)
    if not t.changed:
        return
    s = t.after
    event = ProductReleasedV1(
        **m.ref(),
        site_id=m.site_id,
        run=s.run,
        released_at=when,
        lot=s.lot,
        coa_reference=m.coa_reference,
        certification=plan.certification,
        import_certified=plan.imported,
        exceptional=s.exceptional,
    )
    await tx.manufacturing.update(m.booking_id, s, None)
    tx.audit(
        "manufacture.release",
        "manufacture",
        m.booking_id,
        old={"state": t.before.state, "run": t.before.run},
        new={
            "state": s.state,
            "run": s.run,
            "lot": s.lot,
            "order_id": m.order_id,
            "site_id": m.site_id,
            "certification": plan.certification,
            "import_certified": plan.imported,
            "batch_release_site_id": plan.batch_release_site_id,
            "exceptional": s.exceptional,
        },
        reason=plan.certification,
        actor=actor,
    )
    await tx.manufacturing.append_history(
        m,
        run=s.run,
        action="release",
        step=None,
        state_before=t.before.state,
        state_after=s.state,
        reason=plan.certification,
        occurred_at=when,
        lot=s.lot,
    )
    await tx.publish(event)


async def audit_signature_refusal(
    uow: AbstractUnitOfWork[SiteTx],
    site_id: str,
    order_id: uuid.UUID,
    *,
    reason: str,
    meaning: str,
    principal: Principal | None,
    user_id: str | None,
) -> None:
    """A refused signature, in its own transaction (the request's change, if any, is rolled back):
    who tried (client, user once the token verified), what it would have meant, why it was refused
    (21 CFR 11.300(d): attempted unauthorised use is detected and recorded)."""
    actor = None
    if principal is not None:
        actor = Actor(
            client_id=principal.client_id, kind=str(principal.kind), entity_id=principal.entity_id,
            user_id=user_id,
        )  # fmt: skip
    async with uow.begin() as tx:
        tx.audit(
            "signature.refused",
            "order",
            order_id,
            new={"site_id": site_id, "meaning": meaning, "user_id": user_id},
            reason=reason,
            actor=actor,
        )
