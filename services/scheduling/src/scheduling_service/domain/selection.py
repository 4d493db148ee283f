"""Site selection: the approved, active site that can start manufacturing the earliest.

Pure: given the sites, the slots already taken and the order, returns the choice or the reason none fits.
A site may be excluded (a rebook away from it) and never starts manufacturing inside one of its outages.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta


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

    def closed_on(self, day: date) -> bool:
        return any(w.covers(day) for w in self.outages)


@dataclass(frozen=True)
class Request:
    product_code: str
    order_type: str
    regulator: str
    region: str
    apheresis_date: date


@dataclass(frozen=True)
class Choice:
    site_id: str
    manufacturing_start_date: date


@dataclass(frozen=True)
class NoChoice:
    reason: str  # no_site_known | no_approved_site | no_capacity
    detail: str


@dataclass(frozen=True)
class Parameters:
    same_region_transit_days: int = 1
    cross_region_transit_days: int = 2
    horizon_days: int = 42


def eligible(site: Site, req: Request) -> bool:
    return site.active and Approval(req.regulator, req.order_type, req.product_code) in site.approvals


def transit_days(site: Site, req: Request, params: Parameters) -> int:
    return params.same_region_transit_days if site.region == req.region else params.cross_region_transit_days


def select_site(
    sites: list[Site],
    used: dict[tuple[str, str, date], int],
    req: Request,
    params: Parameters,
    exclude_site_id: str | None = None,
) -> Choice | NoChoice:
    """`used[(site, product, day)]` is how many slots use that day's capacity (held, confirmed, consumed).

    `exclude_site_id` is never chosen; no site is chosen on a day inside one of its outages.
    """
    if not sites:
        return NoChoice("no_site_known", "no manufacturing site is registered yet")
    candidates = [s for s in sites if eligible(s, req) and s.site_id != exclude_site_id]
    if not candidates:
        other = f" other than {exclude_site_id}" if exclude_site_id is not None else ""
        return NoChoice(
            "no_approved_site",
            f"no active site{other} approved for {req.product_code} ({req.order_type}) by {req.regulator}",
        )
    best: Choice | None = None
    for site in sorted(candidates, key=lambda s: s.site_id):
        capacity = site.daily_capacity.get(req.product_code, 0)
        if capacity <= 0:
            continue
        first = req.apheresis_date + timedelta(days=transit_days(site, req, params))
        for offset in range(params.horizon_days):
            day = first + timedelta(days=offset)
            if best is not None and day >= best.manufacturing_start_date:
                break
            if site.closed_on(day):
                continue
            if used.get((site.site_id, req.product_code, day), 0) < capacity:
                best = Choice(site.site_id, day)
                break
    if best is None:
        return NoChoice("no_capacity", f"no approved site has capacity within {params.horizon_days} days")
    return best
