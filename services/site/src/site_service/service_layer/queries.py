"""The site service's reads: the registry and one order's manufacture at a site.

`tenant` is the caller's own site when the caller is a site (its MES), else None (QA, admin, ops): the
repositories find nothing of another site, which the API answers with 404.
"""

from __future__ import annotations

import uuid
from typing import Any

from site_service.adapters.repository import SiteTx
from site_service.domain import manufacturing as mfg
from site_service.domain.manufacturing import Manufacture, State
from site_service.domain.release import NoReleasePath, ReleasePlan, release_plan
from v2v_contracts.errors import Conflict, NotFound
from v2v_messaging import AbstractUnitOfWork
from v2v_servicekit.signatures import SignedRecord


async def list_sites(
    uow: AbstractUnitOfWork[SiteTx], *, tenant: str | None = None, limit: int = 200, offset: int = 0
) -> list[dict[str, Any]]:
    async with uow.read() as tx:
        return await tx.sites.views(tenant=tenant, limit=limit, offset=offset)


async def site_view(tx: SiteTx, site_id: str, tenant: str | None = None) -> dict[str, Any]:
    view = await tx.sites.view(site_id, tenant=tenant)
    if view is None:
        raise NotFound("Site", site_id)
    return view


async def get_site(
    uow: AbstractUnitOfWork[SiteTx], site_id: str, *, tenant: str | None = None
) -> dict[str, Any]:
    async with uow.read() as tx:
        return await site_view(tx, site_id, tenant)


async def ensure_site(tx: SiteTx, site_id: str, tenant: str | None = None) -> None:
    if not await tx.sites.exists(site_id, tenant=tenant):
        raise NotFound("Site", site_id)


async def _collection(tx: SiteTx, order_id: uuid.UUID) -> dict[str, Any]:
    facts = await tx.orders.get(order_id)
    return {
        "collection": facts.collection if facts is not None else None,
        "expected_din": facts.din if facts is not None else None,
    }


async def manufacturing_view(
    tx: SiteTx, site_id: str, order_id: uuid.UUID, tenant: str | None = None
) -> dict[str, Any]:
    """The order's latest manufacture at the site (or its booking, awaiting material), with its history,
    and what the site has learned of the order's latest collection (`collection`, `expected_din`: what a
    receipt must present; None: not learned yet, or its event carried no DIN)."""
    m = await tx.manufacturing.latest(order_id, site_id, tenant=tenant)
    if m is None:
        booking = await tx.bookings.latest_open(order_id, site_id, tenant=tenant)
        if booking is None:
            raise NotFound("Manufacturing", f"{order_id} at {site_id}")
        return {
            "order_id": order_id,
            "site_id": site_id,
            "booking_id": booking.booking_id,
            "product_code": booking.product_code,
            "state": State.AWAITING_MATERIAL.value,
            **await _collection(tx, order_id),
            "run": 0,
            "next_step": None,
            "steps_completed": [],
            "failed_step": None,
            "retained_material": False,
            "received_at": None,
            "lot": None,
            "exceptional": False,
            "qc_results": None,
            "coa_reference": None,
            "release": None,
            "history": [],
        }
    s = m.state
    return {
        "order_id": order_id,
        "site_id": site_id,
        "booking_id": m.booking_id,
        "product_code": m.product_code,
        "state": s.state.value,
        **await _collection(tx, order_id),
        "run": s.run,
        "next_step": s.next_step,
        "steps_completed": list(mfg.STEPS[: s.steps_completed]),
        "failed_step": s.failed_step,
        "retained_material": s.retained_material,
        "received_at": m.received_at,
        "lot": s.lot,
        "exceptional": s.exceptional,
        "qc_results": m.qc_results,
        "coa_reference": m.coa_reference,
        "release": await release_status(tx, m),
        "history": await tx.manufacturing.history(m.booking_id),
    }


# ---- the release: who must sign, and who has ---------------------------------------------------------


def _signable(value: Any) -> Any:
    """A QC summary as it is signed: floats as their shortest text (the canonical form refuses floats)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {k: _signable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_signable(v) for v in value]
    return value


def lot_record(m: Manufacture) -> SignedRecord:
    """What a release signature binds (21 CFR 11.70): the lot, whose material it is, the run, its QC
    results and certificate of analysis, and whether it is an exceptional release. A change to any of
    these after signing leaves the lot unsigned (`check_record`)."""
    s = m.state
    return SignedRecord(
        "lot",
        s.lot or f"{m.booking_id}:{s.run}",
        {
            "lot": s.lot,
            "order_id": m.order_id,
            "coi": m.coi,
            "site_id": m.site_id,
            "product_code": m.product_code,
            "run": s.run,
            "qc_results": _signable(m.qc_results),
            "coa_reference": m.coa_reference,
            "exceptional": s.exceptional,
        },
    )


async def release_plan_of(tx: SiteTx, m: Manufacture) -> ReleasePlan:
    """Who must sign the release of `m`'s lot: from the order's market (`order.submitted`) and the
    manufacturing site's approval for it (its batch-release site). 409 when either is unknown."""
    facts = await tx.orders.get(m.order_id)
    if facts is None or facts.regulator is None:
        raise Conflict("order_id", "the order's market is not known at the site yet (order.submitted)")
    site = await tx.sites.get(m.site_id)
    if site is None:
        raise NotFound("Site", m.site_id)
    approval = next(
        (
            a
            for a in site.entry.approvals
            if a.regulator == facts.regulator
            and a.use == facts.order_type
            and a.product_code == m.product_code
        ),
        None,
    )
    brs_id = approval.batch_release_site_id if approval is not None else None
    brs_country: str | None = None
    if brs_id is not None:
        brs = await tx.sites.get(brs_id)
        brs_country = brs.entry.country if brs is not None else None
    try:
        return release_plan(facts.regulator, m.site_id, site.entry.country, brs_id, brs_country)
    except NoReleasePath as exc:
        raise Conflict(exc.field, exc.reason) from None


async def release_status(tx: SiteTx, m: Manufacture) -> dict[str, Any] | None:
    """Once QC passed: the signatures the release needs, and the ones given (their manifestation)."""
    if m.state.state not in (State.QC_PASSED, State.RELEASED) or m.state.lot is None:
        return None
    try:
        plan = await release_plan_of(tx, m)
    except Conflict as exc:
        return {"problem": exc.detail, "required": []}
    record = lot_record(m)
    signatures = await tx.signatures.of(record.object_type, record.object_id)
    required = []
    for req in plan.requirements:
        current = [s for s in signatures if s.meaning == req.meaning and s.matches(record)]
        stale = [s for s in signatures if s.meaning == req.meaning and not s.matches(record)]
        required.append(
            {
                **req.as_dict(),
                "signed": bool(current),
                "signatures": [
                    {
                        "user_id": s.user_id,
                        "name": s.name,
                        "signed_at": s.signed_at,
                        "manifestation": s.manifestation(),
                    }
                    for s in current
                ],
                "stale": len(stale),
            }
        )
    return {
        "regulator": plan.regulator,
        "batch_release_site_id": plan.batch_release_site_id,
        "imported": plan.imported,
        "certification": plan.certification,
        "required": required,
    }


async def get_manufacturing(
    uow: AbstractUnitOfWork[SiteTx], site_id: str, order_id: uuid.UUID, *, tenant: str | None = None
) -> dict[str, Any]:
    async with uow.read() as tx:
        await ensure_site(tx, site_id, tenant)
        return await manufacturing_view(tx, site_id, order_id, tenant)


async def origin_trace(uow: AbstractUnitOfWork[SiteTx], order_id: uuid.UUID) -> dict[str, str] | None:
    """The order's first trace, as remembered with its latest booking (MES reports link to it)."""
    async with uow.read() as tx:
        return await tx.bookings.origin_trace(order_id)
