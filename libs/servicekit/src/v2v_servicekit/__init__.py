"""What every vein2vein service process is built from: settings, runtime, problem+json."""

from v2v_servicekit.runtime import (
    ConsumerSpec,
    Runtime,
    ServiceDefinition,
    create_app,
    current_runtime,
    get_runtime,
    run,
)
from v2v_servicekit.settings import ServiceSettings

__all__ = [
    "ConsumerSpec",
    "Runtime",
    "ServiceDefinition",
    "ServiceSettings",
    "create_app",
    "current_runtime",
    "get_runtime",
    "run",
]
