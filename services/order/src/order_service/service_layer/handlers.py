"""The order service's event handlers (consumer `order.saga`): every fact about an order from scheduling,
site and logistics goes through the order's state machine; `site.registered` keeps the order service's
own copy of the manufacturing network (which sites may make what for which market)."""

from __future__ import annotations

from order_service.adapters.repository import OrderTx
from order_service.domain.market import Approval
from order_service.service_layer import case as cases
from v2v_audit import AuditedHandlers
from v2v_contracts import (
    BookingAffectedV1,
    BookingCancelledV1,
    BookingConfirmedV1,
    CoiMismatchDetectedV1,
    ManufacturingFailedV1,
    ManufacturingStepCompletedV1,
    ManufacturingStoppedV1,
    MaterialReceivedV1,
    MaterialRejectedV1,
    OrderEventData,
    ProductOutOfSpecificationV1,
    ProductReleasedV1,
    ShipmentCancelledV1,
    ShipmentExcursionV1,
    ShipmentMilestoneV1,
    ShipmentPlannedV1,
    ShipmentReroutedV1,
    SiteCoiMismatchDetectedV1,
    SiteRegisteredV1,
    SlotReleasedV1,
    SlotReservedV1,
    SlotUnavailableV1,
)
from v2v_messaging import EventMeta
from v2v_observability import get_logger

log = get_logger(__name__)

# entries written by these handlers name the consumer (`order.saga`) as actor and the event as cause
handlers = AuditedHandlers[OrderTx]("order.saga")

# every fact about an order the other services publish (each of their event types with an order id)
FACTS: tuple[type[OrderEventData], ...] = (
    SlotReservedV1,
    SlotUnavailableV1,
    SlotReleasedV1,
    BookingConfirmedV1,
    BookingCancelledV1,
    BookingAffectedV1,
    MaterialReceivedV1,
    MaterialRejectedV1,
    ManufacturingStepCompletedV1,
    ProductReleasedV1,
    ProductOutOfSpecificationV1,
    ManufacturingFailedV1,
    ManufacturingStoppedV1,
    SiteCoiMismatchDetectedV1,
    ShipmentPlannedV1,
    ShipmentMilestoneV1,
    ShipmentExcursionV1,
    ShipmentCancelledV1,
    ShipmentReroutedV1,
    CoiMismatchDetectedV1,
)


@handlers.on(*FACTS)
async def apply_fact(tx: OrderTx, fact: OrderEventData, meta: EventMeta) -> None:
    """A fact from scheduling, site or logistics: record it on the timeline, move the state if allowed.

    Topics keep no order between them, so a fact may arrive before the one it follows (a booking
    confirmation before the slot reservation it confirms): such a fact is parked and applied as soon
    as the order reaches a state where it applies."""
    case = await cases.load(tx, fact.order_id)
    cases.check_fact_coi(case.order, meta.type, meta.coi)
    outcome = cases.decide(case, meta.type, fact)
    if cases.may_apply_later(outcome):
        await tx.parked.park(fact.order_id, meta.envelope)
    parked = await cases.apply(
        tx, case, outcome, event=meta.envelope, extra_fields=cases.fact_extras(fact, outcome)
    )
    log.info(  # no reason: the timeline's words may quote another service's report
        "order fact applied",
        event_type=meta.type,
        status=outcome.state.status.value,
        changed=outcome.changed,
    )
    if outcome.changed and parked:
        await cases.replay_parked(tx, fact.order_id)


@handlers.on(SiteRegisteredV1)
async def on_site_registered(tx: OrderTx, site: SiteRegisteredV1, meta: EventMeta) -> None:
    """A site's registry entry: replace what the order service knows of its approvals and whether it
    is active (an inactive site serves no market)."""
    approvals = {Approval(a.regulator, a.use, a.product_code) for a in site.approvals}
    changed = await tx.network.replace_site(
        site.site_id, active=site.active, approvals=approvals, as_of=meta.time
    )
    if changed:
        tx.audit(
            "network.site_replaced",
            "site",
            site.site_id,
            new={
                "active": site.active,
                "approvals": sorted(f"{a.regulator}/{a.use}/{a.product_code}" for a in approvals),
                "as_of": meta.time,
            },
            reason=meta.type,
        )
    log.info(
        "network site updated" if changed else "older site registration ignored",
        site_id=site.site_id,
        active=site.active,
        approvals=len(approvals),
    )
