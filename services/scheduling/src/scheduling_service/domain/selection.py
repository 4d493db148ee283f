"""Site selection: the approved, active site that gets the product to the patient the earliest.

The predicted delivery of a site is its first free manufacturing day (after the inbound transit of the
apheresis material on the lane centre → site, fresh or cryopreserved) plus the product's manufacturing
and QC days plus the outbound transit of the cryopreserved product on the lane site → centre. Ties go
to the earlier start, then to the smallest site id. Lanes come from a table by region pair and
material; a lane missing from the table falls back to the same-region / cross-region inbound days and
to no outbound days.

Pure: given the sites, the slots already taken and the order, returns the choice or the reason none fits.
A site may be excluded (a rebook away from it) and never starts manufacturing inside one of its outages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    processing_days: int = 0  # the product's manufacturing + QC days


@dataclass(frozen=True)
class Choice:
    site_id: str
    manufacturing_start_date: date
    predicted_delivery: date | None = field(default=None, compare=False)


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
    """Inbound: the apheresis material from the centre's region to the site's."""
    lane = params.lanes.get((req.region, site.region, req.material))
    if lane is not None:
        return lane
    return params.same_region_transit_days if site.region == req.region else params.cross_region_transit_days


def outbound_days(site: Site, req: Request, params: Parameters) -> int:
    """Outbound: the cryopreserved product from the site's region back to the centre's."""
    return params.lanes.get((site.region, req.region, "cryopreserved"), 0)


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
    best_key: tuple[date, date, str] | None = None
    for site in sorted(candidates, key=lambda s: s.site_id):
        capacity = site.daily_capacity.get(req.product_code, 0)
        if capacity <= 0:
            continue
        first = req.apheresis_date + timedelta(days=transit_days(site, req, params))
        for offset in range(params.horizon_days):
            day = first + timedelta(days=offset)
            if site.closed_on(day):
                continue
            if used.get((site.site_id, req.product_code, day), 0) < capacity:
                delivery = day + timedelta(days=req.processing_days + outbound_days(site, req, params))
                key = (delivery, day, site.site_id)
                if best_key is None or key < best_key:
                    best, best_key = Choice(site.site_id, day, delivery), key
                break
    if best is None:
        return NoChoice("no_capacity", f"no approved site has capacity within {params.horizon_days} days")
    return best
