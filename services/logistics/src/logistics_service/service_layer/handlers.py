"""Logistics use cases driven by events: plan, ready, cancel and resume the shipments of an order.

Each handler runs in the consumer's transaction (inbox row + state change + outbox events commit
together) and is idempotent: a fact for a state already left is logged and ignored. Facts about the same
order that arrive on different topics (a cancellation crossing a release) are applied one after the
other (`tx.shipments.serialise_order`).

`handlers` holds those that need nothing but the transaction; `build_handlers(lanes)` adds the planning
ones, which need the shipping lanes and carriers read at start-up (config.load_shipping_lanes).

A planned leg gets its carrier (domain/carriers.py) from the regions of its two ends, which logistics
learns from `site.registered` (a site's region) and `order.submitted` (the centre's region).

A planned leg travels by its product's limits and excursion tolerance (domain/lanes.py): the inbound leg's
product is the booking's; the outbound leg's is the order's, learnt from `order.submitted` and
`site.booking_confirmed` (a product release does not name it; unknown: the seed's default lane).

Identity pairs (issue 10): the inbound shipment learns its collection's DIN from
`order.apheresis_completed`, the outbound shipment its run's lot from `site.product_released`; the
handoffs check them (service_layer/commands.py).

QA's disposition of an excursion (`order.disposition_decided`, cause `excursion`) resumes the compromised
shipment (release) or leaves it compromised (reject: the order service asks for a recollection or a
remanufacture, whose new shipment takes the free lane), like the older `order.quarantine_decided`.

Reasons recorded and published are reason codes: an upstream event's reason is carried only when it is a
code itself (`rules.reason_code`), so free text typed by staff never reaches this service's tables or
events.
"""

from __future__ import annotations

import uuid

from logistics_service.adapters.repository import LogisticsTx
from logistics_service.domain import shipment as rules
from logistics_service.domain.carriers import Carrier
from logistics_service.domain.lanes import ShippingLanes
from logistics_service.domain.shipment import Shipment, reason_code
from logistics_service.service_layer.commands import audit_shipment, save_shipment
from v2v_audit import AuditedHandlers
from v2v_contracts import (
    ApheresisCompletedV1,
    BookingCancelledV1,
    BookingConfirmedV1,
    DispositionDecidedV1,
    OrderCancelledV1,
    OrderFailedV1,
    OrderSubmittedV1,
    ProductReleasedV1,
    QuarantineDecidedV1,
    ShipmentCancelledV1,
    ShipmentPlannedV1,
    ShipmentReroutedV1,
    SiteRegisteredV1,
)
from v2v_messaging import EventMeta, HandlerRegistry
from v2v_observability import current_traceparent, get_logger

log = get_logger(__name__)

handlers = HandlerRegistry[LogisticsTx]()


async def _plan(
    tx: LogisticsTx, ship: Shipment, *, treatment_center_id: str, slot_id: uuid.UUID | None
) -> None:
    audit_shipment(tx, ship)
    await tx.shipments.add(ship)
    await tx.publish(
        ShipmentPlannedV1(
            order_id=ship.order_id,
            coi=ship.coi,
            treatment_center_id=treatment_center_id,
            shipment_id=ship.shipment_id,
            leg=ship.leg,
            origin=ship.origin,
            destination=ship.destination,
            material_condition=ship.material_condition,  # type: ignore[arg-type]
            temperature_range_c=(ship.min_temp_c, ship.max_temp_c),
            planned_pickup_date=ship.planned_pickup_date,
            slot_id=slot_id,
            carrier_id=ship.carrier_id,
        )
    )


async def _carrier(tx: LogisticsTx, lanes: ShippingLanes, origin: str, destination: str) -> Carrier:
    """The carrier of a new leg, from the regions of its ends (the broadest one where a region is unknown)."""
    origin_region = await tx.regions.region_of(origin)
    destination_region = await tx.regions.region_of(destination)
    return _carrier_of(lanes, origin, destination, origin_region, destination_region)


def _carrier_of(
    lanes: ShippingLanes,
    origin: str,
    destination: str,
    origin_region: str | None,
    destination_region: str | None,
) -> Carrier:
    carrier = lanes.carriers.for_lane(origin, destination, origin_region, destination_region)
    if origin_region is None or destination_region is None:
        log.warning(
            "region of a leg's end not known yet: the broadest carrier carries it",
            origin_known=origin_region is not None,
            destination_known=destination_region is not None,
            carrier_id=carrier.carrier_id,
        )
    return carrier


@handlers.on(SiteRegisteredV1)
async def site_registered(tx: LogisticsTx, site: SiteRegisteredV1, meta: EventMeta) -> None:
    """A site's registry entry: its region, for the choice of carriers."""
    await tx.regions.remember(site.site_id, "site", site.region, meta.time)


@handlers.on(OrderSubmittedV1)
async def order_submitted(tx: LogisticsTx, order: OrderSubmittedV1, meta: EventMeta) -> None:
    """An order names its treatment centre's region (kept for the choice of carriers) and its product
    (whose limits its outbound leg travels by)."""
    await tx.remember_order(
        order.order_id, order.product_code, order.treatment_center_id, order.region, meta.time
    )


async def plan_inbound(
    tx: LogisticsTx, booking: BookingConfirmedV1, lanes: ShippingLanes, meta: EventMeta | None = None
) -> None:
    """Plan the inbound leg (centre → site) for a confirmed booking; a recollection gets a new one."""
    await tx.shipments.serialise_order(booking.order_id)
    state = await tx.leg_state(
        booking.order_id,
        "inbound_apheresis",
        (booking.treatment_center_id, booking.site_id),
        product=(booking.product_code, meta.time) if meta is not None else None,
    )
    if state.ended:
        log.info(
            "booking confirmed for an ended order: no inbound shipment", booking_id=str(booking.booking_id)
        )
        return
    inbound = state.shipments
    same_booking = any(s.booking_id == booking.booking_id for s in inbound)
    holder = rules.lane_holder(inbound)
    if not same_booking and holder is not None and holder.collected and holder.destination != booking.site_id:
        await _reroute(tx, holder, booking)
        return
    if same_booking or holder is not None:
        log.info(
            "inbound shipment already planned",
            booking_id=str(booking.booking_id),
            holder=str(holder.shipment_id) if holder else None,
        )
        return
    if not lanes.knows(booking.product_code):
        log.warning("product not in the catalogue: inbound shipped fresh", product_code=booking.product_code)
    lane = lanes.inbound(booking.product_code)
    carrier = _carrier_of(
        lanes, booking.treatment_center_id, booking.site_id, state.origin_region, state.destination_region
    )
    ship = Shipment.plan(
        order_id=booking.order_id,
        coi=booking.coi,
        leg="inbound_apheresis",
        origin=booking.treatment_center_id,
        destination=booking.site_id,
        lane=lane,
        pickup=booking.apheresis_date,
        carrier_id=carrier.carrier_id,
        booking_id=booking.booking_id,
        origin_trace=current_traceparent(),
        reason="booking_confirmed",
        product_code=booking.product_code,
    )
    await _plan(tx, ship, treatment_center_id=booking.treatment_center_id, slot_id=booking.slot_id)
    log.info(
        "inbound shipment planned",
        site_id=booking.site_id,
        condition=lane.condition,
        limit_c=[lane.min_c, lane.max_c],
        tolerance_min=lane.tolerance_min,
        carrier_id=carrier.carrier_id,
    )


async def plan_outbound(tx: LogisticsTx, released: ProductReleasedV1, lanes: ShippingLanes) -> None:
    """Plan the outbound leg (site → centre) for a released product, cryopreserved within its label's
    limit (the seed's default lane, at or below -150 °C, when the order's product is not known)."""
    await tx.shipments.serialise_order(released.order_id)
    if await tx.ended_orders.ended(released.order_id):
        log.info("product released for an ended order: no outbound shipment", run=released.run)
        return
    outbound = await tx.shipments.of_order(released.order_id, leg="outbound_product")
    # a run's outbound that was compromised or cancelled does not count: after a recollection runs
    # start again at 1, and a rejected product is replaced by a new one
    same_run = any(
        s.run == released.run and s.status not in (rules.COMPROMISED, rules.CANCELLED) for s in outbound
    )
    holder = rules.lane_holder(outbound)
    if same_run or holder is not None:
        log.info(
            "outbound shipment already planned",
            run=released.run,
            holder=str(holder.shipment_id) if holder else None,
        )
        return
    carrier = await _carrier(tx, lanes, released.site_id, released.treatment_center_id)
    product_code = await tx.order_products.product_of(released.order_id)
    if product_code is None:
        log.warning(
            "the order's product is not known: outbound shipped by the default lane", run=released.run
        )
    lane = lanes.outbound_for(product_code)
    ship = Shipment.plan(
        order_id=released.order_id,
        coi=released.coi,
        leg="outbound_product",
        origin=released.site_id,
        destination=released.treatment_center_id,
        lane=lane,
        pickup=released.released_at.date(),
        carrier_id=carrier.carrier_id,
        run=released.run,
        origin_trace=current_traceparent(),
        reason="product_released",
        product_code=product_code,
        lot=released.lot,
    )
    await _plan(tx, ship, treatment_center_id=released.treatment_center_id, slot_id=None)
    log.info(
        "outbound shipment planned",
        site_id=released.site_id,
        run=released.run,
        condition=lane.condition,
        limit_c=[lane.min_c, lane.max_c],
        tolerance_min=lane.tolerance_min,
        lot_known=released.lot is not None,
        carrier_id=carrier.carrier_id,
    )


@handlers.on(ApheresisCompletedV1)
async def ready_for_pickup(tx: LogisticsTx, done: ApheresisCompletedV1, meta: EventMeta) -> None:
    """The centre collected the cells: the inbound shipment is ready for pickup (status only)."""
    await tx.shipments.serialise_order(done.order_id)
    inbound = await tx.shipments.of_order(done.order_id, leg="inbound_apheresis", lock=True)
    live = [s for s in inbound if s.status in rules.LIVE]
    if not live:
        log.warning("apheresis completed but no live inbound shipment", order_id=str(done.order_id))
        return
    ship = live[-1]  # the newest
    ship.apheresis_completed(done.collected_at)
    if done.din is not None and not ship.learn_din(done.din):
        # another collection's DIN for a shipment that has one: kept (the handoffs check the first)
        log.error(
            "apheresis completed with another DIN than the inbound shipment's: kept the first",
            shipment_id=str(ship.shipment_id),
            collection=done.collection,
        )
    await save_shipment(tx, ship)
    log.info(
        "inbound shipment ready for pickup",
        shipment_id=str(ship.shipment_id),
        status=ship.status,
        din_known=ship.din is not None,
        collection=done.collection,
    )


async def _cancel(tx: LogisticsTx, ship: Shipment, reason: str) -> None:
    """Cancel one shipment and publish `logistics.shipment_cancelled.v1` in the same transaction
    (`reason`: a reason code)."""
    before = ship.status
    ship.cancel(reason)
    await save_shipment(tx, ship)
    await tx.publish(
        ShipmentCancelledV1(**ship.refs(), shipment_id=ship.shipment_id, leg=ship.leg, reason=reason)
    )
    log.info(
        "shipment cancelled",
        shipment_id=str(ship.shipment_id),
        leg=ship.leg,
        status_before=before,
        reason=reason,
    )


async def _cancel_order_shipments(tx: LogisticsTx, order_id: uuid.UUID, outcome: str, reason: str) -> None:
    """Order cancelled or failed (compensation): every shipment not yet delivered is cancelled, and
    later facts plan nothing for the order."""
    await tx.shipments.serialise_order(order_id)
    code = reason_code(f"order_{outcome}", reason)
    await tx.ended_orders.add(order_id, outcome, code)
    tx.audit("order.ended", "order", order_id, new={"outcome": outcome}, reason=code)
    for ship in await tx.shipments.of_order(order_id, lock=True):
        if rules.cancellable_on_order_end(ship.status):
            await _cancel(tx, ship, code)


@handlers.on(OrderCancelledV1)
async def order_cancelled(tx: LogisticsTx, cancelled: OrderCancelledV1, meta: EventMeta) -> None:
    await _cancel_order_shipments(tx, cancelled.order_id, "cancelled", cancelled.reason)


@handlers.on(OrderFailedV1)
async def order_failed(tx: LogisticsTx, failed: OrderFailedV1, meta: EventMeta) -> None:
    await _cancel_order_shipments(tx, failed.order_id, "failed", failed.reason)


async def _reroute(tx: LogisticsTx, ship: Shipment, booking: BookingConfirmedV1) -> None:
    """Issue 11: the order's collected material (waiting for pickup or in transit) goes to its new site."""
    before = ship.destination
    ship.reroute(booking.site_id, booking.booking_id)
    await save_shipment(tx, ship)
    tx.audit(
        "shipment.rerouted",
        "shipment",
        ship.shipment_id,
        old={"destination": before},
        new={"destination": ship.destination, "booking_id": booking.booking_id, "status": ship.status},
        reason=rules.REROUTED,
    )
    await tx.publish(
        ShipmentReroutedV1(
            order_id=ship.order_id,
            coi=ship.coi,
            treatment_center_id=booking.treatment_center_id,
            shipment_id=ship.shipment_id,
            leg=ship.leg,
            previous_destination=before,
            destination=ship.destination,
            status=ship.status,
            slot_id=booking.slot_id,
        )
    )
    log.warning("collected material rerouted to another site", site_id=booking.site_id, previous=before)


@handlers.on(BookingCancelledV1)
async def booking_cancelled(tx: LogisticsTx, cancelled: BookingCancelledV1, meta: EventMeta) -> None:
    """The site dropped the booking: its inbound shipment is cancelled if not yet picked up."""
    await tx.shipments.serialise_order(cancelled.order_id)
    inbound = await tx.shipments.of_order(cancelled.order_id, leg="inbound_apheresis", lock=True)
    for ship in inbound:
        if ship.booking_id not in (cancelled.booking_id, None):
            continue
        if ship.collected and ship.status in rules.LIVE:
            # issue 11: the material exists; it waits for the order's next booking (rerouted there)
            log.info(
                "booking cancelled: the collected material is kept for its next site", status=ship.status
            )
        elif rules.cancellable_on_booking_cancelled(ship.leg, ship.status):
            await _cancel(tx, ship, reason_code("booking_cancelled", cancelled.reason))
        elif ship.status != rules.CANCELLED:
            log.info(
                "booking cancelled but the inbound shipment is past pickup: kept",
                shipment_id=str(ship.shipment_id),
                status=ship.status,
            )


@handlers.on(QuarantineDecidedV1)
async def quarantine_decided(tx: LogisticsTx, decided: QuarantineDecidedV1, meta: EventMeta) -> None:
    """QA decided on a product quarantined after an outbound excursion.

    release: the compromised outbound shipment resumes where it was halted (milestones accepted again);
    reject: it stays compromised (the lane is free for a remanufactured product's new shipment).
    """
    await tx.shipments.serialise_order(decided.order_id)
    outbound = await tx.shipments.of_order(decided.order_id, leg="outbound_product", lock=True)
    compromised = [s for s in outbound if s.status == rules.COMPROMISED]
    if not compromised:
        log.info("quarantine decided but no compromised outbound shipment", decision=decided.decision)
        return
    ship = compromised[-1]  # the newest
    holder = rules.lane_holder(outbound)
    resumed = ship.quarantine_decided(
        decided.decision,
        reason_code(f"quarantine_{decided.decision}", decided.reason),
        lane_taken=holder is not None,
    )
    await save_shipment(tx, ship)
    if resumed:
        log.info(
            "quarantine release: outbound shipment resumed",
            shipment_id=str(ship.shipment_id),
            status=ship.status,
        )
    elif decided.decision == "reject":
        log.info("quarantine reject: outbound shipment stays compromised", shipment_id=str(ship.shipment_id))
    else:
        log.warning(
            "quarantine release, but another outbound shipment holds the lane: not resumed",
            shipment_id=str(ship.shipment_id),
            holder=str(holder.shipment_id) if holder else None,
        )


@handlers.on(DispositionDecidedV1)
async def disposition_decided(tx: LogisticsTx, decided: DispositionDecidedV1, meta: EventMeta) -> None:
    """QA's disposition of material at risk. Only an excursion's concerns a shipment:

    release: the compromised shipment (the one the decision names, else the newest compromised of its
    leg) resumes where it was halted (no change if it never stopped); reject: it stays compromised (the
    lane is free for the recollection's or remanufacture's new leg). The decision is recorded either way.
    `release_on_physician_request` is an OOS outcome: for an excursion it changes nothing (logged).
    """
    if decided.cause != "excursion":
        return
    await tx.shipments.serialise_order(decided.order_id)
    ships = await tx.shipments.of_order(decided.order_id, lock=True)
    if decided.shipment_id is not None:
        named = [s for s in ships if s.shipment_id == decided.shipment_id]
    else:
        named = [s for s in ships if decided.leg in (None, s.leg) and s.status == rules.COMPROMISED][-1:]
    if not named:
        log.warning("excursion disposition for no shipment of the order", outcome=decided.outcome)
        return
    ship = named[0]
    if decided.outcome == "release_on_physician_request":
        log.warning("release on physician request is not an excursion outcome: shipment unchanged")
        return
    if ship.status != rules.COMPROMISED:
        # it never stopped (within the tolerance, or delivered before): nothing to resume
        ship.move_to(ship.status, ship.status_reason or "", quarantine_decision=decided.outcome)
        await save_shipment(tx, ship)
        log.info("excursion disposition recorded", outcome=decided.outcome, status=ship.status)
        return
    same_leg = [s for s in ships if s.leg == ship.leg and s.shipment_id != ship.shipment_id]
    holder = rules.lane_holder(same_leg)
    resumed = ship.quarantine_decided(
        decided.outcome,
        reason_code(f"disposition_{decided.outcome}", decided.reason),
        lane_taken=holder is not None,
    )
    await save_shipment(tx, ship)
    log.info(
        "excursion disposition applied",
        shipment_id=str(ship.shipment_id),
        leg=ship.leg,
        outcome=decided.outcome,
        resumed=resumed,
        status=ship.status,
    )


def build_handlers(lanes: ShippingLanes) -> HandlerRegistry[LogisticsTx]:
    """Every handler of the logistics consumer; planning ones use `lanes` (read once at start-up)."""
    # entries written by these handlers name the consumer (`logistics.shipments`) as actor, the event as cause
    registry: HandlerRegistry[LogisticsTx] = AuditedHandlers[LogisticsTx]("logistics.shipments").include(
        handlers
    )

    @registry.on(BookingConfirmedV1)
    async def booking_confirmed(tx: LogisticsTx, booking: BookingConfirmedV1, meta: EventMeta) -> None:
        await plan_inbound(tx, booking, lanes, meta)

    @registry.on(ProductReleasedV1)
    async def product_released(tx: LogisticsTx, released: ProductReleasedV1, meta: EventMeta) -> None:
        await plan_outbound(tx, released, lanes)

    return registry
