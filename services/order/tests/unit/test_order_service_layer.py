"""The order service's service layer on in-memory repositories: intake (with market authorisation), facts
from the other services through the same handler registry the consumer uses (in order, out of order,
twice, with the wrong chain of identity), and every hospital action in a state that allows it and one
that does not. No I/O."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from order_service.adapters.memory import MemoryUnitOfWork, fake_uow
from order_service.domain.coi import make_coi
from order_service.domain.records import OrderRecord
from order_service.service_layer import commands, queries
from order_service.service_layer.commands import Action, PlaceOrder, act, place_order
from order_service.service_layer.handlers import handlers
from v2v_contracts import (
    EVENT_TYPES,
    BookingConfirmedV1,
    CloudEvent,
    EventData,
    ManufacturingStepCompletedV1,
    MaterialReceivedV1,
    MaterialRejectedV1,
    OrderEventData,
    ProductOutOfSpecificationV1,
    ProductReleasedV1,
    ShipmentMilestoneV1,
    ShipmentPlannedV1,
    SiteApproval,
    SiteRegisteredV1,
    SlotReservedV1,
    SlotUnavailableV1,
    new_event,
)
from v2v_contracts.errors import CoiMismatch, Conflict, Invalid, NotAllowedNow, NotFound, Unavailable
from v2v_messaging.fakes import FakeInbox
from v2v_servicekit.auth import Principal
from v2v_servicekit.problems import status_of
from v2v_servicekit.signatures import SignatureUnauthenticated, Signer

FACILITY = "V2V00"
TODAY = date.today()
SOON = TODAY + timedelta(days=14)
NOT_NOW_TITLE = "Not allowed in the order's current state"

# the seeded network, enough for the tests: TISA-CEL everywhere it is sold, AXI-CEL for FDA and EMA
NETWORK = {
    "US-MORRIS-PLAINS": [("FDA", "commercial", "TISA-CEL"), ("FDA", "commercial", "AXI-CEL")],
    "FR-LES-ULIS": [("EMA", "commercial", "TISA-CEL"), ("EMA", "commercial", "AXI-CEL")],
    "AU-MELBOURNE": [("TGA", "commercial", "TISA-CEL"), ("TGA", "clinical", "TISA-CEL")],
}


def site_registered(
    site_id: str, approvals: list[tuple[str, str, str]], *, active: bool = True
) -> CloudEvent:
    return new_event(
        SiteRegisteredV1(
            site_id=site_id,
            name=site_id,
            country=site_id[:2],
            region="europe",
            timezone="Europe/Paris",
            operator="own",
            active=active,
            approvals=[SiteApproval(regulator=r, use=u, product_code=p) for r, u, p in approvals],  # type: ignore[arg-type]
            daily_capacity={p: 2 for _, _, p in approvals},
        ),
        subject=site_id,
    )


class World:
    """The service layer on fakes: a unit of work on an in-memory store and the consumer's inbox."""

    def __init__(self, *, network: bool = True) -> None:
        self.uow: MemoryUnitOfWork = fake_uow()
        self.inbox = FakeInbox(self.uow, handlers)
        self.network = network

    async def start(self) -> World:
        if self.network:
            await self.inbox.deliver(*(site_registered(s, a) for s, a in NETWORK.items()))
        return self

    async def place(self, **overrides: Any) -> OrderRecord:
        fields: dict[str, Any] = {
            "treatment_center_id": "TC-FR-PA-001",
            "product_code": "TISA-CEL",
            "order_type": "commercial",
            "patient_ref": "PAT-UNIT-0001",
            "requested_apheresis_date": SOON,
        }
        fields.update(overrides)
        order_id = await place_order(self.uow, PlaceOrder(**fields), FACILITY)
        return self.order(order_id)

    def order(self, order_id: uuid.UUID) -> OrderRecord:
        return self.uow.store.orders[order_id]

    def put(self, order: OrderRecord, status: str, **fields: Any) -> OrderRecord:
        """Move the stored order to `status` directly (a state reached by facts tested elsewhere)."""
        self.uow.store.orders[order.order_id] = dataclasses.replace(order, status=status, **fields)
        return self.order(order.order_id)

    async def deliver(self, *events: CloudEvent) -> None:
        await self.inbox.deliver(*events)

    def types(self) -> list[str]:
        return self.uow.types()

    async def timeline(self, order_id: uuid.UUID) -> list[tuple[str, str | None]]:
        view = await queries.order_view(self.uow, order_id)
        return [(t.event_type, t.status_after) for t in view.timeline]


def signer(
    meaning: str = "disposition",
    *,
    user_id: str = "qa.les-ulis",
    roles: tuple[str, ...] = ("qa_reviewer",),
    org: tuple[str, str] = ("site", "FR-LES-ULIS"),
    client: tuple[str, str | None] = ("qa", None),
) -> Signer:
    """A signer as `require_signature` yields it once the signing token verified (tested in servicekit)."""
    now = datetime.now(UTC)
    principal = Principal(f"{client[0]}-client", client[0], client[1], frozenset())
    return Signer(
        user_id=user_id,
        name=f"Printed {user_id}",
        roles=frozenset(roles),
        org_kind=org[0],
        org_id=org[1],
        meaning=meaning,
        client_id=principal.client_id,
        principal=principal,
        auth_time=now,
        token_id=str(uuid.uuid4()),
        issuer="https://issuer.test",
        expires_at=now + timedelta(minutes=2),
    )


def physician(centre: str = "TC-FR-PA-001", meaning: str = "physician-acceptance") -> Signer:
    return signer(
        meaning,
        user_id="dr.paris",
        roles=("physician",),
        org=("centre", centre),
        client=("centre", centre),
    )


def disposition(outcome: str, reason_code: str, **kw: Any) -> Action:
    return Action(
        "disposition",
        outcome=outcome,
        reason_code=reason_code,
        document_reference=kw.pop("document_reference", "QA-DOC-1"),
        signer=signer(),
        **kw,
    )


AT_RISK_OUTBOUND = {
    "status_before_quarantine": "product_in_transit",
    "site_id": "FR-LES-ULIS",
    "at_risk": {"cause": "excursion", "reason": "temperature_excursion", "leg": "outbound_product"},
}


@pytest.fixture
async def world() -> World:
    return await World().start()


def fact(data: EventData) -> CloudEvent:
    return new_event(data)


def slot_reserved(
    order: OrderRecord, slot_id: uuid.UUID, site_id: str = "FR-LES-ULIS", **kw: Any
) -> CloudEvent:
    return fact(
        SlotReservedV1(
            **order.ref(),
            slot_id=slot_id,
            site_id=site_id,
            product_code=order.product_code,
            order_type="commercial",
            apheresis_date=SOON,
            manufacturing_start_date=SOON + timedelta(days=2),
            **kw,
        )
    )


def booking_confirmed(order: OrderRecord, slot_id: uuid.UUID, site_id: str = "FR-LES-ULIS") -> CloudEvent:
    return fact(
        BookingConfirmedV1(
            **order.ref(),
            booking_id=uuid.uuid4(),
            slot_id=slot_id,
            site_id=site_id,
            product_code=order.product_code,
            manufacturing_start_date=SOON + timedelta(days=2),
            apheresis_date=SOON,
        )
    )


def inbound_planned(order: OrderRecord, slot_id: uuid.UUID) -> CloudEvent:
    return fact(
        ShipmentPlannedV1(
            **order.ref(),
            shipment_id=uuid.uuid4(),
            leg="inbound_apheresis",
            origin=order.treatment_center_id,
            destination="FR-LES-ULIS",
            material_condition="cryopreserved",
            temperature_range_c=(-150.0, -120.0),
            planned_pickup_date=SOON,
            slot_id=slot_id,
        )
    )


# ---- intake -------------------------------------------------------------------------------------------


async def test_place_order_records_the_order_and_publishes_submitted_without_patient_data(
    world: World,
) -> None:
    order = await world.place()
    assert order.status == "submitted" and order.coi.startswith(FACILITY)
    assert order.patient_ref == "PAT-UNIT-0001"
    [event] = world.uow.committed
    assert event.type == "order.submitted.v1" and event.coi == order.coi
    assert event.data["regulator"] == "EMA" and event.data["country"] == "FR"
    assert event.data["order_type"] == "commercial" and "patient_ref" not in event.data
    assert await world.timeline(order.order_id) == [("order.submitted.v1", "submitted")]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"treatment_center_id": "TC-XX-NOPE-999"}, "treatment_center_id", "unknown or uncertified"),
        ({"product_code": "NOT-A-PRODUCT"}, "product_code", "unknown product"),
        ({"requested_apheresis_date": TODAY - timedelta(days=2)}, "requested_apheresis_date", "in the past"),
    ],
    ids=["unknown-centre", "unknown-product", "date-in-the-past"],
)
async def test_place_order_refuses_bad_input_and_writes_nothing(
    world: World, overrides: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(Invalid) as info:
        await world.place(**overrides)
    assert status_of(info.value) == 422
    assert info.value.errors[0].field == field and words in info.value.errors[0].reason
    assert world.uow.committed == [] and world.uow.store.orders == {}


@pytest.mark.parametrize(
    ("centre", "product", "use", "reason"),
    [
        (
            "TC-AU-VI-001",
            "AXI-CEL",
            "commercial",
            "no manufacturing site is approved to make AXI-CEL for commercial use in the TGA market (AU)",
        ),
        (
            "TC-JP-TK-001",
            "TISA-CEL",
            "commercial",
            "no manufacturing site is approved to make TISA-CEL for commercial use in the PMDA market (JP)",
        ),
        (
            "TC-DE-BE-001",
            "TISA-CEL",
            "clinical",
            "no manufacturing site is approved to make TISA-CEL for clinical use in the EMA market (DE)",
        ),
    ],
)
async def test_an_order_no_site_may_make_for_the_market_is_refused_at_intake(
    world: World, centre: str, product: str, use: str, reason: str
) -> None:
    patient_ref = "PAT-SECRET-4242"
    with pytest.raises(Invalid) as info:
        await world.place(
            treatment_center_id=centre, product_code=product, order_type=use, patient_ref=patient_ref
        )
    error = info.value
    assert status_of(error) == 422 and error.kind == "validation"
    assert [e.as_dict() for e in error.errors] == [{"field": "product_code", "reason": reason}]
    assert patient_ref not in error.detail and centre not in error.detail
    assert world.uow.committed == [] and world.uow.store.orders == {}


async def test_an_inactive_site_serves_no_market(world: World) -> None:
    await world.deliver(site_registered("AU-MELBOURNE", NETWORK["AU-MELBOURNE"], active=False))
    with pytest.raises(Invalid, match="TGA market"):
        await world.place(treatment_center_id="TC-AU-VI-001")
    await world.deliver(site_registered("AU-MELBOURNE", NETWORK["AU-MELBOURNE"]))
    assert (await world.place(treatment_center_id="TC-AU-VI-001")).status == "submitted"


async def test_before_the_network_is_known_intake_is_unavailable_and_not_ready() -> None:
    world = await World(network=False).start()
    assert await queries.network_unknown(world.uow) is not None
    with pytest.raises(Unavailable) as info:
        await world.place()
    assert status_of(info.value) == 503
    assert world.uow.committed == [] and world.uow.store.orders == {}
    # bad input is still named as such
    with pytest.raises(Invalid):
        await world.place(product_code="NOT-A-PRODUCT")

    await world.deliver(site_registered("FR-LES-ULIS", NETWORK["FR-LES-ULIS"]))
    assert await queries.network_unknown(world.uow) is None
    assert (await world.place()).status == "submitted"


async def test_reference_data_loads_centres_and_the_shared_product_catalogue() -> None:
    world = World()
    world.uow.store.products.clear()
    await commands.load_reference_data(world.uow)
    products = {p["code"]: p for p in await queries.products(world.uow)}
    assert set(products) == {"TISA-CEL", "AXI-CEL", "CILTA-CEL"}
    assert products["AXI-CEL"]["max_runs"] == 1 and products["TISA-CEL"]["retains_material"] is True
    centres = {c.id: c for c in await queries.treatment_centres(world.uow)}
    assert centres["TC-AU-VI-001"].regulator == "TGA"


# ---- facts from the other services --------------------------------------------------------------------


def test_the_saga_handles_every_fact_about_an_order_and_the_site_registry() -> None:
    facts = {
        t
        for t, model in EVENT_TYPES.items()
        if model.SERVICE in {"scheduling", "site", "logistics"} and issubclass(model, OrderEventData)
    }
    assert set(handlers.types) == facts | {"site.registered.v1"}


async def test_facts_in_order_move_the_order_and_keep_the_reported_dates(world: World) -> None:
    order = await world.place()
    slot = uuid.uuid4()
    await world.deliver(
        slot_reserved(order, slot), booking_confirmed(order, slot), inbound_planned(order, slot)
    )
    order = world.order(order.order_id)
    assert order.status == "inbound_shipment_planned"
    assert order.site_id == "FR-LES-ULIS" and order.slot_id == slot
    assert order.manufacturing_start_date == SOON + timedelta(days=2)
    assert [s for _, s in await world.timeline(order.order_id)] == [
        "submitted",
        "slot_reserved",
        "booking_confirmed",
        "inbound_shipment_planned",
    ]
    received_at = datetime(2030, 1, 2, 3, 4, tzinfo=UTC)
    order = world.put(order, "material_in_transit")
    await world.deliver(
        fact(MaterialReceivedV1(**order.ref(), site_id="FR-LES-ULIS", received_at=received_at))
    )
    assert world.order(order.order_id).material_received_at == received_at


async def test_a_fact_before_the_one_it_follows_is_parked_and_applied_when_that_arrives(world: World) -> None:
    order = await world.place()
    slot = uuid.uuid4()
    early = booking_confirmed(order, slot)
    await world.deliver(early)
    assert world.order(order.order_id).status == "submitted"
    assert [e.id for _, e in parked_events(world.uow.store.parked)] == [early.id]

    await world.deliver(slot_reserved(order, slot))
    assert world.order(order.order_id).status == "booking_confirmed"
    assert world.uow.store.parked == {}
    # its timeline entry, written when it arrived (in the order the events happened), now says what it did
    assert await world.timeline(order.order_id) == [
        ("order.submitted.v1", "submitted"),
        ("site.booking_confirmed.v1", "booking_confirmed"),
        ("scheduling.slot_reserved.v1", "slot_reserved"),
    ]


def parked_events(parked: dict[int, tuple[uuid.UUID, CloudEvent]]) -> list[tuple[uuid.UUID, CloudEvent]]:
    return [parked[k] for k in sorted(parked)]


async def test_parked_facts_are_dropped_when_a_new_cycle_begins(world: World) -> None:
    order = await world.place()
    slot = uuid.uuid4()
    await world.deliver(slot_reserved(order, slot))
    # a manufacturing report that can only apply after the material is received: parked
    await world.deliver(
        fact(
            ManufacturingStepCompletedV1(
                **order.ref(), site_id="FR-LES-ULIS", step="activation", run=1, completed_at=datetime.now(UTC)
            )
        )
    )
    assert len(world.uow.store.parked) == 1
    # the centre moves the apheresis date: a rebook, a new cycle; the parked fact will never apply
    await act(
        world.uow,
        order.order_id,
        Action("reschedule", reason_code="patient_unwell", new_date=SOON + timedelta(days=3)),
    )
    assert world.order(order.order_id).status == "rescheduling"
    assert world.uow.store.parked == {}


async def test_a_duplicate_fact_is_a_no_op(world: World) -> None:
    order = await world.place()
    event = slot_reserved(order, uuid.uuid4())
    await world.deliver(event)
    before = (world.order(order.order_id), list(world.uow.store.timeline), world.uow.commits)
    await world.deliver(event)
    assert (world.order(order.order_id), list(world.uow.store.timeline), world.uow.commits) == before


async def test_a_fact_for_a_state_already_left_is_recorded_and_ignored(world: World) -> None:
    order = await world.place()
    await world.deliver(slot_reserved(order, uuid.uuid4()))
    await world.deliver(
        fact(SlotUnavailableV1(**order.ref(), reason="no_capacity", detail="full", waitlisted=True))
    )
    assert world.order(order.order_id).status == "slot_reserved"
    assert ("scheduling.slot_unavailable.v1", "slot_reserved") in await world.timeline(order.order_id)


async def test_a_fact_with_another_chain_of_identity_is_refused_and_changes_nothing(world: World) -> None:
    order = await world.place()
    other = dataclasses.replace(order, coi="V2V0099000001X")
    with pytest.raises(CoiMismatch):
        await world.deliver(slot_reserved(other, uuid.uuid4()))
    assert world.order(order.order_id).status == "submitted"
    assert await world.timeline(order.order_id) == [("order.submitted.v1", "submitted")]


async def test_a_fact_about_an_unknown_order_fails(world: World) -> None:
    order = await world.place()
    ghost = dataclasses.replace(order, order_id=uuid.uuid4())
    with pytest.raises(NotFound):
        await world.deliver(slot_reserved(ghost, uuid.uuid4()))


async def test_oos_is_held_and_a_qa_reject_remanufactures_with_the_catalogue_rules(world: World) -> None:
    order = await world.place(product_code="TISA-CEL")  # retains material, two runs
    order = world.put(order, "qc_pending", site_id="FR-LES-ULIS")
    await world.deliver(
        fact(
            ProductOutOfSpecificationV1(
                **order.ref(), site_id="FR-LES-ULIS", run=1, reason="viability", retained_material=True
            )
        )
    )
    held = world.order(order.order_id)
    assert held.status == "material_at_risk" and held.run == 1
    assert held.at_risk == {
        "cause": "out_of_specification",
        "reason": "viability",
        "site_id": "FR-LES-ULIS",
        "run": 1,
        "retained": True,
    }
    assert "order.remanufacture_requested.v1" not in world.types()  # nothing lost before QA decided
    await act(world.uow, order.order_id, disposition("reject", "confirmed_out_of_specification"))
    assert world.order(order.order_id).run == 2
    assert world.types()[-2:] == ["order.disposition_decided.v1", "order.remanufacture_requested.v1"]

    axi = await world.place(product_code="AXI-CEL")  # one run only: a recollection instead
    axi = world.put(axi, "qc_pending", site_id="FR-LES-ULIS")
    await world.deliver(
        fact(
            ProductOutOfSpecificationV1(
                **axi.ref(), site_id="FR-LES-ULIS", run=1, reason="potency", retained_material=True
            )
        )
    )
    await act(world.uow, axi.order_id, disposition("reject", "patient_safety_risk"))
    assert world.order(axi.order_id).status == "rescheduling"
    assert world.types()[-1] == "order.rebook_requested.v1"


# ---- hospital and QA actions ----------------------------------------------------------------------------

ALLOWED: list[tuple[str, str, dict[str, Any], Action, str, str]] = [
    # (name, from status, extra stored fields, action, new status, event published)
    (
        "cancel",
        "booking_confirmed",
        {},
        Action("cancel", reason_code="consent_withdrawn"),
        "cancelled",
        "order.cancelled.v1",
    ),
    (
        "reschedule",
        "booking_confirmed",
        {},
        Action("reschedule", reason_code="patient_unwell", new_date=SOON + timedelta(days=5)),
        "rescheduling",
        "order.rebook_requested.v1",
    ),
    (
        "apheresis",
        "inbound_shipment_planned",
        {},
        Action("apheresis"),
        "apheresis_completed",
        "order.apheresis_completed.v1",
    ),
    (  # issue 11: once the product's delivery is confirmed, with the indication its window needs
        "lymphodepletion",
        "product_in_transit",
        {},
        Action("lymphodepletion", indication="dlbcl"),
        "product_in_transit",
        "order.lymphodepletion_started.v1",
    ),
    ("receipt", "product_delivered", {}, Action("receipt"), "product_received", "order.product_received.v1"),
    (
        "infusion",
        "product_received",
        {"lymphodepletion_at": datetime(2030, 1, 1, tzinfo=UTC)},
        Action("infusion"),
        "completed",
        "order.completed.v1",
    ),
    (
        "disposition",
        "material_at_risk",
        AT_RISK_OUTBOUND,
        disposition("release", "within_stability_data"),
        "product_in_transit",
        "order.disposition_decided.v1",
    ),
]

REFUSED: list[tuple[str, str, dict[str, Any], Action]] = [
    ("cancel", "completed", {}, Action("cancel", reason_code="other")),
    (
        "reschedule",
        "manufacturing",
        {},
        Action("reschedule", reason_code="other", new_date=SOON + timedelta(days=5)),
    ),
    ("apheresis", "submitted", {}, Action("apheresis")),
    ("lymphodepletion", "manufacturing", {}, Action("lymphodepletion")),
    ("receipt", "released", {}, Action("receipt")),
    ("infusion", "product_received", {}, Action("infusion")),  # lymphodepletion not recorded
    ("disposition", "released", {}, disposition("release", "excursion_not_confirmed")),
    ("physician", "material_at_risk", AT_RISK_OUTBOUND, Action("physician", accept=True, signer=physician())),
]


def with_coi(action: Action, coi: str) -> Action:
    """The identity-checked steps carry the COI read from the label."""
    return (
        dataclasses.replace(action, coi=coi)
        if action.name in {"apheresis", "receipt", "infusion"}
        else action
    )


@pytest.mark.parametrize(
    ("name", "status", "fields", "action", "after", "event_type"), ALLOWED, ids=[a[0] for a in ALLOWED]
)
async def test_a_hospital_action_in_a_state_that_allows_it(
    world: World, name: str, status: str, fields: dict[str, Any], action: Action, after: str, event_type: str
) -> None:
    order = world.put(await world.place(), status, **fields)
    world.uow.take()
    await act(world.uow, order.order_id, with_coi(action, order.coi))
    done = world.order(order.order_id)
    assert done.status == after
    assert world.types() == [event_type]
    assert (event_type, after) in await world.timeline(order.order_id)
    if name == "lymphodepletion":
        assert done.lymphodepletion_at is not None
    if name == "cancel":
        assert world.uow.committed[0].data["previous_status"] == status
        assert done.ended_reason == "cancelled by the centre: consent_withdrawn"
    if name == "reschedule":
        assert world.uow.committed[0].data["kind"] == "reschedule" and done.rebook_pending


@pytest.mark.parametrize(("name", "status", "fields", "action"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_a_hospital_action_in_a_state_that_does_not_allow_it_is_refused(
    world: World, name: str, status: str, fields: dict[str, Any], action: Action
) -> None:
    order = world.put(await world.place(), status, **fields)
    world.uow.take()
    with pytest.raises(NotAllowedNow) as info:
        await act(world.uow, order.order_id, with_coi(action, order.coi))
    error = info.value
    assert status_of(error) == 409 and error.kind == "order-state" and error.title == NOT_NOW_TITLE
    assert error.errors[0].field == "status" and error.detail.startswith("status: ")
    assert world.order(order.order_id) == order and world.uow.committed == []


async def test_an_apheresis_date_in_the_past_is_invalid(world: World) -> None:
    order = world.put(await world.place(), "slot_reserved")
    with pytest.raises(Invalid) as info:
        await act(
            world.uow,
            order.order_id,
            Action("reschedule", reason_code="other", new_date=TODAY - timedelta(days=3)),
        )
    assert status_of(info.value) == 422 and info.value.errors[0].field == "requested_apheresis_date"


async def test_an_action_on_an_unknown_order_is_not_found(world: World) -> None:
    with pytest.raises(NotFound) as info:
        await act(world.uow, uuid.uuid4(), Action("cancel", reason_code="other"))
    assert status_of(info.value) == 404 and info.value.title == "Order not found"


async def test_a_coi_mismatch_at_the_centre_raises_the_alert_and_refuses_the_action(world: World) -> None:
    order = world.put(await world.place(), "inbound_shipment_planned")
    another = await world.place(patient_ref="PAT-UNIT-0002")
    world.uow.take()
    with pytest.raises(CoiMismatch) as info:
        await act(world.uow, order.order_id, Action("apheresis", coi=another.coi))
    error = info.value
    assert status_of(error) == 409 and error.kind == "coi-mismatch"
    assert [e.as_dict() for e in error.errors] == [{"field": "coi", "reason": "does not match the order"}]
    assert error.detail == "coi: does not match this order's chain of identity"
    # the action is refused; the alert is recorded and published in its own transaction
    assert world.order(order.order_id).status == "inbound_shipment_planned"
    [alert] = world.uow.committed
    assert alert.type == "order.coi_mismatch_detected.v1" and alert.data["where"] == "apheresis"
    assert alert.coi == order.coi
    assert ("order.coi_mismatch_detected.v1", "inbound_shipment_planned") in await world.timeline(
        order.order_id
    )


async def test_a_badly_formed_coi_is_invalid_not_a_mismatch(world: World) -> None:
    order = world.put(await world.place(), "inbound_shipment_planned")
    world.uow.take()
    with pytest.raises(Invalid) as info:
        await act(world.uow, order.order_id, Action("apheresis", coi="NOT-A-COI"))
    assert info.value.errors[0].field == "coi"
    assert world.uow.committed == []


async def test_an_action_applies_parked_facts_its_new_state_admits(world: World) -> None:
    order = world.put(await world.place(), "inbound_shipment_planned", site_id="FR-LES-ULIS")
    # the courier reports the pickup before the centre confirmed the apheresis: parked
    picked = fact(
        ShipmentMilestoneV1(
            **order.ref(),
            shipment_id=uuid.uuid4(),
            leg="inbound_apheresis",
            milestone="picked_up",
            occurred_at=datetime.now(UTC),
            location="HUB-1",
            handled_by="courier-42",
        )
    )
    await world.deliver(picked)
    assert len(world.uow.store.parked) == 1
    await act(world.uow, order.order_id, Action("apheresis", coi=order.coi))
    assert world.order(order.order_id).status == "material_in_transit"
    assert world.uow.store.parked == {}


async def test_a_released_product_reported_by_the_site_keeps_its_release_time(world: World) -> None:
    order = world.put(await world.place(), "qc_pending", site_id="FR-LES-ULIS")
    released_at = datetime(2030, 2, 3, 4, 5, tzinfo=UTC)
    await world.deliver(
        fact(ProductReleasedV1(**order.ref(), site_id="FR-LES-ULIS", run=1, released_at=released_at))
    )
    done = world.order(order.order_id)
    assert done.status == "released" and done.released_at == released_at
    view = await queries.order_view(world.uow, order.order_id)
    assert view.predicted is not None and view.predicted["release"] == released_at.date()


# ---- tenancy, one open order per patient and product, reason codes and notes ------------------------------


async def test_another_centres_order_is_not_found_for_reads_and_every_action(world: World) -> None:
    order = world.put(await world.place(), "inbound_shipment_planned")
    world.uow.take()
    with pytest.raises(NotFound) as info:
        await queries.order_view(world.uow, order.order_id, centre="TC-DE-BE-001")
    unknown = await _not_found(world, uuid.uuid4())
    assert info.value.title == unknown.title and status_of(info.value) == 404
    for action in (
        Action("cancel", reason_code="other"),
        Action("reschedule", reason_code="other", new_date=SOON + timedelta(days=3)),
        Action("apheresis", coi=order.coi),
        Action("apheresis", coi="V2V0099000001X"),  # not even a COI mismatch alert for another's order
        disposition("release", "other"),
    ):
        with pytest.raises(NotFound):
            await act(world.uow, order.order_id, action, centre="TC-DE-BE-001")
    assert world.order(order.order_id) == order and world.uow.committed == []
    # its own centre, and QA/ops (no centre), find it
    assert (await queries.order_view(world.uow, order.order_id, centre="TC-FR-PA-001")).order == order
    await act(world.uow, order.order_id, Action("apheresis", coi=order.coi), centre="TC-FR-PA-001")
    assert world.order(order.order_id).status == "apheresis_completed"


async def _not_found(world: World, order_id: uuid.UUID) -> NotFound:
    with pytest.raises(NotFound) as info:
        await queries.order_view(world.uow, order_id, centre="TC-DE-BE-001")
    return info.value


async def test_a_centre_lists_its_own_orders_and_a_filter_only_narrows(world: World) -> None:
    paris = await world.place(treatment_center_id="TC-FR-PA-001", patient_ref="PAT-P")
    berlin = await world.place(treatment_center_id="TC-DE-BE-001", patient_ref="PAT-B")

    async def ids(tenant: str | None, centre: str | None) -> list[uuid.UUID]:
        rows, total = await queries.list_orders(world.uow, tenant=tenant, centre=centre, limit=10, offset=0)
        assert total == len(rows)
        return [r.order_id for r in rows]

    assert await ids("TC-FR-PA-001", None) == [paris.order_id]
    assert await ids("TC-FR-PA-001", "TC-FR-PA-001") == [paris.order_id]
    assert await ids("TC-FR-PA-001", "TC-DE-BE-001") == []  # never widens
    assert await ids(None, None) == [paris.order_id, berlin.order_id]
    assert await ids(None, "TC-DE-BE-001") == [berlin.order_id]


async def test_a_second_open_order_for_the_patient_and_product_is_refused(world: World) -> None:
    first = await world.place(patient_ref="PAT-TWICE")
    before = (dict(world.uow.store.orders), list(world.uow.committed), dict(world.uow.store.coi_sequences))
    with pytest.raises(Conflict) as info:
        await world.place(patient_ref="PAT-TWICE", requested_apheresis_date=SOON + timedelta(days=1))
    error = info.value
    assert status_of(error) == 409 and error.kind == "open-order-exists"
    assert error.errors[0].field == "patient_ref" and "PAT-TWICE" not in error.detail
    after = (dict(world.uow.store.orders), list(world.uow.committed), dict(world.uow.store.coi_sequences))
    assert after == before
    # another product, another centre's patient with the same reference: separate orders
    await world.place(patient_ref="PAT-TWICE", product_code="AXI-CEL")
    await world.place(patient_ref="PAT-TWICE", treatment_center_id="TC-DE-BE-001")
    # once the first order ended, the centre may order again for the patient
    await act(world.uow, first.order_id, Action("cancel", reason_code="duplicate_order"))
    again = await world.place(patient_ref="PAT-TWICE")
    assert again.status == "submitted" and again.order_id != first.order_id


async def test_a_cancel_publishes_its_code_and_keeps_the_note_on_the_timeline_only(world: World) -> None:
    order = world.put(await world.place(), "booking_confirmed")
    world.uow.take()
    note = "Patient moved to palliative care — Dr. Müller, ward 7"
    await act(world.uow, order.order_id, Action("cancel", reason_code="disease_progression", note=note))
    [event] = world.uow.committed
    assert event.type == "order.cancelled.v1" and event.data["reason"] == "disease_progression"
    assert note not in event.to_json().decode() and "Müller" not in event.to_json().decode()
    view = await queries.order_view(world.uow, order.order_id)
    [cancelled] = [t for t in view.timeline if t.event_type == "order.cancelled.v1"]
    assert cancelled.note == note and cancelled.reason == "cancelled by the centre: disease_progression"
    assert view.order.ended_reason == "cancelled by the centre: disease_progression"
    assert all(t.note is None for t in view.timeline if t is not cancelled)


async def test_a_reschedule_and_a_disposition_publish_codes_and_keep_their_notes(
    world: World,
) -> None:
    order = world.put(await world.place(), "slot_reserved")
    world.uow.take()
    await act(
        world.uow,
        order.order_id,
        Action(
            "reschedule", reason_code="patient_unwell", note="fever 39.2", new_date=SOON + timedelta(days=4)
        ),
    )
    held = world.put(await world.place(patient_ref="PAT-Q"), "material_at_risk", **AT_RISK_OUTBOUND)
    await act(
        world.uow,
        held.order_id,
        disposition("reject", "outside_stability_data", note="38 min at +12 °C"),
    )
    events = world.uow.committed
    rebook = next(
        e for e in events if e.type == "order.rebook_requested.v1" and e.data["kind"] == "reschedule"
    )
    decided = next(e for e in events if e.type == "order.disposition_decided.v1")
    assert rebook.data["reason"] == "patient_unwell" and decided.data["reason"] == "outside_stability_data"
    assert (decided.data["cause"], decided.data["outcome"], decided.data["leg"]) == (
        "excursion",
        "reject",
        "outbound_product",
    )
    assert decided.data["document_reference"] == "QA-DOC-1"
    remanufacture = next(e for e in events if e.type == "order.remanufacture_requested.v1")
    assert remanufacture.data["reason"] == "quarantine_rejected"
    for e in events:
        assert "fever" not in e.to_json().decode() and "38 min" not in e.to_json().decode()
    notes = {t.note for t in world.uow.store.timeline if t.note}
    assert notes == {"fever 39.2", "38 min at +12 °C"}


@pytest.mark.parametrize(
    "action",
    [
        Action("cancel", reason_code="patient withdrew"),
        Action("cancel", reason_code=""),
        Action("reschedule", reason_code="duplicate_order", new_date=SOON + timedelta(days=3)),
        disposition("release", "integrity_compromised"),
        disposition("release_on_physician_request", "within_stability_data"),
    ],
    ids=["words", "empty", "cancel-code-for-a-reschedule", "reject-code-for-a-release", "physician-request"],
)
async def test_an_action_without_a_reason_code_of_its_own_is_invalid_and_writes_nothing(
    world: World, action: Action
) -> None:
    if action.name == "disposition":
        order = world.put(await world.place(), "material_at_risk", **AT_RISK_OUTBOUND)
    else:
        order = world.put(await world.place(), "slot_reserved")
    world.uow.take()
    timeline = list(world.uow.store.timeline)
    with pytest.raises(Invalid) as info:
        await act(world.uow, order.order_id, action)
    assert status_of(info.value) == 422 and info.value.errors[0].field == "reason_code"
    assert world.order(order.order_id) == order and world.uow.committed == []
    assert world.uow.store.timeline == timeline
    assert world.uow.store.signatures == [] and world.uow.store.decisions == []


# ---- the audit trail ----------------------------------------------------------------------------------


async def test_every_change_is_audited_with_its_old_and_new_values_by_whom_and_why(world: World) -> None:
    """Intake (the service itself here: no request), a fact by the consumer with the event as cause (a
    repeated fact and a fact that changes nothing write nothing), an action with its reason code; one
    intact chain."""
    order = await world.place()
    slot = uuid.uuid4()
    reserved = slot_reserved(order, slot)
    await world.deliver(reserved, reserved)  # the second is a duplicate (inbox): no second entry
    await act(world.uow, order.order_id, Action("cancel", reason_code="patient_deceased", note="n1"))

    from v2v_audit import Actor, verify

    store = world.uow.store
    mine = [r for r in store.audit if r.object_id == str(order.order_id)]
    assert [(r.action, r.reason) for r in mine] == [
        ("order.placed", None),
        ("order.fact", "scheduling.slot_reserved.v1"),
        ("order.cancel", "patient_deceased"),
    ]
    placed, fact_applied, cancelled = mine
    assert placed.new["status"] == "submitted"  # type: ignore[index, call-overload]
    assert fact_applied.actor == Actor.system("order.saga") and fact_applied.cause == f"event:{reserved.id}"
    assert fact_applied.old == {
        "status": "submitted",
        "slot_id": None,
        "site_id": None,
        "apheresis_date": None,
        "manufacturing_start_date": None,
    }
    assert fact_applied.new["status"] == "slot_reserved"  # type: ignore[index, call-overload]
    assert fact_applied.new["slot_id"] == str(slot)  # type: ignore[index, call-overload]
    assert cancelled.old["status"] == "slot_reserved"  # type: ignore[index, call-overload]
    assert cancelled.new["status"] == "cancelled"  # type: ignore[index, call-overload]
    assert cancelled.new["note"] == "n1"  # type: ignore[index, call-overload]
    assert verify("ordering", store.audit).broken is None


async def test_a_refused_action_leaves_no_entry_and_a_coi_mismatch_is_audited(world: World) -> None:
    order = await world.place()
    before = list(world.uow.store.audit)
    with pytest.raises(NotAllowedNow):
        await act(world.uow, order.order_id, Action("infusion", coi=order.coi))
    assert world.uow.store.audit == before
    with pytest.raises(CoiMismatch):
        await act(world.uow, order.order_id, Action("apheresis", coi=make_coi(FACILITY, 2026, 999_999)))
    (refused,) = world.uow.store.audit[len(before) :]
    assert (refused.action, refused.reason, refused.object_id) == (
        "order.apheresis.refused",
        "coi-mismatch",
        str(order.order_id),
    )


# ---- issue 10: material at risk, signed decisions, DIN per collection, lot per run -------------------------


def oos_fact(order: OrderRecord, *, retained: bool = True, run: int = 1) -> CloudEvent:
    return fact(
        ProductOutOfSpecificationV1(
            **order.ref(), site_id="US-MORRIS-PLAINS", run=run, reason="viability", retained_material=retained
        )
    )


async def test_oos_released_on_physician_request_then_accepted_ships_with_its_lot_and_a_48h_task(
    world: World,
) -> None:
    us = "TC-US-NJ-001"
    order = world.put(await world.place(treatment_center_id=us), "qc_pending", site_id="US-MORRIS-PLAINS")
    await world.deliver(oos_fact(order))
    world.uow.take()
    await act(
        world.uow,
        order.order_id,
        disposition("release_on_physician_request", "no_alternative_treatment", document_reference="QA-RA-7"),
    )
    [asked] = world.uow.take()
    assert asked.type == "order.physician_decision_requested.v1"
    assert (asked.data["reason"], asked.data["qa_reason"]) == ("viability", "no_alternative_treatment")
    assert world.order(order.order_id).status == "awaiting_physician"
    # only the order's own centre's physician: another centre's order is not found
    with pytest.raises(NotFound):
        await act(
            world.uow,
            order.order_id,
            Action("physician", accept=True, signer=physician("TC-US-TX-002")),
            centre="TC-US-TX-002",
        )
    await act(
        world.uow,
        order.order_id,
        Action("physician", accept=True, reason_code="benefit_outweighs_risk", signer=physician(us)),
        centre=us,
    )
    [decided] = world.uow.take()
    assert decided.type == "order.disposition_decided.v1"
    assert (decided.data["cause"], decided.data["outcome"], decided.data["reason"]) == (
        "out_of_specification",
        "release_on_physician_request",
        "no_alternative_treatment",
    )
    assert decided.data["run"] == 1 and decided.data["document_reference"] == "QA-RA-7"
    accepted = world.order(order.order_id)
    assert accepted.status == "qc_pending" and accepted.expanded_access  # FDA: expanded access
    assert accepted.shown_order_type == "expanded_access" and accepted.order_type == "commercial"
    [task] = world.uow.store.tasks.values()
    assert (task.regulator, task.state, task.due_at) == ("FDA", "open", None)  # due from administration
    # the site releases the run exceptionally, with its lot: receipt and infusion check COI + lot
    released_at = datetime.now(UTC)
    await world.deliver(
        fact(
            ProductReleasedV1(
                **order.ref(),
                site_id="US-MORRIS-PLAINS",
                run=1,
                released_at=released_at,
                lot="LOT-US-0001",  # type: ignore[call-arg]  # the site's field (issue 10, [site])
            )
        )
    )
    assert world.order(order.order_id).lot == "LOT-US-0001"
    world.put(world.order(order.order_id), "product_delivered")
    with pytest.raises(Invalid) as missing:
        await act(world.uow, order.order_id, Action("receipt", coi=order.coi))
    assert missing.value.errors[0].field == "lot"
    world.uow.take()
    with pytest.raises(CoiMismatch) as wrong:
        await act(world.uow, order.order_id, Action("receipt", coi=order.coi, lot="LOT-US-0002"))
    assert wrong.value.detail == "lot: does not match this order's chain of identity"
    [alert] = world.uow.take()
    assert alert.type == "order.coi_mismatch_detected.v1" and alert.data["where"] == "receipt"
    assert world.order(order.order_id).status == "product_delivered"
    await act(world.uow, order.order_id, Action("receipt", coi=order.coi, lot="LOT-US-0001"))
    # issue 11: the LD (with the order's indication) started 6 days ago: the infusion is inside its window
    ld_at = datetime.now(UTC) - timedelta(days=6)
    await act(world.uow, order.order_id, Action("lymphodepletion", indication="dlbcl", at=ld_at))
    infused_at = datetime.now(UTC) - timedelta(hours=1)
    await act(world.uow, order.order_id, Action("infusion", coi=order.coi, lot="LOT-US-0001", at=infused_at))
    assert world.order(order.order_id).status == "completed"
    [task] = world.uow.store.tasks.values()
    assert task.administered_at == infused_at and task.due_at == infused_at + timedelta(hours=48)
    assert not task.overdue(datetime.now(UTC)) and task.overdue(infused_at + timedelta(hours=49))
    rows, total = await queries.tasks_page(world.uow, state="open", overdue_at=None, limit=10, offset=0)
    assert total == 1 and rows[0].task_id == task.task_id
    assert await commands.complete_task(world.uow, task.task_id, by="qa-client", reference="FDA-MW-1") == (
        order.order_id
    )
    with pytest.raises(NotAllowedNow):
        await commands.complete_task(world.uow, task.task_id, by="qa-client", reference="FDA-MW-1")
    assert world.uow.store.tasks[task.task_id].state == "done"
    # both decisions are shown signed: printed name, time and meaning
    view = await queries.order_view(world.uow, order.order_id)
    assert [(d.meaning, d.signed) for d in view.decisions] == [
        ("disposition", True),
        ("physician-acceptance", True),
    ]
    assert "Printed dr.paris" in view.decisions[1].signatures[0]
    assert "physician-acceptance" in view.decisions[1].signatures[0]


async def test_a_signed_decision_changed_afterwards_shows_unsigned(world: World) -> None:
    order = world.put(await world.place(), "material_at_risk", **AT_RISK_OUTBOUND)
    await act(world.uow, order.order_id, disposition("release", "within_stability_data"))
    [before] = (await queries.order_view(world.uow, order.order_id)).decisions
    assert before.signed and before.fields["outcome"] == "release"
    world.uow.store.decisions[0]["fields"]["outcome"] = "reject"  # tampered after signing
    [after] = (await queries.order_view(world.uow, order.order_id)).decisions
    assert not after.signed and after.signatures == []


async def test_a_physicians_decline_publishes_a_reject_and_remanufactures(world: World) -> None:
    us = "TC-US-NJ-001"
    order = world.put(await world.place(treatment_center_id=us), "qc_pending", site_id="US-MORRIS-PLAINS")
    await world.deliver(oos_fact(order))
    await act(world.uow, order.order_id, disposition("release_on_physician_request", "other"))
    world.uow.take()
    await act(
        world.uow,
        order.order_id,
        Action("physician", accept=False, reason_code="risk_not_acceptable", signer=physician(us)),
        centre=us,
    )
    decided, remanufacture = world.uow.take()
    assert (decided.data["outcome"], decided.data["reason"]) == ("reject", "physician_declined")
    assert remanufacture.type == "order.remanufacture_requested.v1" and remanufacture.data["run"] == 2
    done = world.order(order.order_id)
    assert done.status == "material_received" and not done.expanded_access and done.at_risk is None
    assert world.uow.store.tasks == {}


async def test_a_cancellation_once_manufacture_started_is_signed_by_the_physician(world: World) -> None:
    order = world.put(await world.place(), "manufacturing", site_id="FR-LES-ULIS")
    world.uow.take()
    with pytest.raises(SignatureUnauthenticated) as info:
        await act(world.uow, order.order_id, Action("cancel", reason_code="consent_withdrawn"))
    assert info.value.reason == "signature-required" and status_of(info.value) == 401
    assert world.order(order.order_id).status == "manufacturing" and world.uow.committed == []
    refused = world.uow.store.audit[-1]
    assert (refused.action, refused.reason) == ("order.cancel.refused", "signature-required")
    await act(
        world.uow,
        order.order_id,
        Action("cancel", reason_code="consent_withdrawn", signer=physician(meaning="cancellation")),
    )
    assert world.order(order.order_id).status == "cancelled"
    [signature] = world.uow.store.signatures
    assert (signature.meaning, signature.user_id) == ("cancellation", "dr.paris")
    signed = [r for r in world.uow.store.audit if r.action == "order.cancel.signed"]
    assert signed and signed[0].new["signature_id"] == str(signature.signature_id)  # type: ignore[index, call-overload]


async def test_each_collection_gets_its_own_din_under_the_one_coi(world: World) -> None:
    from v2v_contracts.coi import coi_problem

    order = world.put(await world.place(), "inbound_shipment_planned", site_id="FR-LES-ULIS")
    world.uow.take()
    await act(world.uow, order.order_id, Action("apheresis", coi=order.coi))
    [first] = world.uow.take()
    din1 = first.data["din"]
    assert first.data["collection"] == 1 and coi_problem(din1) is None and din1 != order.coi
    assert world.order(order.order_id).din == din1
    # the site refuses the bag at receipt and holds it; QA rejects it: a recollection, a new DIN
    await world.deliver(
        fact(MaterialRejectedV1(**order.ref(), site_id="FR-LES-ULIS", reason="damaged_container"))
    )
    assert world.order(order.order_id).status == "material_at_risk"
    await act(world.uow, order.order_id, disposition("reject", "integrity_compromised"))
    recollecting = world.order(order.order_id)
    assert recollecting.status == "rescheduling" and recollecting.din is None and recollecting.collection == 2
    world.put(recollecting, "inbound_shipment_planned")
    world.uow.take()
    await act(world.uow, order.order_id, Action("apheresis", coi=order.coi))
    [second] = world.uow.take()
    assert second.data["collection"] == 2 and second.data["din"] not in {din1, order.coi}
    view = await queries.order_view(world.uow, order.order_id)
    assert [(c["collection"], c["din"]) for c in view.collections] == [(1, din1), (2, second.data["din"])]


async def test_a_refused_signature_is_audited_with_codes_only(world: World) -> None:
    order = await world.place()
    await commands.audit_signature_refusal(
        world.uow,
        f"order:{order.order_id}",
        {
            "reason": "signature-role",
            "status": 403,
            "meaning": "disposition",
            "method": "POST",
            "path": f"/v1/orders/{order.order_id}/disposition",
            "client_id": "qa-client",
            "user_id": "qa.les-ulis",
            "at": "2030-01-01T00:00:00+00:00",
        },
    )
    entry = world.uow.store.audit[-1]
    assert (entry.action, entry.object_type, entry.reason) == (
        "signature.refused",
        "signature_refusal",
        "signature-role",
    )
    assert entry.new["user_id"] == "qa.les-ulis"  # type: ignore[index, call-overload]


def test_a_remanufacture_is_predicted_from_its_own_slot_not_the_first_receipt() -> None:
    """Issue 10: run 2 starts on its slot's day; the material's receipt (run 1's start) no longer counts."""
    at = datetime(2031, 3, 1, 9, tzinfo=UTC)
    first = OrderRecord(
        uuid.uuid4(), "COI", "TC", "TISA-CEL", "commercial", "ref", date(2031, 2, 1), "material_received",
        at, at, material_received_at=at, manufacturing_start_date=date(2031, 3, 2),
    )  # fmt: skip
    remanufacture = dataclasses.replace(first, run=2, manufacturing_start_date=date(2031, 4, 20))
    waiting = dataclasses.replace(first, run=2, manufacturing_start_date=None)  # its slot not booked yet
    assert (queries.predicted_dates(first) or {})["manufacturing_start"] == date(
        2031, 3, 1
    )  # received: started
    assert (queries.predicted_dates(remanufacture) or {})["manufacturing_start"] == date(2031, 4, 20)
    assert (queries.predicted_dates(waiting) or {})["manufacturing_start"] == date(2031, 3, 1)


def test_the_predicted_infusion_waits_for_the_ld_regimen_and_window_after_release() -> None:
    """Issue 11: LD may start only once the product is released, so before LD is recorded the earliest
    infusion is release + the indication's LD regimen + the window's minimum (AXI-CEL, LBCL: 3 + 2 days),
    not release + 2 days; once LD is recorded, its own window counts."""
    at = datetime(2031, 3, 1, 9, tzinfo=UTC)
    released = datetime(2031, 3, 20, 15, tzinfo=UTC)
    order = OrderRecord(
        uuid.uuid4(), "COI", "TC", "AXI-CEL", "commercial", "ref", date(2031, 2, 1), "released",
        at, at, material_received_at=at, manufacturing_start_date=date(2031, 3, 2), released_at=released,
        indication="lbcl",
    )  # fmt: skip
    predicted = queries.predicted_dates(order) or {}
    assert predicted["release"] == date(2031, 3, 20)
    assert predicted["earliest_infusion"] == date(2031, 3, 25)  # 20 + 3 (regimen) + 2 (window minimum)

    without_indication = dataclasses.replace(order, indication=None)  # no treatment facts to apply
    assert (queries.predicted_dates(without_indication) or {})["earliest_infusion"] == date(2031, 3, 22)

    ld_later = dataclasses.replace(order, lymphodepletion_on=date(2031, 3, 24))
    assert (queries.predicted_dates(ld_later) or {})["earliest_infusion"] == date(2031, 3, 29)
