"""Read-only HTTP view of scheduling: slots (filtered) and the waitlist with what each order waits for.

Both routes need `ops:read` (operations: the slots and the waitlist hold every centre's orders). One scope
per route: a site does not read scheduling's slots with `sites:read`; its own plan is in the site service
(`GET /v1/sites/{id}/manufacturing/{order}`, `sites:read`, its own site only), which is where a site's
MES looks. A tenant-bound principal that holds `ops:read` all the same stays confined (the tenant comes
from the token): a centre sees its own orders' slots and waitlist entries, a site its own site's slots
(and no waitlist entry: a waiting order has no site yet), a carrier nothing.

Lists are paged: `limit` 1..200 (default 200), `offset` 0..10 000.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from scheduling_service.service_layer import commands
from scheduling_service.service_layer.commands import Tenancy
from v2v_contracts.fields import CODE_PATTERN
from v2v_contracts.scopes import TENANT_KINDS
from v2v_servicekit import Runtime, current_runtime
from v2v_servicekit.auth import Principal, require_scope
from v2v_servicekit.pagination import MAX_PAGE_LIMIT, PageLimit, PageOffset

router = APIRouter(prefix="/v1")
RuntimeDep = Annotated[Runtime, Depends(current_runtime)]
SlotStatus = Literal["held", "confirmed", "released", "consumed"]

CodeParam = Annotated[str | None, Query(min_length=1, max_length=64, pattern=CODE_PATTERN)]


def tenancy_of(principal: Principal) -> Tenancy:
    """What a caller may read here: ops everything; a centre or a site its own; other tenants nothing."""
    centre, site = principal.tenant("centre"), principal.tenant("site")
    if principal.kind in TENANT_KINDS and centre is None and site is None:
        return Tenancy(nothing=True)
    return Tenancy(centre=centre, site=site)


@router.get("/slots", tags=["slots"], summary="Slots, optionally filtered (order, status, product, site)")
async def slots(
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("ops:read")],
    order_id: uuid.UUID | None = None,
    status: Annotated[list[SlotStatus] | None, Query(max_length=4)] = None,
    product_code: CodeParam = None,
    site_id: CodeParam = None,
    limit: PageLimit = MAX_PAGE_LIMIT,
    offset: PageOffset = 0,
) -> list[dict[str, Any]]:
    return await commands.list_slots(
        rt.uow,
        order_id=order_id,
        statuses=sorted(set(status)) if status is not None else None,
        product_code=product_code,
        site_id=site_id,
        limit=limit,
        offset=offset,
        tenancy=tenancy_of(principal),
    )


@router.get("/waitlist", tags=["slots"], summary="Orders waiting for capacity, in booking order")
async def waitlist(
    rt: RuntimeDep,
    principal: Annotated[Principal, require_scope("ops:read")],
    limit: PageLimit = MAX_PAGE_LIMIT,
    offset: PageOffset = 0,
) -> list[dict[str, Any]]:
    return await commands.list_waitlist(rt.uow, limit=limit, offset=offset, tenancy=tenancy_of(principal))
