"""A real OTLP/HTTP receiver for tests: what a collector would be sent, decoded into span dicts.

Point a service (or an SDK exporter) at it with OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint; the
SDK's HTTP exporters append /v1/traces, /v1/metrics and /v1/logs. Traces are decoded into the same
dict shape as `v2v_observability.tracing.span_to_dict` (what the JSON-lines files hold), so
`v2v_harness.trace_view.render(receiver.spans(), order_id)` draws them. Metrics and logs are kept raw.

Protobuf only (Content-Type application/x-protobuf, the SDK's default), optionally gzip or deflate
Content-Encoding; OTLP/JSON is answered 415.
"""

from __future__ import annotations

import copy
import gzip
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

SpanDict = dict[str, Any]
TRACES_PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"
LOGS_PATH = "/v1/logs"
_PATHS = (TRACES_PATH, METRICS_PATH, LOGS_PATH)


# ------------------------------------------------------------------------------------------- decoding


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as a Python value (arrays as tuples, as the SDK keeps sequence attributes)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which)


def attributes(kvs: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        result[kv.key] = any_value(kv.value)
    return result


def _hex(raw: bytes) -> str | None:
    return raw.hex() if raw and any(raw) else None


def decode_traces(body: bytes) -> list[SpanDict]:
    """An ExportTraceServiceRequest as a flat list of span dicts (shape of `span_to_dict`)."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[SpanDict] = []
    for resource_spans in request.resource_spans:
        service = attributes(resource_spans.resource.attributes).get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": _hex(span.parent_span_id),
                        "name": span.name,
                        "kind": Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        "service": service,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "status": Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                        "status_description": span.status.message or None,
                        "attributes": attributes(span.attributes),
                        "links": [
                            {"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()}
                            for link in span.links
                        ],
                        "events": [
                            {"name": event.name, "attributes": attributes(event.attributes)}
                            for event in span.events
                        ],
                    }
                )
    return spans


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


# ------------------------------------------------------------------------------------------- receiver


class OtlpReceiver:
    """OTLP/HTTP (protobuf) on 127.0.0.1, a background thread; `with OtlpReceiver() as r:` also works."""

    def __init__(self, port: int = 0) -> None:
        self._spans: list[SpanDict] = []
        self._raw: dict[str, list[bytes]] = {path: [] for path in _PATHS}
        self._counts: dict[str, int] = dict.fromkeys(_PATHS, 0)
        self.errors: list[str] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests session expects
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def do_POST(self) -> None:
                path = self.path.split("?", 1)[0]
                body = self._read_body()
                if path not in _PATHS:
                    self._answer(404, b"unknown OTLP path")
                    return
                content_type = (self.headers.get("content-type") or "").split(";")[0].strip().lower()
                if content_type != "application/x-protobuf":
                    receiver._error(f"{path}: unsupported Content-Type {content_type!r}")
                    self._answer(415, b"only application/x-protobuf is supported")
                    return
                try:
                    payload = _decompress(body, self.headers.get("content-encoding") or "")
                    spans = decode_traces(payload) if path == TRACES_PATH else []
                except (ValueError, OSError, EOFError, zlib.error, DecodeError) as exc:
                    receiver._error(f"{path}: undecodable body: {exc}")
                    self._answer(400, str(exc).encode())
                    return
                with receiver._cond:
                    receiver._counts[path] += 1
                    receiver._raw[path].append(payload)
                    receiver._spans.extend(spans)
                    receiver._cond.notify_all()
                # every Export*ServiceResponse without partial_success serialises to the same empty body
                self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or "0"))

            def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-receiver",
            daemon=True,
        )

    # lifecycle --------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The base URL, for OTEL_EXPORTER_OTLP_ENDPOINT (exporters append /v1/traces etc.)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_endpoint(self) -> str:
        """The full traces URL, for OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTLPSpanExporter(endpoint=...)."""
        return self.endpoint + TRACES_PATH

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # what was received ------------------------------------------------------------------------------

    def spans(self) -> list[SpanDict]:
        """A copy of every span received so far, in arrival order."""
        with self._cond:
            return copy.deepcopy(self._spans)

    def requests(self, path: str = TRACES_PATH) -> int:
        """How many export requests were accepted on `path` (/v1/traces, /v1/metrics or /v1/logs)."""
        with self._cond:
            return self._counts[path]

    def raw(self, path: str) -> list[bytes]:
        """The (decompressed) protobuf bodies accepted on `path`."""
        with self._cond:
            return list(self._raw[path])

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            for path in _PATHS:
                self._raw[path].clear()
                self._counts[path] = 0
            self.errors.clear()

    def wait_for(self, predicate: Callable[[list[SpanDict]], bool], timeout: float = 10.0) -> list[SpanDict]:
        """Block until `predicate(spans)` holds; returns those spans, or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = copy.deepcopy(self._spans)
                if predicate(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({f"{s['service']}:{s['name']}" for s in snapshot})
                    raise TimeoutError(
                        f"OTLP receiver: condition not met after {timeout}s; {len(snapshot)} span(s) "
                        f"received: {names[:30]}{' …' if len(names) > 30 else ''}; errors: {self.errors}"
                    )
                self._cond.wait(remaining)

    def _error(self, message: str) -> None:
        with self._cond:
            self.errors.append(message)
