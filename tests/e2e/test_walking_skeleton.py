"""End to end: the five services as separate processes, real Postgres, real Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from order_service.domain.coi import is_valid_coi
from v2v_harness.e2e import eventually, new_secret, order_body, subscribe
from v2v_harness.platform import Platform
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SKELETON_SOURCES = {"/v2v/order", "/v2v/scheduling", "/v2v/site", "/v2v/logistics"}


async def test_order_reaches_the_centres_webhook_signed_with_a_full_timeline(
    platform: Platform, webhook_receiver: WebhookReceiver
) -> None:
    secret = new_secret()
    path = "/single/TC-FR-PA-001"
    async with httpx.AsyncClient(timeout=10) as client:
        await subscribe(
            client, platform.url("notification"), "TC-FR-PA-001", webhook_receiver.url(path), secret
        )
        posted_at = time.time()
        resp = await client.post(f"{platform.url('order')}/v1/orders", json=order_body("TC-FR-PA-001"))
        assert resp.status_code == 201, resp.text
        created = resp.json()
        order_id = created["order_id"]
        assert resp.headers["location"] == f"/v1/orders/{order_id}"
        assert created["status"] == "submitted"
        assert is_valid_coi(created["coi"])

        def last_step_delivered() -> list[Any]:
            return [
                r
                for r in webhook_receiver.on(path)
                if r.json()["subject"] == order_id and r.json()["type"] == "logistics.shipment_planned.v1"
            ]

        hooks = await eventually(last_step_delivered, timeout=10, what="shipment_planned webhook within 10 s")
        assert hooks[0].at - posted_at < 10
        mine = [r for r in webhook_receiver.on(path) if r.json()["subject"] == order_id]
        for hook in mine:  # every webhook verifies against the subscription's secret
            Webhook(secret).verify(hook.body, hook.headers)
            assert hook.headers["webhook-signature"].startswith("v1,")
            assert hook.json()["coi"] == created["coi"]
            assert "patient_ref" not in hook.body.decode() and "PAT-E2E" not in hook.body.decode()
        with pytest.raises(Exception):  # noqa: B017 - a wrong secret must not verify
            Webhook(new_secret()).verify(mine[0].body, mine[0].headers)

        order = (await client.get(f"{platform.url('order')}/v1/orders/{order_id}")).json()
        sources = [entry["source"] for entry in order["timeline"]]
        assert set(sources) >= SKELETON_SOURCES
        types = [entry["type"] for entry in order["timeline"]]
        assert types == [
            "order.submitted.v1",
            "scheduling.slot_reserved.v1",
            "site.booking_confirmed.v1",
            "logistics.shipment_planned.v1",
        ]
        times = [entry["time"] for entry in order["timeline"]]
        assert times == sorted(times)
        assert order["status"] == "inbound_shipment_planned"
        assert order["slot"]["site_id"] in {"FR-LES-ULIS", "CH-STEIN", "DE-LEIPZIG-IZI"}  # EMA-approved sites
        assert order["coi"] == created["coi"]


async def test_twenty_concurrent_orders_each_arrive_exactly_once(
    platform: Platform, webhook_receiver: WebhookReceiver
) -> None:
    centres = [
        "TC-US-NJ-001",
        "TC-US-TX-002",
        "TC-DE-BE-001",
        "TC-CH-ZH-001",
        "TC-JP-TK-001",
        "TC-CN-SH-001",
        "TC-AU-VI-001",
    ]
    types = ["order.submitted.v1", "logistics.shipment_planned.v1"]
    async with httpx.AsyncClient(timeout=30) as client:
        for centre in centres:
            await subscribe(
                client,
                platform.url("notification"),
                centre,
                webhook_receiver.url(f"/c20/{centre}"),
                new_secret(),
                types,
            )
        bodies = [
            order_body(centres[i % len(centres)], patient_ref=f"PAT-C20-{i:03d}", days_ahead=10 + i % 5)
            for i in range(20)
        ]
        responses = await asyncio.gather(
            *(client.post(f"{platform.url('order')}/v1/orders", json=b) for b in bodies)
        )
    assert [r.status_code for r in responses] == [201] * 20
    ids = {r.json()["order_id"] for r in responses}
    assert len(ids) == 20
    assert len({r.json()["coi"] for r in responses}) == 20

    def delivered(kind: str) -> list[str]:
        return [
            r.json()["subject"]
            for r in webhook_receiver.received
            if r.path.startswith("/c20/") and r.json()["type"] == kind and r.json()["subject"] in ids
        ]

    await eventually(
        lambda: len(set(delivered("logistics.shipment_planned.v1"))) == 20,
        timeout=60,
        what="all 20 orders planned and notified",
    )
    await asyncio.sleep(2.0)  # anything sent twice would have arrived by now
    for kind in types:
        got = delivered(kind)
        assert sorted(got) == sorted(ids), f"{kind}: each order exactly once"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"treatment_center_id": "TC-XX-NOPE"}, "treatment_center_id"),
        ({"product_code": "NOT-A-PRODUCT"}, "product_code"),
        ({"requested_apheresis_date": "2020-01-01"}, "requested_apheresis_date"),
        ({"requested_apheresis_date": "next tuesday"}, "requested_apheresis_date"),
        ({"order_type": "compassionate"}, "order_type"),
        ({"patient_ref": ""}, "patient_ref"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
async def test_bad_input_is_refused_naming_the_field_and_nothing_is_written(
    platform: Platform, change: dict[str, Any], field: str
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        before = (await client.get(f"{platform.url('order')}/v1/orders", params={"limit": 1})).json()["total"]
        resp = await client.post(f"{platform.url('order')}/v1/orders", json={**order_body(), **change})
        assert resp.status_code == 422, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        problem = resp.json()
        assert problem["status"] == 422
        assert field in [e["field"] for e in problem["errors"]]
        assert all(e["reason"] for e in problem["errors"])
        after = (await client.get(f"{platform.url('order')}/v1/orders", params={"limit": 1})).json()["total"]
        assert after == before


async def test_missing_fields_and_malformed_json_are_named(platform: Platform) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        body = order_body()
        del body["product_code"]
        resp = await client.post(f"{platform.url('order')}/v1/orders", json=body)
        assert resp.status_code == 422
        assert {"field": "product_code", "reason": "is required"} in resp.json()["errors"]
        resp = await client.post(
            f"{platform.url('order')}/v1/orders",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert resp.status_code == 422
        assert resp.headers["content-type"].startswith("application/problem+json")


async def test_unknown_order_is_404_problem(platform: Platform) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        resp = await client.get(f"{platform.url('order')}/v1/orders/00000000-0000-4000-8000-000000000000")
        assert resp.status_code == 404
        assert resp.headers["content-type"].startswith("application/problem+json")
        resp = await client.get(f"{platform.url('order')}/v1/orders/not-a-uuid")
        assert resp.status_code == 422


async def test_catalogues_health_readiness_and_docs(platform: Platform) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        centres = (await client.get(f"{platform.url('order')}/v1/treatment-centers")).json()
        assert {c["country"] for c in centres} >= {"US", "DE", "FR", "CH", "JP", "CN", "AU"}
        products = (await client.get(f"{platform.url('order')}/v1/products")).json()
        assert "TISA-CEL" in {p["code"] for p in products}
        sites = (await client.get(f"{platform.url('site')}/v1/sites")).json()
        assert len(sites) == 7
        assert {s["operator"] for s in sites} == {"own", "cmo"}
        for name in ("order", "scheduling", "site", "logistics", "notification"):
            base = platform.url(name)
            assert (await client.get(base + "/health")).json()["status"] == "ok"
            ready = await client.get(base + "/ready")
            own = {"order": {"network": "ok"}}.get(name, {})  # the order service waits for the site network
            assert ready.status_code == 200 and ready.json()["checks"] == {
                "database": "ok",
                "broker": "ok",
                **own,
            }
            assert (await client.get(base + "/openapi.json")).status_code == 200
            asyncapi = (await client.get(base + "/asyncapi.json")).json()
            assert asyncapi["asyncapi"].startswith("3.")
            assert asyncapi["channels"], f"{name} documents its channels"
        orders = await client.get(
            f"{platform.url('order')}/v1/orders", params={"treatment_center_id": "TC-DE-BE-001", "limit": 2}
        )
        page = orders.json()
        assert page["limit"] == 2 and all(o["treatment_center_id"] == "TC-DE-BE-001" for o in page["items"])
