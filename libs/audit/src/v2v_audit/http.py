"""The HTTP caller as the actor of the entries a request writes.

`audited_router(router)` wraps a service's router so that every one of its routes first runs
`audit_context`: it points the audit trail at the request, whose principal the route's own scope
dependency (`v2v_servicekit.auth.require_scope`) puts on `request.state.principal` a moment later. Entries
recorded while the request is served then name that principal (client, kind, organisation, and the user
once signatures come), with the request's trace as cause. The scope a route declares is unchanged.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from v2v_audit.chain import Actor
from v2v_audit.trail import set_request_actor


async def audit_context(request: Request) -> None:
    """Dependency: entries written while this request is served name its principal as actor."""

    def resolve() -> Actor | None:
        principal: Any = getattr(request.state, "principal", None)
        return Actor.of_principal(principal) if principal is not None else None

    set_request_actor(resolve)


def audited_router(router: APIRouter) -> APIRouter:
    """`router`'s routes, each running `audit_context` before its own dependencies."""
    wrapper = APIRouter(dependencies=[Depends(audit_context)])
    wrapper.include_router(router)
    return wrapper
