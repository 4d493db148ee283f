"""The compressed clock, and the date/time helpers every actor uses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any


class SimClock:
    """Simulated time: starts at `start` and advances one day every `day_seconds` real seconds."""

    def __init__(
        self, start: datetime, day_seconds: float, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.start = start
        self.day_seconds = day_seconds
        self._monotonic = monotonic
        self._t0 = monotonic()

    def now(self) -> datetime:
        if self.day_seconds <= 0:
            return self.start
        return self.start + timedelta(days=(self._monotonic() - self._t0) / self.day_seconds)

    def real_delay(self, when: datetime) -> float:
        """Real seconds until the simulated clock reaches `when` (0 if it has)."""
        if self.day_seconds <= 0:
            return 0.0
        return max(0.0, (when - self.now()).total_seconds() / 86400 * self.day_seconds)

    async def until(self, when: datetime) -> None:
        delay = self.real_delay(when)
        if delay > 0:
            await asyncio.sleep(delay)

    def at(self, day: date, hour: float = 9.0) -> datetime:
        """A simulated moment on `day` at `hour` (UTC)."""
        return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(hours=hour)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def days_between(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() / 86400


def as_date(value: Any) -> date | None:
    return date.fromisoformat(str(value)[:10]) if value else None


def parse_time(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
