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


RECOVERY_LIMIT_S = 60.0  # issue 12: after 2x the knee for 30 s, back to base within 60 s
RECOVERY_WINDOW_PCT = ("p90", 90.0)  # the percentile of a window that must be back at the base p99


def recovery(
    probes: Sequence[tuple[float, float | None]],
    base_p99_ms: float | None,
    window_s: float,
    hold_s: float = 0.0,
) -> dict[str, Any]:
    """When the probes' chain latency is back at its base after an overload.

    `probes` are (send time in seconds after the overload ended, chain latency in ms or None when the
    chain end never came), `base_p99_ms` the chain p99 at the knee. Two answers, both in seconds after
    the end of the overload, None when it never happened within the probes seen:

    - `recovery_s_strict`: the send time of the first probe after which every probe's latency is at or
      below the base p99 (0 when none was above). At base, one probe in a hundred is above its p99 by
      definition, so over a long window this one is noisy.
    - `recovery_s`: the start of the first `window_s` window (by send time) from which on every window's
      p90 of the probes' latency is at or below the base p99 (a probe without a chain end counts as
      infinitely late; an empty window neither breaks nor makes the run). A stray slow probe does not
      move it; a window of which a tenth is slower than the base p99 does. The windows at base from it
      to the last one must span at least `hold_s`: a run of probes that ends right after its last slow
      window has not shown that latency stays at base (None then).

    Also the per-window series: probes, completed, p50, p90, p99 (ms) and whether it is at base."""
    window_s = max(window_s, 1e-3)
    series: list[dict[str, Any]] = []
    buckets: dict[int, list[float]] = {}
    for sent, latency in probes:
        buckets.setdefault(max(0, math.floor(sent / window_s)), []).append(
            math.inf if latency is None else latency
        )
    last = max(buckets) if buckets else -1
    for index in range(last + 1):
        values = sorted(buckets.get(index, []))
        finite = [v for v in values if math.isfinite(v)]
        row: dict[str, Any] = {
            "t_s": index * window_s,
            "probes": len(values),
            "completed": len(finite),
            "p50_ms": percentile(finite, 50.0) if finite else None,
            "p90_ms": None,
            "p99_ms": percentile(finite, 99.0) if finite else None,
            "at_base": None,
        }
        if values:
            p90 = percentile(values, RECOVERY_WINDOW_PCT[1]) if len(finite) == len(values) else math.inf
            # interpolation towards an infinite value is infinite
            row["p90_ms"] = p90 if math.isfinite(p90) else None
            row["at_base"] = base_p99_ms is not None and p90 <= base_p99_ms
        series.append(row)
    strict: float | None = None
    if base_p99_ms is not None and probes:
        ordered = sorted(probes, key=lambda p: p[0])
        bad = [i for i, (_, lat) in enumerate(ordered) if lat is None or lat > base_p99_ms]
        if not bad:
            strict = max(0.0, ordered[0][0])
        elif bad[-1] + 1 < len(ordered):
            strict = max(0.0, ordered[bad[-1] + 1][0])
    windowed: float | None = None
    if base_p99_ms is not None:
        judged = [r for r in series if r["at_base"] is not None]
        failing = [r for r in judged if not r["at_base"]]
        if judged and not failing:
            windowed = judged[0]["t_s"]
        elif failing and failing[-1] is not judged[-1]:
            windowed = min(r["t_s"] for r in judged if r["t_s"] > failing[-1]["t_s"])
        if windowed is not None and judged[-1]["t_s"] + window_s - windowed < hold_s:
            windowed = None  # at base for less than `hold_s` when the probes ended
    return {
        "window_s": window_s,
        "window_percentile": RECOVERY_WINDOW_PCT[0],
        "recovery_s": windowed,
        "recovery_s_strict": strict,
        "series": series,
    }
