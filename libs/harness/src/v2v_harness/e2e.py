from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def order_body(
    centre: str = "TC-DE-BE-001",
    product: str = "TISA-CEL",
    days_ahead: int = 14,
    patient_ref: str = "PAT-E2E-0001",
) -> dict[str, Any]:
    return {
        "treatment_center_id": centre,
        "product_code": product,
        "order_type": "commercial",
        "patient_ref": patient_ref,
        "requested_apheresis_date": (date.today() + timedelta(days=days_ahead)).isoformat(),
    }


async def eventually(
    check: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")


async def subscribe(
    client: httpx.AsyncClient,
    notification_url: str,
    centre: str,
    url: str,
    secret: str,
    event_types: list[str] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"treatment_center_id": centre, "url": url, "secret": secret}
    if event_types is not None:
        body["event_types"] = event_types
    resp = await client.post(f"{notification_url}/v1/subscriptions", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()
