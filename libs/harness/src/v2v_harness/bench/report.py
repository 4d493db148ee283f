"""What a run leaves behind: the JSON result, two PNG plots, docs/BENCHMARKS.md, a console summary."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from v2v_harness.bench.stats import CHAIN_P99_LIMIT_MS, RECOVERY_LIMIT_S, fmt_rate

PROCESS_ORDER = ("order", "scheduling", "site", "logistics", "notification", "postgres", "broker", "bench")
SECTION = re.compile(
    r"<!-- bench:section:(?P<label>[^ ]+) -->\n(?P<body>.*?)<!-- /bench:section:(?P=label) -->\n?", re.S
)


def write_json(result: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, sort_keys=False, default=str) + "\n"
    path = out_dir / f"bench-{stamp}.json"
    latest = out_dir / "latest.json"
    path.write_text(text)
    latest.write_text(text)
    return path, latest


# ---- plots ------------------------------------------------------------------------------------------


def _series(steps: Sequence[dict[str, Any]], key: str, pct: str) -> list[float]:
    return [float(s[key][pct]) if s[key].get(pct) is not None else float("nan") for s in steps]


def plot_latency(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = (result.get("platform") or {}).get("steps") or []
    raw_steps = ((result.get("raw") or {}).get("chain") or {}).get("steps") or []
    overload = (result.get("platform") or {}).get("overload")
    fig, axes = plt.subplots(1, 3 if overload else 2, figsize=(19 if overload else 13, 5))
    ax = axes[0]
    if steps:
        rates = [s["rate"] for s in steps]
        for pct, style in (("p50", "-o"), ("p95", "-s"), ("p99", "-^"), ("p99_9", "-v")):
            ax.plot(
                rates,
                _series(steps, "chain_ms", pct),
                style,
                label=f"order -> chain end {pct.replace('_', '.')}",
            )
        ax.plot(rates, _series(steps, "intake_ms", "p99"), "--", color="grey", label="intake (POST) p99")
        ax.plot(
            rates,
            _series(steps, "first_webhook_ms", "p99"),
            ":",
            color="black",
            label="order -> first webhook p99",
        )
        knee = (result.get("platform") or {}).get("knee_rate")
        if knee:
            ax.axvline(knee, color="green", linewidth=1, label=f"knee {fmt_rate(knee)}/s")
    ax.axhline(CHAIN_P99_LIMIT_MS, color="red", linewidth=1, linestyle="--", label="1 s")
    ax.set_yscale("log")
    ax.set_xlabel("orders per second (open model)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Platform: latency percentiles vs arrival rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    if raw_steps:
        rates = [s["rate"] for s in raw_steps]
        for pct, style in (("p50", "-o"), ("p95", "-s"), ("p99", "-^"), ("p99_9", "-v")):
            ax.plot(
                rates,
                _series(raw_steps, "chain_ms", pct),
                style,
                label=f"raw 5-hop chain {pct.replace('_', '.')}",
            )
    ax.axhline(CHAIN_P99_LIMIT_MS, color="red", linewidth=1, linestyle="--", label="1 s")
    ax.set_yscale("log")
    ax.set_xlabel("chains per second (open model)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Raw chain on asyncpg + aiokafka")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if overload:
        _plot_overload(axes[2], overload)
    fig.suptitle(f"vein2vein bench {result.get('label', '')} - {result.get('started_at', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_overload(ax: Any, o: dict[str, Any]) -> None:
    """Probe chain latency per window after the overload, against the base p99."""
    series = o.get("probe_series") or []
    t = [float(w["t_s"]) + float(o.get("recovery_window_s") or 0) / 2 for w in series]
    for key, style in (("p50_ms", "-o"), ("p99_ms", "-^")):
        values = [float(w[key]) if w.get(key) is not None else float("nan") for w in series]
        ax.plot(t, values, style, markersize=3, label=f"probe chain {key.removesuffix('_ms')}")
    ax.axvspan(-float(o["seconds"]), 0, color="orange", alpha=0.2, label=f"overload {fmt_rate(o['rate'])}/s")
    base = (o.get("base_chain_ms") or {}).get("p99")
    if base:
        ax.axhline(base, color="green", linewidth=1, linestyle="--", label="base p99 (knee)")
    if o.get("recovery_s") is not None:
        ax.axvline(o["recovery_s"], color="green", linewidth=1, label="back at base")
    ax.set_yscale("log")
    ax.set_xlabel("seconds after the overload")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Recovery: probes at {fmt_rate(o['probe_rate'])}/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_cpu(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = (result.get("platform") or {}).get("steps") or []
    fig, ax = plt.subplots(figsize=(10, 5))
    labels = [f"{fmt_rate(s['rate'])}/s" for s in steps]
    bottoms = [0.0] * len(steps)
    for group in PROCESS_ORDER:
        values = [float((s.get("cpu_ms_per_order") or {}).get(group) or 0.0) for s in steps]
        if not any(values):
            continue
        ax.bar(labels, values, bottom=bottoms, label=group)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for x, total in enumerate(bottoms):
        ax.annotate(f"{total:.1f}", (x, total), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("arrival rate")
    ax.set_ylabel("CPU ms per order")
    ax.set_title("CPU per order per process (psutil, user + system)")
    ax.grid(True, axis="y", alpha=0.3)
    if steps:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- text -------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{float(value):,.{digits}f}"


def _pcts(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("p50") is None:
        return "-"
    return " / ".join(_f(summary[p]) for p in ("p50", "p95", "p99", "p99_9"))


def _load(m: dict[str, Any], key: str) -> str:
    values = m.get(key)
    return f"{values[0]:.2f}" if values else "?"


def platform_table(steps: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| rate /s | orders | chains done | errors | intake POST ms | order → first webhook ms | "
        "order → chain end ms | holds |",
        "|---:|---:|---:|---:|---|---|---|:-:|",
    ]
    for s in steps:
        lines.append(
            f"| {fmt_rate(s['rate'])} | {s['orders']} | {s['completed']} | {s['errors']} "
            f"| {_pcts(s['intake_ms'])} | {_pcts(s['first_webhook_ms'])} | {_pcts(s['chain_ms'])} "
            f"| {'yes' if s['pass'] else 'no'} |"
        )
    return lines


def hop_table(steps: Sequence[dict[str, Any]]) -> list[str]:
    if not steps:
        return []
    hops = list(steps[0]["hop_lag_ms"])
    head = ["rate /s", "POST → order.submitted", *hops, "chain-end event → webhook"]
    lines = ["| " + " | ".join(head) + " |", "|---:" + "|---" * (len(head) - 1) + "|"]
    for s in steps:
        cells = [
            fmt_rate(s["rate"]),
            _pcts(s["post_to_submitted_event_ms"]),
            *(_pcts(s["hop_lag_ms"][h]) for h in hops),
            _pcts(s["chain_end_event_to_webhook_ms"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cpu_table(steps: Sequence[dict[str, Any]], idle: dict[str, Any] | None = None) -> list[str]:
    groups = [
        g for g in PROCESS_ORDER if any((s.get("cpu_ms_per_order") or {}).get(g) is not None for s in steps)
    ]
    head = ["rate /s", *groups, "total", "net of idle", "cores busy", "spans / order"]
    lines = ["| " + " | ".join(head) + " |", "|---:" * len(head) + "|"]
    if idle:
        busy = sum(v for v in idle.values() if v is not None)
        cells = ["idle (cores)", *(_f(idle.get(g), 2) for g in groups), _f(busy, 2), "", _f(busy, 2), ""]
        lines.append("| " + " | ".join(cells) + " |")
    for s in steps:
        per = s.get("cpu_ms_per_order") or {}
        cores = sum(v for v in (s.get("cpu_cores") or {}).values() if v is not None)
        cells = [
            fmt_rate(s["rate"]),
            *(_f(per.get(g), 1) for g in groups),
            _f(s.get("cpu_ms_per_order_total"), 1),
            _f(s.get("cpu_ms_per_order_net_of_idle_total"), 1),
            _f(cores, 2),
            _f(s.get("spans_per_order"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def raw_lines(raw: dict[str, Any] | None) -> list[str]:
    if not raw:
        return ["(raw limits not measured in this run)"]
    pg, kafka, chain = raw["postgres"], raw["kafka"], raw["chain"]
    max_rate = chain.get("max_rate")
    max_text = (
        "-"
        if max_rate is None
        else f"{'≥ ' if chain.get('max_rate_is_lower_bound') else ''}{fmt_rate(max_rate)}"
    )
    lines = [
        "| measurement | result |",
        "|---|---:|",
        f"| Postgres transaction of 2 inserts, sequential | {_f(pg['sequential']['per_s'])} tx/s |",
        f"| Postgres transaction of 2 inserts, 16 concurrent | {_f(pg['concurrent_16']['per_s'])} tx/s |",
        f"| Kafka produce, batched, acks=all | {_f(kafka['produce_batched']['per_s'])} msg/s |",
        f"| Kafka produce, awaited one by one, acks=all | {_f(kafka['produce_awaited']['per_s'])} msg/s |",
        f"| Kafka consume | {_f(kafka['consume']['per_s'])} msg/s |",
        f"| raw 5-hop chain, max sustained rate (all chains, p99 < 1 s) | {max_text} chains/s |",
        f"| raw 5-hop chain at {fmt_rate(chain['reference_rate'])}/s, p50 / p99 | "
        f"{_f(chain.get('p50_ms_at_reference_rate'))} / {_f(chain.get('p99_ms_at_reference_rate'))} ms |",
    ]
    if chain.get("steps"):
        lines += ["", "Raw chain ramp (ms, p50 / p95 / p99 / p99.9):", ""]
        lines += ["| rate /s | chains | errors | latency ms | holds |", "|---:|---:|---:|---|:-:|"]
        for s in chain["steps"]:
            lines.append(
                f"| {fmt_rate(s['rate'])} | {s['completed']}/{s['orders']} | {s['errors']} "
                f"| {_pcts(s['chain_ms'])} | {'yes' if s['pass'] else 'no'} |"
            )
    return lines


def _s(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} s"


def overload_lines(o: dict[str, Any] | None) -> list[str]:
    if not o:
        return ["(no overload phase in this run)"]
    base = o.get("base_chain_ms") or {}
    drained = (
        f"yes, {_s(o['drained_s'])}"
        if o.get("drained")
        else f"no (last chain end {_s(o.get('last_chain_end_s'))})"
    )
    knee = "the knee" if o.get("knee_held") else "the lowest rate tried (none held)"
    lines = [
        f"{o['factor']:g} x {knee} ({fmt_rate(o['knee_rate'])}/s) for {o['seconds']:g} s, then probe "
        f"orders at {fmt_rate(o['probe_rate'])}/s for {o['probe_seconds']:.0f} s. "
        "*Drained*: every overload order's chain end arrived, seconds after the overload's last send. "
        "*Back at base*: the start of the first "
        f"{o['recovery_window_s']:g} s window (by send time) from which on every window's "
        f"{o['recovery_window_percentile']} of the probes' chain latency is at or below the base p99 "
        f"(the knee step's), if that lasted {o.get('recovery_hold_s', 0):g} s before the probes ended; "
        "*strict*: from the first probe after which every probe is.",
        "",
        "| overload /s | orders | chains done | errors | drained | base p50 / p99 ms | back at base | strict "
        f"| probes done | within {RECOVERY_LIMIT_S:g} s |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|:-:|",
        f"| {fmt_rate(o['rate'])} | {o['orders']} | {o['completed']} | {o['errors']} | {drained} "
        f"| {_f(base.get('p50'))} / {_f(base.get('p99'))} | {_s(o.get('recovery_s'))} "
        f"| {_s(o.get('recovery_s_strict'))} | {o['probes_completed']}/{o['probes']} "
        f"| {'yes' if o.get('recovered_within_limit') else 'no'} |",
    ]
    return lines


def overload_summary(o: dict[str, Any] | None) -> str | None:
    if not o:
        return None
    base = o.get("base_chain_ms") or {}
    drained = f"drained in {_s(o['drained_s'])}" if o.get("drained") else "NOT drained"
    return (
        f"overload: {fmt_rate(o['rate'])}/s for {o['seconds']:g} s ({o['factor']:g} x "
        f"{fmt_rate(o['knee_rate'])}/s), {o['completed']}/{o['orders']} chains, {o['errors']} errors, "
        f"{drained}; base p99 {_f(base.get('p99'))} ms; back at base after {_s(o.get('recovery_s'))} "
        f"(strict {_s(o.get('recovery_s_strict'))}); within {RECOVERY_LIMIT_S:g} s: "
        f"{'yes' if o.get('recovered_within_limit') else 'no'}"
    )


def knee_sentence(result: dict[str, Any]) -> str:
    platform = result.get("platform") or {}
    knee = platform.get("knee_rate")
    raw_max = ((result.get("raw") or {}).get("chain") or {}).get("max_rate")
    frac = result.get("knee_fraction_of_raw_chain")
    if not platform:
        return "Platform not measured in this run."
    knee_low = bool(platform.get("knee_is_lower_bound"))
    raw_low = bool(result.get("raw_chain_max_is_lower_bound"))
    if knee is None:
        knee_text = "below the lowest rate tried"
    else:
        knee_text = f"{'≥ ' if knee_low else ''}{fmt_rate(knee)} orders/s"
    text = f"**Knee: {knee_text}**"
    if frac is not None and raw_max:
        # a raw maximum that is only a lower bound makes the fraction an upper bound, and vice versa
        bound = "≈ " if knee_low == raw_low and (knee_low or raw_low) else ""
        bound = bound or ("≤ " if raw_low else "≥ " if knee_low else "")
        text += (
            f" = **{bound}{frac * 100:.1f} %** of the raw chain's maximum "
            f"({'≥ ' if raw_low else ''}{fmt_rate(raw_max)} chains/s)"
        )
    return text + "."


def section_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    st = result["settings"]
    platform = result.get("platform") or {}
    steps = platform.get("steps") or []
    lines = [
        f"## {result['label']} — {result['started_at'][:10]}",
        "",
    ]
    if result.get("note"):
        lines += [result["note"], ""]
    lines += [
        f"Run {result['started_at']} ({_f(result['duration_s'])} s), commit `{result.get('git') or '?'}`. "
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']:.1f} GiB RAM, Python "
        f"{m['python']}, {m['os']}. Postgres {st['postgres_kind']} "
        f"(fsync {'on' if st['durable'] else 'off'}), "
        f"broker {st['kafka_kind']} (fetch_max_wait_ms {st['fetch_max_wait_ms']}"
        + (f", fetch_min_bytes {st['fetch_min_bytes']}" if st.get("fetch_min_bytes") else "")
        + "). "
        f"Load average (1 min) at start {_load(m, 'load_average_at_start')}, at end "
        f"{_load(m, 'load_average_at_end')}: the machine is shared, other work skews the figures.",
        "",
        f"Ramp: {', '.join(fmt_rate(r) for r in st['rates'])} orders/s, {st['seconds']:g} s each, drain "
        f"{st['drain']:g} s, at most {st['max_inflight']} requests in flight; orders spread over "
        f"{st.get('combos', '?')} (centre, product) pairs.",
        "",
        knee_sentence(result),
        "",
        "### Platform, per rate (ms, p50 / p95 / p99 / p99.9)",
        "",
        *platform_table(steps),
        "",
        "### Per-hop lag from the events' own `time` (ms, p50 / p95 / p99 / p99.9)",
        "",
        *hop_table(steps),
        "",
        "### CPU ms per order per process (user + system), cores busy, spans per order",
        "",
        'The first row is the background with no orders, in cores; "net of idle" subtracts it.',
        "",
        *cpu_table(steps, platform.get("idle_cpu_cores")),
        "",
        "### Overload and recovery",
        "",
        *overload_lines(platform.get("overload")),
        "",
        "### Raw limits of the same Postgres and broker",
        "",
        *raw_lines(result.get("raw")),
        "",
    ]
    return "\n".join(lines)


HEADER = """# Benchmarks

`make bench` (`python -m v2v_harness.bench`) starts its own embedded Postgres, Tansu broker and the five
services through the harness (a fresh database and topic namespace; `V2V_DATABASE_URL` /
`V2V_KAFKA_BOOTSTRAP_SERVERS` are used when set) with a token issuer of its own and the per-client rate
limit off (`V2V_RATE_LIMIT_PER_S=0`), raises every site's daily capacity (as the registry admin) so that
no order waits for a slot, subscribes every treatment centre to an in-process webhook receiver (each
centre with its own token; the receiver checks each centre's first webhook against the signing secret
the platform returned), and then:

1. measures the raw limits of that Postgres and broker: transactions of two inserts (sequential and 16
   concurrent), Kafka produce (batched and awaited one by one, acks=all) and consume, and a raw 5-hop
   chain on asyncpg + aiokafka (per hop: consume → one transaction of inbox + state + outbox insert →
   produce acks=all), whose maximum sustained rate comes from an open-model ramp;
2. posts orders at constant arrival rates, each by its centre with its bearer token and an
   `Idempotency-Key` of its own (open model: sends leave on schedule, never waiting for
   answers; a send beyond the in-flight bound counts as an error) and records, per rate, the intake
   latency of `POST /v1/orders`, order → first webhook, order → chain end (`logistics.shipment_planned.v1`
   webhook), the lag of each hop from the CloudEvents' own `time`, CPU seconds per order per process
   (psutil, the harness' child processes), and span lines written per order;
3. finds the **knee**: the highest rate at which every order's chain-end webhook arrives (within the
   drain time) with no error and a chain p99 under 1 s. A rate that fails ends the ramp; then two
   bisection steps (`--refine`) between the highest rate that held and the lowest that did not narrow
   the knee down;
4. overloads it (unless `--skip-overload`): twice the knee (or the lowest rate tried, if none held) for
   `--overload-seconds` (30), then probe orders at the knee rate for up to `--recovery-seconds` (90; they
   stop early once the backlog has drained and 20 s of probes were at base), and reports whether every
   overload order's chain ended and when the last one did (the backlog drained), and when the probes'
   chain latency was back at its base (the knee step's chain p99): the start of the first 2 s window from
   which on every window's p90 is at or below it, if that lasted 20 s before the probes ended (and,
   strict, from the first probe after which every probe is), against the 60 s of issue 12; the
   per-window probe p50/p99 are in the JSON.

Reproduce: `make bench` (a few minutes on 2 cores), or with options
`make bench BENCH_ARGS="--rates 10,25,50 --seconds 10 --label after"`. Options: `--rates`, `--seconds`,
`--drain`, `--settle`, `--max-inflight`, `--keep-going`, `--refine`, `--skip-overload`,
`--overload-seconds`, `--recovery-seconds`, `--raw-rates`, `--raw-step-seconds`,
`--raw-seconds`, `--skip-raw`, `--skip-platform`, `--durable`, `--label`, `--note`, `--out`, `--docs`,
`--no-docs`, `--keep-state`; `--smoke` is a tiny run that proves the path (it never writes this file).
Each run writes `.v2v/bench/bench-<timestamp>.json` and `latest.json`, and the plots
`bench-<timestamp>-latency.png` (latency percentiles vs rate; with the overload, the probes' latency
after it) and `bench-<timestamp>-cpu.png` (CPU per order per process); this file keeps one section per
`--label`, replaced when the same label runs again.

Caveats: everything shares one machine (the generator and receiver too, shown as `bench`); "spans per
order" counts every span line the services wrote during the rate step and its settle time; CPU of a
Postgres backend that ended during a step is not counted.
"""


def update_docs(path: Path, result: dict[str, Any]) -> Path:
    """Write this run's section into `path`: in place of the section with the same label, else at the end.
    Everything else in the file (other runs, hand-written notes between sections) is kept as it is."""
    label = result["label"]
    body = section_markdown(result).rstrip()
    block = f"<!-- bench:section:{label} -->\n{body}\n<!-- /bench:section:{label} -->\n"
    text = path.read_text() if path.exists() else HEADER
    for m in SECTION.finditer(text):
        if m["label"] == label:
            text = text[: m.start()] + block + text[m.end() :]
            break
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def console_summary(result: dict[str, Any]) -> str:
    steps = (result.get("platform") or {}).get("steps") or []
    lines = [f"vein2vein bench ({result['label']}), {result['started_at']}"]
    if steps:
        lines.append(
            f"{'rate/s':>7} {'orders':>7} {'chains':>7} {'err':>5} {'intake p99':>11} {'chain p50':>10} "
            f"{'chain p99':>10} {'chain p99.9':>12} {'cpu ms/ord':>11} {'spans/ord':>10}  holds"
        )
        for s in steps:
            c = s["chain_ms"]
            lines.append(
                f"{fmt_rate(s['rate']):>7} {s['orders']:>7} {s['completed']:>7} {s['errors']:>5} "
                f"{_f(s['intake_ms']['p99']):>11} {_f(c['p50']):>10} {_f(c['p99']):>10} {_f(c['p99_9']):>12} "
                f"{_f(s['cpu_ms_per_order_total'], 1):>11} {_f(s.get('spans_per_order'), 1):>10}  "
                f"{'yes' if s['pass'] else 'no'}"
            )
    raw = result.get("raw")
    if raw:
        ch = raw["chain"]
        lines.append(
            f"raw: pg {_f(raw['postgres']['sequential']['per_s'])} tx/s sequential, "
            f"{_f(raw['postgres']['concurrent_16']['per_s'])} tx/s at 16; kafka produce "
            f"{_f(raw['kafka']['produce_batched']['per_s'])} msg/s batched, "
            f"{_f(raw['kafka']['produce_awaited']['per_s'])} msg/s awaited; consume "
            f"{_f(raw['kafka']['consume']['per_s'])} msg/s; chain max "
            f"{'-' if ch['max_rate'] is None else fmt_rate(ch['max_rate'])}/s, p99 at "
            f"{fmt_rate(ch['reference_rate'])}/s {_f(ch['p99_ms_at_reference_rate'])} ms"
        )
    summary = overload_summary((result.get("platform") or {}).get("overload"))
    if summary:
        lines.append(summary)
    lines.append(knee_sentence(result).replace("**", ""))
    return "\n".join(lines)
