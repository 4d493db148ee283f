"""The five services as separate processes, wired to one infrastructure."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import httpx

from v2v_harness.catalog import SERVICES, ServiceSpec
from v2v_harness.infra import Infrastructure
from v2v_harness.processes import free_port, port_in_use, spawn, stop


@dataclass
class RunningService:
    spec: ServiceSpec
    port: int
    database_url: str
    proc: Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    replica: int = 1  # 1 for the first process of the service, 2.. for the others

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        """`order` for the first replica, `order-2` for the second, ..."""
        return self.spec.name if self.replica == 1 else f"{self.spec.name}-{self.replica}"


def replica_counts(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """How many processes of each service to run: `V2V_REPLICAS` (all services, default 1), overridden per
    service by `V2V_REPLICAS_<SERVICE>` (e.g. `V2V_REPLICAS_SCHEDULING=3`)."""
    env = os.environ if env is None else env

    def count(var: str, default: int) -> int:
        raw = (env.get(var) or "").strip()
        if not raw:
            return default
        value = int(raw)
        if value < 1:
            raise ValueError(f"{var} must be at least 1, not {value}")
        return value

    every = count("V2V_REPLICAS", 1)
    return {spec.name: count(f"V2V_REPLICAS_{spec.name.upper()}", every) for spec in SERVICES}


@dataclass
class Platform:
    infra: Infrastructure
    database: str
    namespace: str
    state_dir: Path
    issuer: str | None = None  # the OAuth issuer the services trust (V2V_AUTH_ISSUER)
    # the first replica of each service (what `url` answers); every replica, the first included, is in
    # `replicas[name]`
    services: dict[str, RunningService] = field(default_factory=dict)
    replicas: dict[str, list[RunningService]] = field(default_factory=dict)

    def url(self, name: str) -> str:
        """The first replica's URL (with fixed ports under `make run`: the documented port)."""
        return self.services[name].url

    def urls(self, name: str) -> list[str]:
        """Every replica's URL, the first first."""
        return [svc.url for svc in self.replicas.get(name) or [self.services[name]]]

    def processes(self) -> list[RunningService]:
        """Every service process, replicas included, in start order."""
        found: list[RunningService] = []
        for name, first in self.services.items():
            found.extend(self.replicas.get(name) or [first])
        return found

    def service_env(
        self,
        spec: ServiceSpec,
        port: int,
        database_url: str,
        extra: dict[str, str],
        migration_database_url: str | None = None,
    ) -> dict[str, str]:
        """The service's environment: `database_url` is its runtime role's (`provision(...)[name]`),
        `migration_database_url` its schema owner's (`provision(...).owner_urls[name]`), which runs the
        migrations; without it the runtime role would have to, and may not."""
        env = dict(os.environ)
        env.pop("V2V_MIGRATION_DATABASE_URL", None)  # never another database's owner from the shell
        if migration_database_url is not None:
            env["V2V_MIGRATION_DATABASE_URL"] = migration_database_url
        env.update(
            {
                "V2V_SERVICE_NAME": spec.name,
                "V2V_DATABASE_URL": database_url,
                "V2V_KAFKA_BOOTSTRAP_SERVERS": self.infra.bootstrap_servers,
                "V2V_KAFKA_ENABLE_IDEMPOTENCE": "true" if self.infra.kafka_idempotence else "false",
                "V2V_KAFKA_FETCH_MAX_WAIT_MS": str(self.infra.kafka_fetch_max_wait_ms),
                "V2V_KAFKA_FETCH_MIN_BYTES": str(self.infra.kafka_fetch_min_bytes),
                "V2V_KAFKA_SESSION_TIMEOUT_MS": str(self.infra.kafka_session_timeout_ms),
                "V2V_KAFKA_HEARTBEAT_INTERVAL_MS": str(max(250, self.infra.kafka_session_timeout_ms // 4)),
                "V2V_TOPIC_NAMESPACE": self.namespace,
                "V2V_HTTP_HOST": "127.0.0.1",
                "V2V_HTTP_PORT": str(port),
                "V2V_STATE_DIR": str(self.state_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.issuer:
            env["V2V_AUTH_ISSUER"] = self.issuer
        # the audit trail's signed checkpoints, outside the database (v2v_audit; make audit-verify reads them)
        env.setdefault("V2V_AUDIT_CHECKPOINT_DIR", str(self.state_dir / "audit"))
        if spec.name == "notification":
            env.setdefault("V2V_WEBHOOK_ALLOW_LOOPBACK", "true")  # development: http://127.0.0.1 receivers
            env.setdefault("V2V_NOTIFICATION_SECRETS_KEY", secrets_key(self.state_dir))
        env.update(extra)
        return env

    def start(
        self,
        service_urls: dict[str, str],
        *,
        fixed_ports: bool,
        extra_env: dict[str, dict[str, str]] | None = None,
        only: tuple[str, ...] | None = None,
        timeout: float = 60.0,
        replicas: Mapping[str, int] | None = None,
    ) -> None:
        """Start each service (`only`: some of them); `replicas`: processes per service (default from
        `V2V_REPLICAS` / `V2V_REPLICAS_<SERVICE>`, see `replica_counts`). The first replica of every
        service starts first and is waited for (it runs the migrations); the others then start on the same
        database and topics, each on a free port, logging to `<service>-<n>.log`."""
        extra_env = extra_env or {}
        counts = dict(replica_counts() if replicas is None else replicas)
        for spec in SERVICES:
            if only is not None and spec.name not in only:
                continue
            port = spec.port if fixed_ports else free_port()
            if fixed_ports and port_in_use(port):
                raise RuntimeError(f"port {port} for the {spec.name} service is taken")
            svc = self._spawn(spec, port, service_urls, extra_env, replica=1)
            self.services[spec.name] = svc
            self.replicas[spec.name] = [svc]
        self.wait_ready(timeout)
        more = False
        for spec in SERVICES:
            if spec.name not in self.services or (only is not None and spec.name not in only):
                continue
            for replica in range(2, counts.get(spec.name, 1) + 1):
                svc = self._spawn(spec, free_port(), service_urls, extra_env, replica=replica)
                self.replicas[spec.name].append(svc)
                more = True
        if more:
            self.wait_ready(timeout)

    def _spawn(
        self,
        spec: ServiceSpec,
        port: int,
        service_urls: dict[str, str],
        extra_env: dict[str, dict[str, str]],
        *,
        replica: int,
    ) -> RunningService:
        suffix = "" if replica == 1 else f"-{replica}"
        log_path = self.state_dir / "logs" / f"{spec.name}{suffix}.log"
        owner_urls = getattr(service_urls, "owner_urls", {})  # provision(...): runtime + owner URLs
        env = self.service_env(
            spec, port, service_urls[spec.name], extra_env.get(spec.name, {}), owner_urls.get(spec.name)
        )
        proc = spawn([sys.executable, "-m", spec.package], env=env, log_path=log_path)
        return RunningService(spec, port, service_urls[spec.name], proc, log_path, env, replica)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {svc.label: svc for svc in self.processes()}
        with httpx.Client(timeout=2.0) as client:
            while pending and time.monotonic() < deadline:
                for name, svc in list(pending.items()):
                    if svc.proc.poll() is not None:
                        raise RuntimeError(
                            f"{name} service exited with {svc.proc.returncode}; last log lines:\n"
                            + tail(svc.log_path)
                        )
                    try:
                        if client.get(svc.url + "/ready").status_code == 200:
                            del pending[name]
                    except httpx.HTTPError:
                        pass
                if pending:
                    time.sleep(0.2)
        if pending:
            raise TimeoutError(
                "not ready in time: "
                + ", ".join(pending)
                + "\n"
                + "\n".join(tail(s.log_path) for s in pending.values())
            )

    def replica(self, name: str, replica: int = 1) -> RunningService:
        return (self.replicas.get(name) or [self.services[name]])[replica - 1]

    def restart_service(self, name: str, replica: int = 1) -> None:
        """Start a service process again as it was started (same port, database and environment)."""
        svc = self.replica(name, replica)
        if svc.proc.poll() is None:
            stop(svc.proc)
        svc.proc = spawn([sys.executable, "-m", svc.spec.package], env=svc.env, log_path=svc.log_path)

    def stop_service(self, name: str) -> None:
        """Stop every process of the service."""
        if name in self.services:
            for svc in self.replicas.get(name) or [self.services[name]]:
                stop(svc.proc)

    def stop(self) -> None:
        for svc in reversed(self.processes()):
            stop(svc.proc)


def secrets_key(state_dir: Path) -> str:
    """The key that seals webhook signing secrets at rest: made once per state folder (0600) and kept, so
    subscriptions survive a restart of `make run`."""
    import base64

    path = state_dir / "notification-secrets.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(os.urandom(32)).decode())
    return path.read_text().strip()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
