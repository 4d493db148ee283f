"""The run's accounting and its report: HTTP stats, each order's result, the summary maths (percentiles,
utilisation, what the platform did), the progress line, the errors grouped by kind and the summary."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from .config import Config
from .plan import EXCEPTION_WEIGHTS, OrderPlan
from .states import BUCKET_OF, BUCKETS


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    intended: Counter[str] = field(default_factory=Counter)
    throttled: Counter[str] = field(default_factory=Counter)  # 429s waited out, per party
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors.append(message)


@dataclass
class OrderResult:
    plan: OrderPlan
    order_id: str | None = None
    final_status: str | None = None
    ended_reason: str | None = None
    predicted_days: int | None = None
    simulated_days: float | None = None
    applied: bool = False  # the exception was injected
    decision: str | None = None
    # QA's dispositions of material at risk, as "<cause>: <outcome>" (with the physician's answer)
    dispositions: list[str] = field(default_factory=list)
    sites_manufactured: list[str] = field(default_factory=list)  # one entry per run started
    reactions: Counter[str] = field(default_factory=Counter)
    aborted: str | None = None


# ---- summary maths -----------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; None if empty."""
    xs = sorted(values)
    if not xs:
        return None
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def utilisation(
    sites: list[dict[str, Any]], consumed: dict[str, int], window: tuple[date, date] | None
) -> list[dict[str, Any]]:
    """Per site: slots consumed by manufacture vs. the capacity (starts/day x days) over the window."""
    days = (window[1] - window[0]).days + 1 if window else 0
    out = []
    for site in sites:
        capacity = sum(int(n) for n in (site.get("daily_capacity") or {}).values()) * days
        used = consumed.get(site["site_id"], 0)
        out.append(
            {
                "site_id": site["site_id"],
                "consumed": used,
                "capacity": capacity,
                "share": (used / capacity) if capacity else 0.0,
            }
        )
    return out


REACTIONS_ORDER = (
    "remanufactured (new run from retained material)",
    "recollected (new apheresis and slot)",
    "rebooked after the site outage",
    "rebooked after the apheresis date moved",
    "quarantined after an outbound excursion",
    "quarantine released by QA",
    "quarantine rejected by QA",
    "waitlisted (no capacity)",
    "failed: nothing left to try",
    "cancelled by the centre",
)


def reactions_of(timeline: list[dict[str, Any]]) -> Counter[str]:
    """What the platform did to one order, read from its timeline."""
    seen: Counter[str] = Counter()
    for entry in timeline:
        kind, status, reason = entry.get("type", ""), entry.get("status"), entry.get("reason") or ""
        if kind == "order.remanufacture_requested.v1":
            seen["remanufactured (new run from retained material)"] += 1
        if status == "rescheduling" and reason.startswith("recollection:"):
            seen["recollected (new apheresis and slot)"] += 1
        if kind == "site.booking_affected.v1" and status == "rescheduling":
            seen["rebooked after the site outage"] += 1
        if status == "rescheduling" and reason.startswith("apheresis moved"):
            seen["rebooked after the apheresis date moved"] += 1
        if kind == "logistics.shipment_excursion.v1" and status == "quarantined":
            seen["quarantined after an outbound excursion"] += 1
        if kind == "order.quarantine_decided.v1":
            released = reason.startswith("quarantine released")
            seen["quarantine released by QA" if released else "quarantine rejected by QA"] += 1
        if kind == "scheduling.slot_unavailable.v1" and status == "waitlisted":
            seen["waitlisted (no capacity)"] += 1
        if kind == "order.failed.v1":
            seen["failed: nothing left to try"] += 1
        if kind == "order.cancelled.v1":
            seen["cancelled by the centre"] += 1
    return seen


def group_errors(errors: list[str]) -> dict[str, list[str]]:
    """Errors by kind: the message without the order's number, id, product, site and timings."""
    groups: dict[str, list[str]] = defaultdict(list)
    for message in errors:
        key = re.sub(r"order #\d+ [0-9a-f]{0,8}( \([^)]*\))?", "order", message)
        key = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", key)
        key = re.sub(r"\b(run \d+ )?for \d+ s\b", "", key)
        key = re.sub(r"\b(at|to) [A-Z]{2}-[A-Z-]+\b", r"\1 <site>", key)
        groups[" ".join(key.split())].append(message)
    return groups


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def progress_line(
    elapsed: float, sim_now: datetime, statuses: Iterable[str | None], calls: int, errors: int
) -> str:
    """One progress line: orders per bucket of states (`None`: not placed yet)."""
    counts: Counter[str] = Counter()
    for status in statuses:
        counts[BUCKET_OF.get(status, "booking") if status is not None else "not placed"] += 1
    parts = [f"{k} {counts[k]}" for k in ("not placed", *BUCKETS) if counts[k]]
    return f"[{elapsed:6.1f}s] sim {sim_now:%Y-%m-%d} | {' · '.join(parts)} | calls {calls} | errors {errors}"


def error_lines(errors: list[str]) -> list[str]:
    """The errors, grouped by kind with an example each, and all of them when there are few."""
    if not errors:
        return ["errors: none"]
    groups = group_errors(errors)
    lines = [f"errors: {len(errors)}, {len(groups)} kind(s)"]
    for key, messages in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(messages):>4} x {key}")
        lines.append(f"         e.g. {messages[0]}")
    if len(errors) <= 30:
        lines.append("all errors:")
        lines.extend(f"  - {message}" for message in errors)
    return lines


def render_summary(
    cfg: Config,
    stats: Stats,
    summary: dict[str, Any],
    results: list[OrderResult],
    *,
    elapsed: float,
    start: datetime,
    last: datetime,
    outage_note: str = "",
) -> str:
    """The summary printed at the end: calls, terminal states, exceptions injected and what the platform
    did, per-site utilisation, predicted vs simulated vein-to-vein days. `start`..`last`: simulated."""
    lines = ["", "=" * 100, "vein2vein simulation summary", "=" * 100]
    lines.append(
        f"{cfg.orders} orders, seed {cfg.seed}, {elapsed:.0f} s real; simulated "
        f"{start:%Y-%m-%d} .. {last:%Y-%m-%d} (1 day = {cfg.day_seconds:g} s)"
    )
    calls = sum(stats.calls.values())
    server = sum(n for s, n in stats.statuses.items() if s >= 500)
    lines.append(
        f"HTTP calls {calls}: 5xx {server}; intended refusals "
        + (", ".join(f"{k}: {n}" for k, n in sorted(stats.intended.items())) or "none")
    )
    if stats.throttled:
        lines.append(
            f"  rate-limited (429, waited out and retried) {sum(stats.throttled.values())}: "
            + ", ".join(f"{k} {n}" for k, n in sorted(stats.throttled.items()))
        )

    lines += ["", "Orders by terminal state"]
    terminal = summary.get("terminal", {})
    for state in ("completed", "cancelled", "failed"):
        lines.append(f"  {state:<12}{terminal.get(state, 0):>6}")
    missing = cfg.orders - sum(terminal.values())
    lines.append(f"  {'not terminal':<12}{missing:>6}")
    gave_up = sum(1 for r in results if r.aborted and r.final_status == "cancelled")
    if gave_up:
        lines.append(f"  ({gave_up} of the cancelled were cancelled by the simulator after an error)")

    lines += [
        "",
        f"Exceptions injected (weights: {', '.join(f'{k} {w}' for k, w in EXCEPTION_WEIGHTS.items())})",
    ]
    planned = Counter(r.plan.kind for r in results if r.plan.kind)
    applied = Counter(r.plan.kind for r in results if r.plan.kind and r.applied)
    lines.append(f"  {'kind':<24}{'planned':>8}{'injected':>10}  detail")
    for kind in EXCEPTION_WEIGHTS:
        if not planned[kind]:
            continue
        detail = ""
        if kind == "cancellation":
            stages = Counter(r.plan.params["stage"] for r in results if r.plan.kind == kind and r.applied)
            detail = ", ".join(f"{s} {n}" for s, n in sorted(stages.items()))
        elif kind in (
            "outbound_excursion",
            "inbound_excursion",
            "material_rejected",
            "qc_oos",
            "persistent_oos",
        ):
            decisions = Counter(d for r in results if r.plan.kind == kind for d in r.dispositions)
            detail = ", ".join(f"QA {d} {n}" for d, n in sorted(decisions.items()))
        elif kind == "site_outage":
            detail = outage_note
        elif kind == "manufacturing_failure":
            steps = Counter(r.plan.params["step"] for r in results if r.plan.kind == kind and r.applied)
            detail = ", ".join(f"{s} {n}" for s, n in sorted(steps.items()))
        lines.append(f"  {kind:<24}{planned[kind]:>8}{applied[kind]:>10}  {detail}")
    lines.append(f"  {'total':<24}{sum(planned.values()):>8}{sum(applied.values()):>10}")
    lines.append("  (planned but not injected: the order ended or moved on before the exception's step)")

    lines += ["", "What the platform did (from the order timelines)"]
    reactions = summary.get("reactions", {})
    for what in REACTIONS_ORDER:
        if reactions.get(what):
            lines.append(f"  {what:<56}{reactions[what]:>6}")
    for what, n in sorted(reactions.items()):
        if what not in REACTIONS_ORDER and n:
            lines.append(f"  {what:<56}{n:>6}")

    window = summary.get("window")
    span = f"{window[0]} .. {window[1]}, {(window[1] - window[0]).days + 1} days" if window else "none"
    lines += ["", f"Per-site utilisation (manufacturing starts of this run: {span})"]
    runs = Counter(s for r in results for s in r.sites_manufactured)
    orders_at = Counter(s for r in results for s in set(r.sites_manufactured))
    lines.append(
        f"  {'site':<18}{'orders':>7}{'runs':>6}{'slots used':>12}{'capacity':>10}{'utilisation':>13}"
    )
    for u in summary.get("utilisation", []):
        lines.append(
            f"  {u['site_id']:<18}{orders_at[u['site_id']]:>7}{runs[u['site_id']]:>6}{u['consumed']:>12}"
            f"{u['capacity']:>10}{u['share']:>12.1%}"
        )
    lines.append(
        "  (orders/runs: manufactured there; slots used: consumed slots; capacity: starts/day x days)"
    )

    lines += ["", "Vein-to-vein days, completed orders (predicted at first booking vs simulated)"]
    lines.append(
        f"  {'product':<12}{'n':>5}{'predicted median':>18}{'p90':>7}{'simulated median':>18}{'p90':>7}"
    )
    done = [r for r in results if r.final_status == "completed" and r.simulated_days is not None]
    for product in [*sorted({r.plan.combo.product for r in done}), "all"]:
        group = [r for r in done if product in ("all", r.plan.combo.product)]
        pred = [float(r.predicted_days) for r in group if r.predicted_days is not None]
        sim = [float(r.simulated_days) for r in group if r.simulated_days is not None]
        lines.append(
            f"  {product:<12}{len(group):>5}{fmt(percentile(pred, 50)):>18}{fmt(percentile(pred, 90)):>7}"
            f"{fmt(percentile(sim, 50)):>18}{fmt(percentile(sim, 90)):>7}"
        )
    clean = [r for r in done if not r.applied]
    if clean and len(clean) != len(done):
        sim = [float(r.simulated_days) for r in clean if r.simulated_days is not None]
        pred = [float(r.predicted_days) for r in clean if r.predicted_days is not None]
        lines.append(
            f"  {'no exception':<12}{len(clean):>5}{fmt(percentile(pred, 50)):>18}"
            f"{fmt(percentile(pred, 90)):>7}{fmt(percentile(sim, 50)):>18}{fmt(percentile(sim, 90)):>7}"
        )
    lines.append("=" * 100)
    return "\n".join(lines)
