"""Courier milestones: chain of custody, COI verification, and a trace that links back to the order.

Each call is made by the party that would make it: the centre places the order and confirms apheresis,
the courier that carries the shipment (its `carrier_id`) reports milestones and reads the custody log,
the receiving site's MES reports the receipt; ops reads which shipment an order has."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from v2v_contracts.coi import check_character
from v2v_harness.e2e import Parties, eventually, order_body, site_knows_the_bag
from v2v_harness.platform import Platform

pytestmark = pytest.mark.e2e

CENTRE = "TC-JP-TK-001"


async def planned_order(parties: Parties, platform: Platform) -> tuple[dict[str, Any], dict[str, Any]]:
    resp = await parties.centre(CENTRE).post(f"{platform.url('order')}/v1/orders", json=order_body(CENTRE))
    assert resp.status_code == 201, resp.text
    order = resp.json()

    async def shipment() -> list[dict[str, Any]]:
        r = await parties.ops.get(
            f"{platform.url('logistics')}/v1/shipments", params={"order_id": order["order_id"]}
        )
        return list(r.json())

    ships = await eventually(shipment, timeout=10, what="inbound shipment planned")
    return order, ships[0]


def other_carrier(parties: Parties, carrier_id: str) -> httpx.AsyncClient:
    """A courier that does not carry this shipment."""
    others = [c.entity_id for c in parties.credentials.clients("carrier") if c.entity_id != carrier_id]
    assert others, "the network has more than one carrier"
    return parties.carrier(str(others[0]))


def spans(platform: Platform) -> list[dict[str, Any]]:
    out = []
    for path in Path(platform.state_dir, "telemetry").glob("spans-*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


async def test_courier_milestone_is_custody_and_links_to_the_orders_first_trace(
    platform: Platform, parties: Parties
) -> None:
    order, ship = await planned_order(parties, platform)
    courier = parties.carrier(ship["carrier_id"])  # the courier that carries this shipment
    url = f"{platform.url('logistics')}/v1/shipments/{ship['shipment_id']}/milestones"
    body = {
        "milestone": "picked_up",
        "occurred_at": datetime.now(UTC).isoformat(),
        "location": "TYO-HND",
        "handled_by": "courier-7731",
        "received_from": CENTRE,
        "coi": order["coi"],
        "temperature_c": -180.5,
    }
    # another courier does not even see the shipment: 404, and nothing is recorded
    stranger = await other_carrier(parties, ship["carrier_id"]).post(url, json=body)
    assert stranger.status_code == 404, stranger.text
    resp = await courier.post(url, json=body)
    assert resp.status_code == 201, resp.text
    custody = (
        await courier.get(f"{platform.url('logistics')}/v1/shipments/{ship['shipment_id']}/custody")
    ).json()
    assert [(c["milestone"], c["handled_by"], c["coi_verified"]) for c in custody] == [
        ("picked_up", "courier-7731", True)
    ]
    centre = parties.centre(CENTRE)

    async def on_timeline() -> bool:
        o = (await centre.get(f"{platform.url('order')}/v1/orders/{order['order_id']}")).json()
        return "logistics.shipment_milestone.v1" in [e["type"] for e in o["timeline"]]

    await eventually(on_timeline, timeout=10, what="milestone on the order's timeline")
    # a hospital confirmation and a site's MES report are later inputs too
    resp = await centre.post(
        f"{platform.url('order')}/v1/orders/{order['order_id']}/apheresis", json={"coi": order["coi"]}
    )
    assert resp.status_code == 200, resp.text
    din = resp.json()["din"]  # the collection's DIN, on the bag's label beside the COI
    mes = parties.site(ship["destination"])
    view = f"{platform.url('site')}/v1/sites/{ship['destination']}/manufacturing/{order['order_id']}"

    async def site_knows_the_din() -> bool:  # a receipt before that is refused (409): the MES waits
        resp = await mes.get(view)
        return resp.status_code == 200 and site_knows_the_bag(resp.json(), din)

    await eventually(site_knows_the_din, timeout=10, what="the site learning the collection's DIN")
    resp = await mes.post(
        f"{platform.url('site')}/v1/sites/{ship['destination']}/receipts",
        json={"order_id": order["order_id"], "coi": order["coi"], "din": din, "accepted": True},
    )
    assert resp.status_code in {200, 201}, resp.text

    oid = order["order_id"]

    def traces() -> tuple[str | None, list[dict[str, Any]]]:
        all_spans = spans(platform)
        first = next(
            (
                s["trace_id"]
                for s in all_spans
                if s["name"] == "POST /v1/orders" and s["attributes"].get("v2v.order_id") == oid
            ),
            None,
        )
        scans = [
            s
            for s in all_spans
            if s["name"] == "courier milestone" and s["attributes"].get("v2v.order_id") == oid
        ]
        return first, scans

    def both() -> tuple[str, list[dict[str, Any]]] | None:
        first, scans = traces()
        return (first, scans) if first and scans else None

    first_trace, scans = await eventually(both, timeout=10, what="spans exported")
    scan = scans[0]
    assert scan["trace_id"] != first_trace  # a later input starts its own trace ...
    assert first_trace in {link["trace_id"] for link in scan["links"]}  # ... linked to the order's first
    assert scan["attributes"]["v2v.coi"] == order["coi"]

    def later(name: str) -> list[dict[str, Any]]:
        return [
            s for s in spans(platform) if s["name"] == name and s["attributes"].get("v2v.order_id") == oid
        ]

    for name in ("hospital apheresis", "mes receipt"):
        found = await eventually(lambda n=name: later(n), timeout=10, what=f"{name} span exported")
        assert found[0]["trace_id"] != first_trace
        assert first_trace in {link["trace_id"] for link in found[0]["links"]}, name


async def test_coi_mismatch_is_refused_and_a_bad_check_character_is_named(
    platform: Platform, parties: Parties
) -> None:
    order, ship = await planned_order(parties, platform)
    courier = parties.carrier(ship["carrier_id"])
    url = f"{platform.url('logistics')}/v1/shipments/{ship['shipment_id']}/milestones"
    base = {
        "milestone": "picked_up",
        "occurred_at": datetime.now(UTC).isoformat(),
        "location": "TYO",
        "handled_by": "courier-1",
    }
    other = "V2V0026999999"
    other += check_character(other)  # a valid COI, but not this shipment's
    resp = await courier.post(url, json={**base, "coi": other})
    assert resp.status_code == 409
    assert resp.json()["errors"] == [{"field": "coi", "reason": "does not match the shipment"}]
    broken = order["coi"][:-1] + ("A" if order["coi"][-1] != "A" else "B")
    resp = await courier.post(url, json={**base, "coi": broken})
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["field"] == "coi"
    custody = (
        await courier.get(f"{platform.url('logistics')}/v1/shipments/{ship['shipment_id']}/custody")
    ).json()
    assert custody == []
