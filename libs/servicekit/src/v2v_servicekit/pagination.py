"""Capped pagination parameters for list endpoints: a page is at most 200 items, an offset is bounded.

    from v2v_servicekit.pagination import PageLimit, PageOffset

    @router.get("/orders")
    async def list_orders(limit: PageLimit = 50, offset: PageOffset = 0, ...) -> OrderPage:

`limit=0`, `limit=201`, a negative or huge offset, or a number too large to parse is a 422 naming the
parameter (never a 500, never a full-table scan).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

MAX_PAGE_LIMIT = 200
MAX_OFFSET = 10_000  # deeper than this: narrow the query (filters, a time range) or use a cursor

PageLimit = Annotated[
    int, Query(ge=1, le=MAX_PAGE_LIMIT, description=f"Items per page (1..{MAX_PAGE_LIMIT})")
]
PageOffset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=f"Items to skip (0..{MAX_OFFSET})")]
# a keyset cursor: the last id of the previous page (ids below it come next); bounded like a bigint
Before = Annotated[
    int | None, Query(ge=1, le=2**63 - 1, description="Only items with an id below this one (paging)")
]

__all__ = ["MAX_OFFSET", "MAX_PAGE_LIMIT", "Before", "PageLimit", "PageOffset"]
