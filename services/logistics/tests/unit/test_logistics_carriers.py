"""Carriers: the seed's shape (the harness provisions one client per `carriers[*].id`), the deterministic
choice of a leg's carrier, the carrier stored on the shipment and carried by `shipment_planned`, and
reason codes (never free text) in everything logistics records and publishes."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import yaml

from logistics_service.adapters.memory import MemoryStore, fake_uow
from logistics_service.adapters.repository import LogisticsTx
from logistics_service.config import SEED_FILE, load_shipping_lanes
from logistics_service.domain.carriers import Carrier, Carriers, Tenant
from logistics_service.domain.shipment import Shipment, reason_code
from logistics_service.service_layer import commands
from logistics_service.service_layer.handlers import build_handlers
from v2v_contracts import (
    BookingCancelledV1,
    BookingConfirmedV1,
    CloudEvent,
    EventData,
    OrderCancelledV1,
    OrderFailedV1,
    OrderSubmittedV1,
    ProductReleasedV1,
    QuarantineDecidedV1,
    SiteRegisteredV1,
    new_event,
)
from v2v_contracts.coi import make_coi
from v2v_contracts.fields import CODE_PATTERN, REASON_CODE_PATTERN
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork
from v2v_messaging.handlers import PoisonMessage

LANES = load_shipping_lanes()
HANDLERS = build_handlers(LANES)
NETWORK_REGIONS = {"north_america", "europe", "asia_pacific"}  # as sites.yaml and treatment_centers.yaml
NOW = datetime.now(UTC).replace(microsecond=0)
_seq = iter(range(1, 999_999))

SITES = {"DE-LEIPZIG-IZI": "europe", "US-MORRIS-PLAINS": "north_america", "JP-KOBE": "asia_pacific"}
CENTRES = {"TC-DE-BE-001": "europe", "TC-US-NJ-001": "north_america", "TC-JP-TK-001": "asia_pacific"}


# ---- the seed --------------------------------------------------------------------------------------


def test_the_seed_lists_carriers_by_id_name_and_regions_of_the_network() -> None:
    seed = yaml.safe_load(SEED_FILE.read_text())
    carriers = seed["carriers"]  # the harness reads carriers[*].id to provision one client per carrier
    assert 2 <= len(carriers) <= 4
    ids = [c["id"] for c in carriers]
    assert len(set(ids)) == len(ids)
    for entry in carriers:
        assert set(entry) == {"id", "name", "regions"}
        assert re.fullmatch(CODE_PATTERN, entry["id"])
        assert isinstance(entry["name"], str) and entry["name"].strip()
        assert entry["regions"] and set(entry["regions"]) <= NETWORK_REGIONS
    assert LANES.carriers.ids() == ids
    # every region pair, cross-region too, has a carrier that serves both ends
    for a in NETWORK_REGIONS:
        for b in NETWORK_REGIONS:
            assert any(c.serves({a, b}) for c in LANES.carriers.carriers), (a, b)


@pytest.mark.parametrize(
    "entries",
    [
        [],
        [{"id": "A", "name": "a", "regions": ["europe"]}, {"id": "A", "name": "b", "regions": ["europe"]}],
        [{"id": "not a code", "name": "a", "regions": ["europe"]}],
        [{"id": "A", "name": "a", "regions": []}],
    ],
)
def test_a_broken_carrier_seed_is_refused_at_start_up(entries: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError):
        Carriers.from_seed(entries)


# ---- the choice ------------------------------------------------------------------------------------


def test_a_leg_within_a_region_goes_with_that_regions_specialist() -> None:
    for centre, region in CENTRES.items():
        site = next(s for s, r in SITES.items() if r == region)
        for origin, destination in ((centre, site), (site, centre)):
            carrier = LANES.carriers.for_lane(origin, destination, region, region)
            assert carrier.regions == {region}, (origin, destination)


def test_a_cross_region_leg_or_an_unknown_region_goes_with_the_broadest_carrier() -> None:
    carriers = LANES.carriers
    assert carriers.broadest.regions == NETWORK_REGIONS
    assert carriers.for_lane("TC-JP-TK-001", "DE-LEIPZIG-IZI", "asia_pacific", "europe") == carriers.broadest
    assert carriers.for_lane("TC-DE-BE-001", "DE-LEIPZIG-IZI", None, "europe") == carriers.broadest
    assert carriers.for_lane("TC-DE-BE-001", "DE-LEIPZIG-IZI", "europe", None) == carriers.broadest
    assert carriers.for_lane("X", "Y", "antarctica", "antarctica") == carriers.broadest  # nobody serves it


def test_the_choice_is_deterministic_and_spreads_lanes_over_equally_specialised_carriers() -> None:
    two = Carriers(
        (
            Carrier("EU-A", "a", frozenset({"europe"})),
            Carrier("EU-B", "b", frozenset({"europe"})),
            Carrier("WORLD", "w", frozenset({"europe", "asia_pacific"})),
        )
    )
    lanes = [(f"TC-{i}", f"SITE-{i % 7}") for i in range(200)]
    first = [two.for_lane(o, d, "europe", "europe").carrier_id for o, d in lanes]
    again = [
        Carriers(tuple(reversed(two.carriers))).for_lane(o, d, "europe", "europe").carrier_id
        for o, d in lanes
    ]
    assert first == again  # the same lane, the same carrier (whatever the seed order)
    spread = Counter(first)
    assert set(spread) == {"EU-A", "EU-B"} and min(spread.values()) > 50
    assert two.broadest.carrier_id == "WORLD"


def test_a_tenant_is_a_carrier_or_a_location_and_admits_only_its_shipments() -> None:
    with pytest.raises(ValueError):
        Tenant()
    with pytest.raises(ValueError):
        Tenant(carrier_id="A", location_id="B")
    ship = Shipment.plan(
        order_id=uuid.uuid4(),
        coi="V2V",
        leg="inbound_apheresis",
        origin="TC-1",
        destination="SITE-1",
        lane=LANES.outbound,
        pickup=date(2030, 1, 1),
        carrier_id="CRYO-EU",
        reason="booking_confirmed",
    )
    assert Tenant(carrier_id="CRYO-EU").admits(ship) and not Tenant(carrier_id="CRYO-NA").admits(ship)
    assert Tenant(location_id="TC-1").admits(ship) and Tenant(location_id="SITE-1").admits(ship)
    assert not Tenant(location_id="TC-2").admits(ship)


# ---- the shipment and its event --------------------------------------------------------------------


class World:
    def __init__(self) -> None:
        self.uow: FakeUnitOfWork[LogisticsTx]
        self.uow, self.store = fake_uow(MemoryStore())
        self.inbox = FakeInbox(self.uow, HANDLERS)

    async def deliver(self, *events: CloudEvent | EventData) -> None:
        await self.inbox.deliver(*(e if isinstance(e, CloudEvent) else new_event(e) for e in events))

    async def learn_network(self) -> None:
        for site, region in SITES.items():
            await self.deliver(site_registered(site, region))
        for centre, region in CENTRES.items():
            await self.deliver(order_submitted(Order(centre), region))

    def ships(self, order: Order) -> list[Shipment]:
        return [s for s in self.store.shipments.values() if s.order_id == order.order_id]


class Order:
    def __init__(self, centre: str = "TC-DE-BE-001") -> None:
        self.order_id = uuid.uuid4()
        self.coi = make_coi("V2V00", 30, next(_seq))
        self.centre = centre
        self.refs: dict[str, Any] = {
            "order_id": self.order_id,
            "coi": self.coi,
            "treatment_center_id": centre,
        }


def site_registered(site_id: str, region: str) -> SiteRegisteredV1:
    return SiteRegisteredV1(
        site_id=site_id,
        name=site_id,
        country=site_id[:2],
        region=region,
        timezone="UTC",
        operator="own",
        active=True,
        approvals=[],
        daily_capacity={},
    )


def order_submitted(order: Order, region: str) -> OrderSubmittedV1:
    return OrderSubmittedV1(
        **order.refs,
        product_code="TISA-CEL",
        order_type="commercial",
        regulator="EMA",
        country=order.centre[3:5],
        region=region,
        requested_apheresis_date=date(2030, 5, 18),
    )


def booking_confirmed(order: Order, site: str) -> BookingConfirmedV1:
    return BookingConfirmedV1(
        **order.refs,
        booking_id=uuid.uuid4(),
        slot_id=uuid.uuid4(),
        site_id=site,
        product_code="TISA-CEL",
        manufacturing_start_date=date(2030, 5, 20),
        apheresis_date=date(2030, 5, 18),
    )


def product_released(order: Order, site: str) -> ProductReleasedV1:
    return ProductReleasedV1(**order.refs, site_id=site, run=1, released_at=NOW)


@pytest.fixture
def world() -> World:
    return World()


@pytest.mark.parametrize(
    ("centre", "site", "expected"),
    [
        ("TC-DE-BE-001", "DE-LEIPZIG-IZI", "CRYO-EU"),
        ("TC-US-NJ-001", "US-MORRIS-PLAINS", "CRYO-NA"),
        ("TC-JP-TK-001", "JP-KOBE", "CRYO-APAC"),
        ("TC-JP-TK-001", "DE-LEIPZIG-IZI", "CGT-GLOBAL"),  # cross-region
    ],
)
async def test_both_legs_get_their_lanes_carrier_stored_and_in_the_planned_event(
    world: World, centre: str, site: str, expected: str
) -> None:
    await world.learn_network()
    order = Order(centre)
    await world.deliver(booking_confirmed(order, site), product_released(order, site))
    ships = world.ships(order)
    assert [(s.leg, s.carrier_id) for s in ships] == [
        ("inbound_apheresis", expected),
        ("outbound_product", expected),
    ]
    planned = [e for e in world.uow.committed if e.type == "logistics.shipment_planned.v1"]
    assert [(e.data["shipment_id"], e.data["carrier_id"]) for e in planned] == [
        (str(s.shipment_id), expected) for s in ships
    ]
    # the same lane again (another order): the same carrier
    again = Order(centre)
    await world.deliver(booking_confirmed(again, site))
    assert [s.carrier_id for s in world.ships(again)] == [expected]


async def test_without_the_regions_the_broadest_carrier_carries_and_keeps_the_leg(world: World) -> None:
    order = Order("TC-DE-BE-001")
    await world.deliver(booking_confirmed(order, "DE-LEIPZIG-IZI"))
    [ship] = world.ships(order)
    assert ship.carrier_id == LANES.carriers.broadest.carrier_id == "CGT-GLOBAL"
    await world.learn_network()  # learnt later: a planned shipment keeps its carrier
    assert world.store.shipments[ship.shipment_id].carrier_id == "CGT-GLOBAL"
    await world.deliver(booking_confirmed(Order("TC-DE-BE-001"), "DE-LEIPZIG-IZI"))
    assert [s.carrier_id for s in world.store.shipments.values()][-1] == "CRYO-EU"


async def test_an_older_site_registration_does_not_replace_a_newer_region(world: World) -> None:
    newer = new_event(site_registered("DE-LEIPZIG-IZI", "europe"))
    older = new_event(site_registered("DE-LEIPZIG-IZI", "north_america"))
    older = older.model_copy(update={"time": newer.time.replace(year=newer.time.year - 1)})
    await world.deliver(newer, older)
    assert world.store.regions["DE-LEIPZIG-IZI"][:2] == ("site", "europe")


# ---- reason codes ----------------------------------------------------------------------------------


def test_reason_code_carries_an_upstream_code_and_drops_free_text() -> None:
    assert reason_code("order_cancelled") == "order_cancelled"
    assert reason_code("order_cancelled", "patient_deceased") == "order_cancelled:patient_deceased"
    assert reason_code("booking_cancelled", "outage:maintenance") == "booking_cancelled:outage:maintenance"
    for text in ("patient withdrew", "Mr Smith", "x" * 200, "a:b:c:d", "\u202e", "", None):
        assert reason_code("order_cancelled", text) == "order_cancelled"
    with pytest.raises(ValueError):
        reason_code("Not a code")


MARKER = "CANARY-7f3a free text: Jane Doe, MRN 0042"


async def test_free_text_reasons_upstream_never_reach_logistics_tables_events_or_logs(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    await world.learn_network()
    first, second, third = Order(), Order(), Order()
    for order in (first, second, third):
        await world.deliver(booking_confirmed(order, "DE-LEIPZIG-IZI"))
    await world.deliver(
        BookingCancelledV1(
            **first.refs,
            booking_id=world.ships(first)[0].booking_id,
            slot_id=uuid.uuid4(),
            site_id="DE-LEIPZIG-IZI",
            reason="rebook:reschedule",
        ),
        OrderCancelledV1(**second.refs, reason="consent_withdrawn", previous_status="released"),
        OrderFailedV1(**third.refs, reason="no_material_left"),
    )
    # the order and site contracts refuse free text: an event built unvalidated (as an older or forged
    # producer could send it) is poison, handled by nothing
    for forged in (
        BookingCancelledV1.model_construct(
            **first.refs,
            booking_id=uuid.uuid4(),
            slot_id=uuid.uuid4(),
            site_id="DE-LEIPZIG-IZI",
            reason=MARKER,
        ),
        OrderCancelledV1.model_construct(**second.refs, reason=MARKER, previous_status="released"),
        OrderFailedV1.model_construct(**third.refs, reason=MARKER),
    ):
        with pytest.raises(PoisonMessage):
            await world.deliver(forged)
    outbound = Order()
    await world.deliver(product_released(outbound, "DE-LEIPZIG-IZI"))
    [ship] = world.ships(outbound)
    await commands.record_milestone(
        world.uow,
        ship.shipment_id,
        milestone="picked_up",
        occurred_at=NOW,
        location="DE-LEIPZIG-IZI",
        handled_by="courier-1",
        received_from=None,
        coi=outbound.coi,
        temperature_c=None,
    )
    for minutes in (1, 40):  # outside the limit for longer than the tolerance: an excursion
        await commands.record_temperature(
            world.uow, ship.shipment_id, reading_c=-100.0, measured_at=NOW + timedelta(minutes=minutes)
        )
    assert world.ships(outbound)[0].status == "compromised"
    with pytest.raises(PoisonMessage):
        await world.deliver(
            QuarantineDecidedV1.model_construct(**outbound.refs, decision="release", reason=MARKER)
        )

    cancelled = [e.data["reason"] for e in world.uow.committed if e.type == "logistics.shipment_cancelled.v1"]
    assert sorted(cancelled) == [
        "booking_cancelled:rebook:reschedule",
        "order_cancelled:consent_withdrawn",
        "order_failed:no_material_left",
    ]
    assert "CANARY" not in repr(world.store.snapshot())
    assert all(b"CANARY" not in e.to_json() for e in world.uow.committed)
    logged = capsys.readouterr()
    assert "shipment cancelled" in logged.out and "CANARY" not in logged.out + logged.err
    reasons = [change.reason for _, change in world.store.status_log]
    reasons += [s.status_reason or "" for s in world.store.shipments.values()]
    reasons += [reason for _, reason in world.store.ended_orders.values()]
    assert reasons and all(re.fullmatch(REASON_CODE_PATTERN, r) for r in reasons), reasons
