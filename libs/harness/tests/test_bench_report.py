"""`make bench`: which (centre, product) pairs get orders, the benchmarks document's sections, and the
lean HTTP client and webhook receiver talking to each other on the loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from v2v_harness.bench import report
from v2v_harness.bench.httpio import CHAIN_END, HttpPool, WebhookSink
from v2v_harness.bench.load import feasible_combos
from v2v_harness.bench.stats import summarise

CENTRES = [
    {"id": "TC-US-NJ-001", "regulator": "FDA"},
    {"id": "TC-DE-BE-001", "regulator": "EMA"},
    {"id": "TC-AU-VI-001", "regulator": "TGA"},
]
SITES = [
    {
        "site_id": "US-MORRIS-PLAINS",
        "active": True,
        "approvals": [
            {"regulator": "FDA", "use": "commercial", "product_code": "TISA-CEL"},
            {"regulator": "FDA", "use": "commercial", "product_code": "AXI-CEL"},
            {"regulator": "TGA", "use": "commercial", "product_code": "TISA-CEL"},
            {"regulator": "TGA", "use": "clinical", "product_code": "AXI-CEL"},
        ],
    },
    {
        "site_id": "FR-LES-ULIS",
        "active": True,
        "approvals": [{"regulator": "EMA", "use": "commercial", "product_code": "AXI-CEL"}],
    },
    {
        "site_id": "CLOSED",
        "active": False,
        "approvals": [{"regulator": "EMA", "use": "commercial", "product_code": "TISA-CEL"}],
    },
]


def test_orders_only_go_where_an_active_site_is_approved_for_commercial_use() -> None:
    combos = feasible_combos(CENTRES, ["TISA-CEL", "AXI-CEL"], SITES)
    assert combos == [
        ("TC-AU-VI-001", "TISA-CEL"),  # AXI-CEL for AU is clinical only: left out
        ("TC-DE-BE-001", "AXI-CEL"),  # TISA-CEL only at an inactive site: left out
        ("TC-US-NJ-001", "AXI-CEL"),
        ("TC-US-NJ-001", "TISA-CEL"),
    ]


def _result(label: str, knee: float | None = 5.0) -> dict[str, Any]:
    lat = summarise([10, 20, 30])
    step = {
        "rate": 5.0,
        "orders": 75,
        "accepted": 75,
        "completed": 75,
        "errors": 0,
        "pass": True,
        "intake_ms": lat,
        "first_webhook_ms": lat,
        "chain_ms": lat,
        "post_to_submitted_event_ms": lat,
        "hop_lag_ms": {"a → b": lat},
        "chain_end_event_to_webhook_ms": lat,
        "cpu_ms_per_order": {"order": 10.0, "postgres": 5.0, "broker": None},
        "cpu_ms_per_order_total": 15.0,
        "cpu_ms_per_order_net_of_idle_total": 9.0,
        "cpu_cores": {"order": 0.05, "postgres": 0.02},
        "spans_per_order": 42.0,
    }
    return {
        "label": label,
        "note": "",
        "started_at": "2026-01-01T00:00:00+00:00",
        "duration_s": 100.0,
        "git": "abc1234",
        "machine": {"nproc": 2, "cpu_model": "cpu", "memory_gb": 8.0, "python": "3.11", "os": "Linux"},
        "settings": {
            "rates": [5.0],
            "seconds": 15,
            "drain": 30,
            "max_inflight": 256,
            "durable": False,
            "postgres_kind": "embedded",
            "kafka_kind": "embedded tansu",
            "fetch_max_wait_ms": 20,
            "combos": 14,
        },
        "platform": {"steps": [step], "knee_rate": knee, "idle_cpu_cores": {"order": 0.1}},
        "raw": None,
        "knee_fraction_of_raw_chain": None,
    }


def test_the_document_keeps_one_section_per_label(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    report.update_docs(doc, _result("before"))
    report.update_docs(doc, _result("after", knee=10.0))
    report.update_docs(doc, _result("before", knee=None))  # the same label again replaces its section
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert text.count("<!-- bench:section:before -->") == 1
    assert text.count("<!-- bench:section:after -->") == 1
    assert text.index("section:before") < text.index("section:after")  # first written stays first
    before = text[text.index("section:before") : text.index("/bench:section:before")]
    assert "below the lowest rate tried" in before
    after = text[text.index("section:after") : text.index("/bench:section:after")]
    assert "**Knee: 10 orders/s**" in after
    assert "| 5 | 75 | 75 | 0 | 20 / 29 / 30 / 30 |" in after
    assert "(raw limits not measured in this run)" in after


def test_hand_written_notes_between_sections_are_kept(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    report.update_docs(doc, _result("before"))
    doc.write_text(doc.read_text() + "\n## Optimisation round 1\n\nwhat changed, by hand\n")
    report.update_docs(doc, _result("after", knee=10.0))
    report.update_docs(doc, _result("before", knee=None))
    text = doc.read_text()
    assert "## Optimisation round 1\n\nwhat changed, by hand" in text
    assert text.index("section:before") < text.index("Optimisation round 1") < text.index("section:after")


async def test_client_and_receiver_speak_http_1_1_with_keep_alive() -> None:
    sink = await WebhookSink().start()
    pool = HttpPool("127.0.0.1", sink.port, limit=4)
    ended: list[str] = []
    sink.on_chain_end = ended.append
    try:
        for i, kind in enumerate(["order.submitted.v1", CHAIN_END, CHAIN_END]):
            body = json.dumps({"subject": "o-1", "type": kind, "time": f"2026-01-01T00:00:0{i}Z"}).encode()
            status, payload = await pool.request("POST", "/hook/TC-1", body)
            assert (status, payload) == (204, b"")
        status, _ = await pool.request("POST", "/hook/TC-1", b"not json")
        assert status == 204
    finally:
        await pool.aclose()
        await sink.stop()
    assert len(pool._idle) == 0
    assert set(sink.arrivals["o-1"]) == {"order.submitted.v1", CHAIN_END}
    assert sink.arrivals["o-1"][CHAIN_END].event_time == "2026-01-01T00:00:01Z"
    assert (sink.received, sink.duplicates, sink.malformed, sink.chain_ends) == (4, 1, 1, 1)
    assert ended == ["o-1"]
