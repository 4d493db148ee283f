"""Material-aware planning (issue 11), pure and through the handlers on the in-memory store.

The acceptance property: over random capacities, calendars, outages, time zones, requested dates and
"now", a fresh-material order never gets a manufacturing start later than the product's maximum hours
after collection, and no planned date (apheresis, manufacturing start) is before today at the site; a
start is always on one of the site's working days. Waiting orders served later are planned again from
that day's today (the waitlist no longer serves dates in the past).
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduling_service.adapters.memory import SchedulingStore, fake_uow
from scheduling_service.domain.planning import EVERY_DAY, Allocation, Calendar, today_at
from scheduling_service.domain.selection import Approval, Choice, Parameters, Site, offers, plans, select_site
from scheduling_service.domain.slots import Planning, plan_request
from scheduling_service.service_layer.handlers import build_handlers
from v2v_contracts import OrderSubmittedV1, RebookRequestedV1, SiteApproval, SiteRegisteredV1, new_event
from v2v_contracts.reference import product_catalogue
from v2v_messaging.fakes import FakeInbox

CATALOGUE = product_catalogue()
FRESH = [code for code, p in CATALOGUE.items() if p.planning and p.planning.starting_material == "fresh"]
ZONES = ["UTC", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Tokyo", "Europe/Zurich", "America/New_York"]
REGIONS = ["europe", "north_america", "asia_pacific"]
BASE = datetime(2027, 1, 1, tzinfo=UTC)

calendars_st = st.builds(
    Calendar,
    working_days=st.frozensets(st.integers(0, 6), min_size=1, max_size=7),
    holidays=st.frozensets(st.integers(0, 60).map(lambda n: BASE.date() + timedelta(days=n)), max_size=8),
)


@st.composite
def worlds(draw: st.DrawFn) -> dict[str, Any]:
    product = draw(st.sampled_from(FRESH))
    n = draw(st.integers(1, 4))
    sites = [
        Site(
            site_id=f"S{i}",
            region=draw(st.sampled_from(REGIONS)),
            active=True,
            approvals=frozenset({Approval("EMA", "commercial", product)}),
            daily_capacity={product: draw(st.integers(0, 3))},
            timezone=draw(st.sampled_from(ZONES)),
        )
        for i in range(n)
    ]
    now = BASE + timedelta(minutes=draw(st.integers(0, 20 * 24 * 60)))
    requested = BASE.date() + timedelta(days=draw(st.integers(-15, 25)))  # may be in the past by now
    used = {
        (s.site_id, product, BASE.date() + timedelta(days=d)): draw(st.integers(0, 3))
        for s in sites
        for d in draw(st.lists(st.integers(0, 70), max_size=25))
    }
    params = Parameters(
        same_region_transit_days=draw(st.integers(0, 2)),
        cross_region_transit_days=draw(st.integers(1, 4)),
        horizon_days=draw(st.integers(1, 42)),
    )
    return {
        "product": product,
        "sites": sites,
        "now": now,
        "req": plan_request(
            CATALOGUE[product], product, "commercial", "EMA", draw(st.sampled_from(REGIONS)), requested
        ),
        "used": used,
        "params": params,
        "calendars": {s.site_id: draw(calendars_st) for s in sites},
    }


def assert_planned_well(choice: Choice, w: dict[str, Any]) -> None:
    product = CATALOGUE[w["product"]]
    assert product.planning is not None and product.planning.max_fresh_hours is not None
    site = next(s for s in w["sites"] if s.site_id == choice.site_id)
    today = today_at(site.timezone, w["now"])
    assert choice.apheresis_date is not None
    # the fresh window: manufacturing starts at most max hours (whole days of it) after collection
    gap = choice.manufacturing_start_date - choice.apheresis_date
    assert timedelta(0) <= gap and gap.days * 24 <= product.planning.max_fresh_hours
    # never in the past, at the site
    assert choice.apheresis_date >= today and choice.manufacturing_start_date >= today
    assert choice.apheresis_date >= w["req"].apheresis_date  # never earlier than asked
    assert w["calendars"][site.site_id].works_on(choice.manufacturing_start_date)
    cap = site.daily_capacity[w["product"]]
    assert w["used"].get((site.site_id, w["product"], choice.manufacturing_start_date), 0) < cap


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_a_fresh_order_starts_within_its_window_on_a_working_day_and_never_in_the_past(
    w: dict[str, Any],
) -> None:
    choice = select_site(w["sites"], w["used"], w["req"], w["params"], now=w["now"], calendars=w["calendars"])
    if isinstance(choice, Choice):
        assert_planned_well(choice, w)
    found = offers(
        w["sites"], w["used"], w["req"], w["params"], per_site=4, now=w["now"], calendars=w["calendars"]
    )
    assert isinstance(found, list)
    for offer in found:
        assert_planned_well(offer, w)
    if isinstance(choice, Choice):  # the booking is the best offer
        assert found and found[0].predicted_delivery == choice.predicted_delivery


def site(site_id: str = "EU", *, capacity: int = 1, timezone: str = "Europe/Zurich") -> Site:
    return Site(
        site_id,
        "europe",
        True,
        frozenset({Approval("EMA", "commercial", p) for p in CATALOGUE}),
        dict.fromkeys(CATALOGUE, capacity),
        timezone=timezone,
    )


PARAMS = Parameters(1, 2, horizon_days=42)
MONDAY = date(2027, 3, 1)


def test_fresh_chooses_the_manufacturing_day_first_and_derives_the_apheresis_date() -> None:
    req = plan_request(CATALOGUE["AXI-CEL"], "AXI-CEL", "commercial", "EMA", "europe", MONDAY)
    full = {("EU", "AXI-CEL", MONDAY + timedelta(days=k)): 1 for k in range(1, 6)}  # Tue..Sat taken
    choice = select_site([site()], full, req, PARAMS, now=datetime(2027, 2, 1, tzinfo=UTC))
    assert isinstance(choice, Choice)
    assert choice.manufacturing_start_date == MONDAY + timedelta(days=6)  # Sunday
    # 48 h: collected two days before the start, not on the requested Monday (six days before)
    assert choice.apheresis_date == choice.manufacturing_start_date - timedelta(days=2)
    # the requested date stands when the first free day is inside the window
    free = select_site([site()], {}, req, PARAMS, now=datetime(2027, 2, 1, tzinfo=UTC))
    assert isinstance(free, Choice) and free.apheresis_date == MONDAY
    assert free.manufacturing_start_date == MONDAY + timedelta(days=1)


def test_alternatives_are_the_sites_next_days_each_with_its_own_apheresis_date() -> None:
    req = plan_request(CATALOGUE["CILTA-CEL"], "CILTA-CEL", "commercial", "EMA", "europe", MONDAY)
    found = offers([site()], {}, req, PARAMS, per_site=3, now=datetime(2027, 2, 1, tzinfo=UTC))
    assert isinstance(found, list)
    assert [o.manufacturing_start_date for o in found] == [MONDAY + timedelta(days=k) for k in (1, 2, 3)]
    assert [o.apheresis_date for o in found] == [MONDAY, MONDAY, MONDAY]  # all within 72 h
    more = offers([site()], {}, req, PARAMS, per_site=6, now=datetime(2027, 2, 1, tzinfo=UTC))
    assert isinstance(more, list) and more[-1].apheresis_date == more[
        -1
    ].manufacturing_start_date - timedelta(days=3)


def test_cryopreserved_material_is_frozen_at_the_centre_then_booked_any_later_day() -> None:
    product = CATALOGUE["TISA-CEL"]
    assert product.planning is not None and product.planning.centre_freezing_days >= 1
    req = plan_request(product, "TISA-CEL", "commercial", "EMA", "europe", MONDAY)
    full = {("EU", "TISA-CEL", MONDAY + timedelta(days=k)): 1 for k in range(0, 20)}
    choice = select_site([site()], full, req, PARAMS, now=datetime(2027, 2, 1, tzinfo=UTC))
    assert isinstance(choice, Choice)
    assert choice.apheresis_date == MONDAY  # collected as asked, stored frozen
    assert choice.manufacturing_start_date == MONDAY + timedelta(days=20)  # no window: weeks later is fine
    first = next(plans(site(), {}, req, PARAMS, now=datetime(2027, 2, 1, tzinfo=UTC)))
    assert first.manufacturing_start_date == MONDAY + timedelta(
        days=product.planning.centre_freezing_days + 1
    )


def test_qc_is_inside_the_published_turnaround_not_added_on_top() -> None:
    """Axi-cel in the US: apheresis to release, median 14 days (Kite, 2024): the plan's predicted
    release for a start the day after apheresis is 14 days after apheresis, not manufacturing + QC (21)."""
    product = CATALOGUE["AXI-CEL"]
    assert product.planning is not None
    assert product.planning.turnaround("north_america").median_days == 14
    us = Site(
        "US", "north_america", True, frozenset({Approval("FDA", "commercial", "AXI-CEL")}), {"AXI-CEL": 1}
    )
    req = plan_request(product, "AXI-CEL", "commercial", "FDA", "north_america", MONDAY)
    choice = select_site([us], {}, req, Parameters(1, 2, 42), now=datetime(2027, 2, 1, tzinfo=UTC))
    assert isinstance(choice, Choice) and choice.apheresis_date == MONDAY
    assert choice.predicted_release == MONDAY + timedelta(days=14)
    assert product.manufacturing_days + product.qc_days == 21  # what the old sum said
    assert choice.predicted_delivery_p90 is not None and choice.predicted_delivery is not None
    assert choice.predicted_delivery_p90 >= choice.predicted_delivery


def test_today_is_the_sites_date_and_nothing_is_planned_before_it() -> None:
    req = plan_request(CATALOGUE["CILTA-CEL"], "CILTA-CEL", "commercial", "EMA", "europe", MONDAY)
    # 23:30 UTC on Monday: already Tuesday in Kiritimati (UTC+14), still Monday in Pago Pago (UTC-11)
    now = datetime(2027, 3, 1, 23, 30, tzinfo=UTC)
    east = select_site([site("E", timezone="Pacific/Kiritimati")], {}, req, PARAMS, now=now)
    west = select_site([site("W", timezone="Pacific/Pago_Pago")], {}, req, PARAMS, now=now)
    assert isinstance(east, Choice) and isinstance(west, Choice)
    assert east.apheresis_date == MONDAY + timedelta(days=1) and west.apheresis_date == MONDAY


def test_a_site_starts_only_on_its_working_days_and_never_on_a_holiday() -> None:
    req = plan_request(CATALOGUE["TISA-CEL"], "TISA-CEL", "commercial", "EMA", "europe", MONDAY)
    weekdays = Calendar.of(["mon", "tue", "wed", "thu", "fri"], [MONDAY + timedelta(days=2)])
    days = [
        p.manufacturing_start_date
        for p in plans(
            site(), {}, req, Parameters(1, 2, 10), now=datetime(2027, 2, 1, tzinfo=UTC), calendar=weekdays
        )
    ]
    assert days and all(weekdays.works_on(d) for d in days)
    assert MONDAY + timedelta(days=2) not in days and MONDAY + timedelta(days=5) not in days
    assert EVERY_DAY.works_on(MONDAY + timedelta(days=5))


def test_a_quota_skips_the_periods_the_centre_has_used_up() -> None:
    allocation = Allocation("month", {("TC-1", "CILTA-CEL"): 1})
    gate = allocation.gate("TC-1", "CILTA-CEL", {date(2027, 3, 5): 1})
    assert gate is not None and not gate(date(2027, 3, 31)) and gate(date(2027, 4, 1))
    assert allocation.gate("TC-2", "CILTA-CEL", {}) is None  # no quota: no cap
    req = plan_request(CATALOGUE["CILTA-CEL"], "CILTA-CEL", "commercial", "EMA", "europe", date(2027, 3, 20))
    choice = select_site([site()], {}, req, PARAMS, now=datetime(2027, 2, 1, tzinfo=UTC), allowed=gate)
    assert isinstance(choice, Choice) and choice.manufacturing_start_date == date(2027, 4, 1)
    assert choice.apheresis_date == date(2027, 3, 29)  # fresh: derived from the April start


# ---- through the handlers: the waitlist served later is planned from that day ----------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def site_event(capacity: int) -> Any:
    return new_event(
        SiteRegisteredV1(
            site_id="CH-A",
            name="A",
            country="CH",
            region="europe",
            timezone="Europe/Zurich",
            operator="own",
            active=True,
            approvals=[SiteApproval(regulator="EMA", use="clinical", product_code="CILTA-CEL")],
            daily_capacity={"CILTA-CEL": capacity},
        )
    )


def submitted(n: int, apheresis: date) -> Any:
    return new_event(
        OrderSubmittedV1(
            order_id=uuid.uuid4(),
            coi=f"V2V0027{n:06d}X",
            treatment_center_id="TC-CH-ZH-001",
            product_code="CILTA-CEL",
            order_type="clinical",
            regulator="EMA",
            country="CH",
            region="europe",
            requested_apheresis_date=apheresis,
        )
    )


async def test_orders_served_from_the_waitlist_weeks_later_get_no_date_in_the_past() -> None:
    clock = Clock(datetime(2027, 3, 1, 8, tzinfo=UTC))
    planning = Planning(Parameters(1, 2, horizon_days=3), CATALOGUE, clock=clock)
    uow = fake_uow(SchedulingStore())
    inbox = FakeInbox(uow, build_handlers(planning))
    await inbox.deliver(site_event(1), *(submitted(i, MONDAY + timedelta(days=1)) for i in range(5)))
    assert len(uow.take()) >= 5
    clock.now = datetime(2027, 3, 20, 8, tzinfo=UTC)  # three weeks on, capacity grows
    await inbox.deliver(site_event(3))
    served = [e for e in uow.take() if e.type == "scheduling.slot_reserved.v1"]
    assert len(served) == 2
    today = date(2027, 3, 20)
    for event in served:
        assert date.fromisoformat(event.data["apheresis_date"]) >= today
        start = date.fromisoformat(event.data["manufacturing_start_date"])
        assert start >= today and (start - date.fromisoformat(event.data["apheresis_date"])).days <= 3
        assert event.data["reason"] == "waitlist"


async def test_a_recollection_rebook_waits_ahead_of_new_orders() -> None:
    planning = Planning(
        Parameters(1, 2, horizon_days=2), CATALOGUE, clock=Clock(datetime(2027, 2, 1, tzinfo=UTC))
    )
    store = SchedulingStore()
    uow = fake_uow(store)
    inbox = FakeInbox(uow, build_handlers(planning))
    holders = [submitted(i, MONDAY) for i in range(2)]
    new = [submitted(10 + i, MONDAY) for i in range(2)]
    await inbox.deliver(site_event(1), *holders, *new)
    assert [str(r.request.order_id) for r in store.waitlist.values()] == [e.data["order_id"] for e in new]
    first = holders[0].data
    rebook = RebookRequestedV1(
        order_id=first["order_id"],
        coi=first["coi"],
        treatment_center_id=first["treatment_center_id"],
        kind="recollection",
        reason="material_rejected",
        product_code="CILTA-CEL",
        order_type="clinical",
        regulator="EMA",
        region="europe",
        apheresis_date=MONDAY,
        exclude_site_id="CH-A",  # nowhere else to go: it waits, and its day goes to the first new order
    )
    await inbox.deliver(new_event(rebook))
    async with uow.read() as tx:
        waiting = await tx.waitlist.waiting(["CILTA-CEL"])
    assert [str(w.order_id) for w in waiting] == [first["order_id"], new[1].data["order_id"]]
    assert [w.priority for w in waiting] == [1, 0]  # the moved patient first, then the new order


# ---- issue 11: collected material that must go to another site ----------------------------------------


@settings(max_examples=200, deadline=None)
@given(worlds(), st.integers(0, 3))
def test_collected_fresh_material_goes_only_where_it_can_start_within_its_window_of_the_collection(
    w: dict[str, Any], collected_days_ago: int
) -> None:
    """A redirect after an outage: the collection date is fixed (never re-planned to today), the new
    site's start lies within the product's fresh window of it, and nothing is planned in the past."""
    now: datetime = w["now"]
    collected = now.date() - timedelta(days=collected_days_ago)
    req = dataclasses.replace(w["req"], apheresis_date=collected, collected=True)
    product = CATALOGUE[w["product"]]
    assert product.planning is not None and product.planning.max_fresh_hours is not None
    choice = select_site(w["sites"], w["used"], req, w["params"], now=now, calendars=w["calendars"])
    if not isinstance(choice, Choice):
        return
    site = next(s for s in w["sites"] if s.site_id == choice.site_id)
    assert choice.apheresis_date == collected  # as it was
    gap = choice.manufacturing_start_date - collected
    assert timedelta(0) <= gap and gap.days * 24 <= product.planning.max_fresh_hours
    assert choice.manufacturing_start_date >= today_at(site.timezone, now)
    assert w["calendars"][site.site_id].works_on(choice.manufacturing_start_date)


def test_collected_material_keeps_its_date_and_a_lapsed_fresh_window_finds_no_site() -> None:
    now = datetime(2027, 3, 3, 10, tzinfo=UTC)  # Wednesday
    fresh = dataclasses.replace(
        plan_request(CATALOGUE["AXI-CEL"], "AXI-CEL", "commercial", "EMA", "europe", MONDAY), collected=True
    )
    choice = select_site([site()], {}, fresh, PARAMS, now=now)
    # collected on Monday, 48 h: Wednesday (today) is the last day it may start; never re-planned to today
    assert isinstance(choice, Choice)
    assert (choice.apheresis_date, choice.manufacturing_start_date) == (MONDAY, date(2027, 3, 3))
    taken = {("EU", "AXI-CEL", date(2027, 3, 3)): 1}
    assert not isinstance(select_site([site()], taken, fresh, PARAMS, now=now), Choice)
    # cryopreserved material on its way was frozen already: no second freezing, any later free day
    cryo = dataclasses.replace(
        plan_request(CATALOGUE["TISA-CEL"], "TISA-CEL", "commercial", "EMA", "europe", MONDAY), collected=True
    )
    later = select_site([site()], {}, cryo, PARAMS, now=now)
    assert isinstance(later, Choice)
    assert later.apheresis_date == MONDAY and later.manufacturing_start_date == date(2027, 3, 3)
