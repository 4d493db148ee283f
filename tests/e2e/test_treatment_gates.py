"""Issue 11, items 4 and 5, end to end (five service processes, each party with its own credentials):

- treatment gates at the centre: lymphodepletion (LD) is refused before release and before the product's
  delivery is confirmed (the courier's booking confirms it); a product lost after LD (an outbound
  excursion QA rejects) clears the LD and alerts the centre (webhook and e-mail); the remanufactured
  product's LD is allowed; infusion after the window's maximum and before its minimum is refused with
  problem+json naming the window; a repeat LD once the window closed; infusion inside it completes;
- the patient's journey: on hold (the site's steps go on beneath the hold) and resumed; a late
  cancellation with a structured reason leaves a product whose disposition (destroyed) the centre
  records, on the order's view, timeline, audit trail and as a webhook.
"""

from __future__ import annotations

from typing import Any

import pytest

from v2v_harness.e2e import (
    MANUFACTURING_STEPS,
    Journey,
    Parties,
    eventually,
    new_secret,
    now_iso,
    order_body,
    subscribe,
)
from v2v_harness.platform import Platform
from v2v_harness.pytest_plugin import SmtpSink
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

DAY = 24 * 60  # minutes


async def start(
    parties: Parties, platform: Platform, receiver: WebhookReceiver, centre: str, product: str, **kw: Any
) -> tuple[Journey, str]:
    client = parties.centre(centre)
    path = f"/gates/{centre}/{new_secret()[6:14]}"
    await subscribe(client, platform.url("notification"), centre, receiver.url(path))
    resp = await client.post(f"{platform.url('order')}/v1/orders", json=order_body(centre, product, **kw))
    assert resp.status_code == 201, resp.text
    return Journey(parties, platform.url, resp.json()), path


async def hook_data(
    receiver: WebhookReceiver, path: str, order_id: str, event_type: str
) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]]:
        return [
            r.json()["data"]
            for r in receiver.on(path)
            if r.json()["subject"] == order_id and r.json()["type"] == event_type
        ]

    return list(await eventually(found, timeout=15, what=f"webhook {event_type}"))


async def post(j: Journey, action: str, body: dict[str, Any]) -> Any:
    """A hospital action as the centre, answering the raw response (to look at a refusal)."""
    return await j.client.post(f"{j.url('order')}/v1/orders/{j.id}/{action}", json=body)


def problem_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    return dict(resp.json())


async def test_treatment_gates_lost_product_after_lymphodepletion_repeat_and_the_infusion_window(
    platform: Platform, webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink, parties: Parties
) -> None:
    centre = "TC-DE-BE-001"
    alerts = await parties.centre(centre).post(
        f"{platform.url('notification')}/v1/email-recipients", json={"email": "car-t-team@charite.example"}
    )
    assert alerts.status_code in {201, 409}, alerts.text
    # tisa-cel for B-ALL: a 4-day LD regimen, infusion 2-14 days after its completion; dose by weight
    j, path = await start(
        parties, platform, webhook_receiver, centre, "TISA-CEL", indication="b_all", weight_kg=38.5
    )
    site = await j.up_to_material_received()
    assert "released" in problem_of(await post(j, "lymphodepletion", {}), 409)["detail"]
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc(site, "released")
    await j.wait_status("released")
    # released, but no confirmed delivery yet
    refused = problem_of(await post(j, "lymphodepletion", {}), 409)
    assert "delivery date is confirmed" in refused["detail"]
    outbound = await j.shipment("outbound_product")
    await j.courier(outbound, "booked")  # the courier's booking confirms the delivery date

    async def confirmed() -> dict[str, Any] | None:
        order = await j.get()
        return order if order["treatment"]["delivery_confirmed"] else None

    assert (await eventually(confirmed, timeout=15, what="delivery confirmed"))["status"] == "released"
    first = await j.hospital("lymphodepletion", {"at": now_iso(-7 * DAY)})
    assert first["treatment"]["lymphodepletions"] == 1
    assert first["treatment"]["infusion_window"]["indication"] == "b_all"

    # the product is lost after LD: an outbound excursion QA rejects -> remanufacture (retained material)
    await j.courier(outbound, "picked_up", minutes_ago=30)
    await j.wait_status("product_in_transit")
    assert (await j.excursion(outbound, -95.0, minutes=20))["excursion_published"] is True
    await j.wait_status("material_at_risk")
    await j.dispose("reject", "outside_stability_data", site_id=site)

    async def run_two() -> dict[str, Any] | None:
        order = await j.get()
        return order if order["run"] == 2 and order["status"] == "material_received" else None

    lost = await eventually(run_two, timeout=20, what="remanufacture after the reject")

    async def site_run_two() -> dict[str, Any] | None:  # the site starts it from its own slot (issue 10)
        view = await j.as_site(site).manufacturing(site, j.id)
        return view.body if view.status == 200 and view.body["run"] == 2 else None

    await eventually(site_run_two, timeout=20, what="the site's run 2")
    assert lost["lymphodepletion_at"] is None
    assert lost["treatment"]["lymphodepletion_started_on"] is None
    assert lost["treatment"]["infusion_window"] is None and lost["treatment"]["lymphodepletions"] == 1
    assert not lost["treatment"]["delivery_confirmed"]
    assert any("lymphodepletion is cleared" in e["reason"] for e in lost["timeline"])
    [cleared] = await hook_data(webhook_receiver, path, j.id, "order.lymphodepletion_cleared.v1")
    assert cleared == {
        "order_id": j.id,
        "coi": j.coi,
        "treatment_center_id": centre,
        "reason": "quarantine_rejected",
        "repeat_allowed": True,
    }
    await eventually(
        lambda: [
            m
            for _, m in smtp_sink.messages
            if j.id in str(m["subject"]) and "lymphodepletion" in str(m["subject"])
        ],
        timeout=15,
        what="the centre's e-mail alert",
    )

    # the remanufactured product: released, picked up, a new LD (started 28 days ago: its window, 22 to 10
    # days ago, has closed; a repeat may start from 9 days ago)
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc(site, "released")
    await j.wait_status("released")
    assert "delivery date is confirmed" in problem_of(await post(j, "lymphodepletion", {}), 409)["detail"]

    async def new_outbound() -> dict[str, Any] | None:
        ships = (await j.ops.shipments(order_id=j.id)).expect(200)
        fresh = [
            s for s in ships if s["leg"] == "outbound_product" and s["shipment_id"] != outbound["shipment_id"]
        ]
        return fresh[-1] if fresh else None

    second = await eventually(new_outbound, timeout=15, what="the second product's shipment")
    await j.courier(second, "picked_up")
    await j.wait_status("product_in_transit")
    late_ld = await j.hospital("lymphodepletion", {"at": now_iso(-28 * DAY)})
    assert late_ld["treatment"]["lymphodepletions"] == 2
    window = late_ld["treatment"]["infusion_window"]
    await j.courier(second, "in_transit", "delivered")
    await j.wait_status("product_delivered")
    await j.hospital("product-receipt", {"coi": j.coi})
    # after the window's maximum: refused, naming the window
    after = problem_of(await post(j, "infusion", {"coi": j.coi, "lot": j.lot}), 409)
    assert after["type"].endswith("/infusion-window") and after["window"] == window
    assert after["errors"][0]["field"] == "at"
    assert (
        f"after the infusion window {window['earliest_infusion']} .. {window['latest_infusion']}"
        in (after["errors"][0]["reason"])
    )
    # the window closed: a repeat LD (started 7 days ago) opens a new one (not before it could: 12 days ago)
    too_soon = problem_of(await post(j, "lymphodepletion", {"at": now_iso(-12 * DAY)}), 409)
    assert "a repeat may start from" in too_soon["detail"]
    repeat = await j.hospital("lymphodepletion", {"at": now_iso(-7 * DAY)})
    assert repeat["treatment"]["lymphodepletions"] == 3
    new_window = repeat["treatment"]["infusion_window"]
    # before the new window's minimum: refused, naming it
    before = problem_of(await post(j, "infusion", {"coi": j.coi, "lot": j.lot, "at": now_iso(-2 * DAY)}), 409)
    assert before["window"] == new_window and "is before the infusion window" in before["detail"]
    done = await j.hospital("infusion", {"coi": j.coi})
    assert done["status"] == "completed"
    audit = (await j.api.get("order", f"/v1/orders/{j.id}/audit", params={"limit": 200})).expect(200)
    assert [a["action"] for a in audit["items"]].count("order.lymphodepletion") == 3


async def test_on_hold_resume_and_a_late_cancellation_whose_product_is_destroyed(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    centre = "TC-US-TX-002"
    j, path = await start(
        parties, platform, webhook_receiver, centre, "AXI-CEL", indication="lbcl", weight_kg=80.0
    )
    site = await j.up_to_material_received()
    await j.steps(site, "activation")
    await j.wait_status("manufacturing")
    note = "febrile, CRP up: wait for the infection to clear"
    held = await j.hospital("hold", {"reason_code": "patient_unwell", "note": note})
    assert held["status"] == "on_hold"
    assert held["on_hold"] == {"reason_code": "patient_unwell", "resumes_in": "manufacturing"}
    assert held["timeline"][-1]["note"] == note
    # the site's steps go on beneath the hold
    await j.steps(site, *MANUFACTURING_STEPS[1:])

    async def moved_beneath() -> dict[str, Any] | None:
        order = await j.get()
        return order if (order["on_hold"] or {}).get("resumes_in") == "qc_pending" else None

    still = await eventually(moved_beneath, timeout=15, what="QC pending beneath the hold")
    assert still["status"] == "on_hold"
    resumed = await j.hospital("resume", {"reason_code": "patient_cleared"})
    assert resumed["status"] == "qc_pending" and resumed["on_hold"] is None
    [paused] = await hook_data(webhook_receiver, path, j.id, "order.put_on_hold.v1")
    assert (paused["reason"], paused["previous_status"]) == ("patient_unwell", "manufacturing")
    assert note not in str(paused)
    [back] = await hook_data(webhook_receiver, path, j.id, "order.resumed.v1")
    assert (back["reason"], back["status"]) == ("patient_cleared", "qc_pending")

    # a late cancellation (structured reason, signed by the physician): the product at the site is left
    creds = parties.credentials
    signature = await creds.signature_headers(
        creds.client_id("centre", centre), creds.user_id("physician", centre)
    )
    resp = await j.client.post(
        f"{j.url('order')}/v1/orders/{j.id}/cancel",
        json={"reason_code": "disease_progression"},
        headers=signature,
    )
    assert resp.status_code == 200, resp.text
    cancelled = resp.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["end_material"] == {
        "material": "product",
        "location": "site",
        "disposition_recorded": False,
    }
    recorded = await j.hospital(
        "material-disposition",
        {
            "material": "product",
            "outcome": "destroyed",
            "reason_code": "order_cancelled",
            "document_reference": "DEST-TX-0042",
            "note": "destroyed at the site per its SOP",
        },
    )
    assert recorded["end_material"]["disposition_recorded"] is True
    [record] = recorded["material_dispositions"]
    assert (record["material"], record["outcome"], record["location"]) == ("product", "destroyed", "site")
    entry = recorded["timeline"][-1]
    assert (
        entry["type"] == "order.material_disposition_recorded.v1" and "product destroyed" in entry["reason"]
    )
    twice = problem_of(
        await post(
            j, "material-disposition", {"material": "product", "outcome": "returned", "reason_code": "other"}
        ),
        409,
    )
    assert twice["errors"][0]["field"] == "material"
    [hook] = await hook_data(webhook_receiver, path, j.id, "order.material_disposition_recorded.v1")
    assert (hook["material"], hook["left_at"], hook["outcome"], hook["reason"]) == (
        "product",
        "site",
        "destroyed",
        "order_cancelled",
    )
    audit = (await j.api.get("order", f"/v1/orders/{j.id}/audit", params={"limit": 200})).expect(200)
    actions = [a["action"] for a in audit["items"]]
    for expected in ("order.hold", "order.resume", "order.cancel", "order.material_disposition.recorded"):
        assert expected in actions, expected
