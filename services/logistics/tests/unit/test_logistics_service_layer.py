"""The logistics service layer on in-memory repositories: the same commands the API calls and the same
handlers the consumer runs (through FakeInbox), asserting the store and the events committed."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from logistics_service.adapters.memory import MemoryStore, fake_uow
from logistics_service.adapters.repository import LogisticsTx
from logistics_service.config import load_shipping_lanes
from logistics_service.domain.shipment import Shipment
from logistics_service.service_layer import commands, queries
from logistics_service.service_layer.handlers import build_handlers
from v2v_contracts import (
    ApheresisCompletedV1,
    BookingCancelledV1,
    BookingConfirmedV1,
    CloudEvent,
    DispositionDecidedV1,
    EventData,
    OrderCancelledV1,
    OrderCompletedV1,
    OrderFailedV1,
    OrderSubmittedV1,
    ProductReleasedV1,
    QuarantineDecidedV1,
    new_event,
)
from v2v_contracts.coi import make_coi
from v2v_contracts.errors import CoiMismatch, Conflict, Invalid, NotFound
from v2v_contracts.reference import product_catalogue
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork
from v2v_servicekit.problems import status_of

TC = "TC-DE-BE-001"
SITE = "DE-LEIPZIG-IZI"
NOW = datetime(2030, 5, 6, 9, 30, tzinfo=UTC)
HANDLERS = build_handlers(load_shipping_lanes())
_seq = iter(range(1, 999_999))

PLANNED = "logistics.shipment_planned.v1"
MILESTONE = "logistics.shipment_milestone.v1"
EXCURSION = "logistics.shipment_excursion.v1"
CANCELLED = "logistics.shipment_cancelled.v1"
MISMATCH = "logistics.coi_mismatch_detected.v1"


class World:
    """An in-memory logistics service: its store, its unit of work and its consumer's inbox."""

    def __init__(self) -> None:
        self.uow: FakeUnitOfWork[LogisticsTx]
        self.uow, self.store = fake_uow(MemoryStore())
        self.inbox = FakeInbox(self.uow, HANDLERS)

    async def deliver(self, *events: CloudEvent | EventData) -> None:
        await self.inbox.deliver(*(e if isinstance(e, CloudEvent) else new_event(e) for e in events))

    def ships(self, order: Order, leg: str | None = None) -> list[Shipment]:
        return [
            s
            for s in self.store.shipments.values()
            if s.order_id == order.order_id and (leg is None or s.leg == leg)
        ]

    def status(self, ship: Shipment) -> str:
        return self.store.shipments[ship.shipment_id].status

    def events(self, event_type: str | None = None) -> list[CloudEvent]:
        return [e for e in self.uow.committed if event_type is None or e.type == event_type]

    async def planned(self, order: Order, leg: str, product_code: str = "TISA-CEL") -> Shipment:
        if leg == "inbound_apheresis":
            await self.deliver(booking_confirmed(order, product_code=product_code))
        else:
            await self.deliver(product_released(order))
        [ship] = [s for s in self.ships(order, leg) if s.status == "planned"]
        return ship

    async def milestone(
        self,
        ship: Shipment,
        name: str,
        *,
        coi: str | None = None,
        temperature_c: float | None = None,
        minutes: int = 0,
        din: str | None = None,
        lot: str | None = None,
    ) -> dict[str, Any]:
        return dict(
            await commands.record_milestone(
                self.uow,
                ship.shipment_id,
                milestone=name,
                occurred_at=NOW + timedelta(minutes=minutes),
                location="FRA",
                handled_by="courier-42",
                received_from=None,
                coi=coi or ship.coi,
                temperature_c=temperature_c,
                din=din,
                lot=lot,
            )
        )

    async def reading(
        self,
        ship: Shipment,
        reading_c: float,
        *,
        coi: str | None = None,
        minutes: int = 0,
        download: bool = False,
    ) -> dict[str, Any]:
        return dict(
            await commands.record_temperature(
                self.uow,
                ship.shipment_id,
                reading_c=reading_c,
                measured_at=NOW + timedelta(minutes=minutes),
                coi=coi,
                source="logger_download" if download else "courier",
            )
        )

    async def breach(self, ship: Shipment, reading_c: float, *, start: int = 1) -> dict[str, Any]:
        """Picked up (if not yet), then outside the limit for 30 minutes from `start`: beyond every
        tolerance of the catalogue and the seed (at most 30 minutes, exceeded only when longer)."""
        if self.status(ship) in ("planned", "ready_for_pickup", "booked"):
            await self.milestone(ship, "picked_up")
        await self.reading(ship, reading_c, minutes=start)
        return await self.reading(ship, reading_c, minutes=start + 31)


class Order:
    def __init__(self) -> None:
        self.order_id = uuid.uuid4()
        self.coi = make_coi("V2V00", 30, next(_seq))
        self.refs: dict[str, Any] = {"order_id": self.order_id, "coi": self.coi, "treatment_center_id": TC}


def other_coi() -> str:
    return make_coi("V2V00", 30, 999_000 + next(_seq) % 999)


def booking_confirmed(
    order: Order, booking_id: uuid.UUID | None = None, *, product_code: str = "TISA-CEL"
) -> CloudEvent:
    return new_event(
        BookingConfirmedV1(
            **order.refs,
            booking_id=booking_id or uuid.uuid4(),
            slot_id=uuid.uuid4(),
            site_id=SITE,
            product_code=product_code,
            manufacturing_start_date=date(2030, 5, 20),
            apheresis_date=date(2030, 5, 18),
        )
    )


def product_released(order: Order, run: int = 1, lot: str | None = None) -> CloudEvent:
    return new_event(ProductReleasedV1(**order.refs, site_id=SITE, run=run, released_at=NOW, lot=lot))


def disposition(
    order: Order, outcome: str, ship: Shipment | None = None, *, cause: str = "excursion"
) -> DispositionDecidedV1:
    return DispositionDecidedV1(
        **order.refs,
        cause=cause,  # type: ignore[arg-type]
        outcome=outcome,  # type: ignore[arg-type]
        shipment_id=None if ship is None else ship.shipment_id,
        leg=None if ship is None else ship.leg,
        reason="within_stability_data" if outcome != "reject" else "outside_stability_data",
        document_reference="QA-DEV-2030-0042",
    )


@pytest.fixture
def world() -> World:
    return World()


# ---- planning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("product_code", sorted(product_catalogue()))
async def test_booking_confirmed_plans_the_inbound_leg_in_the_catalogues_condition(
    world: World, product_code: str
) -> None:
    order = Order()
    event = booking_confirmed(order, product_code=product_code)
    await world.deliver(event)

    [ship] = world.ships(order)
    material = product_catalogue()[product_code].apheresis_material
    expected_range = {"fresh": (2.0, 8.0), "cryopreserved": (-196.0, -150.0)}[material]
    assert ship.leg == "inbound_apheresis" and ship.status == "planned"
    assert (ship.origin, ship.destination) == (TC, SITE)
    assert ship.material_condition == material
    assert (ship.min_temp_c, ship.max_temp_c) == expected_range
    assert ship.planned_pickup_date == date(2030, 5, 18)
    assert ship.booking_id == uuid.UUID(event.data["booking_id"])

    [planned] = world.uow.committed
    assert planned.type == PLANNED and planned.coi == order.coi and planned.subject == str(order.order_id)
    data = planned.data
    assert data["shipment_id"] == str(ship.shipment_id)
    assert data["leg"] == "inbound_apheresis"
    assert (data["origin"], data["destination"], data["treatment_center_id"]) == (TC, SITE, TC)
    assert data["material_condition"] == material
    assert list(data["temperature_range_c"]) == list(expected_range)
    assert data["slot_id"] == event.data["slot_id"]
    assert [h.status_after for h in await _history(world, ship)] == ["planned"]
    assert world.store.locked_orders == [order.order_id]  # serialised per order


async def test_tisa_cel_material_travels_cryopreserved_and_axi_cel_fresh(world: World) -> None:
    frozen = await world.planned(Order(), "inbound_apheresis", "TISA-CEL")
    fresh = await world.planned(Order(), "inbound_apheresis", "AXI-CEL")
    assert (frozen.material_condition, frozen.min_temp_c, frozen.max_temp_c) == ("cryopreserved", -196, -150)
    assert (fresh.material_condition, fresh.min_temp_c, fresh.max_temp_c) == ("fresh", 2.0, 8.0)


async def test_product_released_plans_one_cryogenic_outbound_leg_per_run(world: World) -> None:
    order = Order()
    event = product_released(order)
    await world.deliver(event)
    await world.deliver(product_released(order))  # the same run, another event: still one shipment
    await world.deliver(product_released(order, run=2))  # the first still holds the lane

    [ship] = world.ships(order)
    assert ship.leg == "outbound_product" and ship.run == 1 and ship.status == "planned"
    assert (ship.origin, ship.destination) == (SITE, TC)
    assert (ship.material_condition, ship.min_temp_c, ship.max_temp_c) == ("cryopreserved", -196.0, -150.0)
    assert ship.planned_pickup_date == NOW.date()
    [planned] = world.uow.committed
    assert planned.type == PLANNED
    assert planned.data["leg"] == "outbound_product" and planned.data["slot_id"] is None
    assert (planned.data["origin"], planned.data["destination"], planned.data["treatment_center_id"]) == (
        SITE,
        TC,
        TC,
    )


async def test_a_duplicate_event_is_a_no_op(world: World) -> None:
    order = Order()
    event = booking_confirmed(order)
    await world.deliver(event, event)  # redelivered: the inbox drops it
    assert len(world.ships(order)) == 1
    assert world.uow.types() == [PLANNED]
    assert world.uow.commits == 1

    cancel = new_event(OrderCancelledV1(**order.refs, reason="consent_withdrawn", previous_status="x"))
    await world.deliver(cancel, cancel)
    assert world.uow.types() == [PLANNED, CANCELLED]
    assert world.uow.commits == 2


async def test_the_same_booking_again_under_another_event_id_plans_nothing_new(world: World) -> None:
    order = Order()
    booking_id = uuid.uuid4()
    await world.deliver(booking_confirmed(order, booking_id))
    [first] = world.ships(order)
    await world.milestone(first, "delivered")  # delivered: the lane is free again ...
    await world.deliver(booking_confirmed(order, booking_id))  # ... but this booking has its shipment
    assert len(world.ships(order)) == 1
    await world.deliver(booking_confirmed(order))  # a recollection's new booking: a new leg
    assert [s.status for s in world.ships(order)] == ["delivered", "planned"]
    assert world.uow.types() == [PLANNED, MILESTONE, PLANNED]


async def test_events_the_service_does_not_handle_are_skipped(world: World) -> None:
    order = Order()
    await world.deliver(OrderCompletedV1(**order.refs, infused_at=NOW))
    assert world.inbox.ignored == ["order.completed.v1"]
    assert world.uow.committed == [] and world.store.shipments == {}


async def test_an_order_submitted_records_its_centres_region_and_plans_nothing(world: World) -> None:
    order = Order()
    await world.deliver(
        OrderSubmittedV1(
            **order.refs,
            product_code="TISA-CEL",
            order_type="commercial",
            regulator="EMA",
            country="DE",
            region="europe",
            requested_apheresis_date=date(2030, 5, 18),
        )
    )
    assert world.inbox.ignored == []
    assert world.store.regions[TC][:2] == ("centre", "europe")
    assert world.uow.committed == [] and world.store.shipments == {}


# ---- milestones ------------------------------------------------------------------------------------


async def test_milestones_in_order_record_custody_and_move_the_shipment(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    for name in ("booked", "picked_up", "in_transit", "in_transit", "delivered"):
        result = await world.milestone(ship, name)
        assert result["status"] == name and result["milestone"] == name
        assert result["temperature_in_range"] is None and result["excursion_published"] is False
    assert world.status(ship) == "delivered"
    custody = await queries.custody_log(world.uow, ship.shipment_id)
    assert [(c.milestone, c.handled_by, c.coi_verified) for c in custody] == [
        ("booked", "courier-42", True),
        ("picked_up", "courier-42", True),
        ("in_transit", "courier-42", True),
        ("in_transit", "courier-42", True),
        ("delivered", "courier-42", True),
    ]
    milestones = world.events(MILESTONE)
    assert [e.data["milestone"] for e in milestones] == [
        "booked",
        "picked_up",
        "in_transit",
        "in_transit",
        "delivered",
    ]
    assert all(e.data["shipment_id"] == str(ship.shipment_id) for e in milestones)
    assert milestones[0].data["treatment_center_id"] == TC and milestones[0].data["location"] == "FRA"
    found, history = await queries.shipment(world.uow, ship.shipment_id)
    assert found.status == "delivered" and found.status_reason == "milestone:delivered"
    assert [(h.status_before, h.status_after) for h in history] == [
        (None, "planned"),
        ("planned", "booked"),
        ("booked", "picked_up"),
        ("picked_up", "in_transit"),
        ("in_transit", "delivered"),
    ]


async def test_a_milestone_out_of_order_is_refused_and_writes_nothing(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    await world.milestone(ship, "in_transit")
    committed = len(world.uow.committed)
    with pytest.raises(Invalid) as refused:
        await world.milestone(ship, "picked_up")
    assert status_of(refused.value) == 422
    assert [e.as_dict() for e in refused.value.errors] == [
        {"field": "milestone", "reason": "shipment is already in_transit; cannot go back to picked_up"}
    ]
    assert world.status(ship) == "in_transit"
    assert len(world.store.custody) == 1
    assert len(world.uow.committed) == committed
    assert world.uow.rollbacks == 1


async def test_a_halted_shipment_refuses_milestones_with_a_shipment_state_conflict(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.breach(ship, -120.0)  # excursion beyond the tolerance: compromised
    assert world.status(ship) == "compromised"
    custody = len(world.store.custody)
    with pytest.raises(Conflict) as refused:
        await world.milestone(ship, "in_transit")
    error = refused.value
    assert status_of(error) == 409 and error.kind == "shipment-state"
    assert error.title == "Shipment cannot take this input"
    assert error.detail == "milestone: shipment is compromised: no further milestones"
    assert len(world.store.custody) == custody  # only the pickup


async def test_an_unknown_shipment_is_not_found(world: World) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFound) as nf:
        await commands.record_milestone(
            world.uow,
            missing,
            milestone="picked_up",
            occurred_at=NOW,
            location="FRA",
            handled_by="c",
            received_from=None,
            coi=Order().coi,
            temperature_c=None,
        )
    assert status_of(nf.value) == 404 and nf.value.title == "Shipment not found"
    with pytest.raises(NotFound):
        await commands.record_temperature(world.uow, missing, reading_c=1.0, measured_at=NOW)
    with pytest.raises(NotFound):
        await queries.shipment(world.uow, missing)
    with pytest.raises(NotFound):
        await queries.temperature_log(world.uow, missing)
    with pytest.raises(NotFound):  # was an empty chain: a 404 now, as another carrier's shipment gets
        await queries.custody_log(world.uow, missing)


# ---- chain of identity -----------------------------------------------------------------------------


async def test_coi_mismatch_is_refused_but_stops_the_shipment_and_records_the_alert(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    await world.milestone(ship, "picked_up")
    with pytest.raises(CoiMismatch) as refused:
        await commands.record_milestone(
            world.uow,
            ship.shipment_id,
            milestone="in_transit",
            occurred_at=NOW,
            location="HUB-CDG",
            handled_by="courier-42",
            received_from=None,
            coi=other_coi(),
            temperature_c=None,
        )
    error = refused.value
    assert (
        status_of(error) == 409
        and error.kind == "coi-mismatch"
        and error.title == "Chain of identity mismatch"
    )
    assert error.detail == "coi: does not match the shipment's chain of identity; the handoff is refused"
    assert [e.as_dict() for e in error.errors] == [{"field": "coi", "reason": "does not match the shipment"}]

    [alert] = world.events(MISMATCH)
    assert alert.data == {
        "order_id": str(order.order_id),
        "coi": order.coi,  # the shipment's own COI, never the one presented
        "treatment_center_id": TC,
        "shipment_id": str(ship.shipment_id),
        "where": "HUB-CDG",
        "identifier": "coi",
    }
    stored = world.store.shipments[ship.shipment_id]
    assert stored.status == "stopped" and stored.held_from_status == "picked_up"
    assert len(world.store.custody) == 1  # only the pickup: the refused handoff is not custody

    # stopped: even the right COI is refused now, and nothing more is written
    with pytest.raises(Conflict) as again:
        await world.milestone(ship, "in_transit")
    assert "stopped" in again.value.detail
    assert world.uow.types()[-1] == MISMATCH


async def test_a_reading_with_another_orders_coi_is_a_mismatch_too(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.milestone(ship, "picked_up")
    with pytest.raises(CoiMismatch):
        await world.reading(ship, -170.0, coi=other_coi())
    assert world.status(ship) == "stopped"
    [alert] = world.events(MISMATCH)
    assert alert.data["where"] == commands.TEMPERATURE_WHERE
    assert world.store.readings == []
    # the stopped shipment still logs temperature (right COI, or none)
    assert (await world.reading(ship, -171.0, coi=order.coi))["shipment_status"] == "stopped"


async def test_a_coi_with_a_wrong_check_character_is_invalid_and_writes_nothing(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    broken = order.coi[:-1] + ("A" if order.coi[-1] != "A" else "B")
    with pytest.raises(Invalid) as refused:
        await world.milestone(ship, "picked_up", coi=broken)
    assert refused.value.errors[0].field == "coi" and status_of(refused.value) == 422
    with pytest.raises(Invalid):
        await world.reading(ship, -170.0, coi=broken)
    assert world.status(ship) == "planned" and world.uow.types() == [PLANNED]


# ---- temperature -----------------------------------------------------------------------------------


async def test_a_reading_in_range_is_recorded_without_an_event(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.milestone(ship, "picked_up")
    result = await world.reading(ship, -175.5, coi=order.coi)
    assert result["in_range"] is True and result["excursion_published"] is False
    assert (result["min_c"], result["max_c"], result["shipment_status"]) == (-196.0, -150.0, "picked_up")
    assert (result["source"], result["minutes_outside"], result["excursion_tolerance_min"]) == (
        "courier",
        0.0,
        10.0,
    )
    assert world.uow.types() == [PLANNED, MILESTONE]
    [reading] = await queries.temperature_log(world.uow, ship.shipment_id)
    assert (reading.reading_c, reading.in_range, reading.source, reading.coi_verified) == (
        -175.5,
        True,
        "courier",
        True,
    )


async def test_a_short_excursion_is_recorded_and_holds_nothing(world: World) -> None:
    """Outside the limit for less than the tolerance (10 min, the seed's outbound default), in all: every
    reading recorded with its place against the limit; no event, the shipment goes on."""
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.milestone(ship, "picked_up")
    assert (await world.reading(ship, -140.0, minutes=10))["minutes_outside"] == 0.0  # not yet known
    back = await world.reading(ship, -170.0, minutes=14)  # 4 minutes outside
    again = await world.reading(ship, -145.0, minutes=30)
    last = await world.reading(ship, -180.0, minutes=35)  # 4 + 5 = 9 minutes in all: within 10
    assert (back["in_range"], back["minutes_outside"]) == (True, 4.0)
    assert (again["in_range"], again["minutes_outside"]) == (False, 4.0)
    assert last["minutes_outside"] == 9.0 and last["excursion_published"] is False
    assert world.status(ship) == "picked_up"
    assert world.events(EXCURSION) == []
    readings = await queries.temperature_log(world.uow, ship.shipment_id)
    assert [(r.reading_c, r.in_range) for r in readings] == [
        (-140.0, False),
        (-170.0, True),
        (-145.0, False),
        (-180.0, True),
    ]
    assert (await world.milestone(ship, "delivered", minutes=60))["status"] == "delivered"


async def test_an_excursion_beyond_the_tolerance_compromises_and_is_published_once(world: World) -> None:
    """Cumulative: two warm spells of 6 minutes each exceed the 10-minute tolerance together."""
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.milestone(ship, "picked_up")
    await world.reading(ship, -140.0, minutes=60)
    first = await world.reading(ship, -175.0, minutes=66)
    assert first["excursion_published"] is False and first["shipment_status"] == "picked_up"
    await world.reading(ship, -90.0, minutes=70)
    breach = await world.reading(ship, -178.0, minutes=76)  # 12 minutes in all
    assert breach["in_range"] is True and breach["excursion_published"] is True
    assert breach["shipment_status"] == "compromised" and breach["minutes_outside"] == 12.0
    again = await world.reading(ship, -90.0, minutes=90)
    assert again["in_range"] is False and again["excursion_published"] is False

    [excursion] = world.events(EXCURSION)
    assert excursion.data["shipment_id"] == str(ship.shipment_id)
    assert excursion.data["leg"] == "outbound_product"
    assert (excursion.data["reading_c"], excursion.data["min_c"], excursion.data["max_c"]) == (
        -90.0,  # the reading furthest outside the limit
        -196.0,
        -150.0,
    )
    assert excursion.data["duration_min"] == 12.0
    assert excursion.data["measured_at"] == (NOW + timedelta(minutes=60)).isoformat().replace("+00:00", "Z")
    assert excursion.data["treatment_center_id"] == TC and excursion.coi == order.coi
    stored = world.store.shipments[ship.shipment_id]
    assert stored.status == "compromised" and stored.held_from_status == "picked_up"
    assert stored.excursion_at == NOW + timedelta(minutes=60)  # when the time outside began
    assert stored.excursion_minutes == 12.0
    readings = await queries.temperature_log(world.uow, ship.shipment_id)
    assert [(r.reading_c, r.in_range, r.coi_verified) for r in readings] == [
        (-140.0, False, False),
        (-175.0, True, False),
        (-90.0, False, False),
        (-178.0, True, False),
        (-90.0, False, False),
    ]


async def test_the_products_label_limit_and_tolerance_decide(world: World) -> None:
    """Cilta-cel's label allows storage at or below -120 °C: -130 °C is inside ITS limit (outside the
    seed's -150 °C default), so an hour there is no excursion."""
    order = Order()
    await world.deliver(booking_confirmed(order, product_code="CILTA-CEL"))  # logistics learns the product
    ship = await world.planned(order, "outbound_product")
    limit = product_catalogue()["CILTA-CEL"].shipping
    assert limit is not None
    assert (ship.min_temp_c, ship.max_temp_c) == (limit.outbound.min_c, limit.outbound.max_c) == (-196, -120)
    assert ship.excursion_tolerance_min == limit.outbound.excursion_tolerance_min
    assert ship.product_code == "CILTA-CEL"
    await world.milestone(ship, "picked_up")
    await world.reading(ship, -130.0, minutes=1)
    result = await world.reading(ship, -130.0, minutes=61)
    assert result["in_range"] is True and result["excursion_published"] is False
    assert world.events(EXCURSION) == []


async def test_a_reading_before_pickup_is_refused_naming_the_field(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    await world.deliver(ApheresisCompletedV1(**order.refs, collected_at=NOW))
    await world.milestone(ship, "booked")
    with pytest.raises(Conflict) as refused:
        await world.reading(ship, 30.0)
    assert status_of(refused.value) == 409 and refused.value.kind == "shipment-state"
    assert [e.field for e in refused.value.errors] == ["measured_at"]
    assert "not picked up yet" in refused.value.errors[0].reason
    # nor may `booked` carry one
    with pytest.raises(Invalid) as carried:
        await world.milestone(ship, "booked", temperature_c=-180.0)
    assert [e.field for e in carried.value.errors] == ["temperature_c"]
    await world.milestone(ship, "picked_up", minutes=10)
    with pytest.raises(Invalid) as earlier:  # picked up now, but measured before that
        await world.reading(ship, -180.0, minutes=5)
    assert status_of(earlier.value) == 422 and [e.field for e in earlier.value.errors] == ["measured_at"]
    assert world.store.readings == [] and world.events(EXCURSION) == []
    assert world.status(ship) == "picked_up"


async def test_a_logger_download_after_delivery_is_accepted_and_judged(world: World) -> None:
    """The logger's data read at the centre after delivery: only then, only measured in transit; it may
    reveal an excursion the live readings missed (the delivered shipment is then compromised)."""
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.milestone(ship, "picked_up")
    with pytest.raises(Conflict) as early:
        await world.reading(ship, -170.0, minutes=5, download=True)
    assert [e.field for e in early.value.errors] == ["source"]
    await world.milestone(ship, "delivered", minutes=120)
    for minutes in (-5, 125):  # before pickup, after delivery
        with pytest.raises(Invalid) as outside:
            await world.reading(ship, -170.0, minutes=minutes, download=True)
        assert [e.field for e in outside.value.errors] == ["measured_at"]
    assert world.store.readings == []
    await world.reading(ship, -170.0, minutes=10, download=True)
    await world.reading(ship, -130.0, minutes=40, download=True)
    last = await world.reading(ship, -131.0, minutes=100, download=True)  # 60 minutes outside
    assert last["source"] == "logger_download" and last["minutes_outside"] == 60.0
    assert last["excursion_published"] is True and last["shipment_status"] == "compromised"
    [excursion] = world.events(EXCURSION)
    assert excursion.data["duration_min"] == 60.0
    stored = world.store.shipments[ship.shipment_id]
    assert stored.held_from_status == "delivered" and stored.delivered_at == NOW + timedelta(minutes=120)
    assert {r.source for r in world.store.readings} == {"logger_download"}
    # a live reading after delivery stays refused
    with pytest.raises(Conflict):
        await world.reading(ship, -170.0, minutes=121)


async def test_a_reading_carried_by_a_milestone_gets_the_same_check(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")  # TISA-CEL: cryopreserved at the centre
    ok = await world.milestone(ship, "picked_up", temperature_c=-180.0)
    assert ok["status"] == "picked_up" and ok["temperature_in_range"] is True
    warm = await world.milestone(ship, "in_transit", temperature_c=-100.0, minutes=5)
    assert warm["status"] == "in_transit" and warm["temperature_in_range"] is False
    assert warm["excursion_published"] is False  # outside the limit, not (yet) for long
    bad = await world.reading(ship, -100.0, minutes=25)  # 20 minutes outside: beyond 10
    assert bad["shipment_status"] == "compromised" and bad["excursion_published"] is True
    assert world.uow.types() == [PLANNED, MILESTONE, MILESTONE, EXCURSION]
    assert [(r.source, r.in_range, r.custody_event_id) for r in world.store.readings] == [
        ("milestone", True, ok["custody_event_id"]),
        ("milestone", False, warm["custody_event_id"]),
        ("courier", False, None),
    ]


async def test_readings_after_delivery_are_refused(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.milestone(ship, "delivered")
    with pytest.raises(Conflict) as refused:
        await world.reading(ship, -170.0)
    assert status_of(refused.value) == 409 and refused.value.kind == "shipment-state"
    assert [e.as_dict() for e in refused.value.errors] == [
        {"field": "shipment_id", "reason": "shipment is delivered: no further temperature readings"}
    ]
    assert world.store.readings == []


# ---- compensation and order facts ------------------------------------------------------------------


async def test_order_cancelled_cancels_every_shipment_not_yet_delivered_and_plans_nothing_after(
    world: World,
) -> None:
    order = Order()
    inbound = await world.planned(order, "inbound_apheresis")
    await world.milestone(inbound, "delivered")
    outbound = await world.planned(order, "outbound_product")
    await world.milestone(outbound, "picked_up")
    bystander = Order()
    other = await world.planned(bystander, "inbound_apheresis")

    await world.deliver(
        OrderCancelledV1(**order.refs, reason="consent_withdrawn", previous_status="product_in_transit")
    )
    assert world.status(inbound) == "delivered"
    assert world.status(outbound) == "cancelled"
    assert world.status(other) == "planned"
    [cancel] = world.events(CANCELLED)
    assert cancel.data["shipment_id"] == str(outbound.shipment_id)
    assert cancel.data["leg"] == "outbound_product"
    assert cancel.data["reason"] == "order_cancelled:consent_withdrawn"
    assert cancel.data["treatment_center_id"] == TC
    assert world.store.ended_orders[order.order_id] == ("cancelled", "order_cancelled:consent_withdrawn")

    # a second cancellation (another event) has nothing left to cancel
    await world.deliver(OrderCancelledV1(**order.refs, reason="again", previous_status="cancelled"))
    assert len(world.events(CANCELLED)) == 1
    # a late fact from another topic (crossing the cancellation) plans nothing for the ended order
    await world.deliver(product_released(order, run=2), booking_confirmed(order))
    assert len(world.ships(order)) == 2


async def test_order_failed_cancels_a_stopped_shipment_too(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    with pytest.raises(CoiMismatch):
        await world.milestone(ship, "picked_up", coi=other_coi())
    assert world.status(ship) == "stopped"
    await world.deliver(OrderFailedV1(**order.refs, reason="no_material_left"))
    assert world.status(ship) == "cancelled"
    [cancel] = world.events(CANCELLED)
    assert cancel.data["reason"] == "order_failed:no_material_left"
    assert [(h.status_before, h.status_after) for h in await _history(world, ship)] == [
        (None, "planned"),
        ("planned", "stopped"),
        ("stopped", "cancelled"),
    ]


async def test_a_failing_compensation_commits_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    order = Order()
    await world.planned(order, "inbound_apheresis")
    await world.planned(order, "outbound_product")
    committed = len(world.uow.committed)
    real_publish = LogisticsTx.publish
    calls = 0

    async def flaky(self: LogisticsTx, data: EventData) -> CloudEvent:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("broker-bound write failed")
        return await real_publish(self, data)

    monkeypatch.setattr(LogisticsTx, "publish", flaky)
    with pytest.raises(RuntimeError):
        await world.deliver(OrderCancelledV1(**order.refs, reason="x", previous_status="released"))
    assert {s.status for s in world.ships(order)} == {"planned"}
    assert len(world.uow.committed) == committed and world.store.ended_orders == {}
    monkeypatch.undo()
    await world.deliver(OrderCancelledV1(**order.refs, reason="x", previous_status="released"))
    assert {s.status for s in world.ships(order)} == {"cancelled"}
    assert len(world.events(CANCELLED)) == 2


async def test_booking_cancelled_cancels_the_inbound_shipment_only_before_pickup(world: World) -> None:
    order = Order()
    booking_id = uuid.uuid4()
    await world.deliver(booking_confirmed(order, booking_id))
    [ship] = world.ships(order)

    def cancelled(bid: uuid.UUID) -> BookingCancelledV1:
        return BookingCancelledV1(
            **order.refs, booking_id=bid, slot_id=uuid.uuid4(), site_id=SITE, reason="reschedule"
        )

    await world.deliver(cancelled(uuid.uuid4()))  # another booking of the order: not this shipment's
    assert world.status(ship) == "planned"
    await world.deliver(ApheresisCompletedV1(**order.refs, collected_at=NOW))
    assert world.status(ship) == "ready_for_pickup"
    await world.deliver(cancelled(booking_id))
    assert world.status(ship) == "cancelled"
    [cancel] = world.events(CANCELLED)
    assert cancel.data["leg"] == "inbound_apheresis"
    assert cancel.data["reason"] == "booking_cancelled:reschedule"

    new_booking = uuid.uuid4()
    await world.deliver(booking_confirmed(order, new_booking))
    [live] = [s for s in world.ships(order) if s.status != "cancelled"]
    assert live.booking_id == new_booking
    await world.milestone(live, "picked_up")
    await world.deliver(cancelled(new_booking))  # past pickup: kept
    assert world.status(live) == "picked_up"
    assert len(world.events(CANCELLED)) == 1


async def test_apheresis_completed_makes_the_inbound_shipment_ready_for_pickup(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    await world.deliver(ApheresisCompletedV1(**order.refs, collected_at=NOW))
    stored = world.store.shipments[ship.shipment_id]
    assert stored.status == "ready_for_pickup" and stored.ready_for_pickup_at == NOW
    assert world.uow.types() == [PLANNED]  # status only, no event
    assert (await world.milestone(ship, "booked"))["status"] == "booked"
    await world.deliver(ApheresisCompletedV1(**order.refs, collected_at=NOW))  # again: stays booked
    assert world.status(ship) == "booked"
    await world.deliver(ApheresisCompletedV1(**Order().refs, collected_at=NOW))  # unknown order: ignored


# ---- quarantine ------------------------------------------------------------------------------------


async def test_quarantine_release_resumes_the_compromised_outbound_shipment(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.milestone(ship, "in_transit")
    await world.breach(ship, -149.0)
    assert world.status(ship) == "compromised"
    await world.deliver(QuarantineDecidedV1(**order.refs, decision="release", reason="within_stability_data"))
    stored = world.store.shipments[ship.shipment_id]
    assert stored.status == "in_transit" and stored.quarantine_decision == "release"
    # QA's reason code goes along with the decision
    assert stored.status_reason == "quarantine_release:within_stability_data"
    assert (await world.milestone(ship, "delivered"))["status"] == "delivered"
    assert len(world.events(EXCURSION)) == 1  # published once for this shipment


async def test_quarantine_reject_keeps_it_compromised_and_a_remanufactured_product_gets_a_new_leg(
    world: World,
) -> None:
    order = Order()
    first = await world.planned(order, "outbound_product")
    await world.breach(first, -120.0)
    await world.deliver(QuarantineDecidedV1(**order.refs, decision="reject", reason="excursion"))
    stored = world.store.shipments[first.shipment_id]
    assert stored.status == "compromised" and stored.quarantine_decision == "reject"
    await world.deliver(product_released(order, run=2))
    ships = world.ships(order)
    assert [(s.run, s.status) for s in ships] == [(1, "compromised"), (2, "planned")]
    assert [e.data["shipment_id"] for e in world.events(PLANNED)] == [str(s.shipment_id) for s in ships]


async def test_quarantine_release_does_not_resume_when_another_shipment_took_the_lane(world: World) -> None:
    order = Order()
    first = await world.planned(order, "outbound_product")
    await world.milestone(first, "in_transit")
    await world.breach(first, -120.0)
    await world.deliver(product_released(order, run=2))  # the lane is free: a replacement is planned
    await world.deliver(QuarantineDecidedV1(**order.refs, decision="release", reason="assessed_acceptable"))
    stored = world.store.shipments[first.shipment_id]
    assert stored.status == "compromised" and stored.quarantine_decision == "release"
    assert [s.status for s in world.ships(order)] == ["compromised", "planned"]


async def test_quarantine_decided_without_a_compromised_shipment_changes_nothing(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.deliver(QuarantineDecidedV1(**order.refs, decision="release", reason="other"))
    assert world.store.shipments[ship.shipment_id].quarantine_decision is None
    assert world.uow.types() == [PLANNED]


# ---- identity pairs: COI + DIN inbound, COI + lot outbound --------------------------------------------


async def test_the_inbound_handoffs_check_coi_and_the_collections_din(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    din = make_coi("V2V01", 30, 777_001)
    await world.deliver(ApheresisCompletedV1(**order.refs, collected_at=NOW, din=din, collection=1))
    assert world.store.shipments[ship.shipment_id].din == din
    # known now: a handoff without it is refused naming `din`, and writes nothing
    with pytest.raises(Invalid) as missing:
        await world.milestone(ship, "picked_up")
    assert [e.field for e in missing.value.errors] == ["din"] and status_of(missing.value) == 422
    with pytest.raises(Invalid) as wrong_kind:  # a lot is not on an inbound bag's label
        await world.milestone(ship, "picked_up", din=din, lot="LOT-2030-0001")
    assert [e.field for e in wrong_kind.value.errors] == ["lot"]
    assert world.store.custody == []
    ok = await world.milestone(ship, "picked_up", din=din)
    assert ok["pair_verified"] is True
    [custody] = world.store.custody
    assert (custody.din, custody.lot, custody.pair_verified, custody.coi_verified) == (din, None, True, True)

    # another collection's bag: a mismatch exactly as a COI mismatch (stop, alert, 409 naming `din`)
    other_din = make_coi("V2V01", 30, 777_002)
    with pytest.raises(CoiMismatch) as refused:
        await world.milestone(ship, "in_transit", din=other_din, minutes=5)
    assert status_of(refused.value) == 409 and refused.value.kind == "coi-mismatch"
    assert [e.as_dict() for e in refused.value.errors] == [
        {"field": "din", "reason": "does not match the shipment"}
    ]
    assert other_din not in refused.value.detail
    [alert] = world.events(MISMATCH)
    assert alert.data["identifier"] == "din" and alert.data["coi"] == order.coi
    assert world.status(ship) == "stopped"
    assert len(world.store.custody) == 1


async def test_a_din_with_a_wrong_check_character_is_invalid(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    din = make_coi("V2V01", 30, 777_003)
    broken = din[:-1] + ("A" if din[-1] != "A" else "B")
    with pytest.raises(Invalid) as refused:
        await world.milestone(ship, "picked_up", din=broken)
    assert [e.field for e in refused.value.errors] == ["din"]
    assert world.store.custody == []


async def test_a_din_not_known_yet_is_recorded_unverified_never_guessed(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    await world.deliver(ApheresisCompletedV1(**order.refs, collected_at=NOW))  # an older order service
    din = make_coi("V2V01", 30, 777_004)
    ok = await world.milestone(ship, "picked_up", din=din)
    assert ok["pair_verified"] is False
    assert world.store.shipments[ship.shipment_id].din is None  # not learnt from a courier
    assert (await world.milestone(ship, "in_transit", minutes=1))["status"] == "in_transit"  # nor required
    assert [c.din for c in world.store.custody] == [din, None]


async def test_the_outbound_handoffs_check_coi_and_the_runs_lot(world: World) -> None:
    order = Order()
    await world.deliver(product_released(order, lot="LOT-DE-2030-0007"))
    [ship] = world.ships(order)
    assert ship.lot == "LOT-DE-2030-0007"
    with pytest.raises(Invalid) as missing:
        await world.milestone(ship, "picked_up")
    assert [e.field for e in missing.value.errors] == ["lot"]
    with pytest.raises(Invalid) as wrong_kind:
        await world.milestone(ship, "picked_up", lot="LOT-DE-2030-0007", din=make_coi("V2V01", 30, 1))
    assert [e.field for e in wrong_kind.value.errors] == ["din"]
    assert (await world.milestone(ship, "picked_up", lot="LOT-DE-2030-0007"))["pair_verified"] is True
    with pytest.raises(CoiMismatch) as refused:
        await world.milestone(ship, "delivered", lot="LOT-DE-2030-0008", minutes=60)
    assert refused.value.errors[0].field == "lot"
    [alert] = world.events(MISMATCH)
    assert alert.data["identifier"] == "lot"
    assert world.status(ship) == "stopped"


# ---- QA's disposition of an excursion (order.disposition_decided) ----------------------------------


async def test_an_excursion_release_lets_the_shipment_go_on(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis", "AXI-CEL")  # fresh, 2-8 °C, 30 minutes
    await world.breach(ship, 14.0)
    assert world.status(ship) == "compromised"
    await world.deliver(disposition(order, "release", ship))
    stored = world.store.shipments[ship.shipment_id]
    assert stored.status == "picked_up" and stored.quarantine_decision == "release"
    assert stored.status_reason == "disposition_release:within_stability_data"
    assert (await world.milestone(ship, "delivered", minutes=90))["status"] == "delivered"
    assert len(world.events(EXCURSION)) == 1
    trail = [r for r in world.store.audit if r.reason == "disposition_release:within_stability_data"]
    assert [(r.action, r.old, r.new["status"]) for r in trail] == [  # type: ignore[index, call-overload]
        ("shipment.status_changed", {"status": "compromised"}, "picked_up")
    ]


async def test_an_excursion_reject_keeps_it_compromised_and_frees_the_lane(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis", "AXI-CEL")
    await world.breach(ship, 14.0)
    await world.deliver(disposition(order, "reject"))  # no shipment named: the newest compromised
    stored = world.store.shipments[ship.shipment_id]
    assert stored.status == "compromised" and stored.quarantine_decision == "reject"
    await world.deliver(booking_confirmed(order, product_code="AXI-CEL"))  # the recollection's booking
    assert [s.status for s in world.ships(order)] == ["compromised", "planned"]


async def test_dispositions_that_concern_no_compromised_shipment_change_nothing(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "outbound_product")
    await world.deliver(
        disposition(order, "release_on_physician_request", cause="out_of_specification"),
        disposition(order, "release_on_physician_request", ship),  # not an excursion outcome
    )
    assert world.store.shipments[ship.shipment_id].quarantine_decision is None
    await world.deliver(disposition(order, "release", ship))  # never stopped: recorded, nothing to resume
    stored = world.store.shipments[ship.shipment_id]
    assert stored.status == "planned" and stored.quarantine_decision == "release"
    assert world.uow.types() == [PLANNED]


# ---- reads -----------------------------------------------------------------------------------------


async def test_shipments_are_listed_per_order_oldest_first(world: World) -> None:
    order = Order()
    inbound = await world.planned(order, "inbound_apheresis")
    outbound = await world.planned(order, "outbound_product")
    await world.planned(Order(), "inbound_apheresis")
    listed = await queries.shipments(world.uow, order.order_id)
    assert [s.shipment_id for s in listed] == [inbound.shipment_id, outbound.shipment_id]
    assert len(await queries.shipments(world.uow, None)) == 3


async def _history(world: World, ship: Shipment) -> list[Any]:
    _, history = await queries.shipment(world.uow, ship.shipment_id)
    return history


# ---- the audit trail ---------------------------------------------------------------------------------


async def test_shipments_custody_readings_and_cancellations_are_audited_with_codes_only(world: World) -> None:
    """Planning by the consumer (the event as cause), a custody milestone and temperature readings through
    the courier commands, an excursion and the order's cancellation: each change in the trail with its
    old and new status and a reason code; opaque references only; one intact chain."""
    from v2v_audit import Actor, verify

    order = Order()
    booking = booking_confirmed(order, product_code="AXI-CEL")  # fresh: 2-8 °C
    await world.deliver(booking)
    [ship] = world.ships(order)
    await world.milestone(ship, "picked_up")
    await world.reading(ship, 5.0, minutes=1)
    await world.reading(ship, 12.0, minutes=2)  # outside the limit: recorded, nothing held yet
    await world.reading(ship, 12.5, minutes=40)  # 38 minutes outside, beyond 30: compromised
    await world.deliver(
        OrderCancelledV1(**order.refs, reason="consent_withdrawn", previous_status="material_in_transit")
    )

    trail = world.store.audit
    assert [(r.action, r.object_type, r.reason) for r in trail] == [
        ("shipment.planned", "shipment", "booking_confirmed"),
        ("custody.recorded", "shipment", "picked_up"),
        ("shipment.status_changed", "shipment", "milestone:picked_up"),
        ("reading.recorded", "shipment", "in_range"),
        ("reading.recorded", "shipment", "out_of_range"),
        ("reading.recorded", "shipment", "out_of_range"),
        ("shipment.status_changed", "shipment", "temperature_excursion"),
        ("order.ended", "order", "order_cancelled:consent_withdrawn"),
        ("shipment.status_changed", "shipment", "order_cancelled:consent_withdrawn"),
    ]
    planned = trail[0]
    assert planned.actor == Actor.system("logistics.shipments") and planned.cause == f"event:{booking.id}"
    assert trail[2].old == {"status": "planned"} and trail[2].new["status"] == "picked_up"  # type: ignore[index, call-overload]
    assert trail[6].new["status"] == "compromised"  # type: ignore[index, call-overload]
    assert trail[6].new["excursion_minutes"] == 38.0  # type: ignore[index, call-overload]
    assert trail[8].old == {"status": "compromised"} and trail[8].new["status"] == "cancelled"  # type: ignore[index, call-overload]
    assert trail[1].new["handled_by"] == "courier-42" and trail[4].new["reading_c"] == 12.0  # type: ignore[index, call-overload]
    assert trail[5].new["minutes_outside"] == 38.0 and trail[5].new["excursion_tolerance_min"] == 30  # type: ignore[index, call-overload]
    assert all(r.object_id == str(ship.shipment_id) for r in trail[:7])
    assert verify("logistics", trail).broken is None


async def test_a_refused_milestone_writes_no_audit_entry(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    await world.milestone(ship, "picked_up")
    before = list(world.store.audit)
    with pytest.raises((Conflict, Invalid)):
        await world.milestone(ship, "booked")  # a milestone never goes back
    assert world.store.audit == before


# ---- issue 11: an outage moves the order's booking while its material is on its way --------------------


@pytest.mark.parametrize("picked_up", [False, True])
async def test_collected_material_is_rerouted_to_the_new_site_not_cancelled(
    world: World, picked_up: bool
) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    din = make_coi("V2V01", 30, 777_000 + next(_seq) % 999)
    await world.deliver(ApheresisCompletedV1(**order.refs, collected_at=NOW, din=din, collection=1))
    if picked_up:
        await world.milestone(ship, "picked_up", din=din)
    before = world.status(ship)
    # the old site drops the booking (its slot moved): the material exists, so the shipment is kept
    await world.deliver(
        BookingCancelledV1(
            **order.refs,
            booking_id=ship.booking_id,
            slot_id=uuid.uuid4(),
            site_id=SITE,
            reason="outage:maintenance",
        )
    )
    assert world.status(ship) == before and world.events("logistics.shipment_cancelled.v1") == []
    # the new site's booking: the same shipment goes there, in the status it had (no second inbound leg)
    new_booking = uuid.uuid4()
    confirmed = booking_confirmed(order, new_booking)
    confirmed.data["site_id"] = "FR-LES-ULIS"
    await world.deliver(confirmed)
    [only] = world.ships(order, "inbound_apheresis")
    assert (only.shipment_id, only.destination, only.booking_id, only.status) == (
        ship.shipment_id,
        "FR-LES-ULIS",
        new_booking,
        before,
    )
    [rerouted] = world.events("logistics.shipment_rerouted.v1")
    assert (rerouted.data["previous_destination"], rerouted.data["destination"], rerouted.data["status"]) == (
        SITE,
        "FR-LES-ULIS",
        before,
    )
    assert world.store.status_log[-1][1].reason == "rerouted"
    # the courier carries on to the new site
    if not picked_up:
        await world.milestone(ship, "picked_up", din=din)
    await world.milestone(ship, "delivered", din=din, minutes=60)
    assert world.status(ship) == "delivered"


async def test_material_not_collected_yet_is_cancelled_with_its_booking_as_before(world: World) -> None:
    order = Order()
    ship = await world.planned(order, "inbound_apheresis")
    await world.deliver(
        BookingCancelledV1(
            **order.refs,
            booking_id=ship.booking_id,
            slot_id=uuid.uuid4(),
            site_id=SITE,
            reason="outage:maintenance",
        )
    )
    assert world.status(ship) == "cancelled"
