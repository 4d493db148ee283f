"""No worker thread per request: every dependency of every route of the five services is a coroutine
function (or an object whose `__call__` is one), so FastAPI awaits it on the event loop. A plain `def`
dependency is run through anyio's thread pool for every request; `get_runtime` as a dependency was 3.6 %
of the order service's CPU under load (docs/BENCHMARKS.md, optimisation rounds 3 and 4)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from v2v_servicekit.runtime import create_app
from v2v_servicekit.settings import ServiceSettings

SERVICES = {
    "order": "order_service.app",
    "scheduling": "scheduling_service.app",
    "site": "site_service.app",
    "logistics": "logistics_service.app",
    "notification": "notification_service.app",
}


def _awaited(call: Any) -> bool:
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return True
    dunder = getattr(call, "__call__", None)  # noqa: B004 (an instance such as HTTPBearer)
    return not inspect.isclass(call) and (
        inspect.iscoroutinefunction(dunder) or inspect.isasyncgenfunction(dunder)
    )


def _threaded(dependant: Dependant) -> list[str]:
    found = []
    for sub in dependant.dependencies:
        if sub.call is not None and not _awaited(sub.call):
            found.append(getattr(sub.call, "__qualname__", repr(sub.call)))
        found.extend(_threaded(sub))
    return found


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_route_runs_a_dependency_or_endpoint_in_a_thread(service: str) -> None:
    definition = importlib.import_module(SERVICES[service]).DEFINITION
    settings = definition.settings_class()
    assert isinstance(settings, ServiceSettings)
    app = create_app(definition, settings)
    routes = [(c.path, c.route) for c in iter_route_contexts(app.routes) if isinstance(c.route, APIRoute)]
    assert len(routes) > 5
    threaded = {
        f"{sorted(route.methods)} {path}": names
        for path, route in routes
        if (names := _threaded(route.dependant) + ([] if _awaited(route.endpoint) else ["<endpoint>"]))
    }
    assert not threaded, f"{service}: run in a worker thread per request: {threaded}"
