"""The chaos run's summary table, JSON history and PNG timeline."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from v2v_harness.chaos.checker import Verdict
from v2v_harness.chaos.nemesis import Fault
from v2v_harness.chaos.workload import Call

COLOURS = {
    "kill": "tab:red",
    "pause": "tab:orange",
    "broker-restart": "tab:purple",
    "postgres-restart": "tab:brown",
    "terminate-backends": "tab:pink",
    "read-only": "tab:olive",
}


def summary_table(faults: list[Fault], verdicts: list[Verdict], facts: dict[str, Any]) -> str:
    lines = ["", "chaos: faults injected"]
    by_kind: dict[str, list[Fault]] = defaultdict(list)
    for f in faults:
        by_kind[f.kind].append(f)
    lines.append(f"  {'kind':<20}{'count':>6}{'healed':>8}{'mean heal s':>13}{'max heal s':>12}")
    for kind in COLOURS:
        found = by_kind.get(kind, [])
        heals = [f.healed - f.start for f in found if f.healed is not None]
        mean = f"{sum(heals) / len(heals):.1f}" if heals else "-"
        top = f"{max(heals):.1f}" if heals else "-"
        lines.append(f"  {kind:<20}{len(found):>6}{len(heals):>8}{mean:>13}{top:>12}")
    lines.append(f"  {'total':<20}{len(faults):>6}")
    lines.append("")
    lines.append("chaos: run")
    for key, value in facts.items():
        lines.append(f"  {key:<34}{value}")
    lines.append("")
    lines.append("chaos: invariants")
    for v in verdicts:
        lines.append(f"  {'PASS' if v.ok else 'FAIL'}  {v.name}")
        lines.append(f"        {v.detail}")
        for example in v.examples:
            lines.append(f"        - {example}")
    failed = sum(not v.ok for v in verdicts)
    lines.append("")
    lines.append(
        f"chaos: {len(verdicts) - failed}/{len(verdicts)} invariants hold"
        + (f", {failed} FAILED" if failed else "")
    )
    return "\n".join(lines)


def write_history(path: Path, history: dict[str, Any]) -> None:
    path.write_text(json.dumps(history, indent=1, default=str))


def plot_timeline(
    path: Path,
    faults: list[Fault],
    calls: list[Call],
    transitions: list[float],
    end_s: float,
    last_heal: float,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bucket = 2.0
    n = int(end_s // bucket) + 1
    xs = [i * bucket for i in range(n)]
    ok: Counter[int] = Counter()
    bad: Counter[int] = Counter()
    lat: dict[int, list[float]] = defaultdict(list)
    for c in calls:
        b = int(c.t // bucket)
        if 200 <= c.status < 500 and c.status != 429:
            ok[b] += 1
            lat[b].append(c.ms)
        else:
            bad[b] += 1
    moved: Counter[int] = Counter(int(t // bucket) for t in transitions if t >= 0)

    def pct(values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        s = sorted(values)
        return s[min(len(s) - 1, int(q * len(s)))]

    fig, axes = plt.subplots(3, 1, figsize=(13, 8.5), sharex=True)
    axes[0].plot(xs, [ok[i] / bucket for i in range(n)], label="answered calls/s", color="tab:blue")
    axes[0].plot(
        xs, [bad[i] / bucket for i in range(n)], label="5xx, 429 or transport error /s", color="tab:red"
    )
    axes[0].set_ylabel("HTTP calls/s")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(xs, [pct(lat[i], 0.5) for i in range(n)], label="p50", color="tab:green")
    axes[1].plot(xs, [pct(lat[i], 0.99) for i in range(n)], label="p99", color="tab:gray")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("latency ms")
    axes[1].legend(loc="upper right", fontsize=8)
    axes[2].bar(
        xs, [moved[i] / bucket for i in range(n)], width=bucket, color="tab:cyan", label="order transitions/s"
    )
    axes[2].set_ylabel("transitions/s")
    axes[2].set_xlabel("seconds since start")
    axes[2].legend(loc="upper right", fontsize=8)
    seen: set[str] = set()
    for f in faults:
        end = f.healed if f.healed is not None else f.start + 1.0
        colour = COLOURS.get(f.kind, "black")
        for ax in axes:
            ax.axvspan(f.start, max(end, f.start + 0.5), color=colour, alpha=0.25, label=None)
        if f.kind not in seen:
            axes[0].axvspan(0, 0, color=colour, alpha=0.4, label=f.kind)
            seen.add(f.kind)
    for ax in axes:
        ax.axvline(last_heal, color="black", linestyle="--", linewidth=0.8)
    axes[0].legend(loc="upper right", fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
