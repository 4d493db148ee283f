"""The short chaos run of `make test`: `make chaos` in small (v2v_harness.chaos, docs/RELIABILITY.md).

Two replicas of every service on their own durable Postgres and broker, eight orders driven through the
public API by the simulator's parties, and a seeded nemesis that injects each kind of fault once (kill -9
and SIGSTOP of service processes, broker restart, Postgres crash-restart, terminated backends, a
read-only schema) and then by weight for a minute; then every invariant of the checker must hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from v2v_harness.chaos.runner import ChaosConfig, run

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(420)
def test_a_short_seeded_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = ChaosConfig(
        orders=8,
        seconds=60,
        seed=11,
        day_seconds=0.5,
        deadline_s=120,
        state_dir=tmp_path / "chaos",
        every_kind_first=True,
        out=lines.append,
    )
    code = run(cfg)
    output = "\n".join(lines)
    print(output)
    for kind in ("kill", "pause", "broker-restart", "postgres-restart", "terminate-backends", "read-only"):
        assert any(line.startswith("chaos: t=") and f" {kind} " in line for line in lines), (kind, output)
    assert (cfg.state_dir / "history.json").exists() and (cfg.state_dir / "timeline.png").exists()
    assert code == 0, output
