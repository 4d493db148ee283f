"""Composition root of the order service."""

from __future__ import annotations

import os
from pathlib import Path

from order_service import services
from order_service.adapters import repository as repo
from order_service.domain.coi import FACILITY_RE
from order_service.entrypoints.api import router
from v2v_contracts import EVENT_TYPES
from v2v_messaging import Handler
from v2v_servicekit import ConsumerSpec, Runtime, ServiceDefinition


async def _startup(rt: Runtime) -> None:
    facility = os.environ.get("V2V_COI_FACILITY_ID", "V2V00")
    if not FACILITY_RE.match(facility):
        raise RuntimeError("V2V_COI_FACILITY_ID must be a letter followed by 4 letters or digits")
    rt.extras["coi_facility_id"] = facility
    async with rt.pool.acquire() as conn, conn.transaction():
        await repo.load_seed(conn)


# every fact about an order from the other services goes through the order's state machine
FACT_SERVICES = ("scheduling", "site", "logistics")


def _saga_handlers(rt: Runtime) -> dict[str, Handler]:
    return {
        event_type: services.apply_fact
        for event_type, model in EVENT_TYPES.items()
        if event_type.split(".", 1)[0] in FACT_SERVICES and "order_id" in model.model_fields
    }


DEFINITION = ServiceDefinition(
    name="order",
    schema="ordering",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    consumers=[ConsumerSpec("saga", ["scheduling", "site", "logistics"], _saga_handlers)],
    publishes=[m for t, m in EVENT_TYPES.items() if t.startswith("order.")],
    on_startup=[_startup],
    description="Orders from certified treatment centres: intake, chain of identity, status and timeline.",
)
