"""What scheduling books and remembers: the request for a slot, a booked slot, a waiting request, and
when a booked slot has to move because its site may no longer make the order's product.

Pure: built from the event contracts and the product catalogue handed in; no I/O.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TypeAlias

from scheduling_service.domain.planning import NO_ALLOCATION, Allocation, Calendar
from scheduling_service.domain.selection import Approval, Parameters, Request, Site, Window
from v2v_contracts import (
    OrderSubmittedV1,
    OrderType,
    RebookRequestedV1,
    RemanufactureRequestedV1,
    SiteRegisteredV1,
)
from v2v_contracts.reference.product import Product

LIVE = ("held", "confirmed")  # a slot the order still holds: at most one per order
IN_USE = ("held", "confirmed", "consumed")  # a slot that uses its day's capacity

NO_APPROVED_SITE = "no_approved_site"
# why a live slot is released when its site may no longer make the order's product
APPROVAL_WITHDRAWN = "approval_withdrawn"
SITE_INACTIVE = "site_inactive"
# rebooks that keep the patient's place ahead of new orders on the waitlist (issue 11): moved by a
# recollection (failure, rejected material) or by a site (outage, lost approval), not by their own choice
PRIORITY_REBOOK_KINDS = ("recollection", "site_outage")
REBOOK_PRIORITY = 1


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Planning:
    """What selection needs besides the sites: the scheduling parameters (the seed or the parameters
    file, read at start-up) and the products' facts (the shared catalogue)."""

    params: Parameters
    products: Mapping[str, Product]
    # issue 11: per-site calendars, per-centre quotas (seed files) and the clock "today" comes from
    calendars: Mapping[str, Calendar] = field(default_factory=dict)
    allocation: Allocation = NO_ALLOCATION
    clock: Callable[[], datetime] = utc_now


@dataclass(frozen=True)
class SlotRequest:
    """A request for a slot, from `order.submitted` or `order.rebook_requested` (no patient data)."""

    order_id: uuid.UUID
    coi: str
    treatment_center_id: str
    product_code: str
    order_type: OrderType
    regulator: str
    region: str
    apheresis_date: date
    exclude_site_id: str | None = None
    rebook_kind: str | None = None  # set for a rebook: reschedule | recollection | site_outage
    offer_id: uuid.UUID | None = None  # the centre's hold on an offer (issue 11)
    collected: bool = False  # issue 11: the material exists; `apheresis_date` is its collection date

    @classmethod
    def submitted(cls, o: OrderSubmittedV1) -> SlotRequest:
        return cls(
            o.order_id,
            o.coi,
            o.treatment_center_id,
            o.product_code,
            o.order_type,
            o.regulator,
            o.region,
            o.requested_apheresis_date,
            offer_id=o.offer_id,
        )

    @classmethod
    def rebook(cls, r: RebookRequestedV1) -> SlotRequest:
        return cls(
            r.order_id,
            r.coi,
            r.treatment_center_id,
            r.product_code,
            r.order_type,
            r.regulator,
            r.region,
            r.apheresis_date,
            exclude_site_id=r.exclude_site_id,
            rebook_kind=r.kind,
            collected=r.material_collected,
        )

    def selection(self, products: Mapping[str, Product]) -> Request:
        """The selection request, with the product's material and manufacturing + QC days."""
        product = products.get(self.product_code)
        material, processing = (
            (product.apheresis_material, product.manufacturing_days + product.qc_days)
            if product is not None
            else ("fresh", 0)
        )
        return Request(
            self.product_code,
            self.order_type,
            self.regulator,
            self.region,
            self.apheresis_date,
            material=material,
            processing_days=processing,
        )

    def plan(self, products: Mapping[str, Product]) -> Request:
        """The selection request with the product's planning facts (issue 11): fresh window, freezing at
        the centre, start → release median and p90 for the order's region (QC inside); a product without
        planning facts is selected as before (`selection`)."""
        request = plan_request(
            products.get(self.product_code),
            self.product_code,
            self.order_type,
            self.regulator,
            self.region,
            self.apheresis_date,
        )
        return dataclasses.replace(request, collected=True) if self.collected else request

    @classmethod
    def remanufacture(cls, r: RemanufactureRequestedV1) -> SlotRequest:
        """A remanufacture at the site that holds the material (the order's product and market as the
        command carries them; planned from today at the site)."""
        assert r.product_code is not None and r.order_type is not None
        return cls(
            r.order_id,
            r.coi,
            r.treatment_center_id,
            r.product_code,
            r.order_type,
            r.regulator or "",
            r.region or "",
            date.min,  # replaced by today at the site
        )

    @property
    def waitlist_priority(self) -> int:
        """A patient moved by a recollection or a site keeps a place ahead of new orders."""
        return REBOOK_PRIORITY if self.rebook_kind in PRIORITY_REBOOK_KINDS else 0

    def reserved_reason(self, *, from_waitlist: bool) -> str:
        """`slot_reserved` reason: a rebook stays a rebook even when it had to wait."""
        if self.rebook_kind is not None:
            return f"rebook:{self.rebook_kind}"
        return "waitlist" if from_waitlist else "initial"


@dataclass(frozen=True)
class Slot:
    slot_id: uuid.UUID
    order_id: uuid.UUID
    coi: str
    treatment_center_id: str | None
    site_id: str
    product_code: str
    manufacturing_start_date: date
    apheresis_date: date
    status: str
    reserved_reason: str = "initial"
    # the order's market, kept to notice when the site loses its approval (None: booked before 0003)
    order_type: str | None = None
    regulator: str | None = None
    region: str | None = None
    # issue 11: the date the order's material was collected (`order.apheresis_completed`), once known;
    # a slot booked for collected material (a rebook with `material_collected`) keeps it from the request
    collected_on: date | None = None

    @classmethod
    def booked(
        cls,
        slot_id: uuid.UUID,
        req: SlotRequest,
        site_id: str,
        day: date,
        reason: str,
        apheresis: date | None = None,
    ) -> Slot:
        """`apheresis`: the planned collection date (derived for fresh material, today at the earliest);
        None: the requested one. A request for collected material: its collection date is kept as
        `collected_on` (a later move off the site knows it too)."""
        return cls(
            slot_id,
            req.order_id,
            req.coi,
            req.treatment_center_id,
            site_id,
            req.product_code,
            day,
            apheresis or req.apheresis_date,
            "held",
            reason,
            req.order_type,
            req.regulator,
            req.region,
            req.apheresis_date if req.collected else None,
        )


HOLD_STATUSES = ("active", "claimed", "expired", "released")


@dataclass(frozen=True)
class Hold:
    """A centre's hold on one offer (issue 11): it uses its day's capacity while `active`, until the
    order that names it claims it, the centre releases it, or it expires."""

    hold_id: uuid.UUID
    treatment_center_id: str
    site_id: str
    product_code: str
    order_type: str
    regulator: str
    region: str
    manufacturing_start_date: date
    apheresis_date: date
    status: str
    expires_at: datetime
    order_id: uuid.UUID | None = None
    predicted_delivery: date | None = None

    def usable_for(self, req: SlotRequest, now: datetime) -> bool:
        """Active, not expired, the same centre, product and market as the order."""
        return (
            self.status == "active"
            and now < self.expires_at
            and self.treatment_center_id == req.treatment_center_id
            and (self.product_code, self.order_type, self.regulator, self.region)
            == (req.product_code, req.order_type, req.regulator, req.region)
        )


WaitingRequest: TypeAlias = OrderSubmittedV1 | RebookRequestedV1  # what asked for the slot


@dataclass(frozen=True)
class Waiting:
    """A waitlist entry: the data of the event that asked for the slot and why it waits."""

    request: WaitingRequest
    reason: str
    priority: int = 0

    @property
    def order_id(self) -> uuid.UUID:
        return self.request.order_id

    def slot_request(self) -> SlotRequest:
        if isinstance(self.request, RebookRequestedV1):
            return SlotRequest.rebook(self.request)
        return SlotRequest.submitted(self.request)


def registered_site(site: SiteRegisteredV1) -> Site:
    """The selection's view of a site as the registry registered it."""
    return Site(
        site_id=site.site_id,
        region=site.region,
        active=site.active,
        approvals=frozenset(Approval(a.regulator, a.use, a.product_code) for a in site.approvals),
        daily_capacity=dict(site.daily_capacity),
        outages=tuple(Window(o.start_date, o.end_date) for o in site.outages),
        timezone=site.timezone,
    )


def plan_request(
    product: Product | None,
    product_code: str,
    order_type: str,
    regulator: str,
    region: str,
    apheresis_date: date,
) -> Request:
    """A selection request with the product's planning facts (see `SlotRequest.plan`)."""
    if product is None:
        return Request(product_code, order_type, regulator, region, apheresis_date)
    facts = product.planning
    if facts is None:
        return Request(
            product_code,
            order_type,
            regulator,
            region,
            apheresis_date,
            material=product.apheresis_material,
            processing_days=product.manufacturing_days + product.qc_days,
        )
    return Request(
        product_code,
        order_type,
        regulator,
        region,
        apheresis_date,
        material=facts.starting_material,
        processing_days=facts.release_after_start(region),
        max_fresh_days=facts.max_fresh_hours // 24 if facts.max_fresh_hours is not None else None,
        freezing_days=facts.centre_freezing_days,
        processing_days_p90=facts.release_after_start(region, p90=True),
    )


def move_off(slot: Slot, site: Site, today: date) -> RebookRequestedV1 | None:
    """The rebook a live slot needs when its site (as registered now) is inactive or no longer approved
    for the order's product, use and regulator: like a site outage, away from that site, for the planned
    apheresis date (today at the earliest); when the material was collected already (`collected_on`), as
    collected material on its collection date (issue 11: the planner keeps that date, starts fresh material
    within its window of it, plans nothing before today). None when the site still may make it, or when
    the slot was booked before scheduling kept the order's market (it cannot be told)."""
    if slot.site_id != site.site_id or slot.status not in LIVE:
        return None
    if slot.order_type is None or slot.regulator is None or slot.region is None:
        return None
    if site.approves(slot.regulator, slot.order_type, slot.product_code):
        return None
    return RebookRequestedV1(
        order_id=slot.order_id,
        coi=slot.coi,
        treatment_center_id=slot.treatment_center_id or "",
        kind="site_outage",
        reason=APPROVAL_WITHDRAWN if site.active else SITE_INACTIVE,
        product_code=slot.product_code,
        order_type=slot.order_type,  # type: ignore[arg-type]
        regulator=slot.regulator,
        region=slot.region,
        apheresis_date=(
            slot.collected_on if slot.collected_on is not None else max(slot.apheresis_date, today)
        ),
        exclude_site_id=site.site_id,
        material_collected=slot.collected_on is not None,
    )
