"""The canary: patient data and staff free text stay in the order service.

A unique marker goes into `patient_ref` and into every free-text field of every endpoint (found in the
five OpenAPI documents: a string without a pattern, an enumeration or a format; only the order service
has any), and the marker is also tried in the other services' fields (refused there). The orders are
driven through their journeys with failures forced: a moved date and a cancellation with notes, a
chain-of-identity mismatch, an outbound temperature excursion decided by QA with a note, a rejected
receipt and a recollection. Then the marker is searched for, and must not be found, in every message on
every topic (dead-letter topics too), every log line, every exported span and metric, every service's
/metrics, every webhook and e-mail, and every row of every schema but `ordering` (where it is, as the
sanity check shows).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from v2v_harness import scan
from v2v_harness.e2e import MANUFACTURING_STEPS, Journey, Parties, eventually, order_body, subscribe
from v2v_harness.infra import Infrastructure
from v2v_harness.issuer import IssuerProcess
from v2v_harness.platform import Platform
from v2v_harness.pytest_plugin import SmtpSink, _start_platform
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SERVICES = ("order", "scheduling", "site", "logistics", "notification")
CENTRE = "TC-JP-TK-001"


@pytest.fixture(scope="module")
def canary_platform(
    infra: Infrastructure, state_dir: Path, issuer: IssuerProcess, smtp_sink: SmtpSink
) -> Iterator[Platform]:
    fast = {"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
    env = {name: dict(fast) for name in SERVICES}
    env["notification"].update(
        {
            "V2V_SMTP_HOST": "127.0.0.1",
            "V2V_SMTP_PORT": str(smtp_sink.port),
            "V2V_WEBHOOK_BACKOFF_BASE_S": "0.2",
        }
    )
    platform = _start_platform(infra, state_dir, env)
    yield platform
    platform.stop()


def free_text_fields(platform: Platform) -> dict[str, list[str]]:
    """service -> `METHOD path: field` of every free-text string in a request body."""
    found: dict[str, list[str]] = {s: [] for s in SERVICES}
    with httpx.Client(timeout=10) as http:
        for service in SERVICES:
            doc = http.get(platform.url(service) + "/openapi.json").json()
            components = doc.get("components", {}).get("schemas", {})

            def walk(
                schema: dict[str, Any],
                where: str,
                seen: set[str],
                out: list[str],
                components: dict[str, Any] = components,
            ) -> None:
                if "$ref" in schema:
                    name = schema["$ref"].rsplit("/", 1)[-1]
                    if name not in seen:
                        walk(components[name], where, seen | {name}, out)
                    return
                for key in ("anyOf", "oneOf", "allOf"):
                    for sub in schema.get(key, []):
                        walk(sub, where, seen, out)
                for name, sub in schema.get("properties", {}).items():
                    walk(sub, f"{where}.{name}", seen, out)
                if isinstance(schema.get("items"), dict):
                    walk(schema["items"], where + "[]", seen, out)
                if isinstance(schema.get("additionalProperties"), dict):
                    walk(schema["additionalProperties"], where + ".*", seen, out)
                constrained = {"pattern", "enum", "format", "const"} & set(schema)
                if schema.get("type") == "string" and not constrained:
                    out.append(where)

            for path, operations in doc["paths"].items():
                for method, operation in operations.items():
                    for content in operation.get("requestBody", {}).get("content", {}).values():
                        walk(content["schema"], f"{method.upper()} {path}: body", set(), found[service])
    return found


async def test_the_marker_stays_in_the_ordering_schema(
    canary_platform: Platform,
    parties: Parties,
    webhook_receiver: WebhookReceiver,
    smtp_sink: SmtpSink,
) -> None:
    platform = canary_platform
    marker = f"Canary {secrets.token_hex(6)}"
    needle = marker.encode()

    # 1. where free text may go at all: only into the order service
    fields = free_text_fields(platform)
    assert {s for s, f in fields.items() if f} == {"order"}, fields
    # the notes of a cancellation, a moved date, QA's disposition (and its former route), a physician's
    # decision, a hold, a resume and a material disposition (the centre's and the site's, issue 11); the
    # patient reference
    assert sorted(f.rsplit(".", 1)[-1] for f in fields["order"]) == [*["note"] * 9, "patient_ref"]

    centre = parties.centre(CENTRE)
    path = f"/canary/{uuid.uuid4()}"
    await subscribe(centre, platform.url("notification"), None, webhook_receiver.url(path))
    added = await centre.post(
        f"{platform.url('notification')}/v1/email-recipients", json={"email": "ward@tokyo.example"}
    )
    assert added.status_code == 201, added.text

    async def place(n: int) -> Journey:
        body = order_body(CENTRE, patient_ref=f"{marker}-{n}")
        resp = await centre.post(f"{platform.url('order')}/v1/orders", json=body)
        assert resp.status_code == 201, resp.text
        return Journey(parties, platform.url, resp.json())

    # 2a. a moved date and a cancellation, each with a note
    first = await place(1)
    await first.wait_status("inbound_shipment_planned", timeout=30)
    moved = str(date.today() + timedelta(days=25))
    await first.hospital(
        "apheresis-date",
        {"requested_apheresis_date": moved, "reason_code": "patient_unwell", "note": f"{marker} fever"},
    )
    await first.hospital("cancel", {"reason_code": "consent_withdrawn", "note": f"{marker} withdrew"})

    # 2b. a chain-of-identity mismatch at apheresis, then a rejected receipt and a recollection
    second = await place(2)
    other = await place(3)
    await second.wait_status("inbound_shipment_planned", timeout=30)
    await second.hospital("apheresis", {"coi": other.coi}, expect=409)
    before = await second.get()
    inbound = await second.shipment("inbound_apheresis")
    await second.hospital("apheresis", {"coi": second.coi})
    await second.courier(inbound, "picked_up", "delivered")
    await second.receipt(str(before["site_id"]), accepted=False, reason="damaged_container")
    await second.wait_status("material_at_risk")  # the site holds the bag: QA's signed reject
    qa_client = parties.credentials.client_id("qa")
    resp = await parties.qa.post(
        f"{platform.url('order')}/v1/orders/{second.id}/disposition",
        json={"outcome": "reject", "reason_code": "integrity_compromised", "document_reference": "QA-C-1"},
        headers=await parties.credentials.signature_headers(
            qa_client, f"qa.{str(before['site_id']).lower()}"
        ),
    )
    assert resp.status_code == 200, resp.text

    async def recollecting() -> bool:
        return int((await second.get())["recollections"]) == 1

    await eventually(recollecting, timeout=30, what="a recollection after the rejected receipt")

    # 2c. the whole way with an outbound excursion that QA decides on, with a note
    third = other
    site_id = await third.up_to_material_received()
    await third.steps(site_id, *MANUFACTURING_STEPS)
    await third.wait_status("qc_pending")
    await third.qc(site_id, "released")
    await third.wait_status("released")
    outbound = await third.shipment("outbound_product")
    await third.courier(outbound, "picked_up", minutes_ago=30)
    assert (await third.excursion(outbound, -95.0, minutes=20))["excursion_published"] is True
    await third.wait_status("material_at_risk")
    resp = await parties.qa.post(
        f"{platform.url('order')}/v1/orders/{third.id}/quarantine-decision",
        json={"decision": "release", "reason_code": "within_stability_data", "note": f"{marker} assessed"},
        headers=await parties.credentials.signature_headers(qa_client, f"qa.{site_id.lower()}"),
    )
    assert resp.status_code == 200, resp.text

    # 2d. the marker where it does not belong: refused, and not echoed
    ship_url = f"{platform.url('logistics')}/v1/shipments/{outbound['shipment_id']}/milestones"
    carrier = parties.carrier(str(outbound["carrier_id"]))
    attempts = [
        (
            carrier,
            ship_url,
            {
                "milestone": "in_transit",
                "occurred_at": _now(),
                "location": marker,
                "handled_by": "courier-1",
                "coi": third.coi,
            },
        ),
        (
            parties.admin,
            f"{platform.url('site')}/v1/sites/{site_id}/outages",
            {
                "start_date": str(date.today() + timedelta(days=400)),
                "end_date": str(date.today() + timedelta(days=401)),
                "reason": marker,
            },
        ),
        (
            parties.site(site_id),
            f"{platform.url('site')}/v1/sites/{site_id}/receipts",
            {"order_id": third.id, "coi": third.coi, "accepted": False, "reason": marker},
        ),
        (centre, f"{platform.url('notification')}/v1/subscriptions", {"url": f"https://{marker}.example"}),
        (centre, f"{platform.url('notification')}/v1/email-recipients", {"email": f"{marker}@x.example"}),
        (centre, f"{platform.url('order')}/v1/orders/{third.id}/cancel", {"reason_code": marker}),
    ]
    for client, url, body in attempts:
        resp = await client.post(url, json=body)
        assert 400 <= resp.status_code < 500 and marker not in resp.text, (url, resp.status_code, resp.text)

    # 3. everything has been said: the webhooks of the three orders, the e-mails of the exceptions
    ids = {first.id, second.id, third.id}

    def hook_types() -> set[str]:
        return {r.json()["type"] for r in webhook_receiver.on(path) if r.json()["subject"] in ids}

    await eventually(
        lambda: (
            {"order.cancelled.v1", "site.material_rejected.v1", "order.disposition_decided.v1"}
            <= hook_types()
        ),
        timeout=30,
        what="the exception webhooks",
    )
    await eventually(
        lambda: [m for _, m in smtp_sink.messages if first.id in str(m["subject"])],
        timeout=30,
        what="the cancellation e-mail",
    )
    await eventually(
        lambda: all(third.id in platform.services[s].log_path.read_text() for s in SERVICES),
        timeout=20,
        what="the third order in every log",
    )

    # 4. the scan
    where: dict[str, Any] = {}
    topics = await scan.namespace_topics(platform.infra.bootstrap_servers, platform.namespace)
    assert any(t.endswith(".dlq") for t in topics)
    messages = await scan.read_everything(platform.infra.bootstrap_servers, topics)
    assert sum(len(v) for v in messages.values()) > 50  # the scan read the journeys' events
    where["topics"] = scan.records_containing(messages, needle)
    where["logs"] = [s for s in SERVICES if marker in platform.services[s].log_path.read_text()]
    where["telemetry"] = [
        f.name for f in scan.telemetry_files(platform.state_dir) if needle in f.read_bytes()
    ]
    async with httpx.AsyncClient(timeout=10) as http:
        where["metrics"] = [
            s for s in SERVICES if marker in (await http.get(platform.url(s) + "/metrics")).text
        ]
    where["webhooks"] = [
        r.json()["type"] for r in webhook_receiver.on(path) if needle in r.body or marker in str(r.headers)
    ]
    where["emails"] = [str(m["subject"]) for _, m in smtp_sink.messages if needle in m.as_bytes()]
    rows = await scan.rows_containing(platform.infra.admin_url, platform.database, marker)
    where["schemas"] = sorted(t for t in rows if not t.startswith("ordering."))
    assert where == {k: [] for k in where}

    # the sanity check: the marker is there, where it belongs
    assert {t.split(".")[0] for t in rows} == {"ordering"}
    assert "ordering.orders" in rows and "ordering.order_timeline" in rows
    timeline = (await first.get())["timeline"]
    assert any(marker in (e.get("note") or "") for e in timeline)


def _now() -> str:
    return datetime.now(UTC).isoformat()
