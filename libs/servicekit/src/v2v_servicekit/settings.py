"""Every service reads the same V2V_* environment variables (see README: Configuration)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from v2v_messaging import KafkaSettings


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="V2V_", extra="ignore")

    service_name: str = ""
    # the service's runtime role: reads and writes its schema's tables, owns nothing, creates nothing
    database_url: str = "postgresql://localhost:55432/v2v"
    # the schema owner's role, which runs the migrations at start-up; unset: the runtime URL does (a
    # deployment where the service's one role still owns its schema)
    migration_database_url: str | None = None
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_enable_idempotence: bool = True
    kafka_fetch_max_wait_ms: int = 100
    kafka_fetch_min_bytes: int = Field(default=1, ge=1)
    kafka_max_poll_interval_ms: int = 300_000
    kafka_session_timeout_ms: int = 10_000
    kafka_heartbeat_interval_ms: int = 3_000
    kafka_partitions: int = 6
    kafka_replication_factor: int = 1
    # PLAINTEXT (Tansu, tests) or the service's own SASL principal (SCRAM-SHA-512 in docker-compose)
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    topic_namespace: str = ""
    # the OAuth 2.0 / OIDC issuer whose tokens the API accepts (its discovery metadata and JWKS are read);
    # unset: every route but the public ones (health, ready, metrics) answers 401
    auth_issuer: str | None = None
    auth_audience: str = "vein2vein"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    state_dir: str | None = None
    log_level: str = "INFO"
    db_pool_max: int = 10
    # every database session: statement, lock-wait and idle-in-transaction timeouts (0 turns one off)
    db_statement_timeout_ms: int = 15_000
    db_lock_timeout_ms: int = 5_000
    db_idle_in_transaction_timeout_ms: int = 30_000
    relay_poll_interval_s: float = 2.0
    relay_batch_size: int = 200  # new outbox rows per pass
    relay_replay_batch_size: int = 500  # retained rows replayed per pass (after the new ones)
    relay_broker_check_interval_s: float = 5.0  # how often the relay checks that the broker still has it all
    relay_lease_ttl_s: float = 10.0  # a relay that stops renewing its lease is replaced after this
    relay_publish_timeout_s: float = 15.0  # a batch's acks are awaited this long at most
    outbox_retention_days: int = 7
    outbox_max_event_bytes: int = 262_144  # larger events are refused at write time (256 KiB)
    consumer_max_attempts: int = 3
    # records per transaction; a poll is applied this many at a time (v2v_messaging.consumer): 1 is one
    # transaction per record
    consumer_batch_max: int = Field(default=50, ge=1, le=500)
    # supervised background loops: restart backoff, and no heartbeat for this long is "stuck" in /ready
    background_restart_initial_s: float = 0.5
    background_restart_max_s: float = 30.0
    background_stall_after_s: float = 60.0
    # the edge (v2v_servicekit.edge): request bodies, per-client rate limit, JSON shape, idempotency keys
    max_body_bytes: int = 65_536  # larger request bodies are 413 before anything parses them
    rate_limit_per_s: float = 50.0  # token bucket per client id and process; 0 turns the limit off
    rate_limit_burst: int = 100
    json_max_depth: int = 32  # deeper JSON bodies are 422
    idempotency_ttl_s: float = 86_400.0  # an Idempotency-Key is kept (and replayed) this long
    idempotency_lease_s: float = 60.0  # an in-flight key whose process stopped renewing is taken over after
    idempotency_purge_interval_s: float = 300.0  # how often a process deletes expired keys
    idempotency_max_response_bytes: int = 1_048_576  # larger responses are not kept (the key is released)
    token_cache_size: int = 10_000  # verified bearer tokens remembered until they expire
    # the garbage collector (v2v_servicekit.gcpolicy): start-up's objects frozen out of every collection,
    # and the young generation's threshold (0 keeps CPython's 700)
    gc_freeze: bool = True
    gc_young_threshold: int = Field(default=20_000, ge=0)

    def kafka_settings(self) -> KafkaSettings:
        """Every Kafka setting of the service, as the messaging library takes them."""
        return KafkaSettings(
            bootstrap_servers=self.kafka_bootstrap_servers,
            enable_idempotence=self.kafka_enable_idempotence,
            fetch_max_wait_ms=self.kafka_fetch_max_wait_ms,
            max_poll_interval_ms=self.kafka_max_poll_interval_ms,
            partitions=self.kafka_partitions,
            replication_factor=self.kafka_replication_factor,
            namespace=self.topic_namespace,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=(
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password is not None else None
            ),
        )
