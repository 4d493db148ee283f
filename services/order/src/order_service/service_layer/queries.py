"""Reads behind the order service's HTTP API (no transaction, no events) and its readiness."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeAlias

from order_service.adapters.repository import OrderTx
from order_service.domain.order import Actuals, Durations, Window, predict
from order_service.domain.records import (
    AuthorityTask,
    Centre,
    MaterialDisposition,
    OrderRecord,
    TimelineEntry,
)
from v2v_audit import Record
from v2v_contracts.errors import NotFound
from v2v_contracts.reference import product_catalogue
from v2v_messaging import AbstractUnitOfWork
from v2v_servicekit.signatures import SignedRecord

UnitOfWork: TypeAlias = AbstractUnitOfWork[OrderTx]


@dataclass(frozen=True)
class SignedDecision:
    """A signed decision on the order, with its signatures' manifestations (21 CFR 11.50) and whether
    the decision as stored still matches them (11.70)."""

    decision_id: uuid.UUID
    meaning: str
    fields: dict[str, Any]
    decided_at: Any
    signed: bool
    signatures: list[str]


@dataclass(frozen=True)
class OrderView:
    order: OrderRecord
    timeline: list[TimelineEntry]
    predicted: dict[str, date | None] | None
    collections: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tasks: list[AuthorityTask] = dataclasses.field(default_factory=list)
    decisions: list[SignedDecision] = dataclasses.field(default_factory=list)
    materials: list[MaterialDisposition] = dataclasses.field(default_factory=list)


def infusion_window(order: OrderRecord) -> dict[str, Any] | None:
    """The infusion window of the order's recorded lymphodepletion (None: none recorded, or no facts)."""
    window = Window.of(product_catalogue().get(order.product_code), order.indication)
    if window is None or order.lymphodepletion_on is None:
        return None
    return window.describe(order.lymphodepletion_on)


def predicted_dates(order: OrderRecord, region: str | None = None) -> dict[str, date | None] | None:
    """The remaining steps' predicted dates, from the product's durations and the actual dates so far."""
    product = product_catalogue().get(order.product_code)
    if product is None:
        return None
    actuals = Actuals(
        apheresis_date=order.apheresis_date or order.requested_apheresis_date,
        manufacturing_start_date=order.manufacturing_start_date,
        # a remanufacture starts on its own slot's day, not at the (first) receipt of the material
        material_received=order.material_received_at.date()
        if order.material_received_at and not (order.run > 1 and order.manufacturing_start_date)
        else None,
        released=order.released_at.date() if order.released_at else None,
        delivered=order.delivered_at.date() if order.delivered_at else None,
    )
    # QC lies inside the published apheresis-to-release days, not on top of the manufacturing days
    after_start = product.planning.release_after_start(region or "default") if product.planning else None
    predicted = predict(
        Durations(product.manufacturing_days, product.qc_days, release_after_start_days=after_start), actuals
    )
    # issue 11: the infusion is not before the LD window opens: the recorded LD's, or, before one is
    # recorded, that of an LD started on the predicted release day at the earliest (LD may start only
    # once the product is released, with its delivery confirmed)
    earliest = predicted.get("earliest_infusion")
    regimen = Window.of(product, order.indication)
    ld_from = order.lymphodepletion_on or predicted.get("release")
    if regimen is not None and earliest is not None and ld_from is not None:
        first, _last = regimen.infusion_dates(ld_from)
        predicted["earliest_infusion"] = max(earliest, first)
    return predicted


async def order_view(uow: UnitOfWork, order_id: uuid.UUID, *, centre: str | None = None) -> OrderView:
    """The order with its timeline; `centre` confines it to that centre's orders (another's: NotFound)."""
    async with uow.read() as tx:
        # one read (one snapshot): the order, its centre's region, its timeline and its sub-collections
        found = await tx.orders.history(order_id, centre=centre)
        if found is None:
            raise NotFound("Order", order_id)
        order = found.order
        decisions = []
        for d in found.decisions:
            check = await tx.signatures.check(SignedRecord("decision", str(d["decision_id"]), d["fields"]))
            decisions.append(
                SignedDecision(
                    decision_id=d["decision_id"],
                    meaning=d["meaning"],
                    fields=d["fields"],
                    decided_at=d["decided_at"],
                    signed=check.signed,
                    signatures=[sig.manifestation() for sig in check.current],
                )
            )
    # the centre's region picks the product's published turnaround for the predicted dates
    return OrderView(
        order,
        found.timeline,
        predicted_dates(order, found.region),
        found.collections,
        found.tasks,
        decisions,
        found.materials,
    )


async def tasks_page(
    uow: UnitOfWork, *, state: str | None, overdue_at: Any, limit: int, offset: int
) -> tuple[list[AuthorityTask], int]:
    """A page of QA's authority-notification tasks (earliest due first)."""
    async with uow.read() as tx:
        return await tx.tasks.page(state=state, overdue_at=overdue_at, limit=limit, offset=offset)


async def order_audit(
    uow: UnitOfWork, order_id: uuid.UUID, *, centre: str | None, limit: int, offset: int
) -> tuple[list[Record], int]:
    """A page of the order's audit trail (oldest first) and its length; `centre` confines it to that
    centre's orders (another's: NotFound, as an unknown one)."""
    async with uow.read() as tx:
        if await tx.orders.get(order_id, centre=centre) is None:
            raise NotFound("Order", order_id)
        return await tx.audit_log.of_order(order_id, limit=limit, offset=offset)


async def list_orders(
    uow: UnitOfWork, *, tenant: str | None, centre: str | None, limit: int, offset: int
) -> tuple[list[OrderRecord], int]:
    """A page of orders: only the `tenant` centre's when set, narrowed to `centre` when set."""
    async with uow.read() as tx:
        return await tx.orders.page(tenant=tenant, centre=centre, limit=limit, offset=offset)


async def treatment_centres(uow: UnitOfWork) -> list[Centre]:
    async with uow.read() as tx:
        return await tx.catalogue.centres()


async def products(uow: UnitOfWork) -> list[dict[str, Any]]:
    async with uow.read() as tx:
        return await tx.catalogue.products()


async def network_unknown(uow: UnitOfWork) -> str | None:
    """Readiness: None once at least one manufacturing site is known, else why not."""
    async with uow.read() as tx:
        known = await tx.network.known()
    return None if known else "no manufacturing site known yet (waiting for site.registered)"
