"""The `make trace` waterfall: selection of an order's traces, tree order, links, errors, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from v2v_harness import trace_view
from v2v_harness.trace_view import render

ORDER = "3f2c9a4e-0000-4000-8000-000000000001"
T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
MS = 1_000_000

TRACE_A = "a" * 32  # POST /orders -> outbox -> Kafka -> scheduling
TRACE_B = "b" * 32  # a later courier scan, own trace, links to A
TRACE_X = "c" * 32  # another order entirely


def span(
    trace_id: str,
    span_id: str,
    name: str,
    service: str,
    start_ms: float,
    end_ms: float,
    parent: str | None = None,
    *,
    kind: str = "INTERNAL",
    status: str = "UNSET",
    description: str | None = None,
    attributes: dict[str, Any] | None = None,
    links: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "span_id": span_id.rjust(16, "0"),
        "parent_span_id": parent.rjust(16, "0") if parent else None,
        "name": name,
        "kind": kind,
        "service": service,
        "start_ns": T0 + int(start_ms * MS),
        "end_ns": T0 + int(end_ms * MS),
        "status": status,
        "status_description": description,
        "attributes": attributes or {},
        "links": links or [],
        "events": [],
    }


def order_spans() -> list[dict[str, Any]]:
    order_attr = {"v2v.order_id": ORDER, "v2v.coi": "COI-1"}
    return [
        # trace A, deliberately shuffled
        span(TRACE_A, "a3", "orders publish", "order", 20, 22, "a2", kind="PRODUCER"),
        span(TRACE_A, "a1", "POST /orders", "order", 0, 15, kind="SERVER", attributes=order_attr),
        span(TRACE_A, "a2", "outbox relay", "order", 18, 25, "a1"),
        span(TRACE_A, "a4", "orders process", "scheduling", 30, 60, "a3", kind="CONSUMER"),
        span(
            TRACE_A,
            "a5",
            "INSERT slot",
            "scheduling",
            35,
            40,
            "a4",
            kind="CLIENT",
            status="ERROR",
            description="unique violation on slot_pkey",
        ),
        span(TRACE_A, "a9", "lost child", "site", 45, 50, "deadbeef"),  # parent never exported
        # trace B: starts later, carries no order attribute on its root, links to trace A
        span(
            TRACE_B,
            "b1",
            "POST /scans",
            "logistics",
            1000,
            1010,
            kind="SERVER",
            links=[{"trace_id": TRACE_A, "span_id": "a1".rjust(16, "0")}],
        ),
        span(TRACE_B, "b2", "record scan", "logistics", 1002, 1008, "b1"),
        # an unrelated order
        span(TRACE_X, "c1", "POST /orders", "order", 500, 510, attributes={"v2v.order_id": "other"}),
    ]


def line_of(text: str, name: str) -> str:
    """The waterfall line (it has a bar) of the span called `name`."""
    pattern = re.compile(rf"\s{re.escape(name)}(\s|$)")
    [line] = [ln for ln in text.splitlines() if "|" in ln and pattern.search(ln)]
    return line


def test_render_shows_the_order_traces_and_their_links_only() -> None:
    text = render(order_spans(), ORDER)

    assert TRACE_A in text
    assert TRACE_B in text
    assert TRACE_X not in text
    # traces by start time, each with its header
    assert text.index(f"trace {TRACE_A}") < text.index(f"trace {TRACE_B}")
    assert f"trace {TRACE_A}  POST /orders" in text
    assert "started 2026-01-01T00:00:00.000000Z  duration 60.00 ms  6 span(s)" in text
    assert "services: order, scheduling, site" in text
    assert f"linked to {TRACE_A}" in text
    assert f"linked from {TRACE_B}" in text


def test_render_nests_children_under_parents_in_start_order() -> None:
    text = render(order_spans(), ORDER)
    names = ["POST /orders", "outbox relay", "orders publish", "orders process", "INSERT slot"]
    lines = [line_of(text, n) for n in names]
    columns = [line.index(n) for line, n in zip(lines, names, strict=True)]
    # the tree runs a1 > a2 > a3 > a4 > a5: each one indented more than its parent
    assert columns == sorted(columns)
    assert len(set(columns)) == len(columns)
    # tree order in the output
    positions = [text.index(line) for line in lines]
    assert positions == sorted(positions)
    # offset and duration columns
    assert "18.00" in line_of(text, "outbox relay")
    assert "7.00" in line_of(text, "outbox relay")


def test_render_marks_errors_and_orphans() -> None:
    text = render(order_spans(), ORDER)
    assert "ERROR: unique violation on slot_pkey" in line_of(text, "INSERT slot")
    assert "ERROR" not in line_of(text, "POST /scans")
    orphan = line_of(text, "lost child")
    assert "(parent not exported)" in orphan
    # the orphan is shown at top level, aligned with the root
    assert orphan.index("lost child") == line_of(text, "POST /orders").index("POST /orders")


def test_render_bar_is_proportional_and_fixed_width() -> None:
    text = render(order_spans(), ORDER, bar_char="#")
    root = line_of(text, "POST /orders")  # 0..15 ms of a 60 ms trace
    consumer = line_of(text, "orders process")  # 30..60 ms
    root_bar = root.split("|")[1]
    consumer_bar = consumer.split("|")[1]
    assert len(root_bar) == len(consumer_bar) == trace_view.BAR_WIDTH
    assert root_bar.startswith("#") and root_bar.count("#") == 8  # ceil(15/60*30)
    assert consumer_bar.endswith("#") and consumer_bar.count("#") == 15
    assert consumer_bar.index("#") == 15


def test_render_of_an_unknown_order_is_empty() -> None:
    assert render(order_spans(), "no-such-order") == ""


def _write_state(tmp_path: Path, *, truncated_tail: bool = True) -> Path:
    telemetry = tmp_path / "telemetry"
    telemetry.mkdir()
    by_service: dict[str, list[str]] = {}
    for s in order_spans():
        by_service.setdefault(s["service"], []).append(json.dumps(s))
    for service, lines in by_service.items():
        body = "\n".join(lines) + "\n"
        if truncated_tail:
            body += '{"trace_id":"dddd'  # a service still writing its batch
        (telemetry / f"spans-{service}.jsonl").write_text(body)
    return tmp_path


def test_cli_prints_the_waterfall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _write_state(tmp_path)
    assert trace_view.main(["--order", ORDER, "--state-dir", str(state)]) == 0
    out, err = capsys.readouterr()
    assert TRACE_A in out and TRACE_B in out and TRACE_X not in out
    assert "skipped" in err  # the half-written lines were skipped, not fatal


def test_cli_unknown_order_exits_1_naming_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    telemetry = tmp_path / "telemetry"
    telemetry.mkdir()
    (telemetry / "spans-x.jsonl").write_text(json.dumps(order_spans()[0]) + "\n")
    assert trace_view.main(["--order", "nope", "--state-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "nope" in err
    assert str(telemetry.resolve()) in err


def test_cli_without_span_files_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert trace_view.main(["--order", ORDER, "--state-dir", str(tmp_path / "missing")]) == 1
    assert "no span files" in capsys.readouterr().err


def test_module_entry_point(tmp_path: Path) -> None:
    state = _write_state(tmp_path, truncated_tail=False)
    ok = subprocess.run(
        [sys.executable, "-m", "v2v_harness.trace_view", "--order", ORDER, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"trace {TRACE_A}" in ok.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "v2v_harness.trace_view", "--order", "nope", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert missing.returncode == 1
    assert "no span with v2v.order_id=nope" in missing.stderr
