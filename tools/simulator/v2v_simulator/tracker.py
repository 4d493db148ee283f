"""Order status tracking: one reader of the paginated order list for all the simulated orders, as ops
(who reads every centre's orders)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from v2v_harness.client import ApiResponse

from .api import OPS, Api, OrderAbort
from .clock import parse_time
from .states import TERMINAL


def signature(row: dict[str, Any]) -> tuple[Any, ...]:
    slot = row.get("slot") or {}
    return (row["status"], row.get("run"), slot.get("slot_id"), row.get("recollections"))


class Tracker:
    """Reads every simulated order's status from the paginated order list (one request per 200 orders),
    and lets the actors wait for a change."""

    def __init__(self, api: Api, poll_s: float) -> None:
        self.api = api
        self.poll_s = poll_s
        self.rows: dict[str, dict[str, Any]] = {}
        self.events: dict[str, asyncio.Event] = {}
        self.base_offset = 0

    async def start(self) -> None:
        resp = await self.api.call("list orders", lambda c: c.list_orders(limit=1), party=OPS, throttle=False)
        self.base_offset = max(0, int(resp.body["total"]) - 1)

    def add(self, row: dict[str, Any]) -> None:
        oid = str(row["order_id"])
        self.events.setdefault(oid, asyncio.Event())
        self.observe(row)

    def observe(self, row: dict[str, Any]) -> None:
        oid = str(row["order_id"])
        if oid not in self.events:
            return
        current = self.rows.get(oid)
        if current is not None and parse_time(current["updated_at"]) > parse_time(row["updated_at"]):
            return
        self.rows[oid] = row
        if current is None or signature(current) != signature(row):
            self.events[oid].set()
            self.events[oid] = asyncio.Event()

    async def poll_once(self) -> None:
        offset = self.base_offset
        while True:
            page = (await self._page(offset)).body
            for row in page["items"]:
                self.observe(row)
            if page.get("next_offset") is None:
                return
            offset = page["next_offset"]

    async def _page(self, offset: int) -> ApiResponse:
        return await self.api.call(
            "list orders", lambda c: c.list_orders(limit=200, offset=offset), party=OPS, throttle=False
        )

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OrderAbort):
                await self.poll_once()
            await asyncio.sleep(self.poll_s)

    async def wait_change(self, order_id: str, sig: tuple[Any, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.rows[order_id]
            if signature(row) != sig:
                return row
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events[order_id].wait(), remaining)

    async def wait_for(
        self, order_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.rows[order_id]
            if predicate(row) or row["status"] in TERMINAL:
                return row
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.events[order_id].wait(), remaining)
