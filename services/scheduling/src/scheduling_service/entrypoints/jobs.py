"""Scheduling's background jobs (supervised by the runtime): the hold sweeper (issue 11)."""

from __future__ import annotations

import asyncio
from typing import cast

from scheduling_service.config import SchedulingSettings
from scheduling_service.entrypoints.offers import PLANNING, planning_of
from scheduling_service.service_layer import commands
from v2v_observability import get_logger
from v2v_servicekit import Runtime

log = get_logger(__name__)


async def remember_planning(rt: Runtime) -> None:
    """At start-up: the planning (parameters, calendars, allocation, catalogue) the routes use."""
    rt.extras[PLANNING] = cast(SchedulingSettings, rt.settings).planning()


async def hold_sweeper(rt: Runtime) -> None:
    """Expire holds no order claimed in time: the day returns to the pool and the waitlist is served."""
    settings = cast(SchedulingSettings, rt.settings)
    while True:
        expired = await commands.expire_holds(rt.uow, planning_of(rt))
        if expired:
            log.info("holds expired", count=expired)
        await asyncio.sleep(settings.scheduling_hold_sweep_interval_s)
