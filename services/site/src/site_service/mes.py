"""The site's manufacturing execution system (MES) API: receipt of material, steps, QC disposition.

Each command verifies what it is given, moves the booking's manufacture through the pure state machine
(`domain.manufacturing`) and writes the new state, its history entry and the event it causes in one
transaction. A repeated report is a no-op answered with the current state.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from site_service.catalog import rules_for
from site_service.domain import manufacturing as mfg
from site_service.domain.manufacturing import Conflict, Manufacturing, State, Transition
from v2v_contracts import (
    EventData,
    ManufacturingFailedV1,
    ManufacturingStepCompletedV1,
    ManufacturingStoppedV1,
    MaterialReceivedV1,
    MaterialRejectedV1,
    ProductOutOfSpecificationV1,
    ProductReleasedV1,
    SiteCoiMismatchDetectedV1,
    new_event,
)
from v2v_contracts.coi import coi_problem
from v2v_messaging import Tx, UnitOfWork
from v2v_observability import get_logger, set_order_attributes
from v2v_servicekit import Problem, invalid, not_found

log = get_logger(__name__)


async def _confirmed_booking(conn: Any, order_id: uuid.UUID, site_id: str) -> Any:
    booking = await conn.fetchrow(
        """SELECT * FROM bookings WHERE order_id = $1 AND site_id = $2 AND status = 'confirmed'
           ORDER BY created_at DESC, booking_id LIMIT 1 FOR UPDATE""",
        order_id,
        site_id,
    )
    if booking is None:
        raise conflict("order_id", f"the order has no confirmed booking at {site_id}")
    return booking


def conflict(field: str, reason: str) -> Problem:
    """A 409 naming the field and the reason; nothing was changed."""
    return Problem(
        409,
        "Conflict with the current state",
        f"{field}: {reason}",
        kind="conflict",
        errors=[{"field": field, "reason": reason}],
    )


def coi_mismatch() -> Problem:
    return Problem(
        409,
        "Chain of identity mismatch",
        "coi: does not match the order's chain of identity; the material is not accepted",
        kind="coi-mismatch",
        errors=[{"field": "coi", "reason": "does not match the order's chain of identity"}],
    )


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def as_state(row: asyncpg.Record | None) -> Manufacturing:
    if row is None:
        return Manufacturing()
    return Manufacturing(
        state=State(row["state"]),
        run=row["run"],
        steps_completed=row["steps_completed"],
        failed_step=row["failed_step"],
        retained_material=row["retained_material"],
    )


def _ref(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "order_id": row["order_id"],
        "coi": row["coi"],
        "treatment_center_id": row["treatment_center_id"] or "",
    }


async def ensure_site(conn: asyncpg.Connection, site_id: str) -> None:
    if not await conn.fetchval("SELECT 1 FROM sites WHERE site_id = $1", site_id):
        raise not_found("Site", site_id)


async def save(
    tx: Tx,
    row: asyncpg.Record,
    t: Transition,
    *,
    action: str,
    occurred_at: datetime,
    step: str | None = None,
    reason: str | None = None,
    event: EventData | None = None,
) -> None:
    """Write a changed manufacturing state, its history entry and its event (one transaction: `tx`)."""
    after = t.after
    await tx.conn.execute(
        """UPDATE manufacturing SET state = $2, run = $3, steps_completed = $4, failed_step = $5,
                  retained_material = $6, reason = COALESCE($7, reason), updated_at = now()
           WHERE booking_id = $1""",
        row["booking_id"],
        after.state.value,
        after.run,
        after.steps_completed,
        after.failed_step,
        after.retained_material,
        reason,
    )
    await tx.conn.execute(
        """INSERT INTO manufacturing_history (booking_id, order_id, site_id, run, action, step, state_before,
                                              state_after, reason, occurred_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
        row["booking_id"],
        row["order_id"],
        row["site_id"],
        after.run,
        action,
        step,
        t.before.state.value,
        after.state.value,
        reason,
        occurred_at,
    )
    if event is not None:
        await tx.outbox.add(new_event(event))


# ---- receipt --------------------------------------------------------------------------------------


async def record_receipt(
    uow: UnitOfWork,
    site_id: str,
    *,
    order_id: uuid.UUID,
    coi: str,
    accepted: bool,
    reason: str | None = None,
    received_at: datetime | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The site received (accepted) or refused the order's apheresis material."""
    problem = coi_problem(coi)
    if problem:
        raise invalid("coi", problem)
    reason = (reason or "").strip() or None
    if not accepted and reason is None:
        raise invalid("reason", "is required when the material is refused")
    set_order_attributes(order_id, coi)
    when = received_at or _now(now)
    async with uow.begin() as tx:
        await ensure_site(tx.conn, site_id)
        booking = await _confirmed_booking(tx.conn, order_id, site_id)
        mismatch = coi != booking["coi"]
        if mismatch:
            booking_ref = dict(booking)
    if mismatch:
        log.error("COI mismatch at material receipt: material not accepted", site_id=site_id)
        async with uow.begin() as alert:  # the refusal stands; the alert is committed on its own
            await alert.outbox.add(
                new_event(
                    SiteCoiMismatchDetectedV1(
                        order_id=order_id,
                        coi=booking_ref["coi"],
                        treatment_center_id=booking_ref.get("treatment_center_id") or "",
                        site_id=site_id,
                        where="material receipt",
                    )
                )
            )
        raise coi_mismatch()
    async with uow.begin() as tx:
        booking = await _confirmed_booking(tx.conn, order_id, site_id)
        row = await tx.conn.fetchrow(
            "SELECT * FROM manufacturing WHERE booking_id = $1 FOR UPDATE", booking["booking_id"]
        )
        try:
            t = mfg.receive(as_state(row), accepted)
        except Conflict as exc:
            raise conflict(exc.field, exc.reason) from None
        if t.changed:
            row = await tx.conn.fetchrow(
                """INSERT INTO manufacturing (booking_id, order_id, coi, treatment_center_id, site_id,
                                              product_code, state, run, steps_completed, received_at, reason)
                   VALUES ($1, $2, $3, $4, $5, $6, 'awaiting_material', 0, 0, $7, $8) RETURNING *""",
                booking["booking_id"],
                order_id,
                booking["coi"],
                booking["treatment_center_id"] or "",
                site_id,
                booking["product_code"],
                when,
                reason,
            )
            assert row is not None
            event: EventData = (
                MaterialReceivedV1(**_ref(row), site_id=site_id, received_at=when)
                if accepted
                else MaterialRejectedV1(**_ref(row), site_id=site_id, reason=reason or "")
            )
            await save(tx, row, t, action="receipt", occurred_at=when, reason=reason, event=event)
            log.info("material receipt recorded", site_id=site_id, accepted=accepted)
        return await _view(tx.conn, site_id, order_id)


# ---- steps and QC -----------------------------------------------------------------------------------


async def _current(conn: asyncpg.Connection, site_id: str, order_id: uuid.UUID) -> asyncpg.Record:
    """The order's latest manufacture at the site, locked."""
    await ensure_site(conn, site_id)
    row = await conn.fetchrow(
        """SELECT * FROM manufacturing WHERE order_id = $1 AND site_id = $2
           ORDER BY created_at DESC, booking_id LIMIT 1 FOR UPDATE""",
        order_id,
        site_id,
    )
    if row is None:
        raise conflict("order_id", f"no material of this order has been received at {site_id}")
    return row


def _lost_event(row: asyncpg.Record, after: Manufacturing, reason: str) -> ManufacturingFailedV1:
    return ManufacturingFailedV1(
        **_ref(row),
        site_id=row["site_id"],
        run=after.run,
        reason=reason,
        retained_material=after.retained_material,
    )


async def record_step(
    uow: UnitOfWork,
    site_id: str,
    order_id: uuid.UUID,
    *,
    step: str,
    completed_at: datetime | None = None,
    failed: bool = False,
    reason: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The MES reports a manufacturing step completed (or failed) for the order's current run."""
    if step not in mfg.STEPS:
        raise invalid("step", f"must be one of {', '.join(mfg.STEPS)}")
    reason = (reason or "").strip() or None
    if failed and reason is None:
        raise invalid("reason", "is required when a step failed")
    when = completed_at or _now(now)
    async with uow.begin() as tx:
        row = await _current(tx.conn, site_id, order_id)
        set_order_attributes(order_id, row["coi"])
        m = as_state(row)
        try:
            t = (
                mfg.fail_step(m, step, rules_for(row["product_code"]))
                if failed
                else mfg.complete_step(m, step)
            )
        except Conflict as exc:
            raise conflict(exc.field, exc.reason) from None
        if t.changed:
            event: EventData
            if failed:
                event = _lost_event(row, t.after, f"{step} failed: {reason}")
            else:
                event = ManufacturingStepCompletedV1(
                    **_ref(row),
                    site_id=site_id,
                    step=step,
                    run=t.after.run,
                    completed_at=when,
                )
            await save(
                tx,
                row,
                t,
                action="step_failed" if failed else "step",
                occurred_at=when,
                step=step,
                reason=reason,
                event=event,
            )
            log.info(
                "manufacturing step recorded", site_id=site_id, step=step, failed=failed, run=t.after.run
            )
        return await _view(tx.conn, site_id, order_id)


async def record_qc(
    uow: UnitOfWork,
    site_id: str,
    order_id: uuid.UUID,
    *,
    disposition: str,
    reason: str | None = None,
    decided_at: datetime | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """QC's disposition of the current run's product: released, out of specification or failed."""
    if disposition not in mfg.DISPOSITION_STATE:
        raise invalid("disposition", f"must be one of {', '.join(mfg.DISPOSITION_STATE)}")
    reason = (reason or "").strip() or None
    if disposition != "released" and reason is None:
        raise invalid("reason", f"is required when the product is {disposition}")
    when = decided_at or _now(now)
    async with uow.begin() as tx:
        row = await _current(tx.conn, site_id, order_id)
        set_order_attributes(order_id, row["coi"])
        try:
            t = mfg.qc(as_state(row), disposition, rules_for(row["product_code"]))
        except Conflict as exc:
            raise conflict(exc.field, exc.reason) from None
        if t.changed:
            after = t.after
            event: EventData
            if disposition == "released":
                event = ProductReleasedV1(**_ref(row), site_id=site_id, run=after.run, released_at=when)
            elif disposition == "out_of_specification":
                event = ProductOutOfSpecificationV1(
                    **_ref(row),
                    site_id=site_id,
                    run=after.run,
                    reason=reason or "",
                    retained_material=after.retained_material,
                )
            else:
                event = _lost_event(row, after, f"QC: {reason}")
            await save(tx, row, t, action="qc", occurred_at=when, reason=reason, event=event)
            log.info("QC disposition recorded", site_id=site_id, disposition=disposition, run=after.run)
        return await _view(tx.conn, site_id, order_id)


# ---- compensations and commands from the order service -------------------------------------------


async def stop_order(tx: Tx, order_id: uuid.UUID, reason: str, *, now: datetime | None = None) -> int:
    """Stop every running manufacture of the order (`manufacturing_stopped`); returns how many."""
    rows = await tx.conn.fetch(
        "SELECT * FROM manufacturing WHERE order_id = $1 ORDER BY created_at, booking_id FOR UPDATE", order_id
    )
    stopped = 0
    for row in rows:
        t = mfg.stop(as_state(row))
        if not t.changed:
            continue
        event = ManufacturingStoppedV1(**_ref(row), site_id=row["site_id"], reason=reason)
        await save(tx, row, t, action="stop", occurred_at=_now(now), reason=reason, event=event)
        log.info("manufacturing stopped", site_id=row["site_id"], run=t.after.run)
        stopped += 1
    return stopped


async def start_remanufacture(
    tx: Tx, order_id: uuid.UUID, site_id: str, run: int, reason: str, *, now: datetime | None = None
) -> bool:
    """A new run from retained material at the same site; False when there is nothing to start."""
    row = await tx.conn.fetchrow(
        """SELECT * FROM manufacturing WHERE order_id = $1 AND site_id = $2
           ORDER BY created_at DESC, booking_id LIMIT 1 FOR UPDATE""",
        order_id,
        site_id,
    )
    if row is None:
        log.warning("remanufacture requested, but no material of the order is at the site", site_id=site_id)
        return False
    try:
        t = mfg.remanufacture(as_state(row), run, rules_for(row["product_code"]))
    except Conflict as exc:
        log.warning("remanufacture request not applicable", site_id=site_id, run=run, why=exc.reason)
        return False
    if not t.changed:
        return False
    await save(tx, row, t, action="remanufacture", occurred_at=_now(now), reason=reason)
    log.info("remanufacture started from retained material", site_id=site_id, run=run)
    return True


# ---- reads ------------------------------------------------------------------------------------------


async def _view(conn: asyncpg.Connection, site_id: str, order_id: uuid.UUID) -> dict[str, Any]:
    row = await conn.fetchrow(
        """SELECT * FROM manufacturing WHERE order_id = $1 AND site_id = $2
           ORDER BY created_at DESC, booking_id LIMIT 1""",
        order_id,
        site_id,
    )
    if row is None:
        booking = await conn.fetchrow(
            """SELECT * FROM bookings WHERE order_id = $1 AND site_id = $2 AND status <> 'cancelled'
               ORDER BY created_at DESC, booking_id LIMIT 1""",
            order_id,
            site_id,
        )
        if booking is None:
            raise not_found("Manufacturing", f"{order_id} at {site_id}")
        return {
            "order_id": order_id,
            "site_id": site_id,
            "booking_id": booking["booking_id"],
            "product_code": booking["product_code"],
            "state": State.AWAITING_MATERIAL.value,
            "run": 0,
            "next_step": None,
            "steps_completed": [],
            "failed_step": None,
            "retained_material": False,
            "received_at": None,
            "history": [],
        }
    m = as_state(row)
    history = await conn.fetch(
        """SELECT run, action, step, state_before, state_after, reason, occurred_at, recorded_at
           FROM manufacturing_history WHERE booking_id = $1 ORDER BY id""",
        row["booking_id"],
    )
    return {
        "order_id": order_id,
        "site_id": site_id,
        "booking_id": row["booking_id"],
        "product_code": row["product_code"],
        "state": m.state.value,
        "run": m.run,
        "next_step": m.next_step,
        "steps_completed": list(mfg.STEPS[: m.steps_completed]),
        "failed_step": m.failed_step,
        "retained_material": m.retained_material,
        "received_at": row["received_at"],
        "history": [dict(h) for h in history],
    }


async def get_manufacturing(pool: asyncpg.Pool, site_id: str, order_id: uuid.UUID) -> dict[str, Any]:
    async with pool.acquire() as conn:
        await ensure_site(conn, site_id)
        return await _view(conn, site_id, order_id)
