"""Pure arithmetic of the benchmark: percentiles, summaries, the knee, the send schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p99_9", 99.9))
CHAIN_P99_LIMIT_MS = 1000.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of values sorted ascending, by linear interpolation between the
    closest ranks (numpy's default). Raises ValueError on an empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo]) + (float(sorted_values[hi]) - float(sorted_values[lo])) * frac


def summarise(values: Iterable[float]) -> dict[str, Any]:
    """count, mean, min, max and p50/p95/p99/p99.9 of the values (None for each when there are none)."""
    data = sorted(float(v) for v in values)
    out: dict[str, Any] = {"count": len(data)}
    if not data:
        out.update({"mean": None, "min": None, "max": None})
        out.update({name: None for name, _ in PERCENTILES})
        return out
    out.update({"mean": sum(data) / len(data), "min": data[0], "max": data[-1]})
    out.update({name: percentile(data, q) for name, q in PERCENTILES})
    return out


def step_passes(step: Mapping[str, Any], p99_limit_ms: float = CHAIN_P99_LIMIT_MS) -> bool:
    """A rate step holds when orders were sent, every one was accepted and reached the chain end, nothing
    failed, and the chain p99 stays under the limit."""
    orders = int(step.get("orders", 0))
    p99 = (step.get("chain_ms") or {}).get("p99")
    return (
        orders > 0
        and int(step.get("accepted", 0)) == orders
        and int(step.get("completed", 0)) == orders
        and int(step.get("errors", 0)) == 0
        and p99 is not None
        and float(p99) < p99_limit_ms
    )


def find_knee(steps: Sequence[Mapping[str, Any]], p99_limit_ms: float = CHAIN_P99_LIMIT_MS) -> float | None:
    """The highest rate that holds (see `step_passes`) below the lowest rate that does not: a rate that
    happens to pass above a failing one does not count. None when even the lowest rate fails."""
    knee: float | None = None
    for step in sorted(steps, key=lambda s: float(s["rate"])):
        if not step_passes(step, p99_limit_ms):
            break
        knee = float(step["rate"])
    return knee


def send_schedule(rate: float, seconds: float) -> list[float]:
    """Open-model send offsets (seconds from the start) for a constant arrival rate: evenly spaced,
    round(rate * seconds) of them, the first at 0."""
    if rate <= 0 or seconds <= 0:
        return []
    count = round(rate * seconds)
    return [i / rate for i in range(count)]


def parse_rates(text: str) -> list[float]:
    """'10,25,50' -> [10.0, 25.0, 50.0]: positive, sorted, without duplicates."""
    rates: set[float] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        value = float(part)
        if value <= 0 or not math.isfinite(value):
            raise ValueError(f"a rate must be a positive number, not {part!r}")
        rates.add(value)
    if not rates:
        raise ValueError("no rate given")
    return sorted(rates)


def fmt_rate(rate: float) -> str:
    return f"{rate:g}"
