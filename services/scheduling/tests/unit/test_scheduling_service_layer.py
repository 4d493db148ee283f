"""Scheduling's service layer on the in-memory repositories: events delivered the way the consumer does
(`FakeInbox`: one transaction each, duplicates dropped), the API's reads through `commands`; assertions on
the store and on the events committed. No Postgres, no broker."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from scheduling_service.adapters.memory import SchedulingStore, fake_uow
from scheduling_service.adapters.repository import SchedulingTx
from scheduling_service.domain.selection import Parameters
from scheduling_service.domain.slots import Planning, Slot
from scheduling_service.service_layer import booking, commands
from scheduling_service.service_layer.handlers import build_handlers
from v2v_contracts import (
    ApheresisCompletedV1,
    BookingConfirmedV1,
    CloudEvent,
    MaterialReceivedV1,
    OrderCancelledV1,
    OrderFailedV1,
    OrderSubmittedV1,
    RebookRequestedV1,
    RemanufactureRequestedV1,
    SiteApproval,
    SiteRegisteredV1,
    SlotReleasedV1,
    SlotReservedV1,
    SlotUnavailableV1,
    new_event,
)
from v2v_contracts.reference import product_catalogue
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork

PRODUCT = "CILTA-CEL"
APHERESIS = date(2031, 3, 3)
PLANNING = Planning(Parameters(1, 2, horizon_days=3), product_catalogue())
HANDLERS = build_handlers(PLANNING)

RESERVED, UNAVAILABLE, RELEASED = SlotReservedV1.TYPE, SlotUnavailableV1.TYPE, SlotReleasedV1.TYPE


def d(n: int) -> date:
    return APHERESIS + timedelta(days=n)


def site_event(
    site_id: str,
    *,
    capacity: int = 1,
    region: str = "europe",
    regulators: tuple[str, ...] = ("EMA",),
    active: bool = True,
) -> CloudEvent:
    return new_event(
        SiteRegisteredV1(
            site_id=site_id,
            name=site_id,
            country="DE",
            region=region,
            timezone="Europe/Berlin",
            operator="own",
            active=active,
            approvals=[SiteApproval(regulator=r, use="clinical", product_code=PRODUCT) for r in regulators],
            daily_capacity={PRODUCT: capacity},
        ),
        subject=site_id,
    )


class Order:
    def __init__(self, n: int, regulator: str = "EMA") -> None:
        self.order_id = uuid.uuid4()
        self.coi = f"V2V0031{n:06d}X"
        self.regulator = regulator

    def ids(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "coi": self.coi, "treatment_center_id": "TC-DE-BE-001"}

    def submitted(self, apheresis: date = APHERESIS) -> CloudEvent:
        return new_event(
            OrderSubmittedV1(
                **self.ids(),
                product_code=PRODUCT,
                order_type="clinical",
                regulator=self.regulator,
                country="DE",
                region="europe",
                requested_apheresis_date=apheresis,
            )
        )

    def rebook(self, apheresis: date = APHERESIS, *, exclude: str | None = None) -> CloudEvent:
        return new_event(
            RebookRequestedV1(
                **self.ids(),
                kind="site_outage" if exclude else "reschedule",
                reason="outage:flood" if exclude else "patient_unwell",
                product_code=PRODUCT,
                order_type="clinical",
                regulator=self.regulator,
                region="europe",
                apheresis_date=apheresis,
                exclude_site_id=exclude,
            )
        )

    def apheresis_completed(self, collected_at: datetime, collection: int = 1) -> CloudEvent:
        return new_event(ApheresisCompletedV1(**self.ids(), collected_at=collected_at, collection=collection))

    def cancelled(self) -> CloudEvent:
        return new_event(OrderCancelledV1(**self.ids(), reason="consent_withdrawn", previous_status="x"))

    def failed(self) -> CloudEvent:
        return new_event(OrderFailedV1(**self.ids(), reason="no_material_left"))


class World:
    """One in-memory scheduling service: the store, the unit of work, the consumer's inbox."""

    def __init__(self) -> None:
        self.store = SchedulingStore()
        self.uow: FakeUnitOfWork[SchedulingTx] = fake_uow(self.store)
        self.inbox = FakeInbox(self.uow, HANDLERS)

    async def deliver(self, *events: CloudEvent) -> list[CloudEvent]:
        """Deliver, and return the events committed meanwhile."""
        self.uow.take()
        await self.inbox.deliver(*events)
        return self.uow.take()

    def live(self, order: Order) -> Slot | None:
        found = [
            r.slot
            for r in self.store.slots.values()
            if r.slot.order_id == order.order_id and r.slot.status in ("held", "confirmed")
        ]
        assert len(found) <= 1
        return found[0] if found else None

    def slots(self, order: Order) -> list[Slot]:
        return [r.slot for r in self.store.slots.values() if r.slot.order_id == order.order_id]

    def waiting(self) -> list[uuid.UUID]:
        return [w["order_id"] for w in self.waitlist_view()]

    def waitlist_view(self) -> list[dict[str, Any]]:
        return sorted(
            (
                {"order_id": oid, "reason": r.reason, "enqueued_at": r.enqueued_at, "request": r.request}
                for oid, r in self.store.waitlist.items()
            ),
            key=lambda w: (w["enqueued_at"], w["order_id"]),
        )


def of(events: list[CloudEvent], order: Order) -> list[CloudEvent]:
    return [e for e in events if e.data.get("order_id") == str(order.order_id)]


def types(events: list[CloudEvent]) -> list[str]:
    return [e.type for e in events]


# ---- submitted: reserved or waitlisted ---------------------------------------------------------------


async def test_a_submitted_order_reserves_the_earliest_slot() -> None:
    w = World()
    await w.deliver(site_event("DE-A"), site_event("US-B", region="north_america"))
    order = Order(1)
    [event] = await w.deliver(order.submitted())

    assert event.type == RESERVED and event.source.endswith("scheduling")
    slot = w.live(order)
    assert slot is not None
    assert event.data == {
        "order_id": str(order.order_id),
        "coi": order.coi,
        "treatment_center_id": "TC-DE-BE-001",
        "slot_id": str(slot.slot_id),
        "site_id": "DE-A",
        "product_code": PRODUCT,
        "order_type": "clinical",
        "apheresis_date": APHERESIS.isoformat(),
        "manufacturing_start_date": d(1).isoformat(),  # same region: one day of transit
        "reason": "initial",
        "run": None,  # a remanufacture's slot only
    }
    assert (slot.status, slot.reserved_reason) == ("held", "initial")
    # the slot keeps the order's market (to notice when its site loses the approval)
    assert (slot.order_type, slot.regulator, slot.region) == ("clinical", "EMA", "europe")
    assert w.waiting() == []
    assert w.store.locked[-1] == [PRODUCT]  # booked under the product's lock


async def test_no_capacity_waitlists_and_tells_the_centre() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    holders = [Order(i) for i in range(3)]  # the whole horizon, one start a day
    events = await w.deliver(*(o.submitted() for o in holders))
    assert types(events) == [RESERVED] * 3
    late = Order(10)
    [event] = await w.deliver(late.submitted())

    assert event.type == UNAVAILABLE
    assert event.data["order_id"] == str(late.order_id)
    assert event.data["reason"] == "no_capacity" and event.data["waitlisted"] is True
    assert "3 days" in event.data["detail"]
    assert w.live(late) is None
    assert w.waitlist_view()[0]["reason"] == "no_capacity"
    assert w.waiting() == [late.order_id]
    # a second submission of the same order (another event id) keeps its place and tells nothing new
    assert await w.deliver(late.submitted()) == []


async def test_a_duplicate_event_is_a_no_op() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    order = Order(1)
    event = order.submitted()
    assert types(await w.deliver(event)) == [RESERVED]
    commits = w.uow.commits
    assert await w.deliver(event, event) == []
    assert w.uow.commits == commits  # dropped by the inbox: no transaction at all
    assert len(w.slots(order)) == 1


# ---- release on cancel or failure: the waitlist is served first come first served --------------------


async def test_cancel_releases_and_serves_the_waitlist_fifo() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    booked = [Order(i) for i in range(3)]
    waiting = [Order(10 + i) for i in range(3)]
    await w.deliver(*(o.submitted() for o in booked + waiting))
    assert w.waiting() == [o.order_id for o in waiting]

    events = await w.deliver(booked[1].cancelled())
    assert types(events) == [RELEASED, RESERVED]
    released, reserved = events
    assert released.data["order_id"] == str(booked[1].order_id)
    assert released.data["reason"] == "cancelled" and released.data["site_id"] == "A"
    # the first in line gets the freed day, as a waitlist booking
    assert reserved.data["order_id"] == str(waiting[0].order_id)
    assert reserved.data["reason"] == "waitlist"
    assert reserved.data["manufacturing_start_date"] == d(2).isoformat()
    assert w.waiting() == [o.order_id for o in waiting[1:]]
    assert w.store.closed[booked[1].order_id] == ("cancelled", "consent_withdrawn")

    # a waiting order that fails leaves the waitlist, releasing nothing
    assert await w.deliver(waiting[1].failed()) == []
    assert w.waiting() == [waiting[2].order_id]
    # and a later request for a closed order is recorded and ignored
    assert await w.deliver(waiting[1].submitted(), waiting[1].rebook()) == []
    assert w.waiting() == [waiting[2].order_id]

    events = await w.deliver(booked[0].failed())
    assert types(events) == [RELEASED, RESERVED]
    assert events[0].data["reason"] == "failed"
    assert events[1].data["order_id"] == str(waiting[2].order_id)
    assert w.waiting() == []


# ---- rebook ------------------------------------------------------------------------------------------


async def test_rebook_releases_and_books_away_from_the_excluded_site() -> None:
    w = World()
    await w.deliver(site_event("A-NEAR"), site_event("B-FAR", region="north_america"))
    order = Order(1)
    await w.deliver(order.submitted())
    old = w.live(order)
    assert old is not None and old.site_id == "A-NEAR"

    events = await w.deliver(order.rebook(d(1), exclude="A-NEAR"))
    assert types(events) == [RELEASED, RESERVED]
    assert events[0].data["slot_id"] == str(old.slot_id) and events[0].data["reason"] == "outage:flood"
    assert events[1].data["site_id"] == "B-FAR"
    assert events[1].data["reason"] == "rebook:site_outage"
    assert events[1].data["manufacturing_start_date"] == d(3).isoformat()  # cross-region: two days
    assert [(s.site_id, s.status) for s in w.slots(order)] == [("A-NEAR", "released"), ("B-FAR", "held")]

    # only the excluded site is avoided: excluding B-FAR, the order may return to A-NEAR
    events = await w.deliver(order.rebook(d(1), exclude="B-FAR"))
    assert types(events) == [RELEASED, RESERVED]
    assert events[1].data["site_id"] == "A-NEAR"


async def test_rebook_without_an_alternative_waits_with_its_context() -> None:
    w = World()
    await w.deliver(site_event("A-NEAR", capacity=2))
    order = Order(1)
    await w.deliver(order.submitted())
    events = await w.deliver(order.rebook(exclude="A-NEAR"))
    assert types(events) == [RELEASED, UNAVAILABLE]
    assert events[1].data["reason"] == "no_approved_site" and "A-NEAR" in events[1].data["detail"]
    [entry] = w.waitlist_view()
    assert isinstance(entry["request"], RebookRequestedV1)
    assert entry["request"].exclude_site_id == "A-NEAR" and entry["reason"] == "no_approved_site"

    # more capacity at the excluded site changes nothing; a new approved site serves it, as a rebook
    assert await w.deliver(site_event("A-NEAR", capacity=5)) == []
    events = await w.deliver(site_event("B-OTHER"))
    assert types(events) == [RESERVED]
    assert events[0].data["site_id"] == "B-OTHER" and events[0].data["reason"] == "rebook:site_outage"


async def test_confirmation_and_material_receipt() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    first, second = Order(1), Order(2)
    await w.deliver(first.submitted())
    slot = w.live(first)
    assert slot is not None
    confirmed = BookingConfirmedV1(
        **first.ids(),
        booking_id=uuid.uuid4(),
        slot_id=slot.slot_id,
        site_id="A",
        product_code=PRODUCT,
        manufacturing_start_date=slot.manufacturing_start_date,
        apheresis_date=APHERESIS,
    )
    assert await w.deliver(new_event(confirmed)) == []
    assert w.live(first).status == "confirmed"  # type: ignore[union-attr]
    received = MaterialReceivedV1(**first.ids(), site_id="A", received_at=datetime(2031, 3, 4, tzinfo=UTC))
    assert await w.deliver(new_event(received)) == []
    assert [s.status for s in w.slots(first)] == ["consumed"]
    # the consumed day stays used; a cancellation releases nothing
    await w.deliver(second.submitted())
    assert w.live(second).manufacturing_start_date == d(2)  # type: ignore[union-attr]
    assert await w.deliver(first.cancelled()) == []


# ---- the market loses its last approved site ---------------------------------------------------------


async def test_waiting_orders_are_told_once_when_their_market_loses_its_last_approved_site() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    holders = [Order(i) for i in range(3)]
    waiting = [Order(10), Order(11)]
    await w.deliver(*(o.submitted() for o in holders + waiting))
    assert all(e["reason"] == "no_capacity" for e in w.waitlist_view())

    # A loses its EMA approval: nowhere left for EMA's clinical CILTA-CEL
    events = await w.deliver(site_event("A", capacity=1, regulators=("NMPA",)))
    for o in waiting:
        [told] = of(events, o)
        assert told.type == UNAVAILABLE
        assert told.data["reason"] == "no_approved_site" and told.data["waitlisted"] is True
        detail = told.data["detail"]
        assert PRODUCT in detail and "clinical" in detail and "EMA" in detail
        assert o.coi not in detail and str(o.order_id) not in detail
    assert all(e["reason"] == "no_approved_site" for e in w.waitlist_view())

    # told once: later site events (the same copy again, more capacity, another site) tell nothing more
    again = await w.deliver(
        site_event("A", capacity=1, regulators=("NMPA",)),
        site_event("A", capacity=3, regulators=("NMPA",)),
        site_event("C-NMPA", regulators=("NMPA",)),
    )
    assert again == []

    # an approved site again: the waitlist is served in order, and (issue 11) the patients the site moved
    # keep their place ahead of the orders that were still waiting for a first slot
    events = await w.deliver(site_event("B", capacity=1))
    assert types(events) == [RESERVED] * 3
    served = [e.data["order_id"] for e in events]
    assert served == [str(o.order_id) for o in holders]
    assert {e["order_id"] for e in w.waitlist_view()} == {o.order_id for o in waiting}


async def test_a_new_order_for_a_market_without_an_approved_site_waits_for_that_reason() -> None:
    w = World()
    await w.deliver(site_event("A", regulators=("NMPA",)))
    order = Order(1)  # EMA
    [event] = await w.deliver(order.submitted())
    assert event.type == UNAVAILABLE and event.data["reason"] == "no_approved_site"
    assert w.waitlist_view()[0]["reason"] == "no_approved_site"
    assert await w.deliver(site_event("A", capacity=2, regulators=("NMPA",))) == []  # not told twice


async def test_a_reserved_order_moves_off_a_site_that_loses_the_approval() -> None:
    w = World()
    await w.deliver(site_event("A-NEAR"), site_event("B-FAR", region="north_america"))
    order, other = Order(1), Order(2, regulator="NMPA")
    await w.deliver(site_event("A-NEAR", regulators=("EMA", "NMPA")), order.submitted(), other.submitted())
    old = w.live(order)
    assert old is not None and old.site_id == "A-NEAR"
    assert w.live(other).site_id == "A-NEAR"  # type: ignore[union-attr]

    events = await w.deliver(site_event("A-NEAR", regulators=("NMPA",)))
    # as a site outage rebook: released at A-NEAR, booked at the other approved site
    assert types(events) == [RELEASED, RESERVED]
    released, reserved = events
    assert released.data == {
        "order_id": str(order.order_id),
        "coi": order.coi,
        "treatment_center_id": "TC-DE-BE-001",
        "slot_id": str(old.slot_id),
        "site_id": "A-NEAR",
        "reason": "approval_withdrawn",
    }
    assert reserved.data["site_id"] == "B-FAR" and reserved.data["reason"] == "rebook:site_outage"
    assert reserved.data["apheresis_date"] == APHERESIS.isoformat()
    # the NMPA order keeps its slot: A-NEAR is still approved for its market
    assert w.live(other).site_id == "A-NEAR"  # type: ignore[union-attr]
    # nothing more at the next event
    assert await w.deliver(site_event("A-NEAR", regulators=("NMPA",))) == []


async def test_a_reserved_order_without_another_approved_site_is_released_and_waits() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    order, consumed, third = Order(1), Order(2), Order(3)
    await w.deliver(order.submitted(), consumed.submitted(), third.submitted())  # d1, d2, d3
    received = MaterialReceivedV1(**consumed.ids(), site_id="A", received_at=datetime(2031, 3, 4, tzinfo=UTC))
    await w.deliver(new_event(received))

    # the site is deactivated: every live slot there must go, nowhere else is approved
    late_day = datetime(2031, 3, 20, 9, tzinfo=UTC)  # after the planned apheresis
    event = site_event("A", capacity=1, active=False)
    event = event.model_copy(update={"time": late_day})
    events = await w.deliver(event)
    assert types(of(events, order)) == [RELEASED, UNAVAILABLE]
    assert types(of(events, third)) == [RELEASED, UNAVAILABLE]
    released, told = of(events, order)
    assert released.data["reason"] == "site_inactive"
    assert told.data["reason"] == "no_approved_site" and told.data["waitlisted"] is True
    assert "other than A" in told.data["detail"] and PRODUCT in told.data["detail"]
    # material already received: the consumed slot stays where its material is
    assert of(events, consumed) == []
    assert [s.status for s in w.slots(consumed)] == ["consumed"]
    # both wait as site outage rebooks away from A, for today at the earliest, told once
    entries = {e["order_id"]: e for e in w.waitlist_view()}
    for o in (order, third):
        request = entries[o.order_id]["request"]
        assert isinstance(request, RebookRequestedV1)
        assert (request.kind, request.exclude_site_id, request.reason) == (
            "site_outage",
            "A",
            "site_inactive",
        )
        assert request.apheresis_date == late_day.date()
        assert entries[o.order_id]["reason"] == "no_approved_site"
    assert await w.deliver(site_event("A", capacity=2, active=False)) == []


async def test_the_live_slot_remembers_the_collection_and_a_recollection_replaces_it() -> None:
    w = World()
    await w.deliver(site_event("A"))
    order, unknown = Order(1), Order(2)
    await w.deliver(order.submitted())
    slot = w.live(order)
    assert slot is not None and slot.collected_on is None
    # 23:30 UTC (already the 4th in Berlin): the date is the UTC date of `collected_at`
    first = order.apheresis_completed(datetime(2031, 3, 3, 23, 30, tzinfo=UTC))
    assert await w.deliver(first) == []  # nothing published: scheduling only remembers it
    assert w.live(order) == Slot(**{**slot.__dict__, "collected_on": d(0)})
    [entry] = [a for a in w.store.audit if a.action == "slot.collection_recorded"]
    assert entry.object_id == str(slot.slot_id) and entry.new == {
        "collected_on": "2031-03-03",
        "collection": 1,
    }
    # a replay (even under another event id) changes nothing and is not audited again
    await w.deliver(first.model_copy(update={"id": uuid.uuid4()}))
    assert w.live(order).collected_on == d(0)  # type: ignore[union-attr]
    assert len([a for a in w.store.audit if a.action == "slot.collection_recorded"]) == 1
    # a recollection: the new date for the slot that is live then
    await w.deliver(order.apheresis_completed(datetime(2031, 3, 5, 8, tzinfo=UTC), collection=2))
    assert w.live(order).collected_on == d(2)  # type: ignore[union-attr]
    # an order without a live slot: nothing to remember, nothing fails
    assert await w.deliver(unknown.apheresis_completed(datetime(2031, 3, 3, 9, tzinfo=UTC))) == []
    assert w.slots(unknown) == []


async def test_collected_material_moves_off_a_site_that_loses_the_approval_with_its_collection_date() -> None:
    w = World()
    await w.deliver(site_event("A-NEAR", capacity=2), site_event("B-FAR", region="north_america", capacity=2))
    collected, fresh = Order(1), Order(2)
    await w.deliver(collected.submitted(), fresh.submitted())
    assert w.live(collected).site_id == w.live(fresh).site_id == "A-NEAR"  # type: ignore[union-attr]
    await w.deliver(collected.apheresis_completed(datetime(2031, 3, 3, 10, tzinfo=UTC)))

    events = await w.deliver(site_event("A-NEAR", capacity=2, regulators=("NMPA",)))
    assert types(of(events, collected)) == [RELEASED, RESERVED]
    assert types(of(events, fresh)) == [RELEASED, RESERVED]
    moved = of(events, collected)[1].data
    assert (moved["site_id"], moved["reason"]) == ("B-FAR", "rebook:site_outage")
    assert moved["apheresis_date"] == d(0).isoformat()  # the collection date, kept
    # the new slot knows the material was collected: a second move keeps the date as well
    assert w.live(collected).collected_on == d(0)  # type: ignore[union-attr]
    assert w.live(fresh).collected_on is None  # type: ignore[union-attr]

    # B-FAR goes inactive, nowhere else is approved: the collected order waits as collected material
    await w.deliver(site_event("B-FAR", region="north_america", capacity=2, active=False))
    requests = {e["order_id"]: e["request"] for e in w.waitlist_view()}
    assert isinstance(requests[collected.order_id], RebookRequestedV1)
    assert requests[collected.order_id].material_collected
    assert requests[collected.order_id].apheresis_date == d(0)
    assert not requests[fresh.order_id].material_collected


async def test_a_slot_booked_before_the_market_was_kept_stays() -> None:
    """Slots from before migration 0003 do not know their order's market: left alone, not guessed."""
    w = World()
    await w.deliver(site_event("A", capacity=1))
    order = Order(1)
    await w.deliver(order.submitted())
    [row] = w.store.slots.values()
    row.slot = Slot(**{**row.slot.__dict__, "order_type": None, "regulator": None, "region": None})
    assert await w.deliver(site_event("A", regulators=("NMPA",))) == []
    assert w.live(order) is not None


# ---- the API's reads ---------------------------------------------------------------------------------


async def test_the_api_reads_slots_and_the_waitlist() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    orders = [Order(i) for i in range(4)]
    await w.deliver(*(o.submitted() for o in orders))
    await w.deliver(orders[0].cancelled())  # frees d1 for the one waiting

    everything = await commands.list_slots(w.uow)
    assert [s["order_id"] for s in everything] == [o.order_id for o in orders]
    assert set(everything[0]) == {
        "slot_id",
        "order_id",
        "coi",
        "site_id",
        "product_code",
        "manufacturing_start_date",
        "apheresis_date",
        "status",
        "created_at",
        "updated_at",
        "treatment_center_id",
        "reserved_reason",
        "release_reason",
        "released_at",
    }
    assert everything[0]["status"] == "released" and everything[0]["release_reason"] == "cancelled"
    held = await commands.list_slots(w.uow, statuses=["held"], site_id="A", product_code=PRODUCT)
    assert [s["order_id"] for s in held] == [o.order_id for o in orders[1:]]
    assert await commands.list_slots(w.uow, order_id=orders[3].order_id, limit=1) == [everything[-1]]
    assert await commands.list_slots(w.uow, site_id="ELSEWHERE") == []

    assert await commands.list_waitlist(w.uow) == []
    late = Order(9)
    await w.deliver(late.rebook(APHERESIS))  # d1..d3 are full
    [entry] = await commands.list_waitlist(w.uow)
    assert entry["order_id"] == late.order_id and entry["apheresis_date"] == APHERESIS
    assert (entry["request_type"], entry["rebook_kind"], entry["reason"]) == (
        RebookRequestedV1.TYPE,
        "reschedule",
        "no_capacity",
    )


async def test_a_failing_transaction_keeps_nothing() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    order = Order(1)
    with pytest.raises(RuntimeError):
        async with w.uow.begin() as tx:
            await HANDLERS.dispatch(tx, order.submitted())
            raise RuntimeError("the database went away")
    assert w.store.slots == {} and w.uow.committed == []


# ---- reasons are codes; the reads are paged and confined -----------------------------------------------


async def test_a_rebooks_reason_is_kept_only_as_a_code() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1))
    order, late = Order(1), Order(2, regulator="FDA")  # no site serves the FDA's market here
    await w.deliver(order.submitted())

    events = await w.deliver(order.rebook(d(1)))  # the centre's code: kept
    assert types(events) == [RELEASED, RESERVED]
    assert events[0].data["reason"] == "patient_unwell"

    # free text can no longer travel in the event; were it ever handed over, it would not be kept
    await w.deliver(late.submitted())  # it waits...
    asked = RebookRequestedV1.model_validate(late.rebook(d(1)).data)
    words = asked.model_copy(update={"reason": "patient has an infection"})  # unvalidated, as words were
    async with w.uow.begin() as tx:
        await booking.rebook(tx, PLANNING, words)  # ...and its rebook waits too, with a code for a reason
    [entry] = w.waitlist_view()
    assert entry["order_id"] == late.order_id and entry["request"].reason == "rebook:reschedule"
    async with w.uow.begin() as tx:
        live = await tx.slots.live(order.order_id)
        assert live is not None
        released = await booking.rebook(tx, PLANNING, words.model_copy(update={"order_id": order.order_id}))
    assert released is not None and released.slot_id == live.slot_id
    assert [e.data["reason"] for e in w.uow.take() if e.type == RELEASED] == ["rebook:reschedule"]


async def test_the_reads_are_paged_and_confined_to_the_callers_tenancy() -> None:
    w = World()
    await w.deliver(site_event("A", capacity=1), site_event("B", capacity=1))
    orders = [Order(i) for i in range(6)]  # fill both sites' three days
    await w.deliver(*(o.submitted() for o in orders))
    everything = await commands.list_slots(w.uow)
    assert len(everything) == 6
    assert await commands.list_slots(w.uow, limit=2, offset=3) == everything[3:5]
    at_a = await commands.list_slots(w.uow, tenancy=commands.Tenancy(site="A"))
    assert at_a and {s["site_id"] for s in at_a} == {"A"} and len(at_a) < 6
    assert await commands.list_slots(w.uow, site_id="B", tenancy=commands.Tenancy(site="A")) == []
    mine = await commands.list_slots(w.uow, tenancy=commands.Tenancy(centre="TC-DE-BE-001"))
    assert mine == everything  # every order of this world is that centre's
    assert await commands.list_slots(w.uow, tenancy=commands.Tenancy(centre="TC-FR-PA-001")) == []
    assert await commands.list_slots(w.uow, tenancy=commands.Tenancy(nothing=True)) == []

    waiting = [Order(10 + i) for i in range(3)]
    await w.deliver(*(o.submitted() for o in waiting))
    assert [e["order_id"] for e in await commands.list_waitlist(w.uow, limit=2, offset=1)] == [
        o.order_id for o in waiting[1:]
    ]
    assert len(await commands.list_waitlist(w.uow, tenancy=commands.Tenancy(centre="TC-DE-BE-001"))) == 3
    assert await commands.list_waitlist(w.uow, tenancy=commands.Tenancy(centre="TC-FR-PA-001")) == []
    assert await commands.list_waitlist(w.uow, tenancy=commands.Tenancy(site="A")) == []


# ---- the audit trail ---------------------------------------------------------------------------------


async def test_bookings_waitlist_and_releases_are_audited_by_the_consumer_with_ids_and_codes() -> None:
    """Every change the consumer makes is in the trail, in the transaction of its event: the site copy,
    a reservation, a waitlisting, a release and a leaving on cancellation; ids, codes and dates only (no
    free text), one intact chain."""
    from v2v_audit import verify

    w = World()
    await w.deliver(site_event("DE-A", capacity=1))
    first, elsewhere = Order(1), Order(2, regulator="TGA")  # no site is approved for the TGA market
    submitted = first.submitted()
    await w.deliver(submitted, elsewhere.submitted())
    slot = w.live(first)
    assert slot is not None
    await w.deliver(first.cancelled(), elsewhere.cancelled())

    trail = w.store.audit
    assert [(r.action, r.object_type, r.reason) for r in trail] == [
        ("site.copy_replaced", "site", SiteRegisteredV1.TYPE),
        ("slot.reserved", "slot", "initial"),
        ("waitlist.entered", "waitlist", "no_approved_site"),
        ("order.closed", "order", "consent_withdrawn"),
        ("slot.released", "slot", "cancelled"),
        ("order.closed", "order", "consent_withdrawn"),
        ("waitlist.left", "waitlist", "cancelled"),
    ]
    assert all(r.actor.client_id == "scheduling.slots" and r.actor.kind == "system" for r in trail)
    reserved = trail[1]
    assert reserved.cause == f"event:{submitted.id}" and reserved.object_id == str(slot.slot_id)
    assert reserved.new == {
        "order_id": str(first.order_id),
        "site_id": "DE-A",
        "product_code": PRODUCT,
        "apheresis_date": slot.apheresis_date.isoformat(),
        "manufacturing_start_date": slot.manufacturing_start_date.isoformat(),
        "status": "held",
    }
    assert verify("scheduling", trail).broken is None


async def test_a_failed_transaction_leaves_no_audit_entry() -> None:
    w = World()
    await w.deliver(site_event("DE-A"))
    before = list(w.store.audit)
    with pytest.raises(RuntimeError):
        async with w.uow.begin() as tx:
            await HANDLERS.dispatch(tx, Order(1).submitted())
            raise RuntimeError("the commit fails")
    assert w.store.audit == before and w.store.slots == {}


# ---- issue 10: a remanufacture gets a new slot at the site that holds the material ------------------------

TODAY = datetime(2031, 3, 10, 9, tzinfo=UTC)


def remanufacture(order: Order, site_id: str, run: int = 2) -> CloudEvent:
    return new_event(
        RemanufactureRequestedV1(
            **order.ids(),
            site_id=site_id,
            reason="out_of_specification",
            run=run,
            product_code=PRODUCT,
            order_type="clinical",
            regulator=order.regulator,
            region="europe",
        )
    )


async def test_a_remanufacture_books_a_new_slot_at_its_site_from_today_within_capacity() -> None:
    w = World()
    w.inbox = FakeInbox(
        w.uow,
        build_handlers(Planning(Parameters(1, 2, horizon_days=3), product_catalogue(), clock=lambda: TODAY)),
    )
    # B-OTHER would deliver as early: a remanufacture never leaves the site that holds the material
    await w.deliver(site_event("A", capacity=1), site_event("B-OTHER", capacity=5))
    first, second, third, late = Order(1), Order(2), Order(3), Order(4)

    events = await w.deliver(remanufacture(first, "A"))
    [reserved] = events
    assert (reserved.type, reserved.data["reason"], reserved.data["run"]) == (RESERVED, "remanufacture", 2)
    assert (reserved.data["site_id"], reserved.data["manufacturing_start_date"]) == ("A", "2031-03-10")
    # in use at once (the material is at the site): it counts against the day, it is never moved or released
    [slot] = w.slots(first)
    assert (slot.status, slot.reserved_reason, str(slot.slot_id)) == (
        "consumed",
        "remanufacture",
        reserved.data["slot_id"],
    )
    assert w.live(first) is None

    # the day is taken: the next remanufacture at A gets the next free day, and so does a new order
    [second_slot] = await w.deliver(remanufacture(second, "A"))
    assert second_slot.data["manufacturing_start_date"] == "2031-03-11"
    await w.deliver(remanufacture(third, "A"))
    # no free day within the horizon: booked beyond the day's capacity after it (it cannot go elsewhere),
    # and the audit entry says so
    [beyond] = await w.deliver(remanufacture(late, "A"))
    assert (beyond.data["site_id"], beyond.data["manufacturing_start_date"]) == ("A", "2031-03-13")
    [entry] = [
        e for e in w.store.audit if e.action == "slot.reserved" and e.new["order_id"] == str(late.order_id)
    ]
    assert (entry.reason, entry.new["within_capacity"], entry.new["run"]) == ("remanufacture", False, 2)

    # a closed order's remanufacture books nothing
    closed = Order(5)
    await w.deliver(closed.cancelled())
    assert await w.deliver(remanufacture(closed, "A")) == []
