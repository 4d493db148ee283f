"""`python -m v2v_harness.bench.ab`: two variants of the platform at one rate, in alternating runs.

On a shared 2-core machine the same code at the same rate measures 10-20 % apart from one run to the
next (CPU per order, latency), so one run of each side says nothing about a change of that size. This
runs the platform step of `python -m v2v_harness.bench` (one rate, no raw limits, no overload, nothing
written to docs/BENCHMARKS.md) `--pairs` times for each side, in A B B A order (a drift of the machine
over the runs weighs on both sides alike), and prints every run, each side's mean and range, and whether
the difference of the means is larger than the spread between runs of the same side.

A side is a source tree (`--a-tree`, `--b-tree`: a checkout or `git worktree` with its own `.venv`;
this one by default) and environment settings (`--a-env NAME=VALUE`, repeatable), e.g.

    python -m v2v_harness.bench.ab --rate 20 --pairs 3 --b-env V2V_CONSUMER_BATCH_MAX=1
    python -m v2v_harness.bench.ab --rate 35 --a-tree ../base --pairs 2

The runs' JSON results and an `ab.json` summary go to `--out` (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

# what each run reports, from its step of the bench's JSON result: (key, label, unit)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("cpu_ms_per_order", "CPU per order", "ms"),
    ("cores_busy", "cores busy", ""),
    ("chain_p50_ms", "chain p50", "ms"),
    ("chain_p99_ms", "chain p99", "ms"),
    ("intake_p99_ms", "intake p99", "ms"),
)


@dataclass
class Side:
    name: str
    tree: Path
    env: dict[str, str] = field(default_factory=dict)

    def python(self) -> str:
        own = self.tree / ".venv" / "bin" / "python"
        return str(own) if own.exists() else sys.executable

    def describe(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in sorted(self.env.items())) or "(no settings)"
        return f"{self.name}: {self.tree} {settings}"


def parse_env(items: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--a-env/--b-env takes NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def step_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of a bench result's (only) platform step."""
    steps = result["platform"]["steps"]
    if len(steps) != 1:
        raise ValueError(f"expected one platform step, found {len(steps)}")
    step = steps[0]
    chain = step.get("chain_ms") or {}
    intake = step.get("intake_ms") or {}
    cores = step.get("cpu_cores") or {}
    return {
        "rate": step["rate"],
        "orders": step["orders"],
        "completed": step["completed"],
        "errors": step["errors"],
        "holds": bool(step["pass"]),
        "cpu_ms_per_order": step["cpu_ms_per_order_total"],
        "cores_busy": round(sum(cores.values()), 2) if cores else None,
        "chain_p50_ms": chain.get("p50"),
        "chain_p99_ms": chain.get("p99"),
        "intake_p99_ms": intake.get("p99"),
    }


def compare(a_runs: list[dict[str, Any]], b_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: each side's mean, min and max, B's mean relative to A's, and whether the means lie
    further apart than the larger of the two sides' ranges (`beyond_spread`; None with one run of a
    side): only then is a difference more than what repeating the same run gives on this machine."""
    out: dict[str, Any] = {}
    for key, _label, _unit in METRICS:
        a = [r[key] for r in a_runs if r.get(key) is not None]
        b = [r[key] for r in b_runs if r.get(key) is not None]
        if not a or not b:
            continue
        a_mean, b_mean = mean(a), mean(b)
        spread = max(max(a) - min(a), max(b) - min(b))
        out[key] = {
            "a_mean": a_mean,
            "a_min": min(a),
            "a_max": max(a),
            "b_mean": b_mean,
            "b_min": min(b),
            "b_max": max(b),
            "b_vs_a_pct": (100.0 * (b_mean - a_mean) / a_mean) if a_mean else None,
            "spread": spread,
            # one run of a side shows no spread: nothing to weigh the difference against
            "beyond_spread": (abs(b_mean - a_mean) > spread) if min(len(a), len(b)) >= 2 else None,
        }
    out["holds"] = {
        "a": sum(1 for r in a_runs if r["holds"]),
        "b": sum(1 for r in b_runs if r["holds"]),
        "runs": len(a_runs),
    }
    return out


def run_order(pairs: int) -> list[str]:
    """A B B A A B ...: each pair's first side alternates, so that a drift weighs on both alike."""
    order: list[str] = []
    for i in range(pairs):
        order += ["A", "B"] if i % 2 == 0 else ["B", "A"]
    return order


def run_once(side: Side, rate: float, seconds: float, out: Path) -> dict[str, Any]:
    """One platform step of `python -m v2v_harness.bench` for `side`; its figures (`step_metrics`)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        side.python(),
        "-m",
        "v2v_harness.bench",
        "--rates",
        f"{rate:g}",
        "--seconds",
        f"{seconds:g}",
        "--skip-raw",
        "--skip-overload",
        "--refine",
        "0",
        "--keep-going",
        "--no-docs",
        "--quiet",
        "--out",
        str(out),
    ]
    env = {**os.environ, **side.env}
    with (out / "bench.err").open("wb") as err:
        proc = subprocess.run(cmd, cwd=side.tree, env=env, stdout=subprocess.DEVNULL, stderr=err, check=False)
    if proc.returncode != 0:
        tail = (out / "bench.err").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"side {side.name}: the bench exited with {proc.returncode}: " + " | ".join(tail))
    return step_metrics(json.loads((out / "latest.json").read_text()))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) < 10:
            return f"{value:.2f}"
        return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def render(sides: dict[str, Side], runs: list[tuple[str, dict[str, Any]]], summary: dict[str, Any]) -> str:
    lines = [sides["A"].describe(), sides["B"].describe(), ""]
    head = ["run", "side", "done", "err", *(label for _k, label, _u in METRICS), "holds"]
    lines.append(" | ".join(head))
    for i, (name, r) in enumerate(runs, 1):
        cells = [str(i), name, f"{r['completed']}/{r['orders']}", str(r["errors"])]
        cells += [_fmt(r[k]) for k, _l, _u in METRICS]
        cells.append("yes" if r["holds"] else "no")
        lines.append(" | ".join(cells))
    lines.append("")
    for key, label, unit in METRICS:
        s = summary.get(key)
        if s is None:
            continue
        rel = "" if s["b_vs_a_pct"] is None else f" ({s['b_vs_a_pct']:+.1f} %)"
        verdict = {
            True: "beyond the spread between runs",
            False: "within the spread between runs",
            None: "one run of a side: the spread is unknown",
        }[s["beyond_spread"]]
        name = f"{label} {unit}".strip()
        a = f"{_fmt(s['a_mean'])} [{_fmt(s['a_min'])}-{_fmt(s['a_max'])}]"
        b = f"{_fmt(s['b_mean'])} [{_fmt(s['b_min'])}-{_fmt(s['b_max'])}]"
        lines.append(f"{name}: A {a}, B {b}{rel}: {verdict}")
    h = summary["holds"]
    lines.append(f"held the rate: A {h['a']}/{h['runs']}, B {h['b']}/{h['runs']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v2v_harness.bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, required=True, help="orders per second (one step)")
    p.add_argument("--seconds", type=float, default=25.0, help="duration of the step (25)")
    p.add_argument("--pairs", type=int, default=2, help="runs of each side (2)")
    p.add_argument("--a-tree", type=Path, default=Path.cwd(), help="source tree of side A (this one)")
    p.add_argument("--b-tree", type=Path, default=Path.cwd(), help="source tree of side B (this one)")
    p.add_argument("--a-env", action="append", metavar="NAME=VALUE", help="a setting for side A's runs")
    p.add_argument("--b-env", action="append", metavar="NAME=VALUE", help="a setting for side B's runs")
    p.add_argument("--out", type=Path, help="folder for the runs' results (a temporary one)")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    sides = {
        "A": Side("A", args.a_tree.resolve(), parse_env(args.a_env)),
        "B": Side("B", args.b_tree.resolve(), parse_env(args.b_env)),
    }
    if sides["A"].tree == sides["B"].tree and sides["A"].env == sides["B"].env:
        print("ab: both sides are the same tree and settings (an A/A run: the spread alone)", file=sys.stderr)
    out = args.out or Path(tempfile.mkdtemp(prefix="v2v-bench-ab-"))
    runs: list[tuple[str, dict[str, Any]]] = []
    started = time.monotonic()
    order = run_order(args.pairs)
    try:
        for i, name in enumerate(order, 1):
            print(
                f"ab [{time.monotonic() - started:6.0f}s] run {i}/{len(order)}: side {name}", file=sys.stderr
            )
            r = run_once(sides[name], args.rate, args.seconds, out / f"run{i:02d}-{name}")
            runs.append((name, r))
            print(
                f"ab [{time.monotonic() - started:6.0f}s]   {r['completed']}/{r['orders']} chains, "
                f"CPU {_fmt(r['cpu_ms_per_order'])} ms/order, chain p99 {_fmt(r['chain_p99_ms'])} ms",
                file=sys.stderr,
            )
    except KeyboardInterrupt:
        print("ab: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"ab: failed: {exc}", file=sys.stderr)
        return 1
    summary = compare([r for n, r in runs if n == "A"], [r for n, r in runs if n == "B"])
    (out / "ab.json").write_text(
        json.dumps(
            {
                "rate": args.rate,
                "seconds": args.seconds,
                "sides": {n: {"tree": str(s.tree), "env": s.env} for n, s in sides.items()},
                "runs": [{"side": n, **r} for n, r in runs],
                "summary": summary,
            },
            indent=2,
        )
    )
    print(render(sides, runs, summary))
    print(f"\nresults: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
