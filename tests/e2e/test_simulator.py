"""The simulator (the v2v_simulator package in tools/simulator, `make demo`): a small run end to end against
the five service processes behind the edge, each party (the centres, the carriers, the sites' MES, QA,
the registry admin, ops) with its own demo client's token from the test session's issuer.

Its unit tests (command line, clock, plan, report, the Api's retries, the actors against a mocked platform)
live beside it in tools/simulator/tests; pytest puts tools/simulator on the path (`pythonpath`).
"""

from __future__ import annotations

import pytest

from v2v_harness.identity import Credentials
from v2v_harness.platform import Platform
from v2v_simulator import SERVICES, Config, Simulator
from v2v_simulator.rules import TERMINAL_RULE, fresh_planning


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_simulated_orders_all_end_in_a_terminal_state_without_errors(
    platform: Platform, credentials: Credentials
) -> None:
    cfg = Config(
        orders=18,
        exceptions=0.5,
        seed=5,
        urls={name: platform.url(name) for name in SERVICES},
        start_platform=False,
        day_seconds=0.05,
        timeout_s=150,
        stall_s=45,
        poll_s=0.3,
        progress_s=5,
    )
    lines: list[str] = []
    simulator = Simulator(cfg, lines.append, credentials)
    try:
        code = await simulator.run()
    finally:
        await simulator.api.close()
    output = "\n".join(lines)
    print(output)
    assert code == 0, output
    assert simulator.stats.errors == []
    terminal = simulator.summary["terminal"]
    assert sum(terminal.values()) == cfg.orders, output
    assert terminal.get("completed", 0) > 0
    for state, count in terminal.items():
        assert f"  {state:<12}{count:>6}" in output
    assert "exceptions injected" in output.lower() and "Per-site utilisation" in output
    assert "Vein-to-vein days" in output and "errors: none" in output
    # predicted vs simulated per product and per lane, with the p90 prediction error
    assert "Per lane (the centre's market → the site that made the product)" in output
    assert output.count("p90 |error|") >= 2
    # the rules, checked over the run's orders: none broken
    assert "Rules the orders obey (checked over the run; 0 violation(s), 0 expected)" in output
    rules = {check.rule: check for check in simulator.summary["rules"]}
    assert all(check.violations == [] for check in rules.values()), output
    infused = terminal.get("completed", 0)
    assert rules[TERMINAL_RULE].checked == cfg.orders
    assert rules["LD only after release and confirmed delivery (simulated clock)"].checked == infused
    assert rules["infusion inside the window (the platform's record)"].checked == infused
    assert rules["infusion inside the window (simulated clock)"].checked == infused
    fresh = {code for code, p in simulator.products.items() if fresh_planning(p) is not None}
    made = [r for a in simulator.actors for r in a.result.collected_runs if a.plan.combo.product in fresh]
    started = rules["fresh material started within its max hours of collection (simulated clock)"]
    booked = rules["fresh material booked to start within its max hours (the platform's slots)"]
    assert started.checked == len(made) and booked.checked + booked.unchecked == len(made)
    assert len(made) > 0, "the run made no fresh product: the fresh-material rule checked nothing"
    assert any(k.startswith("lymphodepletion before release -> 409") for k in simulator.stats.intended)
    assert "acting as" in output and "parties, each with its own token" in output
    # the run's patients are its own: every order placed carries the run id in its patient reference
    placed = [a.plan.patient_ref for a in simulator.actors if a.order_id]
    assert len(placed) == cfg.orders and all(ref.startswith(f"SIM-{cfg.run_id}-") for ref in placed)
