"""The whole run: infrastructure, raw limits, platform ramp, outputs.

The platform trusts a token issuer of the run's own (the harness' local authorization server with its
demo clients, in the run's state folder) and runs without the per-client rate limit
(`V2V_RATE_LIMIT_PER_S=0`): the bench measures how much the platform takes, not the edge's quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform as pyplatform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from v2v_harness.bench import report
from v2v_harness.bench.config import BenchConfig
from v2v_harness.bench.httpio import WebhookSink
from v2v_harness.bench.load import CentreTokens, PlatformLoad, prepare_network, run_ramp
from v2v_harness.bench.procs import ProcessGroups, SpanCounter
from v2v_harness.bench.raw import KafkaTarget, measure_raw
from v2v_harness.bench.stats import find_knee, fmt_rate
from v2v_harness.e2e import Parties
from v2v_harness.identity import Credentials, start_identity
from v2v_harness.infra import Infrastructure, start_infrastructure
from v2v_harness.platform import Platform, tail
from v2v_harness.provision import drop_database, provision, with_database


def make_progress(enabled: bool) -> Callable[[str], None]:
    start = time.monotonic()

    def progress(message: str) -> None:
        if enabled:
            print(f"bench [{time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return progress


def machine() -> dict[str, Any]:
    model = pyplatform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": psutil.virtual_memory().total / 2**30,
        "python": pyplatform.python_version(),
        "os": pyplatform.platform(terse=True),
        # the machine may be shared: how busy it was when the run started
        "load_average_at_start": list(os.getloadavg()),
    }


def git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" (with uncommitted changes)" if dirty else "")


def _broker_binary() -> str | None:
    try:
        from v2v_harness.kafka import broker_binary

        return broker_binary()
    except Exception:
        return None


async def _run_platform(
    cfg: BenchConfig,
    infra: Infrastructure,
    database: str,
    urls: dict[str, str],
    run_dir: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    dsn = with_database(infra.admin_url, database)
    identity_dir = run_dir / "identity"
    identity = await asyncio.to_thread(start_identity, identity_dir)
    plat = Platform(infra, database, namespace=database, state_dir=run_dir, issuer=identity.url)
    env = {name: {"V2V_RATE_LIMIT_PER_S": "0", **cfg.service_env} for name in urls}
    progress(f"starting the five services (token issuer {identity.url})")
    try:
        await asyncio.to_thread(plat.start, urls, fixed_ports=False, extra_env=env, timeout=120)
    except BaseException:
        await asyncio.to_thread(plat.stop)
        await asyncio.to_thread(identity.stop)
        raise
    sink = await WebhookSink().start()
    credentials = Credentials(identity.url, identity_dir)
    parties = Parties(credentials, timeout=30)
    load: PlatformLoad | None = None
    tokens: CentreTokens | None = None
    try:
        progress(f"services ready; webhook receiver on {sink.url('/hook')}")
        network = await prepare_network(parties, plat.url, sink, dsn, progress)
        tokens = await CentreTokens(credentials, network.centres, progress).start()
        groups = ProcessGroups({n: s.proc.pid for n, s in plat.services.items()}, _broker_binary())
        spans = SpanCounter(run_dir / "telemetry")
        load = PlatformLoad(cfg, plat.url("order"), sink, network, groups, spans, progress, tokens)
        await load.warmup(cfg.warmup_per_combo * len(network.combos))
        idle = await load.measure_idle(cfg.idle_seconds)
        steps = await run_ramp(load, cfg, progress)
        for index, step in enumerate(steps):
            step["run_index"] = index
        steps.sort(key=lambda s: float(s["rate"]))
        knee = find_knee(steps)
        overload: dict[str, Any] | None = None
        if not cfg.skip_overload and steps:
            # the knee, or the lowest rate tried when none held
            base = next((s for s in steps if s["rate"] == knee), steps[0])
            left = await load.quiesce(cfg.drain * 2)
            if left:
                progress(f"before the overload: {left} orders of the ramp still outstanding")
            await asyncio.sleep(cfg.settle)
            progress(
                f"overload: {cfg.overload_factor:g} x {fmt_rate(base['rate'])}/s for "
                f"{cfg.overload_seconds:g} s, then probes at {fmt_rate(base['rate'])}/s for up to "
                f"{cfg.recovery_seconds:g} s"
            )
            overload = await load.overload(float(base["rate"]), base)
            overload["knee_held"] = knee is not None
        dead = [n for n, s in plat.services.items() if s.proc.poll() is not None]
        if dead:
            raise RuntimeError(
                f"service(s) exited during the run: {dead}\n" + tail(plat.services[dead[0]].log_path)
            )
        return {
            "steps": steps,
            "knee_rate": knee,
            # every rate held: the knee is at least the highest rate tried
            "knee_is_lower_bound": bool(steps) and all(s["pass"] for s in steps),
            "idle_cpu_cores": idle,
            "overload": overload,
            "combos": [list(c) for c in network.combos],
            "webhooks": {
                "received": sink.received,
                "duplicates": sink.duplicates,
                "malformed": sink.malformed,
                # the first webhook of each centre's subscription, checked against its secret
                "signatures_verified": len(sink.verified),
                "bad_signatures": sink.bad_signatures,
            },
            "token_renewal_failures": tokens.failures,
            "rss_mb_at_end": groups.rss_mb(),
        }
    finally:
        if load is not None:
            await load.aclose()
        elif tokens is not None:
            await tokens.aclose()
        await parties.aclose()
        await sink.stop()
        await asyncio.to_thread(plat.stop)
        await asyncio.to_thread(identity.stop)


async def run_bench(cfg: BenchConfig, infra: Infrastructure | None = None) -> dict[str, Any]:
    """Run the benchmark; with `infra` given (e.g. the pytest harness' fixture) use it, else start one.
    Returns the result, also written to `cfg.out_dir` (JSON, PNGs) and, unless `cfg.docs_path` is None,
    to the benchmarks document."""
    progress = make_progress(cfg.progress)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    state_dir = Path(tempfile.mkdtemp(prefix="v2v-bench-"))
    own_infra = infra is None
    if infra is None:
        progress(f"starting Postgres and the broker (state {state_dir})")
        infra = await asyncio.to_thread(start_infrastructure, state_dir, durable=cfg.durable)
    return await _run(cfg, infra, own_infra, state_dir, started, t0, progress)


async def _run(
    cfg: BenchConfig,
    infra: Infrastructure,
    own_infra: bool,
    state_dir: Path,
    started: datetime,
    t0: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    ok = False
    machine_at_start = machine()
    progress(infra.describe())
    database = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        urls = await provision(infra.admin_url, database)
        dsn = with_database(infra.admin_url, database)
        raw: dict[str, Any] | None = None
        if not cfg.skip_raw:
            kafka = KafkaTarget(
                infra.bootstrap_servers,
                infra.kafka_idempotence,
                min(infra.kafka_fetch_max_wait_ms, 20),
                infra.kafka_session_timeout_ms,
            )
            raw = await measure_raw(dsn, kafka, database, cfg, progress)
        platform_result: dict[str, Any] | None = None
        if not cfg.skip_platform:
            run_dir = state_dir / database
            run_dir.mkdir(parents=True)
            platform_result = await _run_platform(cfg, infra, database, urls, run_dir, progress)
        finished = datetime.now(UTC)
        knee = (platform_result or {}).get("knee_rate")
        raw_max = ((raw or {}).get("chain") or {}).get("max_rate")
        result: dict[str, Any] = {
            "schema": "v2v-bench/1",
            "label": cfg.label,
            "note": cfg.note,
            "smoke": cfg.smoke,
            "started_at": started.isoformat(timespec="seconds"),
            "finished_at": finished.isoformat(timespec="seconds"),
            "duration_s": time.monotonic() - t0,
            "git": git_commit(),
            "machine": {**machine_at_start, "load_average_at_end": list(os.getloadavg())},
            "settings": {
                "rates": cfg.rates,
                "seconds": cfg.seconds,
                "drain": cfg.drain,
                "settle": cfg.settle,
                "max_inflight": cfg.max_inflight,
                "keep_going": cfg.keep_going,
                "overload": None
                if cfg.skip_overload
                else {
                    "factor": cfg.overload_factor,
                    "seconds": cfg.overload_seconds,
                    "recovery_seconds": cfg.recovery_seconds,
                    "recovery_window_s": cfg.recovery_window_s,
                    "recovery_hold_s": cfg.recovery_hold_s,
                },
                "raw_seconds": cfg.raw_seconds,
                "raw_rates": cfg.raw_rates,
                "raw_step_seconds": cfg.raw_step_seconds,
                "durable": cfg.durable,
                "postgres_kind": infra.postgres_kind,
                "kafka_kind": infra.kafka_kind,
                "fetch_max_wait_ms": infra.kafka_fetch_max_wait_ms,
                "fetch_min_bytes": infra.kafka_fetch_min_bytes,
                "kafka_idempotence": infra.kafka_idempotence,
                "combos": len((platform_result or {}).get("combos") or []),
            },
            "platform": platform_result,
            "raw": raw,
            "knee_rate": knee,
            "raw_chain_max_rate": raw_max,
            "raw_chain_max_is_lower_bound": bool(
                ((raw or {}).get("chain") or {}).get("max_rate_is_lower_bound")
            ),
            "knee_fraction_of_raw_chain": (knee / raw_max) if knee and raw_max else None,
            "outputs": {},
        }
        out_dir = cfg.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        latency_png = report.plot_latency(result, out_dir / f"bench-{stamp}-latency.png")
        cpu_png = report.plot_cpu(result, out_dir / f"bench-{stamp}-cpu.png")
        for src, name in ((latency_png, "latest-latency.png"), (cpu_png, "latest-cpu.png")):
            shutil.copyfile(src, out_dir / name)
        result["outputs"] = {
            "json": str(out_dir / f"bench-{stamp}.json"),
            "latest_json": str(out_dir / "latest.json"),
            "latency_png": str(latency_png),
            "cpu_png": str(cpu_png),
        }
        docs = cfg.docs_path if not cfg.smoke else out_dir / "BENCHMARKS.md"
        if docs is not None:
            result["outputs"]["docs"] = str(report.update_docs(docs, result))
        report.write_json(result, out_dir, stamp)
        print(report.console_summary(result), flush=True)
        for name, path in result["outputs"].items():
            progress(f"wrote {name}: {path}")
        ok = True
        return result
    finally:
        with contextlib.suppress(Exception):
            await drop_database(infra.admin_url, database)
        if own_infra:
            await asyncio.to_thread(infra.close)
        if ok and not cfg.keep_state:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            progress(f"state (logs, spans) kept in {state_dir}")
