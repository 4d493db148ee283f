"""Telemetry and logging set-up, identical in every service."""

from v2v_observability.logging import bind_order, configure_logging, get_logger
from v2v_observability.tracing import (
    COI_ATTR,
    ORDER_ID_ATTR,
    configure_tracing,
    current_traceparent,
    set_order_attributes,
    shutdown_tracing,
)

__all__ = [
    "COI_ATTR",
    "ORDER_ID_ATTR",
    "bind_order",
    "configure_logging",
    "configure_tracing",
    "current_traceparent",
    "get_logger",
    "set_order_attributes",
    "shutdown_tracing",
]
