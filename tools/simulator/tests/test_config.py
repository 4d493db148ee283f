"""The command line (no I/O)."""

from __future__ import annotations

import re

import pytest

from v2v_simulator.config import DEFAULT_URLS, SERVICES, Config, parse_args


def test_command_line_defaults_are_the_make_run_ports() -> None:
    cfg = parse_args([])
    assert cfg.orders == 200 and cfg.exceptions == 0.2 and cfg.concurrency == 20 and cfg.timeout_s == 600
    assert cfg.urls == {
        "order": "http://127.0.0.1:8001",
        "scheduling": "http://127.0.0.1:8002",
        "site": "http://127.0.0.1:8003",
        "logistics": "http://127.0.0.1:8004",
        "notification": "http://127.0.0.1:8005",
    }
    assert cfg.start_platform


def test_command_line_options() -> None:
    cfg = parse_args(
        [
            "--orders",
            "12",
            "--exceptions",
            "0.5",
            "--seed",
            "9",
            "--base-url-site",
            "http://h:1/",
            "--no-start",
        ]
    )
    assert (cfg.orders, cfg.exceptions, cfg.seed) == (12, 0.5, 9)
    assert cfg.urls["site"] == "http://h:1" and not cfg.start_platform
    with pytest.raises(SystemExit):
        parse_args(["--exceptions", "1.5"])
    with pytest.raises(SystemExit):
        parse_args(["--orders", "0"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--concurrency", "0"],
        ["--day-seconds", "-1"],
        ["--exceptions", "-0.1"],
        ["--run-id", "a b"],
        ["--run-id", "X" * 17],
    ],
)
def test_out_of_range_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_the_rest_of_the_options_reach_the_config() -> None:
    cfg = parse_args(
        [
            *("--concurrency", "3", "--timeout-s", "5", "--day-seconds", "0"),
            *("--stall-s", "7", "--poll-s", "0.1", "--progress-s", "9", "--state-dir", "x/y"),
        ]
    )
    assert (cfg.concurrency, cfg.timeout_s, cfg.day_seconds) == (3, 5.0, 0.0)
    assert (cfg.stall_s, cfg.poll_s, cfg.progress_s, cfg.state_dir) == (7.0, 0.1, 9.0, "x/y")
    assert set(cfg.urls) == set(SERVICES)
    assert cfg.auth_dir is None and re.fullmatch(r"[0-9A-F]{8}", cfg.run_id)  # a fresh run id
    cfg = parse_args(["--auth-dir", ".v2v", "--run-id", "Demo7"])
    assert (cfg.auth_dir, cfg.run_id) == (".v2v", "Demo7")


def test_config_defaults_do_not_share_the_url_map() -> None:
    a, b = Config(), Config()
    a.urls["order"] = "http://elsewhere"
    assert b.urls == DEFAULT_URLS and DEFAULT_URLS["order"] == "http://127.0.0.1:8001"
