"""pytest fixtures: real infrastructure for integration and end-to-end tests, started by the harness.

Never skips: when V2V_DATABASE_URL / V2V_KAFKA_BOOTSTRAP_SERVERS are not set, it starts embedded
Postgres and Tansu (or containers, with V2V_TESTCONTAINERS=1 where Docker answers).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# `make test-unit` is the quick loop: property tests without a count of their own try fewer examples there
# (`--hypothesis-profile=quick`); `make test` runs them at Hypothesis' default.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("quick", max_examples=25, deadline=None)
except ImportError:  # the harness without the test tools installed
    pass

# The infrastructure modules are imported by the fixtures that need them, so that a unit-test run
# (`make test-unit`) does not pay for importing the broker, database and HTTP clients it never uses.
if TYPE_CHECKING:
    from v2v_harness.e2e import Parties
    from v2v_harness.identity import Credentials
    from v2v_harness.infra import Infrastructure
    from v2v_harness.issuer import IssuerProcess
    from v2v_harness.platform import Platform
    from v2v_harness.receiver import WebhookReceiver


@dataclass
class TestDatabase:
    name: str
    admin_url: str
    urls: dict[str, str]  # service name -> its runtime role's URL (what the service runs with)
    owner_urls: dict[str, str]  # service name -> its schema owner's URL (migrations, test tables)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="v2v-test-"))
    yield path
    if os.environ.get("V2V_KEEP_TEST_STATE") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def infra(state_dir: Path) -> Iterator[Infrastructure]:
    from v2v_harness.infra import start_infrastructure

    infrastructure = start_infrastructure(state_dir, durable=False, allow_containers=True)
    print(f"\nv2v test infrastructure: {infrastructure.describe()}")
    yield infrastructure
    infrastructure.close()


@pytest.fixture
async def test_db(infra: Infrastructure) -> AsyncIterator[TestDatabase]:
    """A fresh database with the five schemas and roles, dropped afterwards."""
    from v2v_harness.provision import drop_database, provision

    name = unique("t_")
    urls = await provision(infra.admin_url, name)
    yield TestDatabase(name, infra.admin_url, urls, urls.owner_urls)
    await drop_database(infra.admin_url, name)


_ISSUERS: dict[Path, IssuerProcess] = {}


def _identity(state_dir: Path) -> IssuerProcess:
    """The test session's authorization server and demo clients (one per state folder, started once)."""
    from v2v_harness.identity import start_identity

    if state_dir not in _ISSUERS:
        _ISSUERS[state_dir] = start_identity(state_dir / "identity")
    return _ISSUERS[state_dir]


@pytest.fixture(scope="session")
def issuer(state_dir: Path) -> Iterator[IssuerProcess]:
    """The local OAuth authorization server the test platforms trust (started on first use)."""
    process = _identity(state_dir)
    yield process
    process.stop()
    _ISSUERS.pop(state_dir, None)


@pytest.fixture(scope="session")
def credentials(issuer: IssuerProcess, state_dir: Path) -> Credentials:
    """Tokens of the demo clients by the real client-credentials exchange:
    `credentials.client("centre", "TC-DE-BE-001")` is an httpx client acting as that centre."""
    from v2v_harness.identity import Credentials

    return Credentials(issuer.url, state_dir / "identity")


@pytest.fixture
async def parties(credentials: Credentials) -> AsyncIterator[Parties]:
    """httpx clients acting as a centre, a carrier, a site's MES, QA, admin or ops (see `Parties`)."""
    from v2v_harness.e2e import Parties

    found = Parties(credentials)
    yield found
    await found.aclose()


def _start_platform(
    infra: Infrastructure,
    state_dir: Path,
    extra_env: dict[str, dict[str, str]] | None = None,
) -> Platform:
    from v2v_harness.platform import Platform
    from v2v_harness.provision import provision

    name = unique("e2e_")
    urls = asyncio.run(provision(infra.admin_url, name))
    run_dir = state_dir / name
    run_dir.mkdir(parents=True)
    platform = Platform(infra, name, namespace=name, state_dir=run_dir, issuer=_identity(state_dir).url)
    try:
        platform.start(urls, fixed_ports=False, extra_env=extra_env, timeout=120)
    except BaseException:
        platform.stop()
        raise
    return platform


class SmtpSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps every message it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        from v2v_harness.processes import free_port

        self.messages: list[Any] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                from email import message_from_bytes, policy

                msg = message_from_bytes(envelope.content, policy=policy.default)
                sink.messages.append((list(envelope.rcpt_tos), msg))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture(scope="session")
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def platform(
    infra: Infrastructure, state_dir: Path, smtp_sink: SmtpSink, issuer: IssuerProcess
) -> Iterator[Platform]:
    """The five services as separate processes on their own database and topic namespace."""
    fast_export = {"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
    env = {name: dict(fast_export) for name in ("order", "scheduling", "site", "logistics", "notification")}
    env["notification"].update(
        {
            "V2V_WEBHOOK_BACKOFF_BASE_S": "0.2",
            "V2V_WEBHOOK_MAX_ATTEMPTS": "4",
            "V2V_SMTP_HOST": "127.0.0.1",
            "V2V_SMTP_PORT": str(smtp_sink.port),
        }
    )
    p = _start_platform(infra, state_dir, env)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    from v2v_harness.receiver import WebhookReceiver

    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()
