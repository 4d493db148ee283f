"""The order service: orders from certified treatment centres, the case manager of every order."""

from __future__ import annotations

from pathlib import Path

from order_service.adapters.repository import tx_factory
from order_service.config import OrderSettings
from order_service.entrypoints.api import router
from order_service.service_layer import commands, queries
from order_service.service_layer.handlers import handlers
from v2v_audit.service import audited
from v2v_contracts import EVENT_TYPES
from v2v_servicekit import ConsumerSpec, ServiceDefinition

DEFINITION = ServiceDefinition(
    name="order",
    schema="ordering",
    migrations_dir=Path(__file__).parent / "migrations",
    settings_class=OrderSettings,
    tx_factory=tx_factory,
    routers=[router],
    # facts about orders from scheduling, site and logistics; the site registry (market authorisations)
    consumers=[ConsumerSpec("saga", ["scheduling", "site", "logistics"], handlers)],
    publishes=[m for t, m in EVENT_TYPES.items() if t.startswith("order.")],
    on_startup=[lambda rt: commands.load_reference_data(rt.uow)],
    # no order is taken before the network of manufacturing sites is known (site.registered)
    ready_checks={"network": lambda rt: queries.network_unknown(rt.uow)},
    description="Orders from certified treatment centres: intake, chain of identity, status and timeline.",
)
# the audit trail: its migration and start-up step, the caller as actor of a request's entries, and the
# supervised loop writing signed checkpoints outside the database (v2v_audit.service)
DEFINITION = audited(DEFINITION)
