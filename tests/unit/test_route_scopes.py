"""Deny by default: every route of all five services declares the scope it needs (or is one of the few
declared public: liveness, readiness, metrics, the AsyncAPI document, FastAPI's own OpenAPI and docs)."""

from __future__ import annotations

import importlib

import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from v2v_contracts.scopes import SCOPES
from v2v_servicekit.auth import PUBLIC, declared_scope
from v2v_servicekit.runtime import create_app
from v2v_servicekit.settings import ServiceSettings

SERVICES = {
    "order": "order_service.app",
    "scheduling": "scheduling_service.app",
    "site": "site_service.app",
    "logistics": "logistics_service.app",
    "notification": "notification_service.app",
}
PUBLIC_PATHS = {"/health", "/ready", "/metrics", "/asyncapi.json"}
FASTAPI_DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _app(service: str) -> object:
    definition = importlib.import_module(SERVICES[service]).DEFINITION
    settings = definition.settings_class()
    assert isinstance(settings, ServiceSettings)
    return create_app(definition, settings)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_route_declares_a_scope(service: str) -> None:
    app = _app(service)
    contexts = list(iter_route_contexts(app.routes))  # type: ignore[attr-defined]
    api_routes = [(c.path, c.route) for c in contexts if isinstance(c.route, APIRoute)]
    assert len(api_routes) > len(PUBLIC_PATHS) + 3  # the service's own routes are there
    missing, unknown, public = [], [], set()
    for path, route in api_routes:
        scope = declared_scope(route)
        where = f"{sorted(route.methods)} {path}"
        if scope is None:
            missing.append(where)
        elif scope == PUBLIC:
            public.add(path)
        elif scope not in SCOPES:
            unknown.append(f"{where}: {scope}")
    assert not missing, f"{service}: routes without a declared scope: {missing}"
    assert not unknown, f"{service}: routes with a scope not in v2v_contracts.scopes: {unknown}"
    assert public == PUBLIC_PATHS, f"{service}: public routes {sorted(public)}"
    others = {c.path for c in contexts if not isinstance(c.route, APIRoute)}
    assert others <= FASTAPI_DOCS, f"{service}: routes outside FastAPI's routing: {others - FASTAPI_DOCS}"
