"""Calendars, time zones and allocation: the pure rules that say on which days a site may start
manufacturing, what "today" is at a site, and how many slots a centre may take per period (issue 11).

- A site starts manufacturing only on its working days and never on one of its holidays (`Calendar`,
  per site in `seed/calendars.yaml`; a site the file does not name works every day).
- "Today" is the date in the site's own time zone (`today_at`); nothing is planned before it.
- A centre's quota (`Quota`, `seed/allocation.yaml`) caps the slots it holds for a product in one period
  (a calendar month or an ISO week of the manufacturing start); a centre without a quota has no cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # date.weekday() order
Period = Literal["month", "week"]


@dataclass(frozen=True)
class Calendar:
    """A site's manufacturing calendar: the weekdays it starts runs on (0 = Monday) and its holidays."""

    working_days: frozenset[int] = frozenset(range(7))
    holidays: frozenset[date] = frozenset()

    def works_on(self, day: date) -> bool:
        return day.weekday() in self.working_days and day not in self.holidays

    @classmethod
    def of(cls, working_days: Iterable[str], holidays: Iterable[date | str] = ()) -> Calendar:
        days = frozenset(WEEKDAYS.index(str(d).lower()[:3]) for d in working_days)
        if not days:
            raise ValueError("a calendar needs at least one working day")
        return cls(days, frozenset(h if isinstance(h, date) else date.fromisoformat(h) for h in holidays))


EVERY_DAY = Calendar()


def zone(name: str | None) -> ZoneInfo:
    """The IANA zone, or UTC for a name the zone database does not know."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def today_at(timezone: str | None, now: datetime) -> date:
    """The date at `now` in the time zone (a naive `now` is taken as UTC)."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(zone(timezone)).date()


def period_start(day: date, period: Period) -> date:
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


@dataclass(frozen=True)
class Allocation:
    """Per-centre quotas: (centre, product) -> slots per period; `period` is a month or an ISO week."""

    period: Period = "month"
    quotas: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def quota(self, centre: str | None, product: str) -> int | None:
        return self.quotas.get((centre or "", product))

    def gate(self, centre: str | None, product: str, taken: Mapping[date, int]) -> QuotaGate | None:
        """The centre's quota for the product as a day filter, from the slots it already takes per
        manufacturing day (`taken`); None when it has no quota."""
        quota = self.quota(centre, product)
        if quota is None:
            return None
        per_period: dict[date, int] = {}
        for day, n in taken.items():
            start = period_start(day, self.period)
            per_period[start] = per_period.get(start, 0) + n
        return QuotaGate(self.period, quota, per_period)


@dataclass(frozen=True)
class QuotaGate:
    period: Period
    quota: int
    taken: Mapping[date, int]  # period start -> slots the centre takes in it

    def __call__(self, day: date) -> bool:
        return self.taken.get(period_start(day, self.period), 0) < self.quota


NO_ALLOCATION = Allocation()
