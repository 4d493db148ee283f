"""`python -m v2v_harness.bench` (what `make bench` runs): see the package docstring and --help."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from v2v_harness.bench.config import BenchConfig
from v2v_harness.bench.runner import run_bench
from v2v_harness.bench.stats import parse_rates


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(
        prog="python -m v2v_harness.bench",
        description="Open-model load generator and measurement tool for the vein2vein platform.",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run (2 and 4 orders/s, a 3 s overload, raw limits ~1 s each)",
    )
    p.add_argument(
        "--rates", type=parse_rates, help="orders per second, comma-separated (2,5,10,25,50,100,150,200)"
    )
    p.add_argument("--seconds", type=float, help="duration of each rate (15)")
    p.add_argument(
        "--drain", type=float, help="seconds to wait for a rate's chain ends after its last send (30)"
    )
    p.add_argument(
        "--settle", type=float, help="quiet seconds after each rate, for span files to catch up (6)"
    )
    p.add_argument("--max-inflight", type=int, help="requests in flight at most; beyond is an error (256)")
    p.add_argument(
        "--keep-going", action="store_true", default=None, help="run every rate even after one fails"
    )
    p.add_argument("--refine", type=int, help="bisection steps to narrow the knee after a rate fails (2)")
    p.add_argument(
        "--skip-overload", action="store_true", default=None, help="no overload phase after the ramp"
    )
    p.add_argument(
        "--overload-seconds", type=float, help="2x the knee for this long after the ramp (30; smoke 3)"
    )
    p.add_argument(
        "--recovery-seconds",
        type=float,
        help="probe orders at the knee rate after the overload for up to this long (90; smoke 15)",
    )
    p.add_argument("--raw-rates", type=parse_rates, help="raw chain ramp, chains per second")
    p.add_argument("--raw-step-seconds", type=float, help="duration of each raw chain rate (5)")
    p.add_argument("--raw-seconds", type=float, help="duration of each raw micro measurement (5)")
    p.add_argument("--raw-drain", type=float, help="seconds to wait for a raw rate's chains (10)")
    p.add_argument("--skip-raw", action="store_true", default=None, help="do not measure the raw limits")
    p.add_argument("--skip-platform", action="store_true", default=None, help="only the raw limits")
    p.add_argument("--durable", action="store_true", default=None, help="embedded Postgres with fsync on")
    p.add_argument("--label", help="name of this run's section in the benchmarks document (latest)")
    p.add_argument("--note", help="a sentence printed under the section's heading")
    p.add_argument("--out", type=Path, help="output folder (.v2v/bench; a temporary one with --smoke)")
    p.add_argument("--docs", type=Path, help="benchmarks document to update (docs/BENCHMARKS.md)")
    p.add_argument("--no-docs", action="store_true", help="do not touch the benchmarks document")
    p.add_argument("--keep-state", action="store_true", default=None, help="keep logs and spans of the run")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)

    if args.smoke:
        out = args.out or Path(tempfile.mkdtemp(prefix="v2v-bench-smoke-"))
        cfg = BenchConfig.smoke_run(out)
    else:
        cfg = BenchConfig()
        if args.out is not None:
            cfg.out_dir = args.out
        if args.docs is not None:
            cfg.docs_path = args.docs
        if args.no_docs:
            cfg.docs_path = None
    overrides = {
        "rates": args.rates,
        "seconds": args.seconds,
        "drain": args.drain,
        "settle": args.settle,
        "max_inflight": args.max_inflight,
        "keep_going": args.keep_going,
        "refine": args.refine,
        "skip_overload": args.skip_overload,
        "overload_seconds": args.overload_seconds,
        "recovery_seconds": args.recovery_seconds,
        "raw_rates": args.raw_rates,
        "raw_step_seconds": args.raw_step_seconds,
        "raw_seconds": args.raw_seconds,
        "raw_drain": args.raw_drain,
        "skip_raw": args.skip_raw,
        "skip_platform": args.skip_platform,
        "durable": args.durable,
        "label": args.label,
        "note": args.note,
        "keep_state": args.keep_state,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    cfg.progress = not args.quiet
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        asyncio.run(run_bench(cfg))
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"bench: failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
