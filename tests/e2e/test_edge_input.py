"""Idempotency-Key and hostile input on the running platform.

- `POST /v1/orders` without a key is 400; two identical POSTs with one key make one order, one COI and
  one slot (the second answer is the first, `Idempotent-Replayed: true`); the same key with another
  body is 422; racing duplicates make one order.
- Hostile bodies get their 4xx, never a 5xx, never an answer that echoes the input, and write nothing:
  an oversized body (413 before parsing), lone surrogates and control characters, NaN and Infinity,
  dates outside the booking window, reported times outside [now - 30 d, now + 5 min], unknown
  regulators, uncapped pages. A client that floods is told 429 with Retry-After.
- After an oversized site change is refused, the site still publishes: the next change reaches the
  broker.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from v2v_contracts import topic_for
from v2v_harness import scan
from v2v_harness.e2e import Journey, Parties, eventually, order_body
from v2v_harness.identity import Credentials
from v2v_harness.platform import Platform

pytestmark = pytest.mark.e2e

CENTRE = "TC-CH-ZH-001"
MARKER = "hostile-7c1e"


async def total_orders(client: httpx.AsyncClient, platform: Platform) -> int:
    resp = await client.get(f"{platform.url('order')}/v1/orders", params={"limit": 1})
    assert resp.status_code == 200, resp.text
    return int(resp.json()["total"])


async def oversized_refused(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> bool:
    """A body over the limit is answered 413 from its Content-Length, before it is read: the server may
    close the connection while the client still sends the rest, which the client then sees as a broken
    connection instead of the 413."""
    try:
        resp = await client.patch(url, json=body)
    except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    assert_refused(resp, 413)
    return True


def assert_refused(resp: httpx.Response, *statuses: int) -> None:
    assert resp.status_code in statuses, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert MARKER not in resp.text and "\\ud800" not in resp.text


async def test_one_key_one_order_one_coi_one_slot(
    platform: Platform, credentials: Credentials, parties: Parties
) -> None:
    orders = f"{platform.url('order')}/v1/orders"
    async with credentials.client("centre", CENTRE) as bare:  # sends no key of its own
        before = await total_orders(bare, platform)
        missing = await bare.post(orders, json=order_body(CENTRE))
        assert_refused(missing, 400)
        assert missing.json()["errors"][0]["field"] == "Idempotency-Key"
        assert await total_orders(bare, platform) == before

        body, key = order_body(CENTRE), str(uuid.uuid4())
        first = await bare.post(orders, json=body, headers={"Idempotency-Key": key})
        again = await bare.post(orders, json=body, headers={"Idempotency-Key": key})
        assert (first.status_code, again.status_code) == (201, 201), again.text
        assert "idempotent-replayed" not in first.headers
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json() and again.headers["location"] == first.headers["location"]
        other_body = await bare.post(
            orders,
            json={**body, "patient_ref": f"PAT-{uuid.uuid4().hex[:8]}"},
            headers={"Idempotency-Key": key},
        )
        assert_refused(other_body, 422)
        assert other_body.json()["type"].endswith("/idempotency-key-reused")

        # racing duplicates of another order: one order, whatever each answer was
        race_body, race_key = order_body(CENTRE), str(uuid.uuid4())
        answers = await asyncio.gather(
            *(bare.post(orders, json=race_body, headers={"Idempotency-Key": race_key}) for _ in range(4))
        )
        assert {a.status_code for a in answers} <= {201, 409}, [a.text for a in answers]
        assert len({a.json()["order_id"] for a in answers if a.status_code == 201}) == 1
        assert await total_orders(bare, platform) == before + 2

    order_id = first.json()["order_id"]
    mine = (await parties.centre(CENTRE).get(orders, params={"limit": 200})).json()["items"]
    assert [o["coi"] for o in mine if o["patient_ref"] == body["patient_ref"]] == [first.json()["coi"]]
    journey = Journey(parties, platform.url, first.json())
    await journey.wait_status("inbound_shipment_planned", timeout=30)
    slots = (
        await parties.ops.get(f"{platform.url('scheduling')}/v1/slots", params={"order_id": order_id})
    ).json()
    assert len(slots) == 1


async def test_hostile_input_is_refused_with_a_4xx_that_echoes_nothing_and_writes_nothing(
    platform: Platform, parties: Parties
) -> None:
    centre = parties.centre(CENTRE)
    orders = f"{platform.url('order')}/v1/orders"
    before = await total_orders(centre, platform)
    today = date.today()
    raw_json = {"content-type": "application/json"}

    def raw(text: str) -> bytes:
        return text.encode("utf-8", "surrogatepass")

    good = order_body(CENTRE)
    hostile_orders: list[tuple[str, Any, tuple[int, ...]]] = [
        ("over 64 KiB", {**good, "patient_ref": MARKER * 8000}, (413,)),
        (
            "a lone surrogate",
            raw(json.dumps({**good, "patient_ref": "PAT-\ud800"}, ensure_ascii=True)),
            (422,),
        ),
        (
            "a raw lone surrogate",
            raw(json.dumps({**good, "patient_ref": "PAT-\ud800"}, ensure_ascii=False)),
            (400, 422),
        ),
        ("a control character", {**good, "patient_ref": f"{MARKER}\u0007"}, (422,)),
        ("a C1 control", {**good, "patient_ref": f"{MARKER}\u0085"}, (422,)),
        ("too long", {**good, "patient_ref": MARKER * 10}, (422,)),
        ("far future date", {**good, "requested_apheresis_date": "9999-12-31"}, (422,)),
        ("today", {**good, "requested_apheresis_date": str(today)}, (422,)),
        ("181 days ahead", {**good, "requested_apheresis_date": str(today + timedelta(days=181))}, (422,)),
        ("an unknown field", {**good, "comment": MARKER}, (422,)),
        ("not JSON", b"{" + MARKER.encode(), (422,)),
        ("deeply nested", raw("[" * 200 + "]" * 200), (422,)),
    ]
    for name, payload, statuses in hostile_orders:
        if isinstance(payload, bytes):
            resp = await centre.post(orders, content=payload, headers=raw_json)
        else:
            resp = await centre.post(orders, json=payload)
        assert resp.status_code in statuses, (name, resp.status_code, resp.text[:200])
        assert_refused(resp, *statuses)
    assert await total_orders(centre, platform) == before

    # an order in flight, for the reports below
    placed = (await centre.post(orders, json=order_body(CENTRE))).json()
    journey = Journey(parties, platform.url, placed)
    await journey.wait_status("inbound_shipment_planned", timeout=30)
    shipment = await journey.shipment("inbound_apheresis")
    carrier = parties.carrier(str(shipment["carrier_id"]))
    ship_url = f"{platform.url('logistics')}/v1/shipments/{shipment['shipment_id']}"
    now = datetime.now(UTC)
    readings_before = (await carrier.get(ship_url + "/temperature")).json()
    for name, text in [
        ("NaN", f'{{"reading_c": NaN, "measured_at": "{now.isoformat()}"}}'),
        ("Infinity", f'{{"reading_c": Infinity, "measured_at": "{now.isoformat()}"}}'),
        ("overflow", f'{{"reading_c": 1e999, "measured_at": "{now.isoformat()}"}}'),
        (
            "40 days ago",
            json.dumps({"reading_c": 4.0, "measured_at": (now - timedelta(days=40)).isoformat()}),
        ),
        (
            "an hour ahead",
            json.dumps({"reading_c": 4.0, "measured_at": (now + timedelta(hours=1)).isoformat()}),
        ),
        ("naive time", json.dumps({"reading_c": 4.0, "measured_at": now.replace(tzinfo=None).isoformat()})),
    ]:
        resp = await carrier.post(ship_url + "/temperature", content=text.encode(), headers=raw_json)
        assert resp.status_code == 422, (name, resp.status_code, resp.text[:200])
    milestone = {
        "milestone": "picked_up",
        "occurred_at": now.isoformat(),
        "location": f"Ward 3 {MARKER}",  # free text where an opaque reference belongs
        "handled_by": "courier-1",
        "coi": placed["coi"],
    }
    assert_refused(await carrier.post(ship_url + "/milestones", json=milestone), 422)
    assert (await carrier.get(ship_url + "/temperature")).json() == readings_before

    # the registry: unknown regulators, oversized changes; pages are capped
    admin = parties.admin
    site = str((await journey.get())["site_id"])
    site_url = f"{platform.url('site')}/v1/sites/{site}"
    site_before = (await admin.get(site_url)).json()
    bad_approval = {"approvals": [{"regulator": "XYZ", "use": "commercial", "product_code": "TISA-CEL"}]}
    assert_refused(await admin.patch(site_url, json=bad_approval), 422)
    infinite = b'{"daily_capacity": {"TISA-CEL": Infinity}}'
    assert_refused(await admin.patch(site_url, content=infinite, headers=raw_json), 422)
    assert_refused(await admin.patch(site_url, json={"daily_capacity": {"TISA-CEL": -1}}), 422)
    assert await oversized_refused(admin, site_url, {"name": MARKER * 300_000})
    assert (await admin.get(site_url)).json() == site_before
    for url, params in [
        (orders, {"limit": 201}),
        (orders, {"offset": -1}),
        (orders, {"limit": "1e309"}),
        (f"{platform.url('scheduling')}/v1/slots", {"limit": 5000}),
    ]:
        client = parties.ops if "slots" in url else centre
        assert_refused(await client.get(url, params=params), 422)


async def test_the_site_still_publishes_after_an_oversized_change(
    platform: Platform, parties: Parties
) -> None:
    site = "AU-MELBOURNE"
    url = f"{platform.url('site')}/v1/sites/{site}"
    admin = parties.admin
    assert await oversized_refused(admin, url, {"name": "x" * 2_000_000})
    current = (await admin.get(url)).json()
    product = next(iter(current["daily_capacity"]))
    capacity = int(current["daily_capacity"][product]) + 1
    resp = await admin.patch(url, json={"daily_capacity": {product: capacity}})
    assert resp.status_code == 200, resp.text
    topic = topic_for("site", platform.namespace)

    async def published() -> bool:
        records = await scan.read_everything(platform.infra.bootstrap_servers, [topic])
        for _, _, value, _ in records[topic]:
            event = json.loads(value or b"{}")
            data = event.get("data") or {}
            if (
                event.get("type") == "site.registered.v1"
                and data.get("site_id") == site
                and data.get("daily_capacity", {}).get(product) == capacity
            ):
                return True
        return False

    await eventually(published, timeout=20, interval=0.5, what="the site change on the broker")


async def test_a_client_that_floods_is_told_to_wait(platform: Platform, credentials: Credentials) -> None:
    async with credentials.client("centre", "TC-US-TX-002") as client:
        answers = await asyncio.gather(
            *(client.get(f"{platform.url('order')}/v1/products") for _ in range(400))
        )
    limited = [a for a in answers if a.status_code == 429]
    assert limited, "400 requests at once are more than the rate (50/s) and the burst (100) allow"
    assert all(a.status_code in {200, 429} for a in answers)
    assert all(int(a.headers["retry-after"]) >= 1 for a in limited)
    assert limited[0].headers["content-type"].startswith("application/problem+json")
