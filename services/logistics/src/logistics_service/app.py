"""Composition root of the logistics service: its ServiceDefinition."""

from __future__ import annotations

from pathlib import Path

from logistics_service.adapters.repository import tx_factory
from logistics_service.config import LogisticsSettings, load_shipping_lanes
from logistics_service.entrypoints.api import router
from logistics_service.service_layer.handlers import build_handlers
from v2v_audit.service import audited
from v2v_contracts import (
    CoiMismatchDetectedV1,
    ShipmentCancelledV1,
    ShipmentExcursionV1,
    ShipmentMilestoneV1,
    ShipmentPlannedV1,
)
from v2v_servicekit import ConsumerSpec, ServiceDefinition

DEFINITION = ServiceDefinition(
    name="logistics",
    schema="logistics",
    migrations_dir=Path(__file__).parent / "migrations",
    settings_class=LogisticsSettings,
    tx_factory=tx_factory,
    routers=[router],
    consumers=[
        # the shipping lanes are read once, when the runtime builds the consumer at start-up
        ConsumerSpec(
            "shipments", ["site", "order"], lambda rt: build_handlers(load_shipping_lanes(rt.settings))
        )
    ],
    publishes=[
        ShipmentPlannedV1,
        ShipmentMilestoneV1,
        ShipmentExcursionV1,
        ShipmentCancelledV1,
        CoiMismatchDetectedV1,
    ],
    description="Shipments of apheresis material and product: chain of custody, temperature, compensation.",
)
# the audit trail: its migration and start-up step, the caller as actor of a request's entries, and the
# supervised loop writing signed checkpoints outside the database (v2v_audit.service)
DEFINITION = audited(DEFINITION)
