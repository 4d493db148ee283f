"""A market loses its last approved manufacturing site after an order was accepted (issue 7, item 6):
the order is waitlisted with that reason, the centre is told by webhook and e-mail, and new orders for
that market are refused at intake with 422 naming product, use and market.

The platform is shared by the end-to-end tests: this one uses a combination no other test orders
(TISA-CEL for clinical use in China, whose only approved site is CN-SHANGHAI, an illustrative route:
issue 11's network has no CILTA-CEL in China, the Shanghai CMO makes TISA-CEL only) and puts the site's
approvals back as they were. Each call is made by whom it would be: the centre subscribes, adds its
e-mail recipient and places its orders; the registry admin reads the site and withdraws its approval.
The accepted order holds a slot there (it is released, told
`approval_withdrawn`, and the order waits, told `no_approved_site`) or, when the site is full, already
waits (and is told the new reason).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from v2v_harness.e2e import Parties, eventually, new_secret, order_body, subscribe
from v2v_harness.platform import Platform
from v2v_harness.pytest_plugin import SmtpSink
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

CENTRE, PRODUCT, USE, REGULATOR, SITE = "TC-CN-SH-001", "TISA-CEL", "clinical", "NMPA", "CN-SHANGHAI"


def clinical(**kw: Any) -> dict[str, Any]:
    return {**order_body(CENTRE, PRODUCT, **kw), "order_type": USE}


async def test_an_accepted_order_whose_market_loses_its_last_site_is_waitlisted_and_the_centre_told(
    platform: Platform, webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink, parties: Parties
) -> None:
    order_url, site_url = platform.url("order"), platform.url("site")
    client, admin = parties.centre(CENTRE), parties.admin
    site = (await admin.get(f"{site_url}/v1/sites/{SITE}")).json()
    approvals = site["approvals"]
    serving = [
        s
        for s in (await admin.get(f"{site_url}/v1/sites")).json()
        if s["active"]
        and any(a == {"regulator": REGULATOR, "use": USE, "product_code": PRODUCT} for a in s["approvals"])
    ]
    assert [s["site_id"] for s in serving] == [SITE], "the test needs a market with one approved site"

    path = f"/withdrawal/{new_secret()[6:14]}"
    await subscribe(client, platform.url("notification"), CENTRE, webhook_receiver.url(path))
    resp = await client.post(
        f"{platform.url('notification')}/v1/email-recipients",
        json={"email": "apheresis-unit@hospital.example"},
    )
    assert resp.status_code in {201, 409}, resp.text
    try:
        resp = await client.post(f"{order_url}/v1/orders", json=clinical(patient_ref="PAT-WD-0001"))
        assert resp.status_code == 201, resp.text
        order_id = resp.json()["order_id"]

        # accepted: it holds a slot at the market's only site (or waits for one, when it is full)
        async def placed() -> dict[str, Any] | None:
            body = (await client.get(f"{order_url}/v1/orders/{order_id}")).json()
            held = body["status"] in {"slot_reserved", "booking_confirmed", "inbound_shipment_planned"}
            return body if held or body["status"] == "waitlisted" else None

        before = await eventually(placed, timeout=15, what="order booked or waitlisted")
        if before["status"] != "waitlisted":
            assert before["site_id"] == SITE

        # the market's last approval goes: the accepted order is told why it waits
        withdrawn = [
            a
            for a in approvals
            if not (a["regulator"] == REGULATOR and a["use"] == USE and a["product_code"] == PRODUCT)
        ]
        patch = await admin.patch(f"{site_url}/v1/sites/{SITE}", json={"approvals": withdrawn})
        assert patch.status_code == 200, patch.text

        def unavailable_hooks() -> list[dict[str, Any]]:
            return [
                r.json()
                for r in webhook_receiver.on(path)
                if r.json()["subject"] == order_id
                and r.json()["type"] == "scheduling.slot_unavailable.v1"
                and r.json()["data"].get("reason") == "no_approved_site"
            ]

        [hook] = await eventually(unavailable_hooks, timeout=15, what="no_approved_site webhook")
        assert hook["data"]["waitlisted"] is True
        if before["status"] != "waitlisted":  # its slot was released there, told why

            def released() -> list[dict[str, Any]]:
                return [
                    r.json()
                    for r in webhook_receiver.on(path)
                    if r.json()["subject"] == order_id and r.json()["type"] == "scheduling.slot_released.v1"
                ]

            # two webhooks of two events: a retried delivery of one may arrive after the other
            await eventually(released, timeout=15, what="slot_released webhook")
            await asyncio.sleep(1.0)  # a second one would have arrived by now
            assert [r["data"]["reason"] for r in released()] == ["approval_withdrawn"]

        async def told_in_timeline() -> bool:
            body = (await client.get(f"{order_url}/v1/orders/{order_id}")).json()
            return body["status"] == "waitlisted" and any(
                e["type"] == "scheduling.slot_unavailable.v1" and "no_approved_site" in (e["reason"] or "")
                for e in body["timeline"]
            )

        await eventually(told_in_timeline, timeout=15, what="timeline entry with the reason")
        await eventually(
            lambda: [
                m
                for to, m in smtp_sink.messages
                if order_id in str(m["subject"]) and "apheresis-unit@hospital.example" in to
            ],
            timeout=15,
            what="e-mail to the centre",
        )

        # a new order for that market is now refused at intake, naming product, use and market
        async def refused() -> httpx.Response | None:
            # a new patient each try: one accepted before the order service heard of the withdrawal
            # would make the same patient's next try a second open order
            r = await client.post(f"{order_url}/v1/orders", json=clinical())
            return r if r.status_code == 422 else None

        answer = await eventually(refused, timeout=15, what="intake refusal for the withdrawn market")
        assert answer.headers["content-type"].startswith("application/problem+json")
        [error] = answer.json()["errors"]
        assert error["field"] == "product_code"
        assert all(word in error["reason"] for word in (PRODUCT, USE, REGULATOR))
    finally:
        await admin.patch(f"{site_url}/v1/sites/{SITE}", json={"approvals": approvals})
