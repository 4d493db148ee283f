"""What the service runs at start-up, before it takes requests and events: the registry's seed load."""

from __future__ import annotations

from site_service.service_layer import commands
from v2v_servicekit import Runtime


async def load_seed(rt: Runtime) -> None:
    await commands.load_seed(rt.uow)
