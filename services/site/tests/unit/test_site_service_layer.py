"""The site's service layer on in-memory repositories: the same commands the HTTP API calls and the same
handler registry the consumer routes to (through FakeInbox), asserting the state left behind and the
events committed. No Postgres, no broker."""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from site_service.adapters.memory import MemoryStore, fake_uow
from site_service.adapters.repository import SiteTx
from site_service.domain.manufacturing import ManufacturingConflict
from site_service.domain.registry import OrderFacts
from site_service.service_layer import commands, queries
from site_service.service_layer.handlers import handlers
from v2v_contracts import (
    ApheresisCompletedV1,
    CloudEvent,
    EventData,
    OrderCancelledV1,
    OrderFailedV1,
    OrderSubmittedV1,
    SiteApproval,
    SlotReleasedV1,
    SlotReservedV1,
    new_event,
)
from v2v_contracts.coi import make_coi
from v2v_contracts.errors import CoiMismatch, Conflict, DomainError, Invalid, NotFound
from v2v_contracts.events import DispositionDecidedV1
from v2v_contracts.fields import lot_problem
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork
from v2v_servicekit.auth import Principal
from v2v_servicekit.problems import status_of
from v2v_servicekit.signatures import Signer

SITE = "FR-LES-ULIS"  # Novartis: TISA-CEL 3/day
KITE_SITE = "NL-HOOFDDORP"  # Kite: AXI-CEL 4/day (issue 11: axi-cel is made at Kite's plants, not Novartis's)
OTHER_SITE = "CH-STEIN"
CENTRE = "TC-FR-PA-001"
DAY = date(2031, 5, 12)
TODAY = date(2031, 5, 1)
NOW = datetime(2031, 5, 20, 9, 30, tzinfo=UTC)
ALL_STEPS = ["activation", "transduction", "expansion", "harvest", "cryopreservation"]
_seq = itertools.count(1)


@dataclass
class Site:
    store: MemoryStore
    uow: FakeUnitOfWork[SiteTx]
    inbox: FakeInbox

    async def deliver(self, *data: EventData) -> list[CloudEvent]:
        events = [new_event(d) for d in data]
        await self.inbox.deliver(*events)
        return events

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """The events committed since the last call: [(type, data), ...]."""
        return [(e.type, e.data) for e in self.uow.take()]


@pytest.fixture(scope="module")
async def seeded() -> MemoryStore:
    """The seeded network, loaded once through the start-up command (copied for each test)."""
    store = MemoryStore()
    uow = fake_uow(store)
    assert await commands.load_seed(uow) == 13
    assert uow.types() == ["site.registered.v1"] * 13
    assert await commands.load_seed(uow) == 0  # nothing new: nothing published
    assert uow.types() == ["site.registered.v1"] * 13
    return store


@pytest.fixture
def site(seeded: MemoryStore) -> Site:
    store = seeded.copy()
    uow = fake_uow(store)
    return Site(store, uow, FakeInbox(uow, handlers))


@dataclass
class Order:
    order_id: uuid.UUID
    coi: str
    slot: SlotReservedV1

    @property
    def slot_id(self) -> uuid.UUID:
        return self.slot.slot_id

    @property
    def site_id(self) -> str:
        return self.slot.site_id


def new_order() -> tuple[uuid.UUID, str]:
    return uuid.uuid4(), make_coi("V2V00", 31, next(_seq))


async def reserve(
    site: Site,
    *,
    order: tuple[uuid.UUID, str] | None = None,
    site_id: str = SITE,
    day: date = DAY,
    product: str = "TISA-CEL",
) -> Order:
    order_id, coi = order or new_order()
    slot = SlotReservedV1(
        order_id=order_id,
        coi=coi,
        treatment_center_id=CENTRE,
        slot_id=uuid.uuid4(),
        site_id=site_id,
        product_code=product,
        order_type="commercial",
        apheresis_date=day - timedelta(days=2),
        manufacturing_start_date=day,
    )
    await site.deliver(slot)
    if order is None:  # the bag is collected (no DIN: unchecked) before any receipt
        await site.deliver(
            ApheresisCompletedV1(order_id=order_id, coi=coi, treatment_center_id=CENTRE, collected_at=NOW)
        )
    return Order(order_id, coi, slot)


def remanufacture_slot(o: Order, run: int, *, site_id: str = SITE, day: date = DAY) -> SlotReservedV1:
    """Scheduling's slot for a remanufacture (issue 10): the site starts the run from it."""
    return o.slot.model_copy(
        update={
            "slot_id": uuid.uuid4(),
            "site_id": site_id,
            "manufacturing_start_date": day + timedelta(days=30),
            "reason": "remanufacture",
            "run": run,
        }
    )


async def receive(site: Site, o: Order, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"order_id": o.order_id, "coi": o.coi, "accepted": True, "now": NOW}
    args.update(kw)
    return await commands.record_receipt(site.uow, o.site_id, **args)


RESULTS = {"viability_pct": 91.5, "car_positive_pct": 28.0, "vcn_per_cell": 1.8, "sterility": "negative"}


async def passed(site: Site, o: Order, coa: str = "COA-31-0001") -> dict[str, Any]:
    """QC passed, with its results summary and certificate of analysis (issue 10)."""
    return await commands.record_qc(
        site.uow, o.site_id, o.order_id, disposition="passed", results=RESULTS, coa_reference=coa, now=NOW
    )


def market(site: Site, o: Order, regulator: str, order_type: str = "commercial") -> None:
    """What `order.submitted` told the site: the order's market."""
    known = site.store.orders.get(o.order_id) or OrderFacts(o.order_id)
    site.store.orders[o.order_id] = dataclasses.replace(
        known, regulator=regulator, order_type=order_type, country="FR", region="europe"
    )


def signer(
    meaning: str,
    org_id: str,
    *,
    role: str | None = None,
    user_id: str | None = None,
    client_id: str = "qa-x",
) -> Signer:
    """A verified signer as `require_signature` yields it (the verification is tested in servicekit)."""
    role = role or ("quality_unit" if meaning == "release" else "qualified_person")
    principal = Principal(client_id=client_id, kind="qa", entity_id=None, scopes=frozenset({"qc:release"}))
    return Signer(
        user_id=user_id or f"{'qu' if role == 'quality_unit' else 'qp'}.{org_id.lower()}",
        name=f"Test Signer {org_id}",
        roles=frozenset({role}),
        org_kind="site",
        org_id=org_id,
        meaning=meaning,
        client_id=client_id,
        principal=principal,
        auth_time=NOW,
        token_id=str(uuid.uuid4()),
        issuer="https://issuer.test",
        expires_at=NOW + timedelta(minutes=2),
    )


async def steps(site: Site, o: Order, names: list[str]) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for name in names:
        view = await commands.record_step(site.uow, o.site_id, o.order_id, step=name, now=NOW)
    return view


def status(site: Site, o: Order) -> str:
    return site.store.booking(o.slot_id).status


def problem(exc: pytest.ExceptionInfo[DomainError]) -> tuple[int, str]:
    return status_of(exc.value), exc.value.errors[0].field


# ---- bookings ----------------------------------------------------------------------------------------


async def test_a_reserved_slot_becomes_a_confirmed_booking(site: Site) -> None:
    o = await reserve(site)
    [(kind, data)] = site.events()
    assert kind == "site.booking_confirmed.v1"
    booking = site.store.booking(o.slot_id)
    assert booking.status == "confirmed"
    assert data == {
        "order_id": str(o.order_id),
        "coi": o.coi,
        "treatment_center_id": CENTRE,
        "booking_id": str(booking.booking_id),
        "slot_id": str(o.slot_id),
        "site_id": SITE,
        "product_code": "TISA-CEL",
        "manufacturing_start_date": DAY.isoformat(),
        "apheresis_date": (DAY - timedelta(days=2)).isoformat(),
    }
    view = await queries.get_manufacturing(site.uow, SITE, o.order_id)
    assert (view["state"], view["run"], view["booking_id"]) == ("awaiting_material", 0, booking.booking_id)


async def test_a_duplicate_event_is_a_no_op(site: Site) -> None:
    o = await reserve(site)
    site.events()
    event = new_event(o.slot)
    await site.inbox.deliver(event)
    await site.inbox.deliver(event)  # the same event id again: dropped by the inbox
    assert site.events() == []  # and the same slot in a new event: already booked
    assert sum(1 for r in site.store.bookings.values() if r.booking.order_id == o.order_id) == 1
    cancelled = new_event(
        OrderCancelledV1(
            order_id=o.order_id,
            coi=o.coi,
            treatment_center_id=CENTRE,
            reason="x",
            previous_status="scheduled",
        )
    )
    await site.inbox.deliver(cancelled, cancelled)
    assert [t for t, _ in site.events()] == ["site.booking_cancelled.v1"]


async def test_a_released_slot_cancels_its_booking_once(site: Site) -> None:
    first = await reserve(site)
    again = await reserve(site, order=(first.order_id, first.coi), day=DAY + timedelta(days=7))
    booked = site.events()
    release = SlotReleasedV1(
        order_id=first.order_id,
        coi=first.coi,
        treatment_center_id=CENTRE,
        slot_id=first.slot_id,
        site_id=SITE,
        reason="rebook:reschedule",
    )
    await site.deliver(release)
    [(kind, data)] = site.events()
    assert kind == "site.booking_cancelled.v1"
    assert (data["slot_id"], data["booking_id"], data["reason"]) == (
        str(first.slot_id),
        booked[0][1]["booking_id"],
        "rebook:reschedule",
    )
    assert (status(site, first), status(site, again)) == ("cancelled", "confirmed")

    await site.deliver(release)  # already cancelled
    await site.deliver(release.model_copy(update={"slot_id": uuid.uuid4()}))  # no such booking
    assert site.events() == []


async def test_a_cancelled_order_stops_manufacturing_and_cancels_its_booking(site: Site) -> None:
    o = await reserve(site)
    await receive(site, o)
    await steps(site, o, ["activation"])
    site.events()
    cancelled = OrderCancelledV1(
        order_id=o.order_id,
        coi=o.coi,
        treatment_center_id=CENTRE,
        reason="consent_withdrawn",
        previous_status="manufacturing",
    )
    await site.deliver(cancelled)

    events = site.events()
    assert [t for t, _ in events] == ["site.manufacturing_stopped.v1", "site.booking_cancelled.v1"]
    assert all(d["reason"] == "order_cancelled:consent_withdrawn" for _, d in events)
    view = await queries.get_manufacturing(site.uow, SITE, o.order_id)
    assert view["state"] == "stopped"
    assert view["history"][-1]["action"] == "stop"
    assert status(site, o) == "cancelled"

    await site.deliver(cancelled)  # a new event for the same cancellation: nothing left to do
    assert site.events() == []
    with pytest.raises(ManufacturingConflict) as exc:
        await commands.record_step(site.uow, SITE, o.order_id, step="transduction")
    assert problem(exc) == (409, "step")


async def test_a_failed_order_without_material_only_loses_its_live_bookings(site: Site) -> None:
    o = await reserve(site)
    other = await reserve(site)
    await commands.add_outage(
        site.uow, SITE, start_date=DAY, end_date=DAY, reason="utilities", today=TODAY
    )  # both affected
    rebooked = await reserve(site, order=(o.order_id, o.coi), site_id=OTHER_SITE)
    site.events()

    await site.deliver(
        OrderFailedV1(order_id=o.order_id, coi=o.coi, treatment_center_id=CENTRE, reason="no_material")
    )

    events = site.events()
    assert [t for t, _ in events] == ["site.booking_cancelled.v1"] * 2
    assert {d["site_id"] for _, d in events} == {SITE, OTHER_SITE}
    assert {d["reason"] for _, d in events} == {"order_failed:no_material"}
    assert (status(site, o), status(site, rebooked), status(site, other)) == (
        "cancelled",
        "cancelled",
        "affected",
    )


# ---- the registry ------------------------------------------------------------------------------------


async def test_an_outage_affects_the_bookings_in_its_window_whose_material_has_not_arrived(
    site: Site,
) -> None:
    before = await reserve(site, day=DAY - timedelta(days=1))
    inside = await reserve(site, day=DAY)
    last_day = await reserve(site, day=DAY + timedelta(days=2))
    received = await reserve(site, day=DAY + timedelta(days=1))
    await receive(site, received)
    elsewhere = await reserve(site, site_id=OTHER_SITE, day=DAY)
    site.events()

    out = await commands.add_outage(
        site.uow,
        SITE,
        start_date=DAY,
        end_date=DAY + timedelta(days=2),
        reason="maintenance",
        today=TODAY,
    )

    events = site.events()
    assert [t for t, _ in events] == ["site.registered.v1"] + ["site.booking_affected.v1"] * 3
    # issue 11: the order whose material is at the site already is reported (not moved): its centre is told
    *events, (_, at_site) = events
    assert (at_site["order_id"], at_site["material_at_site"], at_site["run"], at_site["state"]) == (
        str(received.order_id),
        True,
        1,
        "material_received",
    )
    assert out["material_at_site_booking_ids"] == [site.store.booking(received.slot_id).booking_id]
    assert events[0][1]["outages"] == [
        {
            "outage_id": str(out["outage_id"]),
            "start_date": DAY.isoformat(),
            "end_date": (DAY + timedelta(days=2)).isoformat(),
            "reason": "maintenance",
        }
    ]
    assert [d["order_id"] for _, d in events[1:]] == [str(inside.order_id), str(last_day.order_id)]
    assert {d["reason"] for _, d in events[1:]} == {"outage:maintenance"}
    assert out["affected_booking_ids"] == [
        site.store.booking(b.slot_id).booking_id for b in (inside, last_day)
    ]
    assert out["site_id"] == SITE
    for b, expected in [
        (before, "confirmed"),
        (inside, "affected"),
        (last_day, "affected"),
        (received, "confirmed"),
        (elsewhere, "confirmed"),
    ]:
        assert status(site, b) == expected
    assert [o["reason"] for o in (await queries.get_site(site.uow, SITE))["outages"]] == ["maintenance"]


async def test_a_slot_reserved_into_a_declared_outage_is_confirmed_then_affected(site: Site) -> None:
    await commands.add_outage(site.uow, SITE, start_date=DAY, end_date=DAY, reason="utilities", today=TODAY)
    site.events()
    o = await reserve(site)
    events = site.events()
    assert [t for t, _ in events] == ["site.booking_confirmed.v1", "site.booking_affected.v1"]
    assert events[1][1]["reason"] == "outage:utilities"
    assert status(site, o) == "affected"


async def test_an_outage_is_refused_when_it_ends_before_it_starts_or_has_no_reason(site: Site) -> None:
    with pytest.raises(Invalid) as exc:
        await commands.add_outage(
            site.uow, SITE, start_date=DAY, end_date=DAY - timedelta(days=1), reason="other", today=TODAY
        )
    assert problem(exc) == (422, "end_date")
    for free_text in ("   ", "cleanroom requalification", ""):
        with pytest.raises(Invalid) as exc:
            await commands.add_outage(
                site.uow, SITE, start_date=DAY, end_date=DAY, reason=free_text, today=TODAY
            )
        assert problem(exc) == (422, "reason")
    with pytest.raises(NotFound) as nf:
        await commands.add_outage(
            site.uow, "XX-NOWHERE", start_date=DAY, end_date=DAY, reason="other", today=TODAY
        )
    assert (status_of(nf.value), nf.value.title, nf.value.detail) == (
        404,
        "Site not found",
        "no site with id XX-NOWHERE",
    )
    assert site.events() == []


async def test_a_registry_patch_publishes_the_site_and_survives_a_seed_reload(site: Site) -> None:
    # CILTA-CEL: Novartis (Les Ulis' manufacturer) is a declared contract manufacturer of it (issue 11)
    out = await commands.update_site(site.uow, SITE, daily_capacity={"CILTA-CEL": 5}, today=TODAY)
    assert out["daily_capacity"] == {"TISA-CEL": 3, "CILTA-CEL": 5}
    assert out["affected_booking_ids"] == []
    [(kind, data)] = site.events()
    assert kind == "site.registered.v1"
    assert (data["site_id"], data["daily_capacity"], data["outages"], data["manufacturer"]) == (
        SITE,
        {"TISA-CEL": 3, "CILTA-CEL": 5},
        [],
        "novartis",
    )

    approvals = [SiteApproval(regulator="TGA", use="clinical", product_code="CILTA-CEL")]
    out = await commands.update_site(site.uow, SITE, active=False, approvals=approvals, today=TODAY)
    assert out["active"] is False
    [(kind, data)] = site.events()
    assert (data["active"], data["approvals"]) == (False, [a.model_dump() for a in approvals])
    assert out["api_managed"] == ["active", "approvals", "daily_capacity:CILTA-CEL"]

    await commands.update_site(site.uow, SITE, active=False, today=TODAY)  # no change: nothing published
    assert site.events() == []
    assert await commands.load_seed(site.uow) == 0  # the registry's changes win over the seed file
    assert site.events() == []
    kept = await queries.get_site(site.uow, SITE)
    assert (kept["active"], kept["daily_capacity"]["CILTA-CEL"], kept["manufacturer"]) == (
        False,
        5,
        "novartis",
    )
    listed = [s["site_id"] for s in await queries.list_sites(site.uow)]
    assert len(listed) == 13 and listed == sorted(listed) and SITE in listed


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"daily_capacity": {"NOT-A-PRODUCT": 1}}, "daily_capacity.NOT-A-PRODUCT"),
        ({"daily_capacity": {"TISA-CEL": -1}}, "daily_capacity.TISA-CEL"),
        (
            {"approvals": [SiteApproval(regulator="EMA", use="clinical", product_code="NOPE")]},
            "approvals.0.product_code",
        ),
        # issue 11: a product is made only at sites of its manufacturer or its declared contract
        # manufacturers: AXI-CEL is Kite's, Les Ulis is Novartis's
        ({"daily_capacity": {"AXI-CEL": 2}}, "daily_capacity.AXI-CEL"),
        (
            {"approvals": [SiteApproval(regulator="EMA", use="commercial", product_code="AXI-CEL")]},
            "approvals.0.product_code",
        ),
    ],
    ids=[
        "unknown-product",
        "negative",
        "unknown-approval-product",
        "capacity-for-another-makers-product",
        "approval-for-another-makers-product",
    ],
)
async def test_a_bad_registry_patch_is_refused_naming_the_field(
    site: Site, patch: dict[str, Any], field: str
) -> None:
    with pytest.raises(Invalid) as exc:
        await commands.update_site(site.uow, SITE, **patch)
    assert problem(exc) == (422, field)
    assert site.events() == []


async def test_a_capacity_cut_affects_the_latest_bookings_never_received_material(site: Site) -> None:
    first, second, third = [await reserve(site) for _ in range(3)]
    await receive(site, third)  # arrived: keeps its place and counts first
    past = await reserve(site, day=TODAY - timedelta(days=1))
    site.events()

    out = await commands.update_site(site.uow, SITE, daily_capacity={"TISA-CEL": 1}, today=TODAY)

    events = site.events()
    assert [t for t, _ in events] == ["site.registered.v1"] + ["site.booking_affected.v1"] * 2
    assert {d["reason"] for _, d in events[1:]} == {"capacity_cut"}
    assert set(out["affected_booking_ids"]) == {
        site.store.booking(b.slot_id).booking_id for b in (first, second)
    }
    assert [status(site, b) for b in (first, second, third, past)] == [
        "affected",
        "affected",
        "confirmed",
        "confirmed",
    ]


# ---- MES: receipt ------------------------------------------------------------------------------------


async def test_a_receipt_accepted_starts_run_one_once(site: Site) -> None:
    o = await reserve(site)
    site.events()
    view = await receive(site, o, received_at=NOW)
    assert (view["state"], view["run"], view["next_step"]) == ("material_received", 1, "activation")
    [(kind, data)] = site.events()
    assert kind == "site.material_received.v1"
    assert data == {
        "order_id": str(o.order_id),
        "coi": o.coi,
        "treatment_center_id": CENTRE,
        "site_id": SITE,
        "received_at": NOW.isoformat().replace("+00:00", "Z"),
        "lot": view["lot"],  # run 1's lot (issue 10)
        "din": None,  # the order service told the site no DIN: none is checked
    }
    assert lot_problem(view["lot"]) is None and view["lot"].startswith(f"{SITE}-")
    assert await receive(site, o) == view  # the same receipt again: nothing new
    assert site.events() == []
    with pytest.raises(ManufacturingConflict) as exc:
        await receive(site, o, accepted=False, reason="damaged_container")
    assert problem(exc) == (409, "accepted")


async def test_a_receipt_refused_holds_the_material_with_its_reason(site: Site) -> None:
    o = await reserve(site)
    site.events()
    for bad in ("  ", None, "bag damaged in transit"):
        with pytest.raises(Invalid) as exc:
            await receive(site, o, accepted=False, reason=bad)
        assert problem(exc) == (422, "reason")
    with pytest.raises(Invalid) as exc:
        await receive(site, o, accepted=True, reason="damaged_container")  # a reason only when refused
    assert problem(exc) == (422, "reason")

    view = await receive(site, o, accepted=False, reason="damaged_container", reference="DEV-31-0042")

    assert view["state"] == "held_at_receipt"  # held until QA's disposition (issue 10)
    [(kind, data)] = site.events()
    assert (kind, data["reason"]) == ("site.material_rejected.v1", "damaged_container")
    assert "reference" not in data  # the site's document id stays in the site's history
    assert [(h["action"], h["state_after"], h["reason"], h["reference"]) for h in view["history"]] == [
        ("receipt", "held_at_receipt", "damaged_container", "DEV-31-0042")
    ]
    with pytest.raises(ManufacturingConflict) as step_exc:
        await commands.record_step(site.uow, SITE, o.order_id, step="activation")
    assert problem(step_exc) == (409, "step")


async def test_a_coi_mismatch_is_refused_and_alerted_on_its_own(site: Site) -> None:
    o = await reserve(site)
    _, other_coi = new_order()
    site.events()

    with pytest.raises(CoiMismatch) as exc:
        await receive(site, o, coi=other_coi)

    err = exc.value
    assert (status_of(err), err.kind, err.title) == (409, "coi-mismatch", "Chain of identity mismatch")
    assert err.detail == "coi: does not match the order's chain of identity; the material is not accepted"
    assert [e.as_dict() for e in err.errors] == [
        {"field": "coi", "reason": "does not match the order's chain of identity"}
    ]
    [(kind, data)] = site.events()  # the alert is committed, the refusal stands
    assert kind == "site.coi_mismatch_detected.v1"
    assert data == {
        "order_id": str(o.order_id),
        "coi": o.coi,  # the order's COI, never the one presented
        "treatment_center_id": CENTRE,
        "site_id": SITE,
        "where": "material receipt",
        "mismatched": "coi",
    }
    assert site.store.manufacturing == {}
    assert (await queries.get_manufacturing(site.uow, SITE, o.order_id))["state"] == "awaiting_material"


async def test_a_receipt_checks_the_coi_the_site_and_the_booking(site: Site) -> None:
    o = await reserve(site)
    site.events()
    with pytest.raises(Invalid) as bad:
        await receive(site, o, coi=o.coi[:-1] + ("A" if o.coi[-1] != "A" else "B"))
    assert problem(bad) == (422, "coi")
    with pytest.raises(Conflict) as exc:
        await receive(site, Order(o.order_id, o.coi, o.slot.model_copy(update={"site_id": OTHER_SITE})))
    assert problem(exc) == (409, "order_id")
    assert (exc.value.kind, exc.value.title) == ("conflict", "Conflict with the current state")
    assert exc.value.detail == f"order_id: the order has no confirmed booking at {OTHER_SITE}"
    with pytest.raises(Conflict) as exc:
        await receive(site, Order(uuid.uuid4(), o.coi, o.slot))
    assert problem(exc) == (409, "order_id")
    with pytest.raises(NotFound):
        await receive(site, Order(o.order_id, o.coi, o.slot.model_copy(update={"site_id": "XX-NOWHERE"})))
    assert site.events() == []


# ---- MES: steps and QC -------------------------------------------------------------------------------


async def test_steps_in_order_then_release(site: Site) -> None:
    o = await reserve(site)
    await receive(site, o)
    site.events()

    view = await steps(site, o, ALL_STEPS)

    assert (view["state"], view["steps_completed"], view["next_step"]) == ("qc_pending", ALL_STEPS, None)
    events = site.events()
    assert [t for t, _ in events] == ["site.manufacturing_step_completed.v1"] * 5
    assert [(d["step"], d["run"]) for _, d in events] == [(s, 1) for s in ALL_STEPS]
    assert await steps(site, o, ["harvest"]) == view  # a repeated report: no-op
    assert site.events() == []

    view = await passed(site, o)
    assert view["state"] == "qc_passed"
    assert site.events() == []  # nothing leaves the site before the signed release
    assert await passed(site, o) == view
    market(site, o, "EMA")
    view = await commands.sign_release(site.uow, SITE, o.order_id, signer("qp-certification", SITE))
    assert view["state"] == "released"
    [(kind, data)] = site.events()
    assert (kind, data["run"], data["site_id"]) == ("site.product_released.v1", 1, SITE)
    assert (data["lot"], data["coa_reference"], data["certification"]) == (
        view["lot"],
        "COA-31-0001",
        "qp_certification",
    )
    assert (data["import_certified"], data["exceptional"]) == (False, False)
    assert [(h["action"], h["step"], h["state_after"]) for h in view["history"]] == [
        ("receipt", None, "material_received"),
        *zip(
            ["step"] * 5,
            ALL_STEPS,
            ["activation", "transduction", "expansion", "harvest", "qc_pending"],
            strict=True,
        ),
        ("qc", None, "qc_passed"),
        ("signature", None, "qc_passed"),
        ("release", None, "released"),
    ]


async def test_a_step_out_of_order_or_before_receipt_is_refused(site: Site) -> None:
    o = await reserve(site)
    with pytest.raises(Conflict) as exc:
        await commands.record_step(site.uow, SITE, o.order_id, step="activation")
    assert problem(exc) == (409, "order_id")
    await receive(site, o)
    site.events()

    with pytest.raises(ManufacturingConflict) as exc:
        await commands.record_step(site.uow, SITE, o.order_id, step="transduction")
    assert problem(exc) == (409, "step")
    assert (exc.value.kind, exc.value.title) == ("conflict", "Conflict with the current state")
    assert exc.value.detail == "step: steps come in order: the next step is activation, not transduction"
    with pytest.raises(ManufacturingConflict) as exc:
        await passed(site, o)
    assert problem(exc) == (409, "disposition")
    with pytest.raises(Invalid) as bad:
        await commands.record_step(site.uow, SITE, o.order_id, step="formulation")
    assert problem(bad) == (422, "step")
    with pytest.raises(Invalid) as bad:
        await commands.record_step(site.uow, SITE, o.order_id, step="activation", failed=True)
    assert problem(bad) == (422, "reason")
    with pytest.raises(Invalid) as bad:
        await commands.record_step(
            site.uow, SITE, o.order_id, step="activation", failed=True, reason="bag leaked"
        )
    assert problem(bad) == (422, "reason")
    with pytest.raises(Invalid) as bad:  # a reason only when the step failed
        await commands.record_step(site.uow, SITE, o.order_id, step="activation", reason="contamination")
    assert problem(bad) == (422, "reason")
    assert site.events() == []
    assert (await queries.get_manufacturing(site.uow, SITE, o.order_id))["next_step"] == "activation"
    with pytest.raises(NotFound):
        await commands.record_step(site.uow, "XX-NOWHERE", o.order_id, step="activation")
    with pytest.raises(NotFound):
        await queries.get_manufacturing(site.uow, SITE, uuid.uuid4())


@pytest.mark.parametrize(
    ("product", "disposition", "kind", "retained"),
    [
        ("TISA-CEL", "out_of_specification", "site.product_out_of_specification.v1", True),
        ("AXI-CEL", "out_of_specification", "site.product_out_of_specification.v1", False),
        ("TISA-CEL", "failed", "site.manufacturing_failed.v1", True),
        ("AXI-CEL", "failed", "site.manufacturing_failed.v1", False),
    ],
)
async def test_qc_out_of_specification_or_failed_keeps_material_only_when_the_product_retains_it(
    site: Site, product: str, disposition: str, kind: str, retained: bool
) -> None:
    o = await reserve(site, product=product, site_id=KITE_SITE if product == "AXI-CEL" else SITE)
    await receive(site, o)
    await steps(site, o, ALL_STEPS)
    site.events()
    for free_text in (" ", "CAR+ 8%", None):
        with pytest.raises(Invalid) as bad:
            await commands.record_qc(
                site.uow, o.site_id, o.order_id, disposition=disposition, reason=free_text
            )
        assert problem(bad) == (422, "reason")

    view = await commands.record_qc(
        site.uow, o.site_id, o.order_id, disposition=disposition, reason="potency"
    )

    assert (view["state"], view["retained_material"]) == (disposition, retained)
    [(event_kind, data)] = site.events()
    assert event_kind == kind
    assert (data["run"], data["retained_material"]) == (1, retained)
    assert data["reason"] == ("potency" if disposition == "out_of_specification" else "qc_failed:potency")


async def test_a_remanufacture_slot_starts_run_two_from_retained_material(site: Site) -> None:
    o = await reserve(site, product="TISA-CEL")  # retains material, two runs
    await receive(site, o)
    await steps(site, o, ALL_STEPS)
    await commands.record_qc(site.uow, SITE, o.order_id, disposition="out_of_specification", reason="potency")
    site.events()
    command = remanufacture_slot(o, 2)

    await site.deliver(command)
    await site.deliver(command)  # the same slot again (a new event): already booked and started

    view = await queries.get_manufacturing(site.uow, SITE, o.order_id)
    assert (view["state"], view["run"], view["next_step"]) == ("material_received", 2, "activation")
    last = view["history"][-1]
    assert (last["action"], last["reason"]) == ("remanufacture", "remanufacture")
    assert [h["action"] for h in view["history"]].count("remanufacture") == 1
    # the run's slot is booked into the site's plan, and nothing is published: no material moves (no
    # booking confirmation for logistics to plan an inbound leg from), the run starts from retained material
    [booking] = [r.booking for r in site.store.bookings.values() if r.booking.slot_id == command.slot_id]
    assert (booking.status, booking.manufacturing_start_date) == (
        "confirmed",
        command.manufacturing_start_date,
    )
    assert site.events() == []

    await steps(site, o, ["activation", "transduction"])
    view = await commands.record_step(
        site.uow, SITE, o.order_id, step="expansion", failed=True, reason="insufficient_cell_growth"
    )
    assert (view["state"], view["failed_step"]) == ("failed", "expansion")
    events = site.events()
    assert [t for t, _ in events] == ["site.manufacturing_step_completed.v1"] * 2 + [
        "site.manufacturing_failed.v1"
    ]
    assert all(d["run"] == 2 for _, d in events)
    assert (events[2][1]["retained_material"], events[2][1]["reason"]) == (
        False,
        "step_failed:expansion:insufficient_cell_growth",
    )

    await site.deliver(remanufacture_slot(o, 3))  # nothing retained: booked, not started
    await site.deliver(remanufacture_slot(o, 3, site_id=OTHER_SITE))  # no material there: not started
    assert (await queries.get_manufacturing(site.uow, SITE, o.order_id))["state"] == "failed"
    assert site.events() == []


async def test_a_command_that_fails_midway_leaves_nothing(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    o = await reserve(site)
    site.events()

    async def broken(*_a: Any, **_k: Any) -> list[uuid.UUID]:
        raise RuntimeError("affect failed")

    monkeypatch.setattr(commands, "affect_bookings", broken)
    with pytest.raises(RuntimeError):
        await commands.add_outage(site.uow, SITE, start_date=DAY, end_date=DAY, reason="other", today=TODAY)
    assert site.events() == []
    assert (await queries.get_site(site.uow, SITE))["outages"] == []
    assert status(site, o) == "confirmed"


# ---- the audit trail ---------------------------------------------------------------------------------


async def test_bookings_runs_steps_qc_and_registry_changes_are_audited_with_codes_only(site: Site) -> None:
    """The seed, a booking by the consumer (the event as cause), receipt, steps and QC through the MES
    commands, an outage and a cancellation: each change in the trail with its old and new state and a
    reason code, never free text; one intact chain."""
    from v2v_audit import Actor, verify

    trail = site.store.audit
    assert [r.action for r in trail] == ["site.registry_changed"] * 13 and {r.reason for r in trail} == {
        "seed"
    }
    start = len(trail)
    o = await reserve(site)
    await receive(site, o, reference="BR-0001")
    await steps(site, o, ALL_STEPS[:2])
    await commands.add_outage(
        site.uow,
        OTHER_SITE,
        start_date=DAY,
        end_date=DAY + timedelta(days=1),
        reason="maintenance",
        today=TODAY,
    )
    await site.deliver(
        OrderCancelledV1(
            order_id=o.order_id,
            coi=o.coi,
            treatment_center_id=CENTRE,
            reason="consent_withdrawn",
            previous_status="x",
        )
    )

    mine = trail[start:]
    assert [(r.action, r.object_type, r.reason) for r in mine] == [
        ("booking.confirmed", "booking", "initial"),
        ("order.din_learned", "order", "apheresis_completed"),  # the collection, before any receipt
        ("manufacture.receipt", "manufacture", None),
        ("manufacture.step", "manufacture", None),
        ("manufacture.step", "manufacture", None),
        ("site.registry_changed", "site", "maintenance"),
        ("manufacture.stop", "manufacture", "order_cancelled:consent_withdrawn"),
        ("booking.cancelled", "booking", "order_cancelled:consent_withdrawn"),
    ]
    confirmed, learned, received, *_ = mine
    assert (learned.object_id, learned.new) == (str(o.order_id), {"din": None, "collection": 1})
    assert confirmed.actor == Actor.system("site.bookings") and (confirmed.cause or "").startswith("event:")
    assert received.old == {"state": "awaiting_material", "run": 0}
    assert received.new == {
        "state": "material_received",
        "run": 1,
        "order_id": str(o.order_id),
        "site_id": SITE,
        "step": None,
        "lot": received.new["lot"],  # type: ignore[index]
        "reference": "BR-0001",
    }
    assert lot_problem(received.new["lot"]) is None  # type: ignore[index]
    outage = mine[5]
    assert outage.object_id == OTHER_SITE and len(outage.new["outages"]) == len(outage.old["outages"]) + 1  # type: ignore[index, arg-type, call-overload]
    assert verify("site", trail).broken is None


# ---- issue 10: the signed release, DIN at receipt, QA's disposition of material at risk ----------------


async def to_qc_passed(site: Site, o: Order, regulator: str, order_type: str = "commercial") -> None:
    await receive(site, o)
    await steps(site, o, ALL_STEPS)
    await passed(site, o)
    market(site, o, regulator, order_type)
    site.events()


async def test_a_us_lot_is_released_by_the_quality_unit_of_the_site() -> None:
    store = MemoryStore()
    uow = fake_uow(store)
    await commands.load_seed(uow)
    us = Site(store, uow, FakeInbox(uow, handlers))
    o = await reserve(us, site_id="US-MORRIS-PLAINS")
    await to_qc_passed(us, o, "FDA")
    view = await queries.get_manufacturing(us.uow, "US-MORRIS-PLAINS", o.order_id)
    assert [(r["meaning"], r["role"], r["site_id"], r["signed"]) for r in view["release"]["required"]] == [
        ("release", "quality_unit", "US-MORRIS-PLAINS", False)
    ]
    view = await commands.sign_release(
        us.uow, "US-MORRIS-PLAINS", o.order_id, signer("release", "US-MORRIS-PLAINS")
    )
    assert view["state"] == "released"
    [(kind, data)] = us.events()
    assert (kind, data["certification"], data["import_certified"]) == (
        "site.product_released.v1",
        "quality_unit_release",
        False,
    )
    [req] = view["release"]["required"]
    assert (
        req["signed"]
        and "Test Signer US-MORRIS-PLAINS (qu.us-morris-plains)" in (req["signatures"][0]["manifestation"])
    )


async def test_an_eu_lot_made_outside_the_eu_needs_the_qp_and_the_import_certification(site: Site) -> None:
    o = await reserve(site, site_id=OTHER_SITE)  # CH-STEIN: outside the EU/EEA
    await to_qc_passed(site, o, "EMA")
    view = await queries.get_manufacturing(site.uow, OTHER_SITE, o.order_id)
    rel = view["release"]
    assert (rel["batch_release_site_id"], rel["imported"]) == ("DE-LEIPZIG-IZI", True)
    assert [(r["meaning"], r["site_id"]) for r in rel["required"]] == [
        ("qp-certification", "DE-LEIPZIG-IZI"),
        ("import-certification", "DE-LEIPZIG-IZI"),
    ]
    assert await commands.required_signature(site.uow, OTHER_SITE, o.order_id, import_at=False) == (
        "qp-certification",
        "qualified_person",
    )
    assert await commands.required_signature(site.uow, "DE-LEIPZIG-IZI", o.order_id, import_at=True) == (
        "import-certification",
        "qualified_person",
    )
    # a QP of the manufacturing site is not the batch-release site's QP
    with pytest.raises(DomainError) as exc:
        await commands.sign_release(site.uow, OTHER_SITE, o.order_id, signer("qp-certification", OTHER_SITE))
    assert (status_of(exc.value), exc.value.kind) == (403, "signature-organisation")
    # a quality unit is no QP
    with pytest.raises(DomainError) as exc:
        await commands.sign_release(
            site.uow,
            OTHER_SITE,
            o.order_id,
            signer("qp-certification", "DE-LEIPZIG-IZI", role="quality_unit"),
        )
    assert (status_of(exc.value), exc.value.kind) == (403, "signature-role")
    view = await commands.sign_release(
        site.uow, OTHER_SITE, o.order_id, signer("qp-certification", "DE-LEIPZIG-IZI")
    )
    assert view["state"] == "qc_passed"  # certified, not yet imported: nothing ships
    assert site.events() == []
    with pytest.raises(Conflict) as dup:  # the same certification twice
        await commands.sign_release(
            site.uow, OTHER_SITE, o.order_id, signer("qp-certification", "DE-LEIPZIG-IZI")
        )
    assert problem(dup) == (409, "order_id")
    with pytest.raises(Conflict) as wrong_site:  # the import is certified at the batch-release site
        await commands.sign_release(
            site.uow, "FR-LES-ULIS", o.order_id, signer("import-certification", "FR-LES-ULIS"), import_at=True
        )
    assert problem(wrong_site) == (409, "site_id")
    view = await commands.sign_release(
        site.uow,
        "DE-LEIPZIG-IZI",
        o.order_id,
        signer("import-certification", "DE-LEIPZIG-IZI"),
        import_at=True,
    )
    assert view["state"] == "released"
    [(kind, data)] = site.events()
    assert (kind, data["certification"], data["import_certified"], data["site_id"]) == (
        "site.product_released.v1",
        "qp_certification",
        True,
        OTHER_SITE,
    )
    trail = [
        (r.action, r.actor.user_id)
        for r in site.store.audit
        if r.action in ("lot.signed", "manufacture.release")
    ]
    assert trail == [
        ("lot.signed", "qp.de-leipzig-izi"),
        ("lot.signed", "qp.de-leipzig-izi"),
        ("manufacture.release", "qp.de-leipzig-izi"),
    ]


async def test_no_import_certification_for_a_lot_made_inside_the_market(site: Site) -> None:
    o = await reserve(site)
    await to_qc_passed(site, o, "EMA")
    with pytest.raises(Conflict) as exc:
        await commands.required_signature(site.uow, SITE, o.order_id, import_at=True)
    assert problem(exc) == (409, "order_id")


async def test_a_release_needs_qc_passed_and_a_known_market(site: Site) -> None:
    o = await reserve(site)
    await receive(site, o)
    await steps(site, o, ALL_STEPS)
    with pytest.raises(Conflict) as unknown:  # order.submitted not seen: nobody knows who signs
        await commands.required_signature(site.uow, SITE, o.order_id, import_at=False)
    assert problem(unknown) == (409, "order_id")
    market(site, o, "EMA")
    with pytest.raises(ManufacturingConflict) as early:
        await commands.sign_release(site.uow, SITE, o.order_id, signer("qp-certification", SITE))
    assert problem(early) == (409, "state")
    assert site.store.signatures == []


async def test_a_lot_changed_after_signing_shows_unsigned(site: Site) -> None:
    o = await reserve(site, site_id=OTHER_SITE)
    await to_qc_passed(site, o, "EMA")
    await commands.sign_release(
        site.uow, OTHER_SITE, o.order_id, signer("qp-certification", "DE-LEIPZIG-IZI")
    )
    row = next(r for r in site.store.manufacturing.values() if r.m.order_id == o.order_id)
    row.m = dataclasses.replace(row.m, coa_reference="COA-FORGED")  # changed behind the service's back
    view = await queries.get_manufacturing(site.uow, OTHER_SITE, o.order_id)
    qp = view["release"]["required"][0]
    assert (qp["meaning"], qp["signed"], qp["stale"]) == ("qp-certification", False, 1)
    await commands.sign_release(
        site.uow,
        "DE-LEIPZIG-IZI",
        o.order_id,
        signer("import-certification", "DE-LEIPZIG-IZI"),
        import_at=True,
    )
    assert (await queries.get_manufacturing(site.uow, OTHER_SITE, o.order_id))["state"] == "qc_passed"
    assert site.events() == []  # the changed lot is not released on a signature of the old one


async def test_a_refused_signature_is_audited(site: Site) -> None:
    o = await reserve(site)
    await commands.audit_signature_refusal(
        site.uow,
        SITE,
        o.order_id,
        reason="signature-role",
        meaning="qp-certification",
        principal=Principal("qa-x", "qa", None, frozenset()),
        user_id="qa.fr-les-ulis",
    )
    entry = site.store.audit[-1]
    assert (entry.action, entry.object_id, entry.reason) == (
        "signature.refused",
        str(o.order_id),
        "signature-role",
    )
    assert (entry.actor.client_id, entry.actor.user_id) == ("qa-x", "qa.fr-les-ulis")


def apheresis(o: Order, din: str | None, collection: int = 1) -> ApheresisCompletedV1:
    extra: dict[str, Any] = {} if din is None else {"din": din, "collection": collection}
    return ApheresisCompletedV1(
        order_id=o.order_id, coi=o.coi, treatment_center_id=CENTRE, collected_at=NOW, **extra
    )


async def test_a_receipt_checks_the_din_of_the_latest_collection(site: Site) -> None:
    o = await reserve(site)
    first, second = make_coi("DIN01", 31, 1), make_coi("DIN01", 31, 2)
    await site.deliver(apheresis(o, first, 1), apheresis(o, second, 2), apheresis(o, first, 1))
    assert site.store.orders[o.order_id].din == second  # an older collection never replaces a later one
    site.events()
    with pytest.raises(Invalid) as missing_din:
        await receive(site, o)
    assert problem(missing_din) == (422, "din")
    with pytest.raises(Invalid) as bad:
        await receive(site, o, din=second[:-1] + ("A" if second[-1] != "A" else "B"))
    assert problem(bad) == (422, "din")
    with pytest.raises(CoiMismatch) as exc:
        await receive(site, o, din=first)  # the bag of the first collection
    assert problem(exc) == (409, "din")
    [(kind, data)] = site.events()
    assert (kind, data["mismatched"]) == ("site.coi_mismatch_detected.v1", "din")
    assert site.store.manufacturing == {}
    view = await receive(site, o, din=second)
    assert view["state"] == "material_received"
    [(kind, data)] = site.events()
    assert (kind, data["din"], data["lot"]) == ("site.material_received.v1", second, view["lot"])


async def test_no_material_is_received_before_the_site_learns_of_its_collection(site: Site) -> None:
    """A receipt that comes before `order.apheresis_completed` reached the site would skip the DIN check:
    refused with a plain 409 (no alert, nothing recorded); the MES sees in the view when it may go on."""
    o = await reserve(site, order=new_order())  # booked; the collection's event has not arrived
    site.events()
    for accepted, reason in ((True, None), (False, "damaged_container")):
        with pytest.raises(Conflict) as exc:
            await receive(site, o, accepted=accepted, reason=reason)
        assert problem(exc) == (409, "order_id") and not isinstance(exc.value, CoiMismatch)
        assert "has not learned of this order's collection" in exc.value.detail
    assert site.events() == [] and site.store.manufacturing == {}
    view = await queries.get_manufacturing(site.uow, SITE, o.order_id)
    assert (view["state"], view["collection"], view["expected_din"]) == ("awaiting_material", None, None)
    din = make_coi("DIN01", 31, 3)
    await site.deliver(apheresis(o, din, 1))
    view = await queries.get_manufacturing(site.uow, SITE, o.order_id)
    assert (view["collection"], view["expected_din"]) == (1, din)
    view = await receive(site, o, din=din)
    assert (view["state"], view["expected_din"]) == ("material_received", din)


async def test_a_recollections_bag_waits_for_the_site_to_learn_its_din(site: Site) -> None:
    """The site knows collection 1, whose bag it received already; collection 2's bag arrives before its
    event: a plain 409 naming `din`, no chain-of-identity alert; once the DIN is known, it is accepted."""
    o = await reserve(site, order=new_order())
    first, second = make_coi("DIN01", 31, 4), make_coi("DIN01", 31, 5)
    await site.deliver(apheresis(o, first, 1))
    await receive(site, o, din=first)
    await commands.record_step(
        site.uow, SITE, o.order_id, step="activation", failed=True, reason="contamination"
    )
    await reserve(site, order=(o.order_id, o.coi), day=DAY + timedelta(days=30))  # the recollection's slot
    site.events()
    with pytest.raises(Conflict) as exc:
        await receive(site, o, din=second)
    assert problem(exc) == (409, "din") and not isinstance(exc.value, CoiMismatch)
    assert "has not learned of the next one" in exc.value.detail
    assert site.events() == []
    await site.deliver(apheresis(o, second, 2))
    view = await receive(site, o, din=second)
    assert (view["state"], view["collection"], view["expected_din"]) == ("material_received", 2, second)
    [(kind, data)] = site.events()
    assert (kind, data["din"]) == ("site.material_received.v1", second)


def decided(o: Order, cause: str, outcome: str, run: int | None = None) -> DispositionDecidedV1:
    return DispositionDecidedV1(
        order_id=o.order_id,
        coi=o.coi,
        treatment_center_id=CENTRE,
        cause=cause,  # type: ignore[arg-type]
        outcome=outcome,  # type: ignore[arg-type]
        site_id=o.site_id,
        run=run,
        reason="within_specification_risk_assessed",
        document_reference="QA-ASSESS-0042",
    )


@pytest.mark.parametrize(("outcome", "state"), [("release", "material_received"), ("reject", "rejected")])
async def test_qa_decides_on_material_held_at_receipt(site: Site, outcome: str, state: str) -> None:
    o = await reserve(site)
    await receive(site, o, accepted=False, reason="temperature_excursion")
    site.events()
    await site.deliver(decided(o, "receipt", outcome))
    await site.deliver(decided(o, "receipt", outcome))  # redelivered as a new event: nothing more
    view = await queries.get_manufacturing(site.uow, SITE, o.order_id)
    assert view["state"] == state
    events = site.events()
    if outcome == "release":
        [(kind, data)] = events
        assert (kind, data["lot"]) == ("site.material_received.v1", view["lot"])
        assert view["run"] == 1 and view["next_step"] == "activation"
    else:
        assert events == [] and view["lot"] is None
    assert view["history"][-1]["action"] == "disposition"
    assert view["history"][-1]["reference"] == "QA-ASSESS-0042"


@pytest.mark.parametrize(
    ("outcome", "exceptional"), [("release", False), ("release_on_physician_request", True)]
)
async def test_an_oos_lot_released_by_qa_waits_for_the_signed_release(
    site: Site, outcome: str, exceptional: bool
) -> None:
    o = await reserve(site)
    await receive(site, o)
    await steps(site, o, ALL_STEPS)
    await commands.record_qc(
        site.uow, SITE, o.order_id, disposition="out_of_specification", reason="viability",
        results={"viability_pct": 61.0}, coa_reference="COA-OOS-1",
    )  # fmt: skip
    market(site, o, "EMA")
    site.events()
    await site.deliver(decided(o, "out_of_specification", outcome, run=1))
    view = await queries.get_manufacturing(site.uow, SITE, o.order_id)
    assert (view["state"], view["exceptional"]) == ("qc_passed", exceptional)
    assert site.events() == []  # nothing ships before the signature
    await commands.sign_release(site.uow, SITE, o.order_id, signer("qp-certification", SITE))
    [(kind, data)] = site.events()
    assert (kind, data["exceptional"], data["coa_reference"]) == (
        "site.product_released.v1",
        exceptional,
        "COA-OOS-1",
    )


async def test_an_oos_reject_leaves_the_run_for_the_orders_remanufacture_with_a_new_lot(site: Site) -> None:
    o = await reserve(site)
    await receive(site, o)
    await steps(site, o, ALL_STEPS)
    await commands.record_qc(site.uow, SITE, o.order_id, disposition="out_of_specification", reason="potency")
    first_lot = (await queries.get_manufacturing(site.uow, SITE, o.order_id))["lot"]
    await site.deliver(decided(o, "out_of_specification", "reject", run=1))
    assert (await queries.get_manufacturing(site.uow, SITE, o.order_id))["state"] == "out_of_specification"
    await site.deliver(remanufacture_slot(o, 2))
    view = await queries.get_manufacturing(site.uow, SITE, o.order_id)
    assert (view["state"], view["run"]) == ("material_received", 2)
    assert view["lot"] != first_lot and lot_problem(view["lot"]) is None
    site.events()
    await steps(site, o, ["activation"])
    [(kind, data)] = site.events()
    assert (kind, data["lot"], data["run"]) == ("site.manufacturing_step_completed.v1", view["lot"], 2)


async def test_the_site_learns_the_orders_market_from_order_submitted(site: Site) -> None:
    o = await reserve(site)
    await site.deliver(
        OrderSubmittedV1(
            order_id=o.order_id, coi=o.coi, treatment_center_id=CENTRE, product_code="TISA-CEL",
            order_type="commercial", regulator="EMA", country="FR", region="europe",
            requested_apheresis_date=DAY,
        )
    )  # fmt: skip
    facts = site.store.orders[o.order_id]
    assert (facts.regulator, facts.order_type, facts.country) == ("EMA", "commercial", "FR")
