"""The site registry's rules (pure): a site's entry from the seed, what a restart's seed load keeps of the
registry API's changes, what a change may contain, and which bookings a capacity cut or an outage leaves
without a place.

A site is run by one manufacturer (a vendor-neutral code, issue 11) and may hold approvals and capacity
only for the products that manufacturer makes or contract-manufactures (`check_made_by`; the catalogue
says who makes what).

Every change to an entry is published as `site.registered` (with its outages); bookings an outage or a
capacity cut leaves without a place are marked `affected` and announced (`site.booking_affected`), so the
order can move to another site; the booking is cancelled once scheduling releases its slot.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, get_args

from v2v_contracts import Outage, SiteApproval, SiteRegisteredV1
from v2v_contracts.errors import Invalid
from v2v_contracts.events import OutageReason

CAPACITY_CUT = "capacity_cut"
LIVE = ("confirmed", "affected")  # booking statuses that still hold a place in a site's plan

OUTAGE_REASONS: tuple[str, ...] = get_args(OutageReason)
# an outage window: it may have begun up to 30 days ago (declared late), it ends within two years, and
# it lasts at most a year (a longer closure is `active: false`)
OUTAGE_PAST = timedelta(days=30)
OUTAGE_FUTURE = timedelta(days=730)
OUTAGE_MAX_DAYS = 366
# manufacturing starts per day and product: a sanity bound far above any real site (the load bench sets
# 100 000 so that no order waits)
MAX_DAILY_CAPACITY = 100_000


@dataclass(frozen=True)
class Site:
    """A site as stored: its published entry, and the fields changed over the registry API since the
    seed ('active', 'approvals', 'daily_capacity:<product>'), which a restart's seed load leaves alone."""

    entry: SiteRegisteredV1
    api_managed: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Booking:
    """A slot in a site's manufacturing plan, for one order."""

    booking_id: uuid.UUID
    order_id: uuid.UUID
    coi: str
    slot_id: uuid.UUID
    site_id: str
    manufacturing_start_date: date
    apheresis_date: date
    status: str  # confirmed | affected | cancelled
    treatment_center_id: str | None = None  # None for bookings from before it was recorded
    product_code: str | None = None
    run: int | None = None  # a remanufacture's booking (issue 10): its run; the material is at the site

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def ref(self) -> dict[str, Any]:
        """The order references every event about this booking carries."""
        return {
            "order_id": self.order_id,
            "coi": self.coi,
            "treatment_center_id": self.treatment_center_id or "",
        }


@dataclass(frozen=True)
class OrderFacts:
    """What the site learns of an order from the order service (issue 10): the market it is for
    (`order.submitted`: regulator, use, country, region) and the DIN of its latest collection
    (`order.apheresis_completed`), which a receipt must present beside the COI. None: not known (yet)."""

    order_id: uuid.UUID
    regulator: str | None = None
    order_type: str | None = None
    country: str | None = None
    region: str | None = None
    din: str | None = None
    collection: int | None = None


# ---- the seed ---------------------------------------------------------------------------------------


def site_from_seed(entry: Mapping[str, Any]) -> SiteRegisteredV1:
    approvals = [
        SiteApproval(
            regulator=a["regulator"],
            use=a["use"],
            product_code=p,
            batch_release_site_id=a.get("batch_release_site"),
        )
        for a in entry["approvals"]
        for p in a["products"]
    ]
    return SiteRegisteredV1(
        site_id=entry["site_id"],
        name=entry["name"],
        country=entry["country"],
        region=entry["region"],
        timezone=entry["timezone"],
        operator=entry["operator"],
        manufacturer=entry.get("manufacturer"),
        active=bool(entry["active"]),
        approvals=approvals,
        daily_capacity={k: int(v) for k, v in entry["daily_capacity"].items()},
    )


def merge_seed(seeded: SiteRegisteredV1, current: Site | None) -> SiteRegisteredV1:
    """The seed entry, keeping what was changed over the registry API since (and every outage)."""
    if current is None:
        return seeded
    managed = current.api_managed
    capacity = dict(seeded.daily_capacity)
    for product, n in current.entry.daily_capacity.items():
        if f"daily_capacity:{product}" in managed:
            capacity[product] = int(n)
    return seeded.model_copy(
        update={
            "active": current.entry.active if "active" in managed else seeded.active,
            "approvals": current.entry.approvals if "approvals" in managed else seeded.approvals,
            "daily_capacity": capacity,
            "outages": current.entry.outages,
        }
    )


# ---- registry changes ---------------------------------------------------------------------------------


def _unknown_product(products: Collection[str]) -> str:
    return f"unknown product; known: {', '.join(sorted(products))}"


def validate_capacity(daily_capacity: Mapping[str, object], products: Collection[str]) -> None:
    for product, n in daily_capacity.items():
        name = f"daily_capacity.{product}"
        if product not in products:
            raise Invalid(name, _unknown_product(products))
        if isinstance(n, bool) or not isinstance(n, int):
            raise Invalid(name, "must be a whole number")
        if n < 0:
            raise Invalid(name, "must be 0 or more")
        if n > MAX_DAILY_CAPACITY:
            raise Invalid(name, f"must be at most {MAX_DAILY_CAPACITY}")


def validate_approvals(
    approvals: Iterable[SiteApproval], products: Collection[str], sites: Collection[str] | None = None
) -> None:
    """Known products; a batch-release site, when named, is a site of the registry (`sites`)."""
    for i, approval in enumerate(approvals):
        if approval.product_code not in products:
            raise Invalid(f"approvals.{i}.product_code", _unknown_product(products))
        brs = approval.batch_release_site_id
        if brs is not None and sites is not None and brs not in sites:
            raise Invalid(f"approvals.{i}.batch_release_site_id", "not a site of the registry")


def check_made_by(
    manufacturer: str | None,
    makers: Mapping[str, Collection[str]],
    *,
    approvals: Iterable[SiteApproval] = (),
    daily_capacity: Mapping[str, int] | None = None,
) -> None:
    """A site run by `manufacturer` is approved, and given capacity, only for the products whose makers
    (`makers`: product code -> the product's manufacturer and its declared contract manufacturers) include
    it. A site whose manufacturer is not known (an entry from before issue 11) is not checked; an unknown
    product is `validate_*`'s to refuse."""
    if manufacturer is None:
        return
    for i, approval in enumerate(approvals):
        allowed = makers.get(approval.product_code)
        if allowed is not None and manufacturer not in allowed:
            raise Invalid(f"approvals.{i}.product_code", _not_made_by(manufacturer, allowed))
    for product, n in (daily_capacity or {}).items():
        allowed = makers.get(product)
        if allowed is not None and manufacturer not in allowed and n > 0:
            raise Invalid(f"daily_capacity.{product}", _not_made_by(manufacturer, allowed))


def _not_made_by(manufacturer: str, allowed: Collection[str]) -> str:
    return (
        f"not made at sites of this site's manufacturer ({manufacturer}); "
        f"only at sites of {', '.join(sorted(allowed))}"
    )


@dataclass(frozen=True)
class Patch:
    """A registry change as applied: the new entry, the fields the API now manages, the products cut."""

    entry: SiteRegisteredV1
    api_managed: frozenset[str]
    capacity_cut: list[str]


def patch_site(
    site: Site,
    *,
    daily_capacity: Mapping[str, int] | None = None,
    active: bool | None = None,
    approvals: list[SiteApproval] | None = None,
) -> Patch:
    """Change a site's capacity per product (a partial map), whether it is active, and/or its approvals
    (the whole list: per regulator, use and product)."""
    entry = site.entry
    capacity = {**entry.daily_capacity, **(daily_capacity or {})}
    managed = set(site.api_managed) | {f"daily_capacity:{p}" for p in daily_capacity or {}}
    if active is not None:
        managed.add("active")
    if approvals is not None:
        managed.add("approvals")
    new = entry.model_copy(
        update={
            "daily_capacity": capacity,
            "active": entry.active if active is None else active,
            "approvals": entry.approvals if approvals is None else list(dict.fromkeys(approvals)),
        }
    )
    cut = [p for p, n in (daily_capacity or {}).items() if n < entry.daily_capacity.get(p, 0)]
    return Patch(new, frozenset(managed), cut)


def capacity_overflow(
    candidates: Iterable[tuple[Booking, bool]], capacity: Mapping[str, int]
) -> list[Booking]:
    """Bookings beyond a day's capacity. `candidates` are (booking, material arrived) per product and day,
    in plan order (arrived first within a day); the latest booked go first, never ones whose material has
    arrived (they keep their place and count against the capacity first)."""
    per_day: dict[tuple[str | None, date], list[tuple[Booking, bool]]] = defaultdict(list)
    for booking, arrived in candidates:
        per_day[(booking.product_code, booking.manufacturing_start_date)].append((booking, arrived))
    over: list[Booking] = []
    for (product, _day), day in per_day.items():
        over += [b for b, arrived in day[capacity.get(product or "", 0) :] if not arrived]
    return over


def check_outage(start_date: date, end_date: date, reason: str, today: date) -> str:
    """An outage window is inclusive, inside [today - 30 days, today + 2 years], at most a year long, and
    names an `OutageReason` code; returns the code."""
    if start_date < today - OUTAGE_PAST:
        raise Invalid("start_date", f"must be within the last {OUTAGE_PAST.days} days or later")
    if start_date > today + OUTAGE_FUTURE:
        raise Invalid("start_date", f"must be within {OUTAGE_FUTURE.days} days from today")
    if end_date < start_date:
        raise Invalid("end_date", "must be on or after start_date")
    if end_date > today + OUTAGE_FUTURE:
        raise Invalid("end_date", f"must be within {OUTAGE_FUTURE.days} days from today")
    if (end_date - start_date).days + 1 > OUTAGE_MAX_DAYS:
        raise Invalid(
            "end_date", f"an outage lasts at most {OUTAGE_MAX_DAYS} days (else deactivate the site)"
        )
    if reason not in OUTAGE_REASONS:
        raise Invalid("reason", f"must be one of {', '.join(OUTAGE_REASONS)}")
    return reason


def outage_reason(reason: str) -> str:
    """The reason code an outage gives the bookings it affects: `outage:<code>`."""
    return f"outage:{reason}"


def outage_on(outages: Iterable[Outage], day: date) -> Outage | None:
    """The first declared outage whose window holds `day`."""
    return next((o for o in outages if o.start_date <= day <= o.end_date), None)
