"""`make bench`: an open-model load generator and measurement tool for the platform.

It starts its own Postgres, broker and five services through the harness, measures the raw limits of
that same Postgres and broker (asyncpg transactions, Kafka produce/consume, a raw 5-hop chain on
asyncpg + aiokafka), then posts orders at a series of constant arrival rates and measures intake
latency, order → webhook latency, per-hop lag, CPU per order per process and spans per order. The
knee is the highest rate at which every order's chain-end webhook arrives with a chain p99 under 1 s.

Run it as `python -m v2v_harness.bench` (`--help` for the options, `--smoke` for a tiny run).
"""

from v2v_harness.bench.config import BenchConfig
from v2v_harness.bench.runner import run_bench

__all__ = ["BenchConfig", "run_bench"]
