"""The whole vein-to-vein journey and its exception paths, end to end: five service processes, driven
only by the HTTP calls a hospital, a courier and a site's manufacturing system would make, each with its
own credentials (`Parties`): the centre for its order, the courier for its shipment, the site's MES for its
site, the manufacturer's QA for QC and its signed dispositions of material at risk, the centre's physician
for signed decisions (an OOS product, a cancellation once manufacture started), the registry admin for
outages, and ops for what only operations read (slots). Reasons are codes; what staff type beside one (a
note) stays on the order's timeline."""

from __future__ import annotations

from datetime import date, datetime, timedelta
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


async def start(
    parties: Parties,
    platform: Platform,
    receiver: WebhookReceiver,
    centre: str,
    product: str = "TISA-CEL",
    **kw: Any,
) -> tuple[Journey, str]:
    """The centre subscribes its endpoint and places an order, with its own credentials."""
    client = parties.centre(centre)
    path = f"/life/{centre}/{new_secret()[6:14]}"
    await subscribe(client, platform.url("notification"), centre, receiver.url(path))
    resp = await client.post(f"{platform.url('order')}/v1/orders", json=order_body(centre, product, **kw))
    assert resp.status_code == 201, resp.text
    return Journey(parties, platform.url, resp.json()), path


def types_on(receiver: WebhookReceiver, path: str, order_id: str) -> list[str]:
    return [r.json()["type"] for r in receiver.on(path) if r.json()["subject"] == order_id]


async def hooks(
    receiver: WebhookReceiver, path: str, order_id: str, *wanted: str, timeout: float = 15
) -> list[str]:
    return list(
        await eventually(
            lambda: (lambda got: got if set(wanted) <= set(got) else None)(
                types_on(receiver, path, order_id)
            ),
            timeout=timeout,
            what=f"webhooks {wanted}",
        )
    )


def hook_data(receiver: WebhookReceiver, path: str, order_id: str, event_type: str) -> list[dict[str, Any]]:
    return [
        r.json()["data"]
        for r in receiver.on(path)
        if r.json()["subject"] == order_id and r.json()["type"] == event_type
    ]


def entry(order: dict[str, Any], event_type: str) -> dict[str, Any]:
    """The order's last timeline entry of a type."""
    return [e for e in order["timeline"] if e["type"] == event_type][-1]


def reasons(order: dict[str, Any]) -> str:
    return " ".join(e["reason"] or "" for e in order["timeline"])


async def signed(j: Journey, kind: str, user_id: str) -> dict[str, str]:
    """A fresh signing token of a demo user (re-entering the password at the issuer), for the demo client of
    `kind` (the order's centre, or the manufacturer's QA) that sends it."""
    creds = j.parties.credentials
    client_id = creds.client_id("centre", j.centre_id) if kind == "centre" else creds.client_id(kind)
    return await creds.signature_headers(client_id, user_id)


async def disposition(
    j: Journey, site_id: str, outcome: str, reason_code: str, expect: int = 200, **extra: Any
) -> dict[str, Any]:
    """QA's signed disposition of the order's material at risk, by the site's demo QA reviewer."""
    resp = await j.parties.qa.post(
        f"{j.url('order')}/v1/orders/{j.id}/disposition",
        json={"outcome": outcome, "reason_code": reason_code, "document_reference": "QA-E2E-1", **extra},
        headers=await signed(j, "qa", f"qa.{site_id.lower()}"),
    )
    assert resp.status_code == expect, resp.text
    return dict(resp.json())


async def physician(j: Journey, body: dict[str, Any], expect: int = 200) -> dict[str, Any]:
    """The centre's demo physician's signed decision on an out-of-specification product."""
    resp = await j.client.post(
        f"{j.url('order')}/v1/orders/{j.id}/physician-decision",
        json=body,
        headers=await signed(j, "centre", f"phys.{j.centre_id.lower()}"),
    )
    assert resp.status_code == expect, resp.text
    return dict(resp.json())


async def test_an_order_goes_from_submission_to_completed_through_every_step(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    j, path = await start(
        parties, platform, webhook_receiver, "TC-DE-BE-001", indication="b_all", weight_kg=42.0
    )
    site = await j.up_to_material_received()
    # lymphodepletion before release is refused with a clear problem
    resp = await j.client.post(f"{platform.url('order')}/v1/orders/{j.id}/lymphodepletion", json={})
    assert resp.status_code == 409 and resp.headers["content-type"].startswith("application/problem+json")
    assert "released" in resp.json()["detail"]
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc(site, "released")
    await j.wait_status("released")
    # issue 11: and before the product's delivery is confirmed (the courier books or picks it up)
    early = await j.client.post(f"{platform.url('order')}/v1/orders/{j.id}/lymphodepletion", json={})
    assert early.status_code == 409 and "delivery date is confirmed" in early.json()["detail"]
    outbound = await j.shipment("outbound_product")
    assert outbound["origin"] == site and outbound["destination"] == "TC-DE-BE-001"
    await j.courier(outbound, "picked_up", temperature_c=-175.0)
    await j.wait_status("product_in_transit")
    # started 7 days ago (B-ALL: a 4-day regimen, infusion 2-14 days after it): today is in its window
    ld = await j.hospital("lymphodepletion", {"at": now_iso(-7 * 24 * 60)})
    assert ld["treatment"]["infusion_window"]["indication"] == "b_all"
    await j.courier(outbound, "in_transit", "delivered", temperature_c=-175.0)
    await j.wait_status("product_delivered")
    await j.hospital("product-receipt", {"coi": j.coi})
    done = await j.hospital("infusion", {"coi": j.coi})
    assert done["status"] == "completed"

    order = await j.get()
    statuses = [e["status"] for e in order["timeline"]]
    for expected in [
        "submitted",
        "slot_reserved",
        "booking_confirmed",
        "inbound_shipment_planned",
        "apheresis_completed",
        "material_in_transit",
        "material_received",
        "manufacturing",
        "qc_pending",
        "released",
        "product_in_transit",
        "product_delivered",
        "product_received",
        "completed",
    ]:
        assert expected in statuses, expected
    firsts = [statuses.index(s) for s in dict.fromkeys(statuses)]
    assert firsts == sorted(firsts), "every step in order"
    times = [e["time"] for e in order["timeline"]]
    assert times == sorted(times)
    assert order["predicted"]["release"] and order["predicted"]["earliest_infusion"]
    got = await hooks(webhook_receiver, path, j.id, "order.completed.v1", "site.product_released.v1")
    assert {h.json()["coi"] for h in webhook_receiver.on(path) if h.json()["subject"] == j.id} == {j.coi}
    assert "order.submitted.v1" in got and "logistics.shipment_planned.v1" in got


async def test_cancellation_during_manufacture_releases_stops_and_cancels(
    platform: Platform, webhook_receiver: WebhookReceiver, smtp_sink: SmtpSink, parties: Parties
) -> None:
    centre = parties.centre("TC-FR-PA-001")
    resp = await centre.post(
        f"{platform.url('notification')}/v1/email-recipients", json={"email": "cell-lab@hospital.example"}
    )
    assert resp.status_code in {201, 409}, resp.text
    j, path = await start(parties, platform, webhook_receiver, "TC-FR-PA-001")
    site = await j.up_to_material_received()
    await j.steps(site, "activation")
    await j.wait_status("manufacturing")  # the order learnt that manufacture started
    note = "patient withdrew consent"
    body = {"reason_code": "consent_withdrawn", "note": note}
    # manufacture started: the cancellation is the physician's signed decision (21 CFR 11.50)
    unsigned = await j.client.post(f"{platform.url('order')}/v1/orders/{j.id}/cancel", json=body)
    assert unsigned.status_code == 401 and unsigned.json()["reason"] == "signature-required"
    resp = await j.client.post(
        f"{platform.url('order')}/v1/orders/{j.id}/cancel",
        json=body,
        headers=await signed(j, "centre", "phys.tc-fr-pa-001"),
    )
    assert resp.status_code == 200, resp.text
    cancelled = resp.json()
    assert cancelled["status"] == "cancelled"
    assert [(d["meaning"], d["signed"]) for d in cancelled["decisions"]] == [("cancellation", True)]
    # the code is the reason; the note stays on the order's own timeline
    cancel_entry = entry(cancelled, "order.cancelled.v1")
    assert "consent_withdrawn" in cancel_entry["reason"] and cancel_entry["note"] == note
    again = await j.client.post(
        f"{platform.url('order')}/v1/orders/{j.id}/cancel",
        json={"reason_code": "duplicate_order"},
        headers=await signed(j, "centre", "phys.tc-fr-pa-001"),
    )
    assert again.status_code == 409

    async def compensated() -> bool:
        slots = (await j.ops.slots(order_id=j.id)).expect(200)  # operations read the slots
        mfg = (await j.as_site(site).manufacturing(site, j.id)).expect(200)  # the site's MES its plan
        return all(s["status"] in {"released", "consumed"} for s in slots) and mfg["state"] == "stopped"

    await eventually(compensated, timeout=15, what="slot released and manufacturing stopped")
    await hooks(webhook_receiver, path, j.id, "order.cancelled.v1", "site.manufacturing_stopped.v1")
    assert [d["reason"] for d in hook_data(webhook_receiver, path, j.id, "order.cancelled.v1")] == [
        "consent_withdrawn"
    ]
    mails = await eventually(
        lambda: [
            m
            for to, m in smtp_sink.messages
            if j.id in str(m["subject"]) and "order.cancelled" in str(m["subject"])
        ],
        timeout=15,
        what="cancel e-mail",
    )
    assert all(note not in m.as_string() for m in mails), "the note stays in the order service"


async def test_cancellation_before_apheresis_releases_the_slot_and_cancels_the_shipment(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    j, path = await start(parties, platform, webhook_receiver, "TC-US-TX-002", "AXI-CEL")
    await j.wait_status("inbound_shipment_planned")
    inbound = await j.shipment("inbound_apheresis")
    await j.hospital("cancel", {"reason_code": "patient_ineligible", "note": "no longer eligible"})
    courier = j.as_carrier(inbound)  # the courier sees its shipment cancelled

    async def compensated() -> bool:
        slots = (await j.ops.slots(order_id=j.id)).expect(200)
        ship = (await courier.shipment(inbound["shipment_id"])).expect(200)
        return [s["status"] for s in slots] == ["released"] and ship["status"] == "cancelled"

    await eventually(compensated, timeout=15, what="slot released and shipment cancelled")
    await hooks(
        webhook_receiver, path, j.id, "scheduling.slot_released.v1", "logistics.shipment_cancelled.v1"
    )


async def test_rejected_material_is_recollected_with_a_new_apheresis_and_slot(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    j, path = await start(parties, platform, webhook_receiver, "TC-CH-ZH-001")
    first = await j.wait_status("inbound_shipment_planned")
    inbound = await j.shipment("inbound_apheresis")
    await j.hospital("apheresis", {"coi": j.coi})
    await j.courier(inbound, "picked_up", "delivered")
    await j.receipt(first["site_id"], accepted=False, reason="damaged_container")
    held = await j.wait_status("material_at_risk")  # the site holds the bag; QA decides
    assert held["at_risk"]["cause"] == "receipt" and held["recollections"] == 0
    await disposition(j, first["site_id"], "reject", "integrity_compromised")
    again = await j.wait_status("inbound_shipment_planned", timeout=20)
    assert again["recollections"] == 1
    assert again["slot"]["slot_id"] != first["slot"]["slot_id"]
    # a new collection is planned recollection_lead_days from today (the first one already happened)
    assert again["slot"]["apheresis_date"] != first["slot"]["apheresis_date"]
    assert again["slot"]["apheresis_date"] >= date.today().isoformat()
    assert "damaged_container" in reasons(again) and "recollection" in reasons(again)
    new_inbound = await j.shipment("inbound_apheresis")
    assert new_inbound["shipment_id"] != inbound["shipment_id"]
    await hooks(
        webhook_receiver,
        path,
        j.id,
        "site.material_rejected.v1",
        "order.rebook_requested.v1",
        "scheduling.slot_released.v1",
    )
    rejected = hook_data(webhook_receiver, path, j.id, "site.material_rejected.v1")
    assert [d["reason"] for d in rejected] == ["damaged_container"]


async def test_inbound_excursion_is_recollected(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    # fresh material, 2-8 °C
    j, path = await start(parties, platform, webhook_receiver, "TC-US-NJ-001", "AXI-CEL")
    await j.wait_status("inbound_shipment_planned")
    inbound = await j.shipment("inbound_apheresis")
    await j.hospital("apheresis", {"coi": j.coi})
    await j.courier(inbound, "picked_up", minutes_ago=60)
    # a short time outside 2-8 °C is recorded and holds nothing; beyond the product's tolerance (30 min for
    # fresh AXI-CEL material) it is an excursion, held for QA
    short = await j.temperature(inbound, 14.5, minutes_ago=55)
    assert short["in_range"] is False and short["excursion_published"] is False
    reading = await j.excursion(inbound, 14.5, minutes=45)
    assert reading["excursion_published"] is True
    held = await j.wait_status("material_at_risk")  # held for QA, not recollected at once
    assert (held["at_risk"]["cause"], held["at_risk"]["leg"]) == ("excursion", "inbound_apheresis")
    await disposition(j, held["site_id"], "reject", "outside_stability_data")
    order = await j.wait_status(
        "rescheduling", "waitlisted", "slot_reserved", "booking_confirmed", "inbound_shipment_planned"
    )
    order = await j.wait_status("inbound_shipment_planned", timeout=20)
    assert order["recollections"] == 1
    assert any("temperature excursion" in e["reason"] for e in order["timeline"])
    await hooks(webhook_receiver, path, j.id, "logistics.shipment_excursion.v1", "order.rebook_requested.v1")


async def test_out_of_specification_is_remanufactured_from_retained_material(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    j, path = await start(parties, platform, webhook_receiver, "TC-JP-TK-001", "TISA-CEL")
    site = await j.up_to_material_received()
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc(site, "out_of_specification", "potency")  # as the manufacturer's QA
    held = await j.wait_status("material_at_risk")
    assert held["at_risk"]["cause"] == "out_of_specification" and held["run"] == 1
    # QA asks the physician, who declines (signed): as a reject, a remanufacture from retained material
    asked = await disposition(j, site, "release_on_physician_request", "risk_assessed_for_patient")
    assert asked["status"] == "awaiting_physician"
    await physician(j, {"accept": False, "reason_code": "risk_not_acceptable"})

    async def second_run() -> dict[str, Any] | None:
        o = await j.get()
        return o if o["run"] == 2 and o["status"] == "material_received" else None

    order = await eventually(second_run, timeout=15, what="remanufacture (run 2)")
    assert "out of specification: potency" in reasons(order)
    assert "physician declined" in reasons(order)
    decided = entry(order, "order.disposition_decided.v1")
    assert decided["type"] == "order.disposition_decided.v1" and decided["status"] == "material_received"
    await hooks(webhook_receiver, path, j.id, "order.remanufacture_requested.v1")

    # the remanufacture has a new slot of its own at the site that holds the material (issue 10): booked
    # by scheduling against the site's capacity, in the site's plan, and the site starts run 2 from it
    async def remanufacture_slot() -> list[dict[str, Any]] | None:
        page = _checked_json(await j.ops.slots(order_id=j.id))
        slots = page["items"] if isinstance(page, dict) else page
        return slots if len(slots) == 2 else None

    slots = await eventually(remanufacture_slot, timeout=15, what="the remanufacture's slot")
    first, new = sorted(slots, key=lambda s: s["reserved_reason"] == "remanufacture")
    assert (new["reserved_reason"], new["site_id"], new["status"]) == ("remanufacture", site, "consumed")
    assert new["slot_id"] != first["slot_id"] and first["status"] == "consumed"

    async def run_two_started() -> dict[str, Any] | None:
        view = _checked_json(await j.as_site(site).manufacturing(site, j.id))
        return view if view["run"] == 2 else None

    view = await eventually(run_two_started, timeout=15, what="run 2 started at the site")
    assert view["state"] == "material_received" and view["next_step"] == "activation"
    order = await eventually(
        lambda: _booked(j), timeout=15, what="the order to record the remanufacture's slot"
    )
    assert f"remanufacture (run 2) booked at {site}" in reasons(order)
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc(site, "released")
    released = await j.wait_status("released")
    assert released["recollections"] == 0
    await j.shipment("outbound_product")


async def _booked(j: Journey) -> dict[str, Any] | None:
    order = await j.get()
    return order if "remanufacture (run 2) booked at" in reasons(order) else None


def _checked_json(resp: Any) -> Any:
    assert resp.status == 200, resp.text
    return resp.body


async def test_an_oos_product_the_physician_accepts_ships_is_infused_and_the_authority_is_to_be_told(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    """EU GMP for ATMPs Part IV §11.5: QA releases an out-of-specification product on the physician's
    request, the physician accepts it (signed); in an FDA market the order becomes expanded access; the lot
    is released by signature (exceptional), ships, is received and infused against COI + lot, and a task to
    notify the authority falls due 48 h after the infusion."""
    j, path = await start(parties, platform, webhook_receiver, "TC-US-TX-002", "AXI-CEL")
    site = await j.up_to_material_received()
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc(site, "out_of_specification", "dose")
    held = await j.wait_status("material_at_risk")
    assert (held["at_risk"]["cause"], held["at_risk"]["reason"]) == ("out_of_specification", "dose")
    # the lot cannot be released while the product is held: QA decides first
    asked = await disposition(j, site, "release_on_physician_request", "no_alternative_treatment")
    assert asked["status"] == "awaiting_physician"
    # not QA's decision to take for the physician, and not the centre's without its physician's signature
    unsigned = await j.client.post(
        f"{j.url('order')}/v1/orders/{j.id}/physician-decision", json={"accept": True}
    )
    assert unsigned.status_code == 401 and unsigned.json()["reason"] == "signature-required"
    accepted = await physician(j, {"accept": True, "reason_code": "benefit_outweighs_risk"})
    assert accepted["status"] == "qc_pending"
    assert (accepted["order_type"], accepted["use"]) == ("expanded_access", "commercial")

    # the site holds the run as passed (exceptional) until the lot's signed release
    async def passed() -> dict[str, Any] | None:
        view = (await j.qa.manufacturing(site, j.id)).body
        return view if view.get("state") == "qc_passed" else None

    view = await eventually(passed, timeout=15, what="the OOS run back in qc_passed")
    assert view["exceptional"] is True
    lot = await j.sign_release(site)
    assert lot["state"] == "released" and lot["exceptional"] is True and j.lot == lot["lot"]
    await j.wait_status("released")
    outbound = await j.shipment("outbound_product")
    await j.courier(outbound, "picked_up", "in_transit", "delivered")
    await j.wait_status("product_delivered")
    # the wrong lot on the label halts, as a wrong COI does
    wrong = await j.client.post(
        f"{j.url('order')}/v1/orders/{j.id}/product-receipt",
        json={"coi": j.coi, "lot": "WRONG-LOT-0001"},
    )
    assert wrong.status_code == 409, wrong.text
    await j.hospital("product-receipt", {"coi": j.coi})  # with the released lot
    # issue 11: the order names its indication (and the weight axi-cel's dose needs) with its LD, started
    # 6 days ago (a 3-day regimen, infusion 2 days after it and at most 7): today is in its window
    ld = await j.lymphodepletion(days_ago=6, indication="lbcl", weight_kg=80.0)
    assert (ld["treatment"]["indication"], ld["treatment"]["weight_kg"]) == ("lbcl", 80.0)
    assert (await j.hospital("infusion", {"coi": j.coi}))["status"] == "completed"
    [task] = (await j.get())["tasks"]
    assert (task["kind"], task["state"], task["regulator"]) == ("authority_notification", "open", "FDA")
    infused = datetime.fromisoformat(task["administered_at"])
    assert datetime.fromisoformat(task["due_at"]) - infused == timedelta(hours=48)
    listed: list[str] = []  # QA's open tasks, every page
    offset: int | None = 0
    while offset is not None:
        page = (await j.qa.get("order", "/v1/tasks", params={"state": "open", "offset": offset})).body
        listed += [t["task_id"] for t in page["items"]]
        offset = page["next_offset"]
    assert task["task_id"] in listed
    await hooks(webhook_receiver, path, j.id, "order.disposition_decided.v1")
    decided = hook_data(webhook_receiver, path, j.id, "order.disposition_decided.v1")
    assert [(d["cause"], d["outcome"]) for d in decided] == [
        ("out_of_specification", "release_on_physician_request")
    ]


async def test_failed_manufacture_without_retained_material_recollects_then_fails(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    # AXI-CEL: 1 run, 1 recollection
    j, path = await start(parties, platform, webhook_receiver, "TC-US-NJ-001", "AXI-CEL")
    failures = {1: "contamination", 2: "equipment_failure"}
    for attempt, failure in failures.items():
        site = await j.up_to_material_received()
        await j.step_failed(site, "activation", failure)  # as the site's MES
        if attempt == 1:
            order = await j.wait_status(
                "rescheduling",
                "slot_reserved",
                "booking_confirmed",
                "inbound_shipment_planned",
                timeout=20,
            )
            assert order["recollections"] == 1
            assert "contamination" in reasons(order)
    failed = await j.wait_status("failed", timeout=20)
    assert "no recollection left" in failed["ended_reason"]
    assert "equipment_failure" in failed["ended_reason"]  # the second failure's code
    await hooks(webhook_receiver, path, j.id, "order.failed.v1")
    [data] = hook_data(webhook_receiver, path, j.id, "order.failed.v1")
    assert data["reason"].endswith("no_recollection_left")


async def test_outbound_excursion_quarantines_and_qa_decides(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    j, path = await start(parties, platform, webhook_receiver, "TC-AU-VI-001")
    site = await j.up_to_material_received()
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc(site, "released")
    await j.wait_status("released")
    outbound = await j.shipment("outbound_product")
    await j.courier(outbound, "picked_up", minutes_ago=30)
    assert (await j.excursion(outbound, -95.0, minutes=20))["excursion_published"] is True
    quarantined = await j.wait_status("material_at_risk")
    assert "held for QA's disposition" in quarantined["timeline"][-1]["reason"]
    bad = await j.client.post(
        f"{platform.url('order')}/v1/orders/{j.id}/product-receipt", json={"coi": j.coi}
    )
    assert bad.status_code == 409
    decision = {
        "decision": "release",
        "reason_code": "within_stability_data",
        "note": "within stability data",
    }
    # the decision is QA's: the centre may not take it
    not_theirs = await j.client.post(
        f"{platform.url('order')}/v1/orders/{j.id}/quarantine-decision", json=decision
    )
    assert not_theirs.status_code == 403
    # nor QA without a signature (refused and audited)
    unsigned = await j.parties.qa.post(
        f"{platform.url('order')}/v1/orders/{j.id}/quarantine-decision", json=decision
    )
    assert unsigned.status_code == 401 and unsigned.json()["reason"] == "signature-required"
    resp = await j.parties.qa.post(  # the former route: the same signed disposition
        f"{platform.url('order')}/v1/orders/{j.id}/quarantine-decision",
        json=decision,
        headers=await signed(j, "qa", f"qa.{site.lower()}"),
    )
    assert resp.status_code == 200, resp.text
    back = resp.json()
    assert back["status"] == "product_in_transit"
    decided = entry(back, "order.disposition_decided.v1")
    assert "within_stability_data" in decided["reason"] and decided["note"] == "within stability data"
    assert [(d["meaning"], d["signed"]) for d in back["decisions"]] == [("disposition", True)]
    await hooks(webhook_receiver, path, j.id, "logistics.shipment_excursion.v1")


async def test_site_outage_moves_the_booking_to_the_next_best_site(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    j, path = await start(parties, platform, webhook_receiver, "TC-DE-BE-001", days_ahead=20)
    first = await j.wait_status("inbound_shipment_planned")
    site, day = first["site_id"], date.fromisoformat(first["slot"]["manufacturing_start_date"])
    outages = f"{platform.url('site')}/v1/sites/{site}/outages"
    resp = await parties.admin.post(  # the registry admin declares it
        outages,
        json={
            "start_date": (day - timedelta(days=1)).isoformat(),
            "end_date": (day + timedelta(days=1)).isoformat(),
            "reason": "maintenance",
        },
    )
    assert resp.status_code == 201, resp.text

    async def moved() -> dict[str, Any] | None:
        o = await j.get()
        return o if o["status"] == "inbound_shipment_planned" and o["site_id"] != site else None

    order = await eventually(moved, timeout=20, what="booking moved to another site")
    assert any("outage:maintenance" in e["reason"] for e in order["timeline"])
    await hooks(webhook_receiver, path, j.id, "site.booking_affected.v1", "scheduling.slot_released.v1")
    ships = (await j.ops.shipments(order_id=j.id)).expect(200)
    live = [s for s in ships if s["leg"] == "inbound_apheresis" and s["status"] != "cancelled"]
    assert [s["destination"] for s in live] == [order["site_id"]]
    # an outage far ahead affects no booking; one beyond the registry's window (2 years) is refused
    far = date.today() + timedelta(days=700)
    unrelated = await parties.admin.post(
        outages,
        json={
            "start_date": far.isoformat(),
            "end_date": (far + timedelta(days=1)).isoformat(),
            "reason": "other",
        },
    )
    assert unrelated.status_code == 201, unrelated.text
    assert unrelated.json()["affected_booking_ids"] == []
    beyond = await parties.admin.post(
        outages, json={"start_date": "2099-01-01", "end_date": "2099-01-02", "reason": "other"}
    )
    assert beyond.status_code == 422


async def test_an_outage_reroutes_material_in_transit_to_another_site_and_the_order_completes(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    """Issue 11: the site goes down while the patient's collected material is on its way to it. The
    material goes to another approved site with capacity (a new slot there; the same shipment rerouted,
    the centre told) and the order completes from there."""
    j, path = await start(parties, platform, webhook_receiver, "TC-DE-BE-001", days_ahead=20)
    first = await j.wait_status("inbound_shipment_planned")
    site, day = first["site_id"], date.fromisoformat(first["slot"]["manufacturing_start_date"])
    inbound = await j.shipment("inbound_apheresis")
    await j.hospital("apheresis", {"coi": j.coi})
    await j.courier(inbound, "picked_up", "in_transit")
    await j.wait_status("material_in_transit")
    resp = await parties.admin.post(  # the registry admin declares it, over the run's start
        f"{platform.url('site')}/v1/sites/{site}/outages",
        json={
            "start_date": (day - timedelta(days=1)).isoformat(),
            "end_date": (day + timedelta(days=1)).isoformat(),
            "reason": "equipment_failure",
        },
    )
    assert resp.status_code == 201, resp.text

    async def redirected() -> dict[str, Any] | None:
        o = await j.get()
        return o if o["site_id"] != site and "material redirected to" in reasons(o) else None

    order = await eventually(redirected, timeout=20, what="the material redirected to another site")
    new_site = order["site_id"]
    assert order["status"] == "material_in_transit"  # nothing went back: the material is on its way
    assert order["slot"]["manufacturing_start_date"] >= date.today().isoformat()

    async def rerouted() -> dict[str, Any] | None:
        ship = (await j.ops.shipment(str(inbound["shipment_id"]))).expect(200)
        return ship if ship["destination"] == new_site else None

    ship = await eventually(rerouted, timeout=15, what="the shipment rerouted")
    assert ship["status"] == "in_transit"  # the same shipment, still with its courier
    await hooks(webhook_receiver, path, j.id, "site.booking_affected.v1", "logistics.shipment_rerouted.v1")
    await j.courier(inbound, "delivered")
    await j.receipt(new_site)
    await j.wait_status("material_received")
    await j.steps(new_site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc(new_site, "released")
    await j.wait_status("released")
    outbound = await j.shipment("outbound_product")
    assert outbound["origin"] == new_site
    await j.courier(outbound, "picked_up", "in_transit", "delivered")
    await j.wait_status("product_delivered")
    await j.hospital("product-receipt", {"coi": j.coi})
    await j.lymphodepletion()
    assert (await j.hospital("infusion", {"coi": j.coi}))["status"] == "completed"


async def test_an_outage_at_the_site_holding_the_material_is_reported_and_the_run_goes_on(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    """Issue 11: the material is at the site before its run starts: it cannot move. The outage reports it
    (the centre is told) and the run is not forgotten: it goes on at that site."""
    j, path = await start(parties, platform, webhook_receiver, "TC-DE-BE-001", days_ahead=20)
    site = await j.up_to_material_received()
    today = date.today()
    resp = await parties.admin.post(
        f"{platform.url('site')}/v1/sites/{site}/outages",
        json={
            "start_date": (today + timedelta(days=1)).isoformat(),
            "end_date": (today + timedelta(days=2)).isoformat(),
            "reason": "maintenance",
        },
    )
    assert resp.status_code == 201, resp.text
    answer = resp.json()
    assert answer["affected_booking_ids"] == [] and len(answer["material_at_site_booking_ids"]) == 1

    async def reported() -> dict[str, Any] | None:
        o = await j.get()
        return o if "the material is at the site, its run waits there" in reasons(o) else None

    order = await eventually(reported, timeout=15, what="the outage reported on the order")
    assert (order["status"], order["site_id"]) == ("material_received", site)

    def affected_hooks() -> list[dict[str, Any]]:
        return [r.json() for r in webhook_receiver.on(path) if r.json()["type"] == "site.booking_affected.v1"]

    # the order service and the webhook dispatcher consume the event independently: either may be first
    await eventually(affected_hooks, timeout=15, what="the centre's webhook about the outage")
    [affected] = affected_hooks()
    assert (affected["data"]["material_at_site"], affected["data"]["run"]) == (True, 1)
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")


async def test_moving_the_apheresis_date_releases_and_rebooks(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    # issue 11: a UK centre (MHRA); not Shanghai (tisa-cel was never approved in China)
    j, path = await start(parties, platform, webhook_receiver, "TC-GB-LN-001")
    first = await j.wait_status("inbound_shipment_planned")
    new_date = (date.fromisoformat(first["slot"]["apheresis_date"]) + timedelta(days=9)).isoformat()
    note = "patient has an infection"
    moved_to = await j.hospital(
        "apheresis-date",
        {"requested_apheresis_date": new_date, "reason_code": "patient_unwell", "note": note},
    )
    assert moved_to["timeline"][-1]["note"] == note

    async def rebooked() -> dict[str, Any] | None:
        o = await j.get()
        moved = o["slot"] and o["slot"]["apheresis_date"] == new_date
        return o if moved and o["status"] == "inbound_shipment_planned" else None

    order = await eventually(rebooked, timeout=20, what="rebooked for the new apheresis date")
    assert order["slot"]["slot_id"] != first["slot"]["slot_id"]
    await hooks(webhook_receiver, path, j.id, "order.rebook_requested.v1", "scheduling.slot_released.v1")
    released = hook_data(webhook_receiver, path, j.id, "scheduling.slot_released.v1")
    assert "patient_unwell" in [d["reason"] for d in released]


async def test_coi_with_a_wrong_check_character_is_refused_and_a_mismatch_is_alerted(
    platform: Platform, parties: Parties
) -> None:
    centre = parties.centre("TC-DE-BE-001")
    resp = await centre.post(f"{platform.url('order')}/v1/orders", json=order_body("TC-DE-BE-001"))
    assert resp.status_code == 201, resp.text
    j = Journey(parties, platform.url, resp.json())
    site = (await j.wait_status("inbound_shipment_planned"))["site_id"]
    mes = parties.site(site)  # the receiving site's MES scans the label
    broken = j.coi[:-1] + ("A" if j.coi[-1] != "A" else "B")
    receipts = f"{platform.url('site')}/v1/sites/{site}/receipts"
    for who, url, body in [
        (centre, f"{platform.url('order')}/v1/orders/{j.id}/apheresis", {"coi": broken}),
        (mes, receipts, {"order_id": j.id, "coi": broken, "accepted": True}),
    ]:
        r = await who.post(url, json=body)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "coi", (url, r.text)
    other_resp = await centre.post(f"{platform.url('order')}/v1/orders", json=order_body("TC-DE-BE-001"))
    assert other_resp.status_code == 201, other_resp.text
    other = other_resp.json()
    mismatch = [{"field": "coi", "reason": "does not match the order"}]
    r = await centre.post(f"{platform.url('order')}/v1/orders/{j.id}/apheresis", json={"coi": other["coi"]})
    assert r.status_code == 409 and r.json()["errors"] == mismatch
    r = await mes.post(receipts, json={"order_id": j.id, "coi": other["coi"], "accepted": True})
    assert r.status_code == 409

    async def alerted() -> bool:
        types = [e["type"] for e in (await j.get())["timeline"]]
        return {"order.coi_mismatch_detected.v1", "site.coi_mismatch_detected.v1"} <= set(types)

    await eventually(alerted, timeout=15, what="both mismatches alerted on the order's timeline")
    assert (await j.get())["status"] == "inbound_shipment_planned"  # nothing was accepted
