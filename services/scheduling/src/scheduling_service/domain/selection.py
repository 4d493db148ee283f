"""Site selection: the approved, active site that gets the product to the patient the earliest.

The predicted delivery of a site is its first free manufacturing day (after the inbound transit of the
apheresis material on the lane centre → site, fresh or cryopreserved) plus the product's manufacturing
and QC days plus the outbound transit of the cryopreserved product on the lane site → centre. Ties go
to the earlier start, then to the smallest site id. Lanes come from a table by region pair and
material; a lane missing from the table falls back to the same-region / cross-region inbound days and
to no outbound days.

Pure: given the sites, the slots already taken and the order, returns the choice or the reason none fits.
A site may be excluded (a rebook away from it) and never starts manufacturing inside one of its outages.

Material-aware planning (issue 11), when the request carries the product's planning facts and the caller
passes `now` (and the sites' calendars, and a centre's quota):
- nothing is planned before today in the site's time zone: an apheresis date in the past (a request that
  waited) is re-planned from today;
- manufacturing starts only on the site's working days (`planning.Calendar`) and, with a quota, only in a
  period where the centre has room;
- fresh material: the manufacturing day is chosen first and the apheresis date derived from it, so that
  the start is at most `max_fresh_days` calendar days after collection (the requested date when that
  holds, else the earliest date after it that does); a lane longer than that window is not used;
- cryopreserved material: collected on the requested date, frozen (`freezing_days`, at the centre for
  tisa-cel), stored and shipped; the run starts on any later free day;
- the predicted delivery is the start plus the product's start-to-release days (from its published
  apheresis-to-release median: QC inside, never added on top) plus the outbound leg; `plans` lists a
  site's alternatives (its next free days), which the availability offers show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from itertools import islice

from scheduling_service.domain.planning import EVERY_DAY, Calendar, today_at


@dataclass(frozen=True)
class Approval:
    regulator: str
    use: str
    product_code: str


@dataclass(frozen=True)
class Window:
    """A closed date interval: both ends included."""

    start_date: date
    end_date: date

    def covers(self, day: date) -> bool:
        return self.start_date <= day <= self.end_date


@dataclass(frozen=True)
class Site:
    site_id: str
    region: str
    active: bool
    approvals: frozenset[Approval]
    daily_capacity: dict[str, int]
    outages: tuple[Window, ...] = ()
    timezone: str = "UTC"  # the site's IANA time zone: its "today"

    def closed_on(self, day: date) -> bool:
        return any(w.covers(day) for w in self.outages)

    @property
    def products(self) -> set[str]:
        """Every product the site has capacity or an approval for."""
        return {*self.daily_capacity, *(a.product_code for a in self.approvals)}

    def approves(self, regulator: str, use: str, product_code: str) -> bool:
        """Active and approved for the product, the use and the regulator of the order's market."""
        return self.active and Approval(regulator, use, product_code) in self.approvals


@dataclass(frozen=True)
class Request:
    product_code: str
    order_type: str
    regulator: str
    region: str
    apheresis_date: date
    material: str = "fresh"  # how the apheresis material travels: fresh | cryopreserved
    processing_days: int = 0  # manufacturing start → release (the median; QC inside)
    # issue 11: the product's planning facts (None / 0: as before)
    max_fresh_days: int | None = None  # fresh: start at most this many days after collection
    freezing_days: int = 0  # cryopreserved at the centre first: days before it can ship
    processing_days_p90: int | None = None  # start → release, p90
    # issue 10: a remanufacture from material retained at the site: no collection, no inbound leg
    material_at_site: bool = False
    # issue 11: the material was collected on `apheresis_date` (it is waiting for pickup or in transit):
    # that date is not re-planned, and fresh material must still start within its window of it
    collected: bool = False


@dataclass(frozen=True)
class Choice:
    site_id: str
    manufacturing_start_date: date
    predicted_delivery: date | None = field(default=None, compare=False)
    apheresis_date: date | None = field(default=None, compare=False)  # planned collection (None: asked)
    predicted_release: date | None = field(default=None, compare=False)
    predicted_delivery_p90: date | None = field(default=None, compare=False)


@dataclass(frozen=True)
class NoChoice:
    reason: str  # no_site_known | no_approved_site | no_capacity
    detail: str


@dataclass(frozen=True)
class Parameters:
    same_region_transit_days: int = 1
    cross_region_transit_days: int = 2
    horizon_days: int = 42
    # (from region, to region, material) -> transit days
    lanes: dict[tuple[str, str, str], int] = field(default_factory=dict)


def eligible(site: Site, req: Request) -> bool:
    return site.approves(req.regulator, req.order_type, req.product_code)


def transit_days(site: Site, req: Request, params: Parameters) -> int:
    """Inbound: the apheresis material from the centre's region to the site's (none when it is there)."""
    if req.material_at_site:
        return 0
    lane = params.lanes.get((req.region, site.region, req.material))
    if lane is not None:
        return lane
    return params.same_region_transit_days if site.region == req.region else params.cross_region_transit_days


def outbound_days(site: Site, req: Request, params: Parameters) -> int:
    """Outbound: the cryopreserved product from the site's region back to the centre's."""
    return params.lanes.get((site.region, req.region, "cryopreserved"), 0)


DayFilter = Callable[[date], bool]


def earliest_apheresis(site: Site, req: Request, now: datetime | None) -> date:
    """The requested apheresis date, or today at the site when that date has passed (collected material:
    its collection date, as it was)."""
    if now is None or req.collected:
        return req.apheresis_date
    return max(req.apheresis_date, today_at(site.timezone, now))


def plans(
    site: Site,
    used: Mapping[tuple[str, str, date], int],
    req: Request,
    params: Parameters,
    *,
    now: datetime | None = None,
    calendar: Calendar = EVERY_DAY,
    allowed: DayFilter | None = None,
) -> Iterator[Choice]:
    """Every day the site could start the request's run within the horizon, earliest first, each with
    its planned apheresis date and predicted release and delivery."""
    capacity = site.daily_capacity.get(req.product_code, 0)
    if capacity <= 0:
        return
    inbound = transit_days(site, req, params)
    fresh_window = req.max_fresh_days if req.material == "fresh" else None
    if fresh_window is not None and inbound > fresh_window:
        return  # the lane is longer than fresh material may wait
    collect = earliest_apheresis(site, req, now)
    # frozen at the centre before it ships (collected material that is on its way has been already)
    freezing = (
        req.freezing_days
        if req.material == "cryopreserved" and not (req.material_at_site or req.collected)
        else 0
    )
    first = collect + timedelta(days=freezing + inbound)
    if req.collected and now is not None:  # collected earlier: nothing before today at the site
        first = max(first, today_at(site.timezone, now))
    outbound = outbound_days(site, req, params)
    for offset in range(params.horizon_days):
        day = first + timedelta(days=offset)
        if req.collected and fresh_window is not None and day > collect + timedelta(days=fresh_window):
            return  # the collected fresh material cannot wait any longer
        if site.closed_on(day) or not calendar.works_on(day):
            continue
        if allowed is not None and not allowed(day):
            continue
        if used.get((site.site_id, req.product_code, day), 0) >= capacity:
            continue
        apheresis = collect
        if fresh_window is not None and not req.collected:  # from the manufacturing day back: the window
            apheresis = max(collect, day - timedelta(days=fresh_window))
        release = day + timedelta(days=req.processing_days)
        p90 = day + timedelta(days=req.processing_days_p90) if req.processing_days_p90 is not None else None
        yield Choice(
            site.site_id,
            day,
            release + timedelta(days=outbound),
            apheresis,
            release,
            p90 + timedelta(days=outbound) if p90 is not None else None,
        )


def remanufacture_plan(
    site: Site,
    used: Mapping[tuple[str, str, date], int],
    req: Request,
    params: Parameters,
    *,
    now: datetime,
    calendar: Calendar = EVERY_DAY,
) -> tuple[Choice, bool]:
    """A remanufacture's run at the site that holds the retained material (it cannot go elsewhere): the
    site's first free working day from today, outside its outages; `(choice, True)`. With no free day
    within the horizon, the first working day after it, booked beyond the day's capacity: `(choice,
    False)` — the site's planners have to fit the run in, and the booking says so."""
    req = dataclasses.replace(req, material_at_site=True, apheresis_date=today_at(site.timezone, now))
    free = next(plans(site, used, req, params, now=now, calendar=calendar), None)
    if free is not None:
        return free, True
    day = req.apheresis_date + timedelta(days=params.horizon_days)
    for _ in range(366):
        if not site.closed_on(day) and calendar.works_on(day):
            break
        day += timedelta(days=1)
    release = day + timedelta(days=req.processing_days)
    delivery = release + timedelta(days=outbound_days(site, req, params))
    return Choice(site.site_id, day, delivery, req.apheresis_date, release), False


def candidates_for(sites: list[Site], req: Request, exclude_site_id: str | None) -> list[Site] | NoChoice:
    if not sites:
        return NoChoice("no_site_known", "no manufacturing site is registered yet")
    candidates = [s for s in sites if eligible(s, req) and s.site_id != exclude_site_id]
    if not candidates:
        other = f" other than {exclude_site_id}" if exclude_site_id is not None else ""
        return NoChoice(
            "no_approved_site",
            f"no active site{other} approved for {req.product_code} ({req.order_type}) by {req.regulator}",
        )
    return sorted(candidates, key=lambda s: s.site_id)


def select_site(
    sites: list[Site],
    used: dict[tuple[str, str, date], int],
    req: Request,
    params: Parameters,
    exclude_site_id: str | None = None,
    *,
    now: datetime | None = None,
    calendars: Mapping[str, Calendar] | None = None,
    allowed: DayFilter | None = None,
) -> Choice | NoChoice:
    """`used[(site, product, day)]` is how many slots use that day's capacity (held, confirmed, consumed,
    and the centres' active holds).

    `exclude_site_id` is never chosen; no site is chosen on a day inside one of its outages, off its
    calendar, or (with `allowed`, a centre's quota) in a period the centre has used up; with `now`,
    nothing before today at the site.
    """
    candidates = candidates_for(sites, req, exclude_site_id)
    if isinstance(candidates, NoChoice):
        return candidates
    best: Choice | None = None
    best_key: tuple[date, date, str] | None = None
    for site in candidates:
        calendar = (calendars or {}).get(site.site_id, EVERY_DAY)
        choice = next(plans(site, used, req, params, now=now, calendar=calendar, allowed=allowed), None)
        if choice is None:
            continue
        assert choice.predicted_delivery is not None
        key = (choice.predicted_delivery, choice.manufacturing_start_date, site.site_id)
        if best_key is None or key < best_key:
            best, best_key = choice, key
    if best is None:
        return NoChoice("no_capacity", f"no approved site has capacity within {params.horizon_days} days")
    return best


def offers(
    sites: list[Site],
    used: dict[tuple[str, str, date], int],
    req: Request,
    params: Parameters,
    *,
    per_site: int = 3,
    now: datetime | None = None,
    calendars: Mapping[str, Calendar] | None = None,
    allowed: DayFilter | None = None,
    apheresis_until: date | None = None,
) -> list[Choice] | NoChoice:
    """Availability: per approved site its `per_site` earliest plans (the first is the site's earliest
    predicted delivery, the others its alternatives), at most until `apheresis_until`; ordered by
    predicted delivery, then start, then site."""
    candidates = candidates_for(sites, req, None)
    if isinstance(candidates, NoChoice):
        return candidates
    found: list[Choice] = []
    for site in candidates:
        calendar = (calendars or {}).get(site.site_id, EVERY_DAY)
        site_plans = plans(site, used, req, params, now=now, calendar=calendar, allowed=allowed)
        for choice in islice(site_plans, per_site):
            if apheresis_until is not None and (choice.apheresis_date or date.max) > apheresis_until:
                break
            found.append(choice)
    found.sort(key=lambda c: (c.predicted_delivery or date.max, c.manufacturing_start_date, c.site_id))
    return found
