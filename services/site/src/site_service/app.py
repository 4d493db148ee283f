"""Composition root of the site service: its ServiceDefinition."""

from __future__ import annotations

from pathlib import Path

from site_service.adapters.repository import site_tx
from site_service.config import SiteSettings
from site_service.entrypoints import startup
from site_service.entrypoints.api import router
from site_service.service_layer.handlers import handlers
from v2v_audit.service import audited
from v2v_contracts import (
    BookingAffectedV1,
    BookingCancelledV1,
    BookingConfirmedV1,
    ManufacturingFailedV1,
    ManufacturingStepCompletedV1,
    ManufacturingStoppedV1,
    MaterialReceivedV1,
    MaterialRejectedV1,
    ProductOutOfSpecificationV1,
    ProductReleasedV1,
    SiteRegisteredV1,
)
from v2v_servicekit import ConsumerSpec, ServiceDefinition

DEFINITION = ServiceDefinition(
    name="site",
    schema="site",
    migrations_dir=Path(__file__).parent / "migrations",
    settings_class=SiteSettings,
    tx_factory=site_tx,
    routers=[router],
    consumers=[ConsumerSpec("bookings", ["scheduling", "order"], handlers)],
    publishes=[
        SiteRegisteredV1,
        BookingConfirmedV1,
        BookingCancelledV1,
        BookingAffectedV1,
        MaterialReceivedV1,
        MaterialRejectedV1,
        ManufacturingStepCompletedV1,
        ProductReleasedV1,
        ProductOutOfSpecificationV1,
        ManufacturingFailedV1,
        ManufacturingStoppedV1,
    ],
    on_startup=[startup.load_seed],
    description="Manufacturing sites: registry, approvals, capacity, outages, the manufacturing plan "
    "(bookings) and the MES API (receipt, steps, QC).",
)
# the audit trail: its migration and start-up step, the caller as actor of a request's entries, and the
# supervised loop writing signed checkpoints outside the database (v2v_audit.service)
DEFINITION = audited(DEFINITION)
