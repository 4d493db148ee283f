"""Create the platform database, one schema per service and one login role per service.

Idempotent: run it as often as you like against a server where the given URL may create roles and
databases. Each role owns only its own schema; PUBLIC gets nothing, so a service that reaches into
another's schema is refused ("permission denied for schema ...").
"""

from __future__ import annotations

import contextlib
import os
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from v2v_harness.catalog import SERVICES, ServiceSpec

DEFAULT_ROLE_PASSWORD = "v2v-dev-password"


def role_password() -> str:
    return os.environ.get("V2V_DB_ROLE_PASSWORD", DEFAULT_ROLE_PASSWORD)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def service_url(admin_url: str, database: str, spec: ServiceSpec) -> str:
    return with_credentials(with_database(admin_url, database), spec.role, role_password())


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def provision(admin_url: str, database: str) -> dict[str, str]:
    """Make `database` ready for the five services; returns each service's own connection URL."""
    password = role_password()
    conn = await asyncpg.connect(admin_url)
    try:
        for spec in SERVICES:
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", spec.role)
            verb = "ALTER" if exists else "CREATE"
            # passwords cannot be bound parameters in DDL; quote_literal does the escaping
            lit = await conn.fetchval("SELECT quote_literal($1)", password)
            try:
                await conn.execute(f"{verb} ROLE {_ident(spec.role)} LOGIN PASSWORD {lit}")
            except asyncpg.DuplicateObjectError:  # created concurrently by another provisioner
                await conn.execute(f"ALTER ROLE {_ident(spec.role)} LOGIN PASSWORD {lit}")
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
                role, schema = _ident(spec.role), _ident(spec.schema)
                await db.execute(f"GRANT CONNECT, TEMPORARY ON DATABASE {_ident(database)} TO {role}")
                await db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}")
                await db.execute(f"ALTER SCHEMA {schema} OWNER TO {role}")
                await db.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
                await db.execute(
                    f"ALTER ROLE {role} IN DATABASE {_ident(database)} SET search_path = {schema}"
                )
    finally:
        await db.close()
    return {spec.name: service_url(admin_url, database, spec) for spec in SERVICES}


async def drop_database(admin_url: str, database: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_ident(database)} WITH (FORCE)")
    finally:
        await conn.close()
