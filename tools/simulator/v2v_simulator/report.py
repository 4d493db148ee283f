"""The run's accounting and its report: HTTP stats, each order's result, the summary maths (percentiles,
utilisation, what the platform did), the progress line, the errors grouped by kind and the summary."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from .config import Config
from .plan import EXCEPTION_WEIGHTS, OrderPlan
from .rules import RuleCheck, RunStart
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
    # (what, simulated moment) of each timed action: the order's case file (`OrderActor.moments`)
    moments: list[tuple[str, datetime]] = field(default_factory=list)
    collected_runs: list[RunStart] = field(default_factory=list)  # runs started from collected material
    # from the platform at the end of the run: the site of the order (the product's, once made), the
    # centre's market (country) and timezone, the indication, the infusion window of the recorded LD
    # (`treatment.infusion_window`) and the recorded infusion time
    site_id: str | None = None
    market: str | None = None
    centre_tz: str | None = None
    indication: str | None = None
    infusion_window: dict[str, Any] | None = None
    infused_at: datetime | None = None

    @property
    def lane(self) -> str:
        """The centre's market -> the manufacturing site, as a scheduling team reads a lane."""
        return f"{self.market or '?'} → {self.site_id or '?'}"

    @property
    def prediction_error(self) -> float | None:
        """Predicted minus simulated vein-to-vein days (positive: the prediction was late)."""
        if self.predicted_days is None or self.simulated_days is None:
            return None
        return self.predicted_days - self.simulated_days


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


def fmt_signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


# ---- predicted vs simulated vein-to-vein days ------------------------------------------------------------

SMALL_GROUP = 5  # fewer completed orders in a group: its p90 is barely more than its maximum (marked *)


@dataclass(frozen=True)
class Accuracy:
    """Vein-to-vein days of a group of completed orders: predicted at first booking vs simulated, and the
    prediction's error (predicted - simulated): its mean (the bias) and the p90 of its absolute value."""

    n: int
    predicted_median: float | None
    predicted_p90: float | None
    simulated_median: float | None
    simulated_p90: float | None
    bias: float | None
    p90_abs_error: float | None


def accuracy(group: Iterable[OrderResult]) -> Accuracy:
    rs = [r for r in group if r.simulated_days is not None]
    predicted = [float(r.predicted_days) for r in rs if r.predicted_days is not None]
    simulated = [float(r.simulated_days) for r in rs if r.simulated_days is not None]
    errors = [e for r in rs if (e := r.prediction_error) is not None]
    return Accuracy(
        n=len(rs),
        predicted_median=percentile(predicted, 50),
        predicted_p90=percentile(predicted, 90),
        simulated_median=percentile(simulated, 50),
        simulated_p90=percentile(simulated, 90),
        bias=sum(errors) / len(errors) if errors else None,
        p90_abs_error=percentile((abs(e) for e in errors), 90),
    )


def completed(results: Iterable[OrderResult]) -> list[OrderResult]:
    return [r for r in results if r.final_status == "completed" and r.simulated_days is not None]


def accuracy_by(
    results: Iterable[OrderResult], key: Callable[[OrderResult], str]
) -> list[tuple[str, Accuracy]]:
    """The completed orders grouped by `key`, each group's accuracy (groups sorted by key)."""
    groups: dict[str, list[OrderResult]] = defaultdict(list)
    for r in completed(results):
        groups[key(r)].append(r)
    return [(k, accuracy(groups[k])) for k in sorted(groups)]


def accuracy_table(label: str, rows: list[tuple[str, Accuracy]]) -> list[str]:
    width = max([12, len(label), *(len(k) for k, _ in rows)]) + 2
    lines = [
        f"  {label:<{width}}{'n':>5}{'predicted median':>18}{'p90':>7}{'simulated median':>18}{'p90':>7}"
        f"{'bias':>8}{'p90 |error|':>13}"
    ]
    for key, a in rows:
        n = f"{a.n}{'*' if a.n < SMALL_GROUP else ''}"
        lines.append(
            f"  {key:<{width}}{n:>5}{fmt(a.predicted_median):>18}{fmt(a.predicted_p90):>7}"
            f"{fmt(a.simulated_median):>18}{fmt(a.simulated_p90):>7}{fmt_signed(a.bias):>8}"
            f"{fmt(a.p90_abs_error):>13}"
        )
    return lines


def accuracy_lines(results: list[OrderResult]) -> list[str]:
    """Predicted (at first booking) vs simulated vein-to-vein days of the completed orders, per product
    (with all of them, and those without an exception) and per lane, with the p90 prediction error."""
    done = completed(results)
    per_product = accuracy_by(done, lambda r: r.plan.combo.product)
    if done:
        per_product.append(("all", accuracy(done)))
    clean = [r for r in done if not r.applied]
    if clean and len(clean) != len(done):
        per_product.append(("no exception", accuracy(clean)))
    lines = [
        "Vein-to-vein days, completed orders: predicted at first booking vs simulated",
        "  (error: predicted - simulated days of an order; bias: the mean error; p90 |error|: 90% of the",
        "  orders were predicted within this many days)",
        *accuracy_table("product", per_product),
        "",
        "Per lane (the centre's market → the site that made the product)",
        *accuracy_table("lane", accuracy_by(done, lambda r: r.lane)),
    ]
    lines.append(f"  (*: fewer than {SMALL_GROUP} orders, their p90 is little more than their maximum)")
    return lines


# ---- the rules -------------------------------------------------------------------------------------------

MAX_LISTED = 20  # violations listed per rule


def rule_lines(checks: list[RuleCheck]) -> list[str]:
    """The rules section: per rule the cases checked and the violations (0 expected), each violation
    listed (the first MAX_LISTED)."""
    violated = sum(len(c.violations) for c in checks)
    lines = [f"Rules the orders obey (checked over the run; {violated} violation(s), 0 expected)"]
    width = max([40, *(len(c.rule) for c in checks)]) + 2
    lines.append(f"  {'rule':<{width}}{'checked':>8}{'violations':>12}")
    for c in checks:
        lines.append(f"  {c.rule:<{width}}{c.checked:>8}{len(c.violations):>12}")
        if c.note:
            lines.append(f"      ({c.note})")
        lines.extend(f"      - {v}" for v in c.violations[:MAX_LISTED])
        if len(c.violations) > MAX_LISTED:
            lines.append(f"      ... and {len(c.violations) - MAX_LISTED} more")
    return lines


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
    did, per-site utilisation, predicted vs simulated vein-to-vein days per product and per lane, and the
    rules checked (`summary["rules"]`). `start`..`last`: simulated."""
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

    lines += ["", *accuracy_lines(results)]
    lines += ["", *rule_lines(summary.get("rules") or [])]
    lines.append("=" * 100)
    return "\n".join(lines)
