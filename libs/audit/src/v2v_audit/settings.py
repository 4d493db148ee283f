"""The audit trail's settings (V2V_* environment variables), read once at start-up."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STATE_DIR = ".v2v"  # `make run`'s state folder (v2v_harness), when V2V_STATE_DIR is not set
CHECKPOINT_SUBDIR = "audit"


class AuditSettings(BaseSettings):
    """What every service reads for its audit checkpoints (v2v_audit.service)."""

    model_config = SettingsConfigDict(env_prefix="V2V_", extra="ignore")

    # where signed checkpoints are written, outside the database: unset, `<V2V_STATE_DIR>/audit`
    audit_checkpoint_dir: str | None = None
    state_dir: str | None = None  # V2V_STATE_DIR, the platform's state folder
    audit_checkpoint_interval_s: float = 60.0  # how often the chain's head is checkpointed (when it moved)
    # the signing key (a private JWK, mode 0600): unset, `checkpoint-key.jwk.json` in the checkpoint dir,
    # created on first use
    audit_checkpoint_key_file: str | None = None

    def checkpoint_dir(self) -> Path:
        if self.audit_checkpoint_dir:
            return Path(self.audit_checkpoint_dir)
        return Path(self.state_dir or DEFAULT_STATE_DIR) / CHECKPOINT_SUBDIR

    def key_file(self) -> Path:
        if self.audit_checkpoint_key_file:
            return Path(self.audit_checkpoint_key_file)
        return self.checkpoint_dir() / "checkpoint-key.jwk.json"


class VerifySettings(AuditSettings):
    """`python -m v2v_audit verify` (make audit-verify): the same database the harness uses."""

    # an admin URL (as for the harness: V2V_DATABASE_URL), else `make run`'s embedded Postgres
    database_url: str | None = None
    pg_port: int = 55432  # V2V_PG_PORT: `make run`'s embedded Postgres
    database_name: str = "v2v"  # V2V_DATABASE_NAME

    def admin_url(self) -> str:
        return self.database_url or f"postgresql://postgres:postgres@127.0.0.1:{self.pg_port}/postgres"
