"""Composition root of the scheduling service."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from scheduling_service.adapters.repository import postgres_tx
from scheduling_service.config import SchedulingSettings
from scheduling_service.entrypoints.api import router
from scheduling_service.entrypoints.jobs import hold_sweeper, remember_planning
from scheduling_service.entrypoints.offers import offers_router
from scheduling_service.service_layer.handlers import build_handlers
from v2v_audit.service import audited
from v2v_contracts import SlotReleasedV1, SlotReservedV1, SlotUnavailableV1
from v2v_servicekit import ConsumerSpec, ServiceDefinition

DEFINITION = ServiceDefinition(
    name="scheduling",
    schema="scheduling",
    migrations_dir=Path(__file__).parent / "migrations",
    settings_class=SchedulingSettings,
    tx_factory=postgres_tx,
    routers=[router, offers_router],
    # built at start-up: the parameters file named by the settings and the product catalogue are read then
    consumers=[
        ConsumerSpec(
            "slots",
            ["order", "site"],
            lambda rt: build_handlers(cast(SchedulingSettings, rt.settings).planning()),
        )
    ],
    publishes=[SlotReservedV1, SlotUnavailableV1, SlotReleasedV1],
    on_startup=[remember_planning],  # the planning the offer routes use (read once)
    background=[hold_sweeper],  # holds that expire return their day to the pool (issue 11)
    description="Manufacturing slots: site selection, capacity, waitlist, rebook; offers and holds.",
)
# the audit trail: its migration and start-up step, the caller as actor of a request's entries, and the
# supervised loop writing signed checkpoints outside the database (v2v_audit.service)
DEFINITION = audited(DEFINITION)
