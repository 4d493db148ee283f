"""The benchmark's settings: full defaults (`make bench`) and the smoke run (`--smoke`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RATES = [2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 150.0, 200.0]
DEFAULT_RAW_RATES = [50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 800.0]
SMOKE_RATES = [2.0, 4.0]
SMOKE_RAW_RATES = [25.0, 50.0]


@dataclass
class BenchConfig:
    # the platform ramp
    rates: list[float] = field(default_factory=lambda: list(DEFAULT_RATES))
    seconds: float = 15.0  # per rate
    drain: float = 30.0  # after a rate's last send, how long to wait for its chain ends
    settle: float = 6.0  # quiet time after each rate: the services' span batches (5 s) reach their files
    max_inflight: int = 256  # requests in flight at once; a send beyond it is counted as an error
    request_timeout: float = 30.0
    keep_going: bool = False  # run every rate, also after one fails
    refine: int = 2  # bisection steps between the highest rate that held and the lowest that did not
    warmup_per_combo: int = 1  # orders per (centre, product) before the ramp, not measured
    idle_seconds: float = 5.0  # CPU of each process with no load, before the ramp
    # the overload after the ramp (issue 12): overload_factor x the knee for overload_seconds, then probe
    # orders at the knee rate for up to recovery_seconds while the backlog drains
    skip_overload: bool = False
    overload_factor: float = 2.0
    overload_seconds: float = 30.0
    recovery_seconds: float = 90.0
    recovery_window_s: float = 2.0  # probe latency windows (see stats.recovery)
    recovery_hold_s: float = 20.0  # probes stop early after the backlog drained and this long at base
    # the raw limits on the same Postgres and broker
    raw_seconds: float = 5.0  # per micro measurement
    raw_rates: list[float] = field(default_factory=lambda: list(DEFAULT_RAW_RATES))
    raw_step_seconds: float = 5.0
    raw_drain: float = 10.0
    raw_reference_rate: float = 50.0  # the raw chain's p99 is reported at this rate
    skip_raw: bool = False
    skip_platform: bool = False
    # where things go
    out_dir: Path = field(default_factory=lambda: Path(".v2v/bench"))
    docs_path: Path | None = field(default_factory=lambda: Path("docs/BENCHMARKS.md"))
    label: str = "latest"
    note: str = ""  # printed under the section heading
    smoke: bool = False
    durable: bool = False  # fsync on for the embedded Postgres (off by default, as in the tests)
    keep_state: bool = False  # keep the state folder (logs, spans) of the run
    progress: bool = True  # progress lines on stderr
    service_env: dict[str, str] = field(default_factory=dict)  # extra environment for the five services

    @classmethod
    def smoke_run(cls, out_dir: Path) -> BenchConfig:
        """A tiny run that proves the whole path: two low rates, raw measurements of about a second."""
        return cls(
            rates=list(SMOKE_RATES),
            seconds=2.5,
            drain=20.0,
            settle=0.5,
            warmup_per_combo=0,
            idle_seconds=1.0,
            refine=0,
            overload_seconds=3.0,
            recovery_seconds=15.0,
            recovery_window_s=1.0,
            recovery_hold_s=3.0,
            raw_seconds=1.0,
            raw_rates=list(SMOKE_RAW_RATES),
            raw_step_seconds=1.0,
            raw_drain=10.0,
            out_dir=out_dir,
            docs_path=None,
            label="smoke",
            smoke=True,
            keep_going=True,
            # spans reach their files within 0.2 s instead of 5 s, so a short settle counts them
            service_env={"OTEL_BSP_SCHEDULE_DELAY": "200"},
        )
