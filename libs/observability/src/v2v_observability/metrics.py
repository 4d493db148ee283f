"""OpenTelemetry metrics: scrapeable as Prometheus at /metrics, exported by OTLP when configured,
otherwise written as JSON lines under `<state dir>/telemetry/metrics-<service>.jsonl`."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from v2v_observability.settings import TelemetrySettings

_provider: MeterProvider | None = None
_files: list[IO[str]] = []


def otlp_metrics_configured(telemetry: TelemetrySettings | None = None) -> bool:
    return (telemetry or TelemetrySettings.from_env()).otlp_metrics


def configure_metrics(
    service: str, state_dir: str | None = None, telemetry: TelemetrySettings | None = None
) -> MeterProvider:
    global _provider
    if _provider is not None:
        return _provider
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    readers: list[MetricReader] = [PrometheusMetricReader()]
    telemetry = telemetry or TelemetrySettings.from_env()
    interval = telemetry.metric_export_interval_ms
    if telemetry.otlp_metrics:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=interval))
    elif state_dir:
        path = Path(state_dir) / "telemetry" / f"metrics-{service}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        out = path.open("a", encoding="utf-8")
        _files.append(out)
        exporter = ConsoleMetricExporter(out=out, formatter=lambda m: m.to_json(indent=None) + "\n")
        readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=interval))
    resource = Resource.create({"service.name": service, "service.namespace": "vein2vein"})
    _provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(_provider)
    return _provider


def shutdown_metrics() -> None:
    if _provider is not None:
        _provider.shutdown(timeout_millis=5000)
    for f in _files:
        f.close()


def meter(name: str = "v2v") -> metrics.Meter:
    return metrics.get_meter(name)
