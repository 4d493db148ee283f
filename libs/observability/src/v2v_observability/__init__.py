"""Telemetry and logging set-up, identical in every service."""

from v2v_observability.context import bind_order, current_order
from v2v_observability.logging import configure_logging, get_logger
from v2v_observability.metrics import configure_metrics, meter, shutdown_metrics
from v2v_observability.settings import TelemetrySettings
from v2v_observability.statements import instrument_asyncpg
from v2v_observability.tracing import (
    COI_ATTR,
    ORDER_ID_ATTR,
    configure_tracing,
    current_traceparent,
    later_input,
    links_to,
    set_order_attributes,
    shutdown_tracing,
)

__all__ = [
    "COI_ATTR",
    "ORDER_ID_ATTR",
    "TelemetrySettings",
    "bind_order",
    "configure_logging",
    "configure_metrics",
    "configure_tracing",
    "current_order",
    "current_traceparent",
    "get_logger",
    "instrument_asyncpg",
    "later_input",
    "links_to",
    "meter",
    "set_order_attributes",
    "shutdown_metrics",
    "shutdown_tracing",
]
