"""Create the platform database, one schema per service and two login roles per service.

For each service (`v2v_harness.catalog`):
- its **owner role** `<role>_owner` (e.g. `v2v_order_owner`) owns the schema and everything in it and runs
  the migrations (the service's `V2V_MIGRATION_DATABASE_URL`);
- its **runtime role** `<role>` (e.g. `v2v_order`), which the running service uses (`V2V_DATABASE_URL`),
  owns nothing: USAGE on its schema (no CREATE), SELECT/INSERT/UPDATE/DELETE on its tables, USAGE on its
  sequences, the same on whatever later migrations create (default privileges of the owner), nothing on
  the migration bookkeeping. It cannot drop, alter or truncate a table, nor create one: the ground for
  an append-only audit table that the service writes and cannot rewrite.

Neither role may touch another service's schema; PUBLIC gets nothing. Every role has its own password:
`V2V_DB_PASSWORD_<SERVICE>` and `V2V_DB_OWNER_PASSWORD_<SERVICE>` when set (docker-compose), else
random, drawn once per process (so that every database this process provisions on one server keeps
working: roles are server-wide, and setting a new password would lock out the services already
running on an earlier database). The URLs returned carry them.

Idempotent: run it as often as you like against a server where the given URL may create roles and
databases. A database provisioned by the earlier layout (the runtime role owned its schema) is moved to
this one: what the runtime role owned in it is handed to the owner role.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from v2v_harness.catalog import SERVICES, ServiceSpec

# the migration tool's bookkeeping (yoyo-migrations): the owner's alone
MIGRATION_TABLES = ("_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock")
RUNTIME_TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"
# the runtime role adds to these and reads them, never rewrites them (Part 11 audit trail, signatures)
APPEND_ONLY_TABLES = ("audit_trail", "signatures")

_process_passwords: dict[str, str] = {}


def owner_role(spec: ServiceSpec) -> str:
    """The role that owns the service's schema and runs its migrations."""
    return f"{spec.role}_owner"


def password_variable(spec: ServiceSpec, *, owner: bool) -> str:
    return f"V2V_DB_{'OWNER_' if owner else ''}PASSWORD_{spec.name.upper()}"


def role_password(spec: ServiceSpec, *, owner: bool = False) -> str:
    """The password of the service's runtime (or owner) role: from the environment, else random (the
    same for the whole process)."""
    given = os.environ.get(password_variable(spec, owner=owner))
    if given:
        return given
    role = owner_role(spec) if owner else spec.role
    if role not in _process_passwords:
        _process_passwords[role] = secrets.token_urlsafe(24)
    return _process_passwords[role]


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def service_url(admin_url: str, database: str, spec: ServiceSpec) -> str:
    """The runtime role's URL (what the running service connects with)."""
    return with_credentials(with_database(admin_url, database), spec.role, role_password(spec))


def owner_url(admin_url: str, database: str, spec: ServiceSpec) -> str:
    """The owner role's URL (what the migrations run with)."""
    return with_credentials(
        with_database(admin_url, database), owner_role(spec), role_password(spec, owner=True)
    )


@dataclass(frozen=True)
class ServiceDatabase:
    """One service's place in the database: its schema, its two roles and their URLs."""

    name: str
    schema: str
    role: str  # runtime role: V2V_DATABASE_URL
    owner_role: str  # owns the schema, runs migrations: V2V_MIGRATION_DATABASE_URL
    url: str
    owner_url: str


class ProvisionedDatabase(dict[str, str]):
    """What `provision` returns: a mapping of service name -> its runtime role's URL (so `urls["order"]`
    is what the order service's `V2V_DATABASE_URL` gets, as before), plus each service's owner URL for
    the migrations (`owner_urls`, its `V2V_MIGRATION_DATABASE_URL`) and the details (`services`)."""

    def __init__(self, database: str, services: Mapping[str, ServiceDatabase]) -> None:
        super().__init__({name: s.url for name, s in services.items()})
        self.database = database
        self.services: dict[str, ServiceDatabase] = dict(services)

    @property
    def owner_urls(self) -> dict[str, str]:
        return {name: s.owner_url for name, s in self.services.items()}


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _set_login(conn: asyncpg.Connection, role: str, password: str) -> None:
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    verb = "ALTER" if exists else "CREATE"
    # passwords cannot be bound parameters in DDL; quote_literal does the escaping
    lit = await conn.fetchval("SELECT quote_literal($1)", password)
    options = f"LOGIN PASSWORD {lit} NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
    try:
        await conn.execute(f"{verb} ROLE {_ident(role)} {options}")
    except asyncpg.DuplicateObjectError:  # created concurrently by another provisioner
        await conn.execute(f"ALTER ROLE {_ident(role)} {options}")


async def _grant_schema(db: asyncpg.Connection, database: str, spec: ServiceSpec) -> None:
    owner, runtime, schema = _ident(owner_role(spec)), _ident(spec.role), _ident(spec.schema)
    await db.execute(f"GRANT CONNECT ON DATABASE {_ident(database)} TO {owner}, {runtime}")
    await db.execute(f"REVOKE TEMPORARY ON DATABASE {_ident(database)} FROM {runtime}")
    await db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner}")
    await db.execute(f"ALTER SCHEMA {schema} OWNER TO {owner}")
    # the earlier layout: the runtime role owned the schema's tables (and the migrations' bookkeeping)
    await db.execute(f"REASSIGN OWNED BY {runtime} TO {owner}")
    await db.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC, {runtime}")
    await db.execute(f"GRANT USAGE ON SCHEMA {schema} TO {runtime}")
    tables = await db.fetch(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY c.relname""",
        spec.schema,
    )
    for row in tables:
        table = f"{schema}.{_ident(row['relname'])}"
        await db.execute(f"REVOKE ALL ON TABLE {table} FROM PUBLIC, {runtime}")
        if row["relname"] in APPEND_ONLY_TABLES:
            await db.execute(f"GRANT SELECT, INSERT ON TABLE {table} TO {runtime}")
        elif row["relname"] not in MIGRATION_TABLES:
            await db.execute(f"GRANT {RUNTIME_TABLE_PRIVILEGES} ON TABLE {table} TO {runtime}")
    await db.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {runtime}")
    # what later migrations create (run by the owner) is the runtime role's to use in the same way
    await db.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} "
        f"GRANT {RUNTIME_TABLE_PRIVILEGES} ON TABLES TO {runtime}"
    )
    await db.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} GRANT USAGE ON SEQUENCES TO {runtime}"
    )
    for role in (owner, runtime):
        await db.execute(f"ALTER ROLE {role} IN DATABASE {_ident(database)} SET search_path = {schema}")


async def provision(admin_url: str, database: str) -> ProvisionedDatabase:
    """Make `database` ready for the five services; returns each service's runtime URL (a mapping, as
    before) with its owner URL beside it (`.owner_urls`)."""
    conn = await asyncpg.connect(admin_url)
    try:
        for spec in SERVICES:
            await _set_login(conn, owner_role(spec), role_password(spec, owner=True))
            await _set_login(conn, spec.role, role_password(spec))
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # created concurrently
                await conn.execute(f"CREATE DATABASE {_ident(database)}")
        await conn.execute(f"REVOKE ALL ON DATABASE {_ident(database)} FROM PUBLIC")
    finally:
        await conn.close()

    db = await asyncpg.connect(with_database(admin_url, database))
    try:
        async with db.transaction():
            await db.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            for spec in SERVICES:
                await _grant_schema(db, database, spec)
    finally:
        await db.close()
    return ProvisionedDatabase(
        database,
        {
            spec.name: ServiceDatabase(
                name=spec.name,
                schema=spec.schema,
                role=spec.role,
                owner_role=owner_role(spec),
                url=service_url(admin_url, database, spec),
                owner_url=owner_url(admin_url, database, spec),
            )
            for spec in SERVICES
        },
    )


async def drop_database(admin_url: str, database: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_ident(database)} WITH (FORCE)")
    finally:
        await conn.close()
