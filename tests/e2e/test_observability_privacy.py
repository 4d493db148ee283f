"""The patient reference stays in the order service: a scanner over everything that leaves it.

An order is placed with a distinctive `patient_ref`; then every span and metric exported, every log
line, every message on every topic of the platform (dead-letter topics too, read from the beginning
with a plain Kafka consumer) and every webhook body is searched for it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from v2v_contracts import all_topics
from v2v_harness import scan
from v2v_harness.e2e import Parties, eventually, order_body, subscribe
from v2v_harness.platform import Platform
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SERVICES = ("order", "scheduling", "site", "logistics", "notification")
ORDER_EVENTS = {
    "order.submitted.v1",
    "scheduling.slot_reserved.v1",
    "site.booking_confirmed.v1",
    "logistics.shipment_planned.v1",
}
CENTRE = "TC-CA-ON-001"  # issue 11: not Shanghai (tisa-cel was never approved in China)


def telemetry_files(platform: Platform) -> list[Path]:
    return scan.telemetry_files(platform.state_dir)


def exported_spans(platform: Platform) -> list[dict[str, Any]]:
    return scan.exported_spans(platform.state_dir)


async def test_the_patient_ref_never_leaves_the_order_service(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    patient_ref = f"PATIENT-SCAN-{secrets.token_hex(8)}"
    needle = patient_ref.encode()
    path = f"/privacy/{secrets.token_hex(4)}"
    client = parties.centre(CENTRE)  # the centre, with its own credentials
    await subscribe(client, platform.url("notification"), CENTRE, webhook_receiver.url(path))
    resp = await client.post(
        f"{platform.url('order')}/v1/orders", json=order_body(CENTRE, patient_ref=patient_ref)
    )
    assert resp.status_code == 201, resp.text
    oid, coi = resp.json()["order_id"], resp.json()["coi"]

    def webhooks() -> list[Any]:
        return [r for r in webhook_receiver.on(path) if r.json()["subject"] == oid]

    await eventually(
        lambda: {r.json()["type"] for r in webhooks()} >= ORDER_EVENTS,
        timeout=20,
        what="the order's four webhooks delivered",
    )
    # the order service holds it, and hands it back to the centre that placed the order (and to nobody
    # else: another centre is told the order does not exist)
    order = (await client.get(f"{platform.url('order')}/v1/orders/{oid}")).json()
    assert order["patient_ref"] == patient_ref
    stranger = await parties.centre("TC-DE-BE-001").get(f"{platform.url('order')}/v1/orders/{oid}")
    assert stranger.status_code == 404 and needle not in stranger.content
    deliveries = (
        await client.get(f"{platform.url('notification')}/v1/deliveries", params={"order_id": oid})
    ).json()
    assert len(deliveries) >= 4 and needle.decode() not in json.dumps(deliveries)

    # wait until every service has exported and logged its part of the order: the scan then covers it
    def exported_by() -> set[str]:
        return {s["service"] for s in exported_spans(platform) if s["attributes"].get("v2v.order_id") == oid}

    await eventually(
        lambda: exported_by() == set(SERVICES), timeout=20, what="the order's spans from all five"
    )
    await eventually(
        lambda: all(oid in platform.services[s].log_path.read_text() for s in SERVICES),
        timeout=20,
        what="the order in every service's log",
    )

    # 1. spans (names, attributes, events, links, status) and metrics, as exported: not even the order
    #    service's own contain it (the rule 'no patient data' holds for all telemetry)
    files = telemetry_files(platform)
    assert {f.name for f in files} >= {f"spans-{s}.jsonl" for s in SERVICES}
    assert [f.name for f in files if needle in f.read_bytes()] == []
    spans = [s for s in exported_spans(platform) if s["attributes"].get("v2v.order_id") == oid]
    assert {s["service"] for s in spans if s["attributes"].get("v2v.coi") == coi} == set(SERVICES)
    assert [s["name"] for s in spans if patient_ref in json.dumps(s)] == []

    # 2. log lines of every service (the order service's included)
    leaking_logs = {
        s: [line for line in platform.services[s].log_path.read_text().splitlines() if patient_ref in line]
        for s in SERVICES
    }
    assert leaking_logs == {s: [] for s in SERVICES}

    # 3. every message on every topic of the platform, dead-letter topics included
    topics = await scan.namespace_topics(platform.infra.bootstrap_servers, platform.namespace)
    assert set(topics) >= set(all_topics(platform.namespace))
    assert any(t.endswith(".dlq") for t in topics)
    messages = await scan.read_everything(platform.infra.bootstrap_servers, topics)
    assert scan.records_containing(messages, needle) == []
    # the scan read this order's events: one per hop, on its publisher's topic
    about_order = {
        topic.rsplit(".", 1)[-1]: [
            json.loads(v)["type"] for (_t, _k, v, _h) in records if v and oid.encode() in v
        ]
        for topic, records in messages.items()
        if not topic.endswith(".dlq")
    }
    assert about_order["order"] == ["order.submitted.v1"]
    assert "scheduling.slot_reserved.v1" in about_order["scheduling"]
    assert "site.booking_confirmed.v1" in about_order["site"]
    assert "logistics.shipment_planned.v1" in about_order["logistics"]

    # 4. the webhook bodies and headers the centre received
    hooks = [r for r in webhook_receiver.on(path) if r.json()["subject"] == oid]
    assert {r.json()["type"] for r in hooks} >= ORDER_EVENTS
    assert all(r.json()["coi"] == coi for r in hooks)
    assert [r.json()["type"] for r in hooks if needle in r.body or patient_ref in json.dumps(r.headers)] == []
