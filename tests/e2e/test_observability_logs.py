"""Every log line of the five services is JSON carrying service, trace and order, and the order's lines
point into the order's exported trace."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import pytest

from v2v_harness.e2e import Parties, eventually, order_body, subscribe
from v2v_harness.platform import Platform
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SERVICES = ("order", "scheduling", "site", "logistics", "notification")
FIELDS = {"service", "trace_id", "span_id", "order_id", "level", "message"}
LEVELS = {"debug", "info", "warning", "error", "critical"}
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
SPAN_ID = re.compile(r"^[0-9a-f]{16}$")
CENTRE = "TC-US-TX-002"


def log_lines(platform: Platform, service: str) -> list[str]:
    """The complete lines of a service's log so far (a line still being written is left out)."""
    text = platform.services[service].log_path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    return [line for line in lines[:-1] if line.strip()]  # after the last "\n": empty, or partial


def exported_spans(platform: Platform) -> list[dict[str, Any]]:
    out = []
    for path in Path(platform.state_dir, "telemetry").glob("spans-*.jsonl"):
        text = path.read_text(encoding="utf-8")
        out += [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]
    return out


def parse(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def malformed(service: str, line: str) -> str | None:
    """Why a log line breaks the format, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    if missing := FIELDS - record.keys():
        return f"missing {sorted(missing)}"
    if record["service"] != service:
        return f"service is {record['service']!r}"
    if record["level"] not in LEVELS:
        return f"level is {record['level']!r}"
    if not isinstance(record["message"], str):
        return "message is not a string"
    trace_id, span_id = record["trace_id"], record["span_id"]
    if (trace_id is None) != (span_id is None):
        return "trace_id and span_id: one without the other"
    if trace_id is not None and not (TRACE_ID.match(trace_id) and SPAN_ID.match(span_id)):
        return "trace_id/span_id are not lower-case hex of 32/16 digits"
    if record["order_id"] is not None and not isinstance(record["order_id"], str):
        return "order_id is not a string"
    return None


async def test_every_log_line_is_json_with_trace_and_order_and_matches_the_exported_trace(
    platform: Platform, webhook_receiver: WebhookReceiver, parties: Parties
) -> None:
    path = f"/logs/{secrets.token_hex(4)}"
    client = parties.centre(CENTRE)  # the centre, with its own credentials
    await subscribe(client, platform.url("notification"), CENTRE, webhook_receiver.url(path))
    resp = await client.post(
        f"{platform.url('order')}/v1/orders",
        json=order_body(CENTRE, patient_ref=f"PAT-LOGS-{secrets.token_hex(4)}"),
    )
    assert resp.status_code == 201, resp.text
    oid = resp.json()["order_id"]
    await eventually(
        lambda: any(
            r.json()["subject"] == oid and r.json()["type"] == "logistics.shipment_planned.v1"
            for r in webhook_receiver.on(path)
        ),
        timeout=20,
        what="the order planned and its last webhook delivered",
    )

    def order_records() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for service in SERVICES:
            out[service] = [
                record
                for record in (parse(line) for line in log_lines(platform, service) if oid in line)
                if isinstance(record, dict) and record.get("order_id") == oid
            ]
        return out

    await eventually(
        lambda: all(order_records().values()),
        timeout=20,
        what="a log line about the order from every service",
    )

    # 1. every line every service wrote (this test's and every other's) keeps the format
    bad = [
        (service, why, line[:200])
        for service in SERVICES
        for line in log_lines(platform, service)
        if (why := malformed(service, line))
    ]
    assert bad == []
    assert all(len(log_lines(platform, s)) >= 5 for s in SERVICES)

    # 2. the lines about the order are traced, and their trace and span were exported
    def first_trace() -> str | None:
        return next(
            (
                s["trace_id"]
                for s in exported_spans(platform)
                if s["name"] == "POST /v1/orders" and s["attributes"].get("v2v.order_id") == oid
            ),
            None,
        )

    first = await eventually(first_trace, timeout=20, what="the order's first trace exported")
    records = order_records()

    def unexported() -> list[tuple[str, str, str | None, str | None]]:
        spans = {(s["trace_id"], s["span_id"]): s["service"] for s in exported_spans(platform)}
        return [
            (service, r["message"], r["trace_id"], r["span_id"])
            for service, rs in records.items()
            for r in rs
            if spans.get((r["trace_id"], r["span_id"])) != service
        ]

    await eventually(
        lambda: not unexported(), timeout=20, what="every order line's span exported by its service"
    )
    assert unexported() == []
    for service, rs in records.items():
        assert all(r["trace_id"] is not None for r in rs), service
        assert any(r["trace_id"] == first for r in rs), f"{service} logs the order in its first trace"
    messages = {service: {r["message"] for r in rs} for service, rs in records.items()}
    assert "order placed" in messages["order"]
    assert "slot reserved" in messages["scheduling"]
