"""Postgres helpers shared by every service: the connection pool and versioned migrations."""

from v2v_persistence.db import create_pool, schema_of
from v2v_persistence.migrations import apply_migrations

__all__ = ["apply_migrations", "create_pool", "schema_of"]
