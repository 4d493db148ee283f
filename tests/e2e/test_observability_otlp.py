"""Follow one order across every service, as a collector would see it: the five services as processes
exporting OTLP over HTTP to a real receiver started here, one trace from the HTTP request to the
centre's webhook, every Kafka hop joined, metrics both pushed by OTLP and scrapeable, no patient
reference in anything exported, and logs that stay JSON lines until the processes have exited."""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from v2v_contracts import topic_for
from v2v_harness.e2e import Parties, eventually, order_body, subscribe
from v2v_harness.identity import Credentials
from v2v_harness.infra import Infrastructure
from v2v_harness.otlp import METRICS_PATH, TRACES_PATH, OtlpReceiver, attributes
from v2v_harness.platform import Platform
from v2v_harness.pytest_plugin import _start_platform
from v2v_harness.receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SERVICES = ("order", "scheduling", "site", "logistics", "notification")
# the services whose events an order's walk to its shipment plan produces
PUBLISHERS = ("order", "scheduling", "site", "logistics")


def consumer_topology() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Service -> (its consumer's purpose, the services whose topics it reads): its ConsumerSpec."""
    out = {}
    for service in SERVICES:
        definition = importlib.import_module(f"{service}_service.app").DEFINITION
        [spec] = definition.consumers
        out[service] = (spec.purpose, tuple(spec.from_services))
    return out


CONSUMES = consumer_topology()
ORDER_EVENTS = [
    "order.submitted.v1",
    "scheduling.slot_reserved.v1",
    "site.booking_confirmed.v1",
    "logistics.shipment_planned.v1",
]
CENTRE = "TC-CH-ZH-001"
Span = dict[str, Any]


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def traced(infra: Infrastructure, state_dir: Path, otlp: OtlpReceiver) -> Iterator[Platform]:
    """A second platform (own database and topic namespace) whose services export OTLP to `otlp`, with a
    span for every SQL statement (by default only slow and failed ones get one): the spans most likely
    to miss the order's id are the statements' own, so these tests see all of them."""
    env = {
        name: {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "V2V_TRACE_STATEMENT_MIN_MS": "0",
        }
        for name in SERVICES
    }
    platform = _start_platform(infra, state_dir, env)
    yield platform
    platform.stop()


@pytest.fixture(scope="module")
async def followed(
    traced: Platform, webhook_receiver: WebhookReceiver, credentials: Credentials
) -> AsyncIterator[dict[str, Any]]:
    """One order placed on the traced platform by its centre and carried all the way to its webhook."""
    path = f"/otlp/{secrets.token_hex(4)}"
    patient_ref = f"PATIENT-SCAN-{secrets.token_hex(8)}"
    parties = Parties(credentials, timeout=10)  # of its own: the plugin's `parties` is per test
    try:
        client = parties.centre(CENTRE)
        await subscribe(client, traced.url("notification"), CENTRE, webhook_receiver.url(path))
        resp = await client.post(
            f"{traced.url('order')}/v1/orders", json=order_body(CENTRE, patient_ref=patient_ref)
        )
        assert resp.status_code == 201, resp.text
        order = resp.json()

        def all_delivered() -> bool:
            types = {
                r.json()["type"]
                for r in webhook_receiver.on(path)
                if r.json()["subject"] == order["order_id"]
            }
            return types >= set(ORDER_EVENTS)

        await eventually(all_delivered, timeout=20, what="the order's four webhooks delivered")
    finally:
        await parties.aclose()
    yield {**order, "patient_ref": patient_ref, "path": path}


def ns_topic(platform: Platform, service: str) -> str:
    return topic_for(service, platform.namespace)


def first_trace_id(spans: list[Span], order_id: str) -> str | None:
    return next(
        (
            s["trace_id"]
            for s in spans
            if s["name"] == "POST /v1/orders" and s["attributes"].get("v2v.order_id") == order_id
        ),
        None,
    )


def missing_from_trace(spans: list[Span], order_id: str, platform: Platform) -> list[str]:
    """What the order's trace should hold but does not (yet): empty once every hop was exported."""
    trace_id = first_trace_id(spans, order_id)
    if trace_id is None:
        return ["POST /v1/orders server span"]
    in_trace = [s for s in spans if s["trace_id"] == trace_id]
    missing = []
    for service in PUBLISHERS:
        topic = ns_topic(platform, service)
        if not any(s["kind"] == "PRODUCER" and s["name"] == f"{topic} create" for s in in_trace):
            missing.append(f"{service}: '{topic} create' PRODUCER span")
    for consumer, (_purpose, sources) in CONSUMES.items():
        for source in (s for s in sources if s in PUBLISHERS):
            topic = ns_topic(platform, source)
            if not any(
                s["kind"] == "CONSUMER" and s["service"] == consumer and s["name"] == f"{topic} process"
                for s in in_trace
            ):
                missing.append(f"{consumer}: '{topic} process' CONSUMER span")
    delivered = {
        s["attributes"].get("v2v.event_type")
        for s in in_trace
        if s["name"] == "webhook deliver" and s["service"] == "notification"
    }
    missing += [f"webhook deliver of {t}" for t in ORDER_EVENTS if t not in delivered]
    return missing


async def order_trace(otlp: OtlpReceiver, order: dict[str, Any], platform: Platform) -> list[Span]:
    await eventually(
        lambda: not missing_from_trace(otlp.spans(), order["order_id"], platform),
        timeout=20,
        what="every hop of the order's trace exported",
    )
    spans = otlp.spans()
    assert missing_from_trace(spans, order["order_id"], platform) == []
    trace_id = first_trace_id(spans, order["order_id"])
    return [s for s in spans if s["trace_id"] == trace_id]


async def test_one_trace_covers_all_five_services_from_the_request_to_the_webhook(
    otlp: OtlpReceiver, traced: Platform, followed: dict[str, Any]
) -> None:
    trace = await order_trace(otlp, followed, traced)
    assert {s["service"] for s in trace} == set(SERVICES)

    roots = [s for s in trace if s["parent_span_id"] is None]
    assert [(r["name"], r["kind"], r["service"]) for r in roots] == [("POST /v1/orders", "SERVER", "order")]
    ids = {s["span_id"] for s in trace}
    orphans = [
        (s["service"], s["name"]) for s in trace if s["parent_span_id"] and s["parent_span_id"] not in ids
    ]
    assert orphans == [], "every span of the trace hangs off another span of the same trace"

    # the hops, in the order an order travels: HTTP -> order's outbox -> Kafka -> ... -> the webhook
    by_id = {s["span_id"]: s for s in trace}
    order_create = next(s for s in trace if s["name"] == f"{ns_topic(traced, 'order')} create")
    assert by_id[order_create["parent_span_id"]]["name"] == "POST /v1/orders"
    hops = [
        ("order", "scheduling", "scheduling"),
        ("scheduling", "site", "site"),
        ("site", "logistics", "logistics"),
    ]
    for source, consumer, next_publisher in hops:
        processing = {
            s["span_id"]
            for s in trace
            if s["service"] == consumer and s["name"] == f"{ns_topic(traced, source)} process"
        }
        creates = [s for s in trace if s["name"] == f"{ns_topic(traced, next_publisher)} create"]
        assert {s["service"] for s in creates} == {next_publisher}
        assert any(s["parent_span_id"] in processing for s in creates), (
            f"{next_publisher} publishes inside its consumer of {source}'s event"
        )

    deliveries = [s for s in trace if s["name"] == "webhook deliver"]
    delivered = [s["attributes"]["v2v.event_type"] for s in deliveries]
    assert set(delivered) >= set(ORDER_EVENTS)
    assert len(delivered) == len(set(delivered)), "each event delivered once, at the first attempt"
    for span in deliveries:
        assert (span["service"], span["kind"], span["status"]) == ("notification", "CLIENT", "UNSET")
        assert span["attributes"]["http.response.status_code"] == 204
        assert span["attributes"]["v2v.attempt"] == 1
        parent = by_id[span["parent_span_id"]]
        assert (parent["service"], parent["kind"]) == ("notification", "CONSUMER")
        source = span["attributes"]["v2v.event_type"].split(".")[0]
        assert parent["name"] == f"{ns_topic(traced, source)} process"

    # every span anywhere (not only this trace) names the service that exported it
    assert {s["service"] for s in otlp.spans()} == set(SERVICES)
    assert otlp.errors == []


async def test_every_consumer_span_has_its_producer_span_as_parent_or_link(
    otlp: OtlpReceiver, traced: Platform, followed: dict[str, Any]
) -> None:
    await order_trace(otlp, followed, traced)

    def unjoined() -> list[str]:
        spans = otlp.spans()
        producers = {s["span_id"]: s for s in spans if s["kind"] == "PRODUCER"}
        problems = []
        for span in (s for s in spans if s["kind"] == "CONSUMER"):
            topic = span["attributes"]["messaging.destination_publish.name"]
            candidates = [span["parent_span_id"], *(link["span_id"] for link in span["links"])]
            found = [producers[c] for c in candidates if c in producers]
            if not found:
                problems.append(f"{span['service']}: {span['name']} {span['span_id']} has no producer")
                continue
            producer = found[0]
            if producer["attributes"]["messaging.destination.name"] != topic:
                problems.append(f"{span['name']}: producer wrote to another topic ({producer['name']})")
            if producer["attributes"].get("messaging.message.conversation_id") != span["attributes"].get(
                "messaging.message.conversation_id"
            ):
                problems.append(f"{span['name']}: producer is another message")
            if span["parent_span_id"] == producer["span_id"] and span["trace_id"] != producer["trace_id"]:
                problems.append(f"{span['name']}: parent in another trace")
        return problems

    await eventually(lambda: not unjoined(), timeout=20, what="every consumer span joined to its producer")
    consumers = [s for s in otlp.spans() if s["kind"] == "CONSUMER"]
    # this order's 11 consumptions and the site registrations read at start-up (4 consumers x 13 sites)
    assert len(consumers) >= 11 + 4 * 13
    assert unjoined() == []


async def test_spans_about_the_order_carry_its_id_and_coi(
    otlp: OtlpReceiver, traced: Platform, followed: dict[str, Any]
) -> None:
    oid, coi = followed["order_id"], followed["coi"]
    trace = await order_trace(otlp, followed, traced)
    root = next(s for s in trace if s["parent_span_id"] is None)
    # the order service only learns the order id part-way through the request: the spans it started
    # before that (the request body being read, the validation look-ups) cannot carry it
    bound_at = min(
        s["start_ns"]
        for s in trace
        if s["service"] == "order" and s is not root and s["attributes"].get("v2v.order_id") == oid
    )
    before = [s for s in trace if s["service"] == "order" and s is not root and s["start_ns"] < bound_at]
    assert {s["kind"] for s in before} <= {"INTERNAL", "CLIENT"}
    assert not any(s["name"] == "COMMIT;" for s in before), (
        "the order is bound before its transaction commits"
    )
    early = {s["span_id"] for s in before}
    about = [s for s in trace if s["span_id"] not in early]
    assert len(about) > 50
    wrong = [
        (
            s["service"],
            s["kind"],
            s["name"],
            s["attributes"].get("v2v.order_id"),
            s["attributes"].get("v2v.coi"),
        )
        for s in about
        if s["attributes"].get("v2v.order_id") != oid or s["attributes"].get("v2v.coi") != coi
    ]
    assert wrong == []
    for kind in ("SERVER", "PRODUCER", "CONSUMER"):
        assert any(s["kind"] == kind for s in about)
    # and no span anywhere names this order with another COI
    stray = [
        s["name"]
        for s in otlp.spans()
        if s["attributes"].get("v2v.order_id") == oid and s["attributes"].get("v2v.coi") != coi
    ]
    assert stray == []


def otlp_metrics(otlp: OtlpReceiver) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Per service name: how many OTLP metric exports it sent, and the metric names in them."""
    exports: dict[str, int] = defaultdict(int)
    names: dict[str, set[str]] = defaultdict(set)
    for body in otlp.raw(METRICS_PATH):
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for resource_metrics in request.resource_metrics:
            service = str(attributes(resource_metrics.resource.attributes).get("service.name"))
            exports[service] += 1
            for scope in resource_metrics.scope_metrics:
                names[service].update(m.name for m in scope.metrics)
    return exports, names


def expected_otlp_metrics(service: str) -> set[str]:
    names = {
        "v2v.consumer.events",
        "v2v.consumer.handler.duration",
        "v2v.consumer.lag",
        "v2v.outbox.backlog",
        "v2v.outbox.oldest_pending_age",
        "messaging.process.messages",
        "messaging.process.duration",
        "http.server.duration",
        "http.server.active_requests",
    }
    if service in PUBLISHERS:
        names |= {"v2v.outbox.published", "v2v.outbox.publish_lag", "messaging.publish.messages"}
    if service == "notification":
        names |= {"v2v.webhook.deliveries", "v2v.webhook.duration"}
    return names


async def test_metrics_are_pushed_by_otlp_and_scrapeable_from_every_service(
    otlp: OtlpReceiver, traced: Platform, followed: dict[str, Any], parties: Parties
) -> None:
    oid = followed["order_id"]
    centre = parties.centre(CENTRE)
    reads = {  # one API read per service (by whom may read it), so each served an instrumented request
        "order": (centre, f"/v1/orders/{oid}"),
        "scheduling": (parties.ops, "/v1/slots"),
        "site": (parties.ops, "/v1/sites"),
        "logistics": (parties.ops, "/v1/shipments"),
        "notification": (centre, "/v1/deliveries"),
    }
    for service, (reader, path) in reads.items():
        assert (await reader.get(traced.url(service) + path)).status_code == 200

    def otlp_missing() -> dict[str, set[str]]:
        _exports, names = otlp_metrics(otlp)
        missing = {s: expected_otlp_metrics(s) - names[s] for s in SERVICES}
        return {s: m for s, m in missing.items() if m}

    await eventually(lambda: not otlp_missing(), timeout=20, what="every service's metrics over OTLP")
    assert otlp_missing() == {}
    exports, _names = otlp_metrics(otlp)
    assert set(exports) == set(SERVICES), "metrics from these five services and nothing else"
    assert all(exports[s] >= 1 for s in SERVICES)
    assert otlp.requests(METRICS_PATH) >= len(SERVICES)

    for service in SERVICES:
        resp = await parties.anonymous.get(traced.url(service) + "/metrics")  # a public scrape
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        samples = [
            sample for family in text_string_to_metric_families(resp.text) for sample in family.samples
        ]

        def total(name: str, **labels: str) -> float:
            return sum(
                s.value
                for s in samples  # noqa: B023 - used right away
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        assert total("target_info", service_name=service, service_namespace="vein2vein") == 1.0
        purpose, sources = CONSUMES[service]
        group = f"{traced.namespace}.{service}.{purpose}"
        assert total("v2v_consumer_events_total", consumer_group=group, outcome="processed") >= 1, service
        assert total("v2v_consumer_handler_duration_seconds_count", consumer_group=group) >= 1, service
        for source in (s for s in sources if s in PUBLISHERS):
            assert (
                total(
                    "messaging_process_messages_message_total",
                    messaging_destination_publish_name=ns_topic(traced, source),
                )
                >= 1
            ), (service, source)
        if service in PUBLISHERS:
            topic = ns_topic(traced, service)
            assert total("v2v_outbox_published_total", topic=topic) >= 1, service
            assert total("v2v_outbox_publish_lag_seconds_count", topic=topic) >= 1, service
            assert total("v2v_outbox_backlog", topic=topic) == 0, service
        assert (
            total("http_server_duration_milliseconds_count", http_method="GET", http_status_code="200") >= 1
        )
        if service == "order":
            assert (
                total("http_server_duration_milliseconds_count", http_method="POST", http_status_code="201")
                >= 1
            )
        if service == "notification":
            for event_type in ORDER_EVENTS:
                assert total("v2v_webhook_deliveries_total", event_type=event_type, outcome="delivered") >= 1


async def test_no_otlp_export_from_any_service_carries_the_patient_ref(
    otlp: OtlpReceiver, traced: Platform, followed: dict[str, Any]
) -> None:
    await order_trace(otlp, followed, traced)
    needle = followed["patient_ref"].encode()
    coi = followed["coi"].encode()
    seen_coi: set[str] = set()
    leaks: list[str] = []
    for body in otlp.raw(TRACES_PATH):
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = attributes(resource_spans.resource.attributes).get("service.name")
            raw = resource_spans.SerializeToString()  # every field: names, attributes, events, links, status
            if needle in raw:
                leaks.append(f"spans of {service}")
            if coi in raw:
                seen_coi.add(str(service))
    for body in otlp.raw(METRICS_PATH):
        if needle in body:
            leaks.append("a metrics export")
    assert seen_coi == set(SERVICES), "the scan did see the order's spans from every service"
    assert leaks == []


LOG_FIELDS = {"service", "trace_id", "span_id", "order_id", "level", "message"}


# Stops the module's platform, so it comes last in this file.
async def test_logs_stay_json_lines_through_shutdown(traced: Platform, followed: dict[str, Any]) -> None:
    await asyncio.to_thread(traced.stop)
    for service in SERVICES:
        svc = traced.services[service]
        # uvicorn re-raises the SIGTERM it handled once shut down; -9 would mean it had to be killed
        assert svc.proc.returncode in (0, -signal.SIGTERM), service
        lines = svc.log_path.read_text(encoding="utf-8").splitlines()
        not_json = []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                not_json.append(line)
        assert not_json == [], f"{service} wrote lines that are not JSON"
        assert all(r.keys() >= LOG_FIELDS and r["service"] == service for r in records), service
        messages = [r["message"] for r in records]
        assert "service stopped" in messages, service
        assert messages[-1].startswith("Finished server process"), service
        assert any(r["order_id"] == followed["order_id"] for r in records), service
