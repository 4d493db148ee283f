"""Versioned SQL migrations per service, applied with yoyo-migrations inside the service's own schema.

yoyo keeps its bookkeeping tables (`_yoyo_migration`, `_yoyo_log`, `_yoyo_version`, `yoyo_lock`) in that
schema too, so every service's migration history is its own. A lock serialises replicas starting together.

Migrations run as the schema's **owner** role (the service's `V2V_MIGRATION_DATABASE_URL`), not as the
role the service runs with: that one may read and write the tables but not create, alter or drop any.
The owner's default privileges hand every new table to the runtime role; the bookkeeping tables are
taken back from it here, so that only the owner can tell which migrations ran. A URL whose role may
not create in the schema fails with `MigrationPrivilegeError`, which says what to set.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from yoyo import get_backend, read_migrations

BOOKKEEPING_TABLES = ("_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock")


class MigrationPrivilegeError(RuntimeError):
    """The role of the migration URL may not change the schema (it is a runtime role, not the owner)."""


def _yoyo_url(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["schema"] = schema
    return urlunsplit(("postgresql+psycopg", parts.netloc, parts.path, urlencode(query), ""))


def _is_privilege_error(exc: BaseException) -> bool:
    import psycopg.errors

    while exc is not None:
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _keep_bookkeeping_to_the_owner(connection: Any, schema: str) -> None:
    """Revoke every grant on yoyo's tables (the owner's default privileges gave the runtime role DML on
    them when yoyo created them). Only where the connected role owns them: an earlier layout, in which
    the service's one role owns everything, has nothing to revoke."""
    with connection.cursor() as cur:
        cur.execute(
            """SELECT DISTINCT c.relname, g.grantee
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN information_schema.role_table_grants g
                 ON g.table_schema = n.nspname AND g.table_name = c.relname
               WHERE n.nspname = %s AND c.relname = ANY(%s)
                 AND pg_get_userbyid(c.relowner) = current_user AND g.grantee <> current_user""",
            (schema, list(BOOKKEEPING_TABLES)),
        )
        rows = cur.fetchall()
        for table, grantee in rows:
            target = "PUBLIC" if grantee == "PUBLIC" else _quote_ident(grantee)
            cur.execute(f"REVOKE ALL ON TABLE {_quote_ident(schema)}.{_quote_ident(table)} FROM {target}")
    connection.commit()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def apply_migrations_sync(url: str, schema: str, directories: list[Path]) -> list[str]:
    try:
        backend = get_backend(_yoyo_url(url, schema))
    except Exception as exc:
        if _is_privilege_error(exc):
            raise _privilege_error(url, schema) from None
        raise
    try:
        # yoyo swallows a refused CREATE of its lock table and then waits for a lock it cannot take:
        # ask first (a role of the earlier layout, owning its schema, may; a runtime role may not)
        with backend.connection.cursor() as cur:
            cur.execute("SELECT has_schema_privilege(%s, 'CREATE')", (schema,))
            row = cur.fetchone()
        backend.connection.rollback()
        if not row or not row[0]:
            raise _privilege_error(url, schema)
        migrations = read_migrations(*[str(d) for d in directories])
        try:
            with backend.lock():
                pending = backend.to_apply(migrations)
                backend.apply_migrations(pending)
        except Exception as exc:
            if _is_privilege_error(exc):
                raise _privilege_error(url, schema) from None
            raise
        _keep_bookkeeping_to_the_owner(backend.connection, schema)
        return [m.id for m in pending]
    finally:
        backend.connection.close()


def _privilege_error(url: str, schema: str) -> MigrationPrivilegeError:
    user = urlsplit(url).username or "the connecting role"
    return MigrationPrivilegeError(
        f"role {user} may not change schema {schema}: migrations run as the schema's owner role; "
        "set V2V_MIGRATION_DATABASE_URL to the owner's URL"
    )


async def apply_migrations(url: str, schema: str, directories: list[Path]) -> list[str]:
    return await asyncio.to_thread(apply_migrations_sync, url, schema, directories)
