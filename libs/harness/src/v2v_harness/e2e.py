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


class Journey:
    """Drives one order through the public APIs as a hospital, a courier and a site's MES would."""

    def __init__(self, client: httpx.AsyncClient, urls: Callable[[str], str], order: dict[str, Any]) -> None:
        self.client = client
        self.url = urls
        self.order = order
        self.id = order["order_id"]
        self.coi = order["coi"]

    async def get(self) -> dict[str, Any]:
        resp = await self.client.get(f"{self.url('order')}/v1/orders/{self.id}")
        resp.raise_for_status()
        return dict(resp.json())

    async def wait_status(self, *statuses: str, timeout: float = 15) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            body = await self.get()
            return body if body["status"] in statuses else None

        return dict(await eventually(check, timeout=timeout, what=f"order {self.id} in {statuses}"))

    async def shipment(self, leg: str, *, live: bool = True, timeout: float = 15) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            resp = await self.client.get(
                f"{self.url('logistics')}/v1/shipments", params={"order_id": self.id}
            )
            ships = [s for s in resp.json() if s["leg"] == leg and (not live or s["status"] != "cancelled")]
            return ships[-1] if ships else None

        return dict(await eventually(check, timeout=timeout, what=f"{leg} shipment of {self.id}"))

    async def post(
        self, service: str, path: str, body: dict[str, Any], expect: int | None = None
    ) -> dict[str, Any]:
        """POST and check the status: `expect`, or any 2xx when None."""
        resp = await self.client.post(f"{self.url(service)}{path}", json=body)
        ok = resp.status_code == expect if expect is not None else resp.is_success
        assert ok, f"{path}: {resp.status_code} {resp.text}"
        return dict(resp.json()) if resp.content else {}

    async def hospital(
        self, action: str, body: dict[str, Any] | None = None, expect: int = 200
    ) -> dict[str, Any]:
        return await self.post("order", f"/v1/orders/{self.id}/{action}", body or {}, expect)

    async def courier(
        self, shipment: dict[str, Any], *milestones: str, temperature_c: float | None = None
    ) -> None:
        for milestone in milestones:
            body: dict[str, Any] = {
                "milestone": milestone,
                "occurred_at": now_iso(),
                "location": "HUB-1",
                "handled_by": "courier-42",
                "coi": self.coi,
            }
            if temperature_c is not None:
                body["temperature_c"] = temperature_c
            await self.post("logistics", f"/v1/shipments/{shipment['shipment_id']}/milestones", body)

    async def temperature(self, shipment: dict[str, Any], reading_c: float) -> dict[str, Any]:
        body = {"reading_c": reading_c, "measured_at": now_iso(), "coi": self.coi}
        return await self.post("logistics", f"/v1/shipments/{shipment['shipment_id']}/temperature", body)

    async def receipt(self, site_id: str, accepted: bool = True, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"order_id": self.id, "coi": self.coi, "accepted": accepted}
        if reason:
            body["reason"] = reason
        return await self.post("site", f"/v1/sites/{site_id}/receipts", body)

    async def steps(self, site_id: str, *steps: str, expect: int | None = None) -> None:
        for step in steps:
            await self.post(
                "site",
                f"/v1/sites/{site_id}/manufacturing/{self.id}/steps",
                {"step": step, "completed_at": now_iso()},
                expect,
            )

    async def qc(self, site_id: str, disposition: str, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"disposition": disposition}
        if reason:
            body["reason"] = reason
        return await self.post("site", f"/v1/sites/{site_id}/manufacturing/{self.id}/qc", body)

    async def up_to_material_received(self) -> str:
        """Slot, booking, inbound shipment, apheresis, courier, receipt: returns the site id."""
        order = await self.wait_status("inbound_shipment_planned")
        site_id = str(order["site_id"])
        inbound = await self.shipment("inbound_apheresis")
        await self.hospital("apheresis", {"coi": self.coi})
        await self.courier(inbound, "picked_up", "in_transit", "delivered")
        await self.wait_status("material_in_transit", "material_received")
        await self.receipt(site_id)
        await self.wait_status("material_received")
        return site_id


MANUFACTURING_STEPS = ("activation", "transduction", "expansion", "harvest", "cryopreservation")


def now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()
