"""The broker's fetch settings the harness chose reach every service it starts, and its settings read them."""

from __future__ import annotations

from pathlib import Path

import pytest

from v2v_harness.catalog import SERVICES
from v2v_harness.infra import Infrastructure
from v2v_harness.platform import Platform
from v2v_servicekit.settings import ServiceSettings


def _infra(**fetch: int) -> Infrastructure:
    admin = "postgresql://admin@127.0.0.1:1/postgres"
    return Infrastructure(admin, "127.0.0.1:2", False, 50, "embedded", "embedded tansu", **fetch)


def test_the_fetch_settings_reach_the_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    platform = Platform(_infra(kafka_fetch_min_bytes=8000), "v2v", "ns", tmp_path)
    env = platform.service_env(SERVICES[0], 8101, "postgresql://svc@127.0.0.1:1/v2v", {})
    assert (env["V2V_KAFKA_FETCH_MAX_WAIT_MS"], env["V2V_KAFKA_FETCH_MIN_BYTES"]) == ("50", "8000")
    for name, value in env.items():
        if name.startswith("V2V_"):
            monkeypatch.setenv(name, value)
    settings = ServiceSettings()
    assert (settings.kafka_fetch_max_wait_ms, settings.kafka_fetch_min_bytes) == (50, 8000)


def test_a_fetch_answers_at_once_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _infra().kafka_fetch_min_bytes == 1
    monkeypatch.delenv("V2V_KAFKA_FETCH_MIN_BYTES", raising=False)
    assert ServiceSettings().kafka_fetch_min_bytes == 1
    monkeypatch.setenv("V2V_KAFKA_FETCH_MIN_BYTES", "0")
    with pytest.raises(ValueError, match="kafka_fetch_min_bytes"):
        ServiceSettings()
