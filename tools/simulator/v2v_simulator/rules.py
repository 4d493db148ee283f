"""The rules every simulated order must obey, checked at the end of a run over what the run recorded (issue
11: the simulator obeys the same rules as the platform): every order terminal; lymphodepletion only after
the product's release and its confirmed delivery; the infusion inside the window of the recorded LD; fresh
starting material in manufacture within its maximum hours of collection.

The platform is told the real time (a simulated day lasts a fraction of a second), so the hours and days
between two steps are measured on the simulated clock (the moments in the order's case file), against the
platform's own facts: the product's planning facts from its catalogue (`GET /v1/products`: starting
material, `max_fresh_hours`), the infusion window the order shows for its recorded LD (`treatment.
infusion_window`), the infusion's recorded time in the centre's calendar, and the booked days of the slot a
run was started from (`GET /v1/slots`). Pure functions: no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .clock import as_date
from .states import TERMINAL

if TYPE_CHECKING:
    from .report import OrderResult

# the case file's labels (`OrderActor.at`) of the moments the rules look at
INFUSION = "infusion"
LYMPHODEPLETION = "lymphodepletion"
RELEASES = frozenset({"QC released", "release after the disposition"})  # the lot released by signature
DELIVERY_CONFIRMED = frozenset({"outbound booked", "outbound picked_up"})  # the courier booked or has it


@dataclass
class RunStart:
    """A manufacturing run started from collected material (a remanufacture from material the site retained
    is not one): the simulated moments of the collection and of the start, the slot the material was
    received for, and that slot's days as the platform booked them (filled in at the end of the run)."""

    site_id: str
    slot_id: str
    collected: datetime
    started: datetime
    booked_collection: date | None = None
    booked_start: date | None = None


@dataclass
class RuleCheck:
    """One rule over the run: how many cases were checked, and each violation (order, what happened)."""

    rule: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)
    unchecked: int = 0  # cases the rule could not be checked for (the reason is in `note`)
    note: str = ""


def order_label(r: OrderResult) -> str:
    return f"order #{r.plan.index + 1} {r.order_id or '(not placed)'}"


def last_moment(
    moments: Iterable[tuple[str, datetime]], labels: Iterable[str], *, until: datetime | None = None
) -> datetime | None:
    """The last moment noted with one of `labels` (at or before `until`)."""
    wanted = set(labels)
    found = [m for w, m in moments if w in wanted and (until is None or m <= until)]
    return max(found) if found else None


def zone(name: str | None) -> ZoneInfo | None:
    try:
        return ZoneInfo(name) if name else None
    except (ZoneInfoNotFoundError, ValueError):
        return None


def local_day(moment: datetime, tz: ZoneInfo | None) -> date:
    """The day of `moment` in the centre's calendar (UTC without a known timezone)."""
    return moment.astimezone(tz).date() if tz is not None else moment.date()


def hours(delta: timedelta) -> float:
    return delta.total_seconds() / 3600


# ---- the rules -------------------------------------------------------------------------------------------


TERMINAL_RULE = "every order terminal (completed, cancelled or failed)"


def every_order_terminal(results: list[OrderResult]) -> RuleCheck:
    check = RuleCheck(TERMINAL_RULE, checked=len(results))
    for r in results:
        if r.final_status not in TERMINAL:
            check.violations.append(f"{order_label(r)}: {r.final_status or 'not readable'}")
    return check


def lymphodepletion_after_release_and_delivery(results: list[OrderResult]) -> RuleCheck:
    """Each infused order: the LD that stands at the infusion started after the infused lot's release, and
    after the courier booked or picked up its delivery (simulated clock)."""
    check = RuleCheck("LD only after release and confirmed delivery (simulated clock)")
    for r in results:
        infused = last_moment(r.moments, {INFUSION})
        if infused is None:
            continue
        check.checked += 1
        ld = last_moment(r.moments, {LYMPHODEPLETION}, until=infused)
        released = last_moment(r.moments, RELEASES, until=infused)
        if ld is None or released is None:
            missing = "no LD" if ld is None else "no release"
            check.violations.append(f"{order_label(r)}: infused with {missing} before it")
            continue
        if ld < released:
            check.violations.append(f"{order_label(r)}: LD {hours(released - ld):.1f} h before the release")
            continue
        confirmed = [m for w, m in r.moments if w in DELIVERY_CONFIRMED and released <= m <= ld]
        if not confirmed:
            check.violations.append(f"{order_label(r)}: LD before the product's delivery was confirmed")
    return check


def infusion_in_window_recorded(results: list[OrderResult]) -> RuleCheck:
    """Each infused order: the day of the infusion the platform recorded, in the centre's calendar, inside
    the window the order shows for its recorded LD (earliest .. latest infusion)."""
    check = RuleCheck(
        "infusion inside the window (the platform's record)",
        note="the order's treatment.infusion_window vs its recorded infusion, in the centre's calendar",
    )
    for r in results:
        if r.final_status != "completed":
            continue
        if r.indication is None:  # a product without treatment facts: no window to meet
            check.unchecked += 1
            continue
        check.checked += 1
        window, infused = r.infusion_window, r.infused_at
        if not window or infused is None:
            what = "no infusion window" if not window else "no infusion time"
            check.violations.append(f"{order_label(r)}: completed with {what} recorded")
            continue
        day = local_day(infused, zone(r.centre_tz))
        first, last = as_date(window.get("earliest_infusion")), as_date(window.get("latest_infusion"))
        if first is None or last is None or not first <= day <= last:
            check.violations.append(
                f"{order_label(r)}: infused on {day.isoformat()}, window {first} .. {last}"
            )
    if check.unchecked:
        check.note += f"; {check.unchecked} infused without an indication (no window)"
    return check


def infusion_in_window_simulated(results: list[OrderResult]) -> RuleCheck:
    """Each infused order: the days from the start of the LD that stands to the infusion, on the simulated
    clock in the centre's calendar, inside the window the platform holds for the order's indication (the
    regimen's days, then `min_days_after_completion` .. `max_days_after_completion`)."""
    check = RuleCheck(
        "infusion inside the window (simulated clock)",
        note="days from LD start to infusion vs the regimen + the window the order shows",
    )
    for r in results:
        infused = last_moment(r.moments, {INFUSION})
        if infused is None or r.indication is None:
            continue
        check.checked += 1
        ld = last_moment(r.moments, {LYMPHODEPLETION}, until=infused)
        window = r.infusion_window or {}
        started, completed = (
            as_date(window.get("lymphodepletion_started_on")),
            as_date(window.get("lymphodepletion_completed_on")),
        )
        if ld is None or started is None or completed is None:
            check.violations.append(f"{order_label(r)}: no LD, or no window to check the infusion against")
            continue
        regimen = (completed - started).days
        low = regimen + int(window["min_days_after_completion"])
        high = regimen + int(window["max_days_after_completion"])
        tz = zone(r.centre_tz)
        days = (local_day(infused, tz) - local_day(ld, tz)).days
        if not low <= days <= high:
            check.violations.append(
                f"{order_label(r)}: infused {days} days after LD started (allowed {low}-{high})"
            )
    return check


def fresh_planning(product: dict[str, Any] | None) -> int | None:
    """The maximum hours from collection to manufacturing start of a product whose starting material is
    fresh (its catalogue planning facts); None: not fresh, or no such fact."""
    planning = (product or {}).get("planning") or {}
    if planning.get("starting_material") != "fresh" or planning.get("max_fresh_hours") is None:
        return None
    return int(planning["max_fresh_hours"])


def fresh_started_in_time(results: list[OrderResult], products: dict[str, dict[str, Any]]) -> RuleCheck:
    """Each run started from fresh material: started at most the product's `max_fresh_hours` after the
    collection it was made from (simulated clock)."""
    check = RuleCheck(
        "fresh material started within its max hours of collection (simulated clock)",
        note="per run started from fresh material; the max hours are the product's planning facts",
    )
    for r in results:
        limit = fresh_planning(products.get(r.plan.combo.product))
        if limit is None:
            continue
        for run in r.collected_runs:
            check.checked += 1
            waited = hours(run.started - run.collected)
            if waited > limit:
                check.violations.append(
                    f"{order_label(r)}: started at {run.site_id} {waited:.1f} h after collection "
                    f"(max {limit} h)"
                )
    return check


def fresh_booked_in_time(results: list[OrderResult], products: dict[str, dict[str, Any]]) -> RuleCheck:
    """Each run started from fresh material: the platform booked its slot's manufacturing start day at most
    the product's `max_fresh_hours` (in whole days) after the slot's collection day."""
    check = RuleCheck(
        "fresh material booked to start within its max hours (the platform's slots)",
        note="the slot's manufacturing start day - its apheresis day, in whole days",
    )
    for r in results:
        limit = fresh_planning(products.get(r.plan.combo.product))
        if limit is None:
            continue
        for run in r.collected_runs:
            if run.booked_collection is None or run.booked_start is None:
                check.unchecked += 1
                continue
            check.checked += 1
            days = (run.booked_start - run.booked_collection).days
            if days * 24 > limit:
                check.violations.append(
                    f"{order_label(r)}: slot {run.slot_id} at {run.site_id} booked to start {days} days "
                    f"after its collection day (max {limit} h)"
                )
    if check.unchecked:
        check.note += f"; {check.unchecked} run(s) whose slot was not found"
    return check


def check_rules(results: list[OrderResult], products: dict[str, dict[str, Any]]) -> list[RuleCheck]:
    """Every rule over the run's orders (`products`: the platform's catalogue, by code)."""
    return [
        every_order_terminal(results),
        lymphodepletion_after_release_and_delivery(results),
        infusion_in_window_recorded(results),
        infusion_in_window_simulated(results),
        fresh_started_in_time(results, products),
        fresh_booked_in_time(results, products),
    ]
