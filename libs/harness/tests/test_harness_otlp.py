"""The OTLP/HTTP receiver, fed by the real SDK exporter over a real socket."""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from v2v_harness.otlp import OtlpReceiver
from v2v_harness.trace_view import render
from v2v_observability.tracing import span_to_dict

ORDER = "7d1e0b6a-0000-4000-8000-000000000002"
LINKED_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
LINKED_SPAN = 0xB7AD6B7169203331


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def _provider(
    endpoint: str, compression: Compression | None = None
) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(resource=Resource.create({"service.name": "svc-test"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, compression=compression, timeout=5))
    )
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _emit(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("test")
    link = Link(
        SpanContext(LINKED_TRACE, LINKED_SPAN, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)),
        {"link.reason": "same order"},
    )
    attributes = {
        "v2v.order_id": ORDER,
        "v2v.coi": "COI-2",
        "messaging.batch.message_count": 3,
        "retry": True,
        "ratio": 0.5,
        "tags": ["a", "b"],
    }
    with (
        tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER),
        tracer.start_as_current_span(
            "orders publish", kind=SpanKind.PRODUCER, links=[link], attributes=attributes
        ) as child,
    ):
        child.add_event("enqueued", {"queue": "orders"})
        child.set_status(Status(StatusCode.ERROR, "broker unavailable"))


def test_sdk_exporter_spans_are_decoded(receiver: OtlpReceiver) -> None:
    assert receiver.endpoint.startswith("http://127.0.0.1:")
    provider, memory = _provider(receiver.endpoint + "/v1/traces")
    _emit(provider)
    assert provider.force_flush(5000)

    spans = receiver.wait_for(lambda s: len(s) >= 2, timeout=10)
    by_name = {s["name"]: s for s in spans}
    parent, child = by_name["POST /orders"], by_name["orders publish"]

    assert parent["parent_span_id"] is None
    assert child["parent_span_id"] == parent["span_id"]
    assert child["trace_id"] == parent["trace_id"]
    assert len(parent["trace_id"]) == 32 and len(parent["span_id"]) == 16
    assert parent["trace_id"] == parent["trace_id"].lower()
    assert (parent["kind"], child["kind"]) == ("SERVER", "PRODUCER")
    assert parent["service"] == child["service"] == "svc-test"
    assert child["attributes"]["v2v.order_id"] == ORDER
    assert child["attributes"]["messaging.batch.message_count"] == 3
    assert child["attributes"]["retry"] is True
    assert child["attributes"]["ratio"] == 0.5
    assert child["links"] == [
        {"trace_id": format(LINKED_TRACE, "032x"), "span_id": format(LINKED_SPAN, "016x")}
    ]
    assert (child["status"], child["status_description"]) == ("ERROR", "broker unavailable")
    assert (parent["status"], parent["status_description"]) == ("UNSET", None)
    assert child["start_ns"] >= parent["start_ns"] and child["end_ns"] <= parent["end_ns"]

    # exactly the shape the JSON-lines exporter writes for the same spans
    expected = {d["span_id"]: d for d in (span_to_dict(s) for s in memory.get_finished_spans())}
    assert {s["span_id"]: s for s in spans} == expected

    # and the waterfall draws them
    text = render(spans, ORDER)
    assert parent["trace_id"] in text and "ERROR: broker unavailable" in text
    provider.shutdown()


def test_gzip_export(receiver: OtlpReceiver) -> None:
    provider, _ = _provider(receiver.traces_endpoint, Compression.Gzip)
    _emit(provider)
    assert provider.force_flush(5000)
    spans = receiver.wait_for(lambda s: {x["name"] for x in s} >= {"POST /orders", "orders publish"}, 10)
    assert {s["service"] for s in spans} == {"svc-test"}
    assert receiver.requests("/v1/traces") == 2  # SimpleSpanProcessor: one request per span
    provider.shutdown()


def test_metrics_and_logs_are_counted_and_bad_requests_refused(receiver: OtlpReceiver) -> None:
    proto = {"content-type": "application/x-protobuf"}
    with httpx.Client(base_url=receiver.endpoint, timeout=5) as client:
        assert client.post("/v1/metrics", content=b"", headers=proto).status_code == 200
        assert (
            client.post(
                "/v1/logs", content=gzip.compress(b""), headers={**proto, "content-encoding": "gzip"}
            ).status_code
            == 200
        )
        assert (
            client.post("/v1/traces", content=b"{}", headers={"content-type": "application/json"}).status_code
            == 415
        )
        assert client.post("/v1/traces", content=b"\xff\xff\xff", headers=proto).status_code == 400
        assert client.post("/v2/other", content=b"", headers=proto).status_code == 404
    assert receiver.requests("/v1/metrics") == 1
    assert receiver.requests("/v1/logs") == 1
    assert receiver.requests("/v1/traces") == 0
    assert len(receiver.errors) == 2
    assert receiver.spans() == []


def test_wait_for_times_out_with_a_summary(receiver: OtlpReceiver) -> None:
    with pytest.raises(TimeoutError, match="0 span"):
        receiver.wait_for(lambda s: bool(s), timeout=0.2)
