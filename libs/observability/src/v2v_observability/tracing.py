"""OpenTelemetry tracing: one TracerProvider per process, named after its service.

Export: OTLP over HTTP/protobuf when the standard OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT)
is set; otherwise JSON lines in `<V2V_STATE_DIR>/telemetry/spans-<service>.jsonl` when a state folder
is known; otherwise nothing leaves the process. Sampling and batching follow the standard OTEL_*
variables (OTEL_TRACES_SAMPLER, OTEL_BSP_*), which the SDK reads itself.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from v2v_observability import names
from v2v_observability.context import bind_order, current_order
from v2v_observability.settings import TelemetrySettings

ORDER_ID_ATTR = names.ORDER_ID
COI_ATTR = names.COI

_provider: TracerProvider | None = None


class OrderAttributesProcessor(SpanProcessor):
    """Stamps `v2v.order_id` / `v2v.coi` of the bound order on every span started in its context."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        order_id, coi = current_order()
        if order_id:
            span.set_attribute(ORDER_ID_ATTR, order_id)
        if coi:
            span.set_attribute(COI_ATTR, coi)

    def on_end(self, span: ReadableSpan) -> None:
        return None


class JsonLinesSpanExporter(SpanExporter):
    """Writes finished spans as JSON lines (the SDK's own JSON form), for `make trace` to read."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_to_dict(span), separators=(",", ":"), default=_plain) for span in spans]
        with self._lock, self._path.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def span_to_dict(span: ReadableSpan) -> dict[str, object]:
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name"),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "links": [
            {
                "trace_id": format(link.context.trace_id, "032x"),
                "span_id": format(link.context.span_id, "016x"),
            }
            for link in span.links
        ],
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
    }


def otlp_configured(telemetry: TelemetrySettings | None = None) -> bool:
    return (telemetry or TelemetrySettings.from_env()).otlp_traces


def configure_tracing(
    service: str, state_dir: str | None = None, telemetry: TelemetrySettings | None = None
) -> TracerProvider:
    global _provider
    if _provider is not None:
        return _provider
    resource = Resource.create({"service.name": service, "service.namespace": "vein2vein"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(OrderAttributesProcessor())
    if otlp_configured(telemetry):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif state_dir:
        path = Path(state_dir) / "telemetry" / f"spans-{service}.jsonl"
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(path)))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.force_flush(5000)
        _provider.shutdown()


def current_traceparent() -> dict[str, str]:
    """The W3C trace context of the current span, as headers (traceparent, tracestate)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def set_order_attributes(order_id: object | None, coi: str | None) -> None:
    """Put the order on the current span and bind it for everything that follows in this context."""
    bind_order(order_id, coi)
    span = trace.get_current_span()
    if order_id is not None:
        span.set_attribute(ORDER_ID_ATTR, str(order_id))
    if coi:
        span.set_attribute(COI_ATTR, coi)


def links_to(origin: Mapping[str, str] | None) -> list[trace.Link]:
    """A span link to the trace whose W3C context is `origin` (e.g. an order's first trace)."""
    if not origin:
        return []
    ctx = trace.get_current_span(propagate.extract(dict(origin))).get_span_context()
    return [trace.Link(ctx, {names.LINK: names.LINK_ORDER_ORIGIN})] if ctx.is_valid else []


@contextlib.contextmanager
def later_input(name: str, origin: Mapping[str, str] | None, **attributes: str) -> Iterator[trace.Span]:
    """A span for a later input about an order (a courier scan, an MES report, a hospital action): it
    lives in the input's own trace and links back to the order's first trace."""
    tracer = trace.get_tracer(names.TRACER_LATER_INPUT)
    with tracer.start_as_current_span(name, links=links_to(origin), attributes=attributes) as span:
        yield span
