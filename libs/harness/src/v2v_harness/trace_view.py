"""`make trace ORDER=<id>`: every trace of one order, printed as a terminal waterfall.

Reads the JSON-lines span files the services write when no OTLP endpoint is configured
(`<state_dir>/telemetry/spans-<service>.jsonl`, one `span_to_dict` object per line, see
v2v_observability.tracing). A trace belongs to the order when one of its spans carries
`v2v.order_id == <order_id>`; traces that link to one of those traces, or are linked from them
(span links, one hop), are shown too. `render()` also accepts the span dicts of an `OtlpReceiver`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from v2v_observability.names import ORDER_ID as ORDER_ID_ATTR

BAR_WIDTH = 30
SpanDict = dict[str, Any]

_RED = "\033[31m"
_DIM = "\033[2m"
_BOLD = "\033[1m"
_RESET = "\033[0m"


# --------------------------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    spans: list[SpanDict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped_lines: int = 0


def span_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "telemetry").glob("spans-*.jsonl"))


def load_spans(state_dir: Path) -> Loaded:
    """Every well-formed span of every `spans-*.jsonl` file; unparsable lines (a half-written last line
    while a service is still exporting) are counted and skipped."""
    loaded = Loaded()
    for path in span_files(state_dir):
        loaded.files.append(path)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                loaded.skipped_lines += 1
                continue
            span = _normalise(obj)
            if span is None:
                loaded.skipped_lines += 1
            else:
                loaded.spans.append(span)
    return loaded


def _normalise(obj: object) -> SpanDict | None:
    """The span with the fields the view relies on coerced, or None when it cannot be placed."""
    if not isinstance(obj, dict):
        return None
    trace_id, span_id = obj.get("trace_id"), obj.get("span_id")
    if not isinstance(trace_id, str) or not isinstance(span_id, str) or not trace_id or not span_id:
        return None
    try:
        start = int(obj["start_ns"])
    except (KeyError, TypeError, ValueError):
        return None
    try:
        end = int(obj["end_ns"]) if obj.get("end_ns") is not None else start
    except (TypeError, ValueError):
        end = start
    span = dict(obj)
    span["trace_id"] = trace_id.lower()
    span["span_id"] = span_id.lower()
    parent = obj.get("parent_span_id")
    span["parent_span_id"] = parent.lower() if isinstance(parent, str) and parent else None
    span["start_ns"] = start
    span["end_ns"] = max(end, start)
    if not isinstance(span.get("attributes"), dict):
        span["attributes"] = {}
    if not isinstance(span.get("links"), list):
        span["links"] = []
    if not isinstance(span.get("events"), list):
        span["events"] = []
    span["name"] = str(obj.get("name") or "(unnamed)")
    span["service"] = str(obj.get("service") or "?")
    return span


# ------------------------------------------------------------------------------------------- selection


def _dedupe(spans: Iterable[SpanDict]) -> dict[str, list[SpanDict]]:
    by_trace: dict[str, list[SpanDict]] = {}
    seen: set[tuple[str, str]] = set()
    for raw in spans:
        span = _normalise(raw)
        if span is None:
            continue
        key = (span["trace_id"], span["span_id"])
        if key in seen:
            continue
        seen.add(key)
        by_trace.setdefault(span["trace_id"], []).append(span)
    return by_trace


def _link_targets(spans: Iterable[SpanDict]) -> set[str]:
    targets: set[str] = set()
    for span in spans:
        for link in span["links"]:
            if isinstance(link, dict) and isinstance(link.get("trace_id"), str):
                targets.add(link["trace_id"].lower())
    return targets


def select_traces(by_trace: dict[str, list[SpanDict]], order_id: str) -> list[str]:
    """The order's traces (a span carries v2v.order_id) plus traces linked to or from them."""
    seeds = {
        trace_id
        for trace_id, spans in by_trace.items()
        if any(str(s["attributes"].get(ORDER_ID_ATTR)) == order_id for s in spans)
    }
    selected = set(seeds)
    for trace_id, spans in by_trace.items():
        targets = _link_targets(spans)
        if trace_id not in seeds and targets & seeds:
            selected.add(trace_id)  # links to one of the order's traces
        if trace_id in seeds:
            selected |= {t for t in targets if t in by_trace}  # linked from one of them
    return sorted(selected, key=lambda t: (min(s["start_ns"] for s in by_trace[t]), t))


# ------------------------------------------------------------------------------------------- rendering


def _fmt_ms(ns: int) -> str:
    return f"{ns / 1e6:.2f}"


def _fmt_duration(ns: int) -> str:
    if ns >= 10_000_000_000:
        return f"{ns / 1e9:.2f} s"
    return f"{ns / 1e6:.2f} ms"


def _iso(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=rest // 1000)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _bar(offset: int, duration: int, total: int, char: str) -> str:
    start = min(BAR_WIDTH - 1, offset * BAR_WIDTH // total)
    end = min(BAR_WIDTH, max(start + 1, -(-(offset + duration) * BAR_WIDTH // total)))
    return " " * start + char * (end - start) + " " * (BAR_WIDTH - end)


def _error_text(span: SpanDict) -> str:
    description = span.get("status_description")
    if description:
        return str(description)
    for event in span["events"]:
        if isinstance(event, dict) and event.get("name") == "exception":
            attrs = event.get("attributes") or {}
            text = f"{attrs.get('exception.type', '')}: {attrs.get('exception.message', '')}".strip(": ")
            if text:
                return text
    return "(no description)"


def _tree(spans: Sequence[SpanDict]) -> Iterator[tuple[int, SpanDict, bool]]:
    """(depth, span, orphan) in tree order; children by start time under their parent."""
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[SpanDict]] = {}
    tops: list[SpanDict] = []
    for span in spans:
        parent = span["parent_span_id"]
        if parent and parent in ids and parent != span["span_id"]:
            children.setdefault(parent, []).append(span)
        else:
            tops.append(span)

    def order(items: list[SpanDict]) -> list[SpanDict]:
        return sorted(items, key=lambda s: (s["start_ns"], s["end_ns"], s["name"], s["span_id"]))

    visited: set[str] = set()

    def walk(span: SpanDict, depth: int, orphan: bool) -> Iterator[tuple[int, SpanDict, bool]]:
        visited.add(span["span_id"])
        yield depth, span, orphan
        for child in order(children.get(span["span_id"], [])):
            if child["span_id"] not in visited:
                yield from walk(child, depth + 1, False)

    for top in order(tops):
        yield from walk(top, 0, top["parent_span_id"] is not None)
    # a parent cycle in corrupt data never reaches a top: show those spans rather than drop them
    for span in order([s for s in spans if s["span_id"] not in visited]):
        if span["span_id"] not in visited:
            yield from walk(span, 0, True)


def render(spans: Iterable[SpanDict], order_id: str, *, color: bool = False, bar_char: str = "█") -> str:
    """The waterfall of every trace of `order_id`; an empty string when the order has no spans."""
    by_trace = _dedupe(spans)
    selected = select_traces(by_trace, order_id)
    if not selected:
        return ""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    shown = set(selected)
    linked_from: dict[str, set[str]] = {}
    for trace_id in selected:
        for target in _link_targets(by_trace[trace_id]):
            if target != trace_id:
                linked_from.setdefault(target, set()).add(trace_id)
    service_width = max(len(s["service"]) for t in selected for s in by_trace[t])
    n_spans = sum(len(by_trace[t]) for t in selected)

    out = [f"order {order_id}: {len(selected)} trace(s), {n_spans} span(s)"]
    for trace_id in selected:
        trace_spans = by_trace[trace_id]
        start = min(s["start_ns"] for s in trace_spans)
        end = max(s["end_ns"] for s in trace_spans)
        total = max(end - start, 1)
        ordered = list(_tree(trace_spans))
        roots = [s for _, s, orphan in ordered if s["parent_span_id"] is None]
        root_name = roots[0]["name"] if roots else f"{ordered[0][1]['name']} (root not exported)"
        services: list[str] = []
        for span in sorted(trace_spans, key=lambda s: s["start_ns"]):
            if span["service"] not in services:
                services.append(span["service"])

        out.append("")
        out.append(paint(f"trace {trace_id}  {root_name}", _BOLD))
        out.append(
            f"  started {_iso(start)}  duration {_fmt_duration(end - start)}  "
            f"{len(trace_spans)} span(s)  services: {', '.join(services)}"
        )
        for target in sorted(_link_targets(trace_spans) - {trace_id}):
            if target in shown:
                note = ""
            elif target in by_trace:
                note = " (not part of this order's view)"
            else:
                note = " (not exported)"
            out.append(f"  linked to {target}{note}")
        for source in sorted(linked_from.get(trace_id, set())):
            out.append(f"  linked from {source}")
        out.append(
            f"  {'offset ms':>10} {'':{BAR_WIDTH + 2}} {'dur ms':>10}  {'service':<{service_width}}  span"
        )
        for depth, span, orphan in ordered:
            offset = span["start_ns"] - start
            duration = span["end_ns"] - span["start_ns"]
            line = (
                f"  {_fmt_ms(offset):>10} |{_bar(offset, duration, total, bar_char)}| "
                f"{_fmt_ms(duration):>10}  {span['service']:<{service_width}}  {'  ' * depth}{span['name']}"
            )
            if orphan:
                line += paint(" (parent not exported)", _DIM)
            if span.get("status") == "ERROR":
                out.append(paint(f"{line}  ERROR: {_error_text(span)}", _RED))
            else:
                out.append(line)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- CLI


def _stdout_takes(char: str) -> bool:
    try:
        char.encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m v2v_harness.trace_view",
        description="Print every trace of one order (and the traces linked to it) as a waterfall.",
    )
    parser.add_argument("--order", required=True, help="the order id (span attribute v2v.order_id)")
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("V2V_STATE_DIR", ".v2v"),
        help="the state folder holding telemetry/spans-*.jsonl (default: $V2V_STATE_DIR or .v2v)",
    )
    args = parser.parse_args(argv)
    order_id = args.order.strip()
    if not order_id:
        parser.error("--order must not be empty")

    state_dir = Path(args.state_dir)
    folder = (state_dir / "telemetry").resolve()
    loaded = load_spans(state_dir)
    if loaded.skipped_lines:
        print(f"trace: skipped {loaded.skipped_lines} unparsable line(s)", file=sys.stderr)
    if not loaded.files:
        print(
            f"trace: no span files (spans-*.jsonl) in {folder}. Spans are written there only when no OTLP "
            "endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT); is `make run` using another state folder?",
            file=sys.stderr,
        )
        return 1

    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    text = render(loaded.spans, order_id, color=color, bar_char="█" if _stdout_takes("█") else "#")
    if not text:
        print(
            f"trace: no span with {ORDER_ID_ATTR}={order_id} in {folder} "
            f"({len(loaded.spans)} span(s) read from {len(loaded.files)} file(s)). "
            "Services write spans in batches every few seconds: retry shortly if the order is new.",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
