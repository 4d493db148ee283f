"""Composition root of the scheduling service."""

from __future__ import annotations

from pathlib import Path

from scheduling_service import services
from scheduling_service.api import router
from v2v_contracts import SlotReleasedV1, SlotReservedV1, SlotUnavailableV1
from v2v_servicekit import ConsumerSpec, ServiceDefinition

DEFINITION = ServiceDefinition(
    name="scheduling",
    schema="scheduling",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    consumers=[ConsumerSpec("slots", ["order", "site"], services.handlers)],
    publishes=[SlotReservedV1, SlotUnavailableV1, SlotReleasedV1],
    description="Manufacturing slots: site selection, capacity, waitlist, release and rebook.",
)
