"""Every service reads the same V2V_* environment variables (see README: Configuration)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="V2V_", extra="ignore")

    service_name: str = ""
    database_url: str = "postgresql://localhost:55432/v2v"
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_enable_idempotence: bool = True
    kafka_fetch_max_wait_ms: int = 100
    kafka_max_poll_interval_ms: int = 300_000
    kafka_session_timeout_ms: int = 10_000
    kafka_heartbeat_interval_ms: int = 3_000
    kafka_partitions: int = 6
    kafka_replication_factor: int = 1
    topic_namespace: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    state_dir: str | None = None
    log_level: str = "INFO"
    db_pool_max: int = 10
    relay_poll_interval_s: float = 2.0
    outbox_retention_days: int = 7
    consumer_max_attempts: int = 3
