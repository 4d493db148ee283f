"""Telemetry settings: the standard OpenTelemetry environment variables this platform acts on, read once.

The exporters themselves read the rest of the OTEL_* variables (headers, protocol, batch sizes) as the
OpenTelemetry SDK documents; here are only the ones that decide what we set up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TelemetrySettings:
    otlp_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT
    otlp_traces_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    otlp_metrics_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_METRICS_ENDPOINT
    metric_export_interval_ms: int = 10_000  # OTEL_METRIC_EXPORT_INTERVAL
    trace_trivial_statements: bool = False  # V2V_TRACE_TRIVIAL_STATEMENTS: spans for BEGIN and pool resets
    # V2V_TRACE_STATEMENT_MIN_MS: a SQL statement gets a span when it takes this long (or fails); 0: all
    statement_min_ms: float = 50.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TelemetrySettings:
        env = os.environ if env is None else env
        return cls(
            otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
            otlp_traces_endpoint=env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None,
            otlp_metrics_endpoint=env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or None,
            metric_export_interval_ms=int(env.get("OTEL_METRIC_EXPORT_INTERVAL") or 10_000),
            trace_trivial_statements=(env.get("V2V_TRACE_TRIVIAL_STATEMENTS") or "").strip().lower()
            in {"1", "true", "yes", "on"},
            statement_min_ms=_non_negative(env, "V2V_TRACE_STATEMENT_MIN_MS", 50.0),
        )

    @property
    def otlp_traces(self) -> bool:
        return bool(self.otlp_endpoint or self.otlp_traces_endpoint)

    @property
    def otlp_metrics(self) -> bool:
        return bool(self.otlp_endpoint or self.otlp_metrics_endpoint)


def _non_negative(env: Mapping[str, str], name: str, default: float) -> float:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}: not a number of milliseconds ({raw!r})") from None
    if value < 0:
        raise ValueError(f"{name}: must not be negative ({raw!r})")
    return value
