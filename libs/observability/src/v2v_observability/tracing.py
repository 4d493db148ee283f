"""OpenTelemetry tracing: one TracerProvider per process, named after its service.

Export: OTLP over HTTP/protobuf when the standard OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT)
is set; otherwise JSON lines in `<V2V_STATE_DIR>/telemetry/spans-<service>.jsonl` when a state folder
is known; otherwise nothing leaves the process. Sampling and batching follow the standard OTEL_*
variables (OTEL_TRACES_SAMPLER, OTEL_BSP_*), which the SDK reads itself.

Statements: most get no span at all — `v2v_observability.statements` makes spans only for slow and
failed statements (V2V_TRACE_STATEMENT_MIN_MS). Of those, the ones that say nothing to an SRE are never
recorded: the `BEGIN` that opens each transaction and the reset a connection pool runs when a connection
is given back (asyncpg's `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`), however
slow; set V2V_TRACE_TRIVIAL_STATEMENTS=true to record them too.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, _get_from_env_or_default
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import Attributes

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


TRIVIAL_STATEMENT_NAMES = frozenset({"BEGIN", "BEGIN;"})
POOL_RESET_PREFIX = "SELECT pg_advisory_unlock_all();"
_STATEMENT_KEYS = ("db.statement", "db.query.text")


def is_trivial_statement(name: str, kind: SpanKind | None, attributes: Attributes) -> bool:
    """A database client span of a transaction's BEGIN or of a pooled connection's reset."""
    if kind is not SpanKind.CLIENT or not attributes:
        return False
    if "db.system" not in attributes and "db.system.name" not in attributes:
        return False
    if name in TRIVIAL_STATEMENT_NAMES:
        return True
    statement = next((attributes[k] for k in _STATEMENT_KEYS if k in attributes), None)
    return isinstance(statement, str) and statement.startswith(POOL_RESET_PREFIX)


class SkipTrivialStatements(Sampler):
    """Drops the spans of trivial statements (see the module's doc); asks `delegate` about the rest."""

    def __init__(self, delegate: Sampler) -> None:
        self._delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if is_trivial_statement(name, kind, attributes):
            parent = trace.get_current_span(parent_context).get_span_context()
            return SamplingResult(Decision.DROP, None, parent.trace_state if parent.is_valid else None)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"SkipTrivialStatements{{{self._delegate.get_description()}}}"


class JsonLinesSpanExporter(SpanExporter):
    """Writes finished spans as JSON lines (the SDK's own JSON form), for `make trace` to read.

    It runs in the batch span processor's thread; the file stays open between batches."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode = _ENCODER.encode
        text = "".join([encode(span_to_dict(span)) + "\n" for span in spans])
        with self._lock:
            if self._fh is None:
                self._fh = self._path.open("a", encoding="utf-8")
            self._fh.write(text)
            self._fh.flush()  # readers (make trace, the tests) see whole batches
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_plain, check_circular=False)


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
    telemetry = telemetry or TelemetrySettings.from_env()
    sampler = _get_from_env_or_default()
    if not telemetry.trace_trivial_statements:
        sampler = SkipTrivialStatements(sampler)
    provider = TracerProvider(resource=resource, sampler=sampler)
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
