"""Postgres helpers shared by every service: the connection pool and versioned migrations."""

from v2v_persistence.db import DEFAULT_TIMEOUTS, DbTimeouts, connect, create_pool, schema_of
from v2v_persistence.migrations import MigrationPrivilegeError, apply_migrations

__all__ = [
    "DEFAULT_TIMEOUTS",
    "DbTimeouts",
    "MigrationPrivilegeError",
    "apply_migrations",
    "connect",
    "create_pool",
    "schema_of",
]
