"""Two database roles per service, on real Postgres, provisioned as for the running platform.

- each service's schema is owned by its owner role (`v2v_<service>_owner`), which runs the migrations;
- the service runs as its runtime role (`v2v_<service>`): it reads and writes its tables (those later
  migrations create too), and owns nothing: it cannot create, alter, drop or truncate a table, nor create
  anything in its schema, nor read the migration bookkeeping, nor touch another service's schema;
- an append-only table is therefore possible: the owner revokes UPDATE and DELETE, and the service can
  only add rows;
- every role has its own password, carried in the URLs, and a wrong one is refused;
- a real service process starts with the split (`V2V_MIGRATION_DATABASE_URL` for the migrations, the
  runtime URL for everything else) and refuses to start, saying why, when only the runtime URL is given.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

import logistics_service
import notification_service
import order_service
import scheduling_service
import site_service
from v2v_harness import pytest_plugin
from v2v_harness.catalog import BY_NAME, SERVICES
from v2v_harness.infra import Infrastructure
from v2v_harness.platform import Platform, tail
from v2v_harness.processes import free_port, spawn, stop
from v2v_harness.provision import (
    ProvisionedDatabase,
    owner_role,
    provision,
    with_credentials,
    with_database,
)
from v2v_messaging import MIGRATIONS_DIR
from v2v_persistence import MigrationPrivilegeError, apply_migrations

pytestmark = pytest.mark.integration

SCHEMAS = {spec.name: spec.schema for spec in SERVICES}
SERVICE_MIGRATIONS = {
    "order": Path(order_service.__file__).parent / "migrations",
    "scheduling": Path(scheduling_service.__file__).parent / "migrations",
    "site": Path(site_service.__file__).parent / "migrations",
    "logistics": Path(logistics_service.__file__).parent / "migrations",
    "notification": Path(notification_service.__file__).parent / "migrations",
}
DENIED = asyncpg.InsufficientPrivilegeError


def provisioned(test_db: pytest_plugin.TestDatabase) -> ProvisionedDatabase:
    assert isinstance(test_db.urls, ProvisionedDatabase)
    return test_db.urls


@pytest.fixture
async def migrated(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[ProvisionedDatabase]:
    """Every service's real migrations, applied by its owner role."""
    urls = provisioned(test_db)
    for name, owner_url in urls.owner_urls.items():
        applied = await apply_migrations(owner_url, SCHEMAS[name], [MIGRATIONS_DIR, SERVICE_MIGRATIONS[name]])
        assert applied[:2] == ["0000.messaging-outbox-inbox", "0001.messaging-dead-letters-relay-lease"]
    yield urls


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url)


async def test_roles_and_passwords_are_the_services_own(test_db: pytest_plugin.TestDatabase) -> None:
    urls = provisioned(test_db)
    assert set(urls) == set(SCHEMAS) == set(urls.owner_urls)
    users, passwords = set(), set()
    for name, spec in BY_NAME.items():
        runtime, owner = urlsplit(urls[name]), urlsplit(urls.owner_urls[name])
        assert (runtime.username, owner.username) == (spec.role, owner_role(spec))
        assert urls.services[name].owner_role == f"{spec.role}_owner"
        users |= {runtime.username, owner.username}
        passwords |= {runtime.password, owner.password}
    assert len(users) == len(passwords) == 2 * len(SERVICES)  # ten roles, ten passwords
    assert "v2v-dev-password" not in passwords  # the old shared default is gone
    assert all(p and len(p) >= 24 for p in passwords)

    # a provisioning of another database in this process keeps the passwords: the first one's
    # running services are not locked out (roles are server-wide)
    other = f"t_{uuid.uuid4().hex[:10]}"
    again = await provision(test_db.admin_url, other)
    try:
        assert {n: urlsplit(u).password for n, u in again.items()} == {
            n: urlsplit(u).password for n, u in urls.items()
        }
        conn = await connect(urls["order"])
        await conn.close()
    finally:
        from v2v_harness.provision import drop_database

        await drop_database(test_db.admin_url, other)

    # the password is checked: the runtime role with its owner's password is refused
    wrong = with_credentials(urls["order"], "v2v_order", urlsplit(urls.owner_urls["order"]).password or "")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(wrong)


async def test_the_owner_owns_everything_and_the_runtime_role_nothing(
    test_db: pytest_plugin.TestDatabase, migrated: ProvisionedDatabase
) -> None:
    admin = await connect(with_database(test_db.admin_url, test_db.name))
    try:
        for name, spec in BY_NAME.items():
            schema_owner = await admin.fetchval(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", spec.schema
            )
            assert schema_owner == owner_role(spec)
            owners = await admin.fetch(
                """SELECT DISTINCT pg_get_userbyid(c.relowner) AS owner FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1""",
                spec.schema,
            )
            assert [r["owner"] for r in owners] == [owner_role(spec)], name
            owned_by_runtime = await admin.fetchval(
                """SELECT count(*) FROM pg_class
                   WHERE relowner = (SELECT oid FROM pg_roles WHERE rolname = $1)""",
                spec.role,
            )
            assert owned_by_runtime == 0
            can_create = await admin.fetchval(
                "SELECT has_schema_privilege($1, $2, 'CREATE')", spec.role, spec.schema
            )
            assert can_create is False
            assert await admin.fetchval(
                "SELECT has_schema_privilege($1, $2, 'USAGE')", spec.role, spec.schema
            )
            temp = await admin.fetchval(
                "SELECT has_database_privilege($1, $2, 'TEMPORARY')", spec.role, test_db.name
            )
            assert temp is False
    finally:
        await admin.close()


async def test_the_runtime_role_reads_and_writes_its_tables_and_cannot_change_its_schema(
    migrated: ProvisionedDatabase,
) -> None:
    for name, url in migrated.items():
        own = SCHEMAS[name]
        conn = await connect(url)
        try:
            assert await conn.fetchval("SELECT current_user") == BY_NAME[name].role
            assert await conn.fetchval("SELECT current_schema()") == own

            # what a service does: insert, read, update, delete (sequences included)
            event_id = uuid.uuid4()
            await conn.execute(
                """INSERT INTO inbox (consumer, event_id, event_type, topic, kafka_partition, kafka_offset)
                   VALUES ('probe', $1, 't', 't', 0, 0)""",
                event_id,
            )
            await conn.execute("UPDATE inbox SET kafka_offset = 1 WHERE event_id = $1", event_id)
            assert await conn.fetchval("SELECT kafka_offset FROM inbox WHERE event_id = $1", event_id) == 1
            dead = await conn.fetchval(
                """INSERT INTO dead_letters (consumer, topic, payload, error, attempts)
                   VALUES ('probe', 't', '\\x00', 'e', 1) RETURNING id"""
            )
            assert dead >= 1  # a bigserial: the sequence is usable
            await conn.execute("DELETE FROM dead_letters WHERE id = $1", dead)
            await conn.execute("DELETE FROM inbox WHERE event_id = $1", event_id)

            # what it may not: change the schema, in any way
            forbidden = {
                "CREATE TABLE intruder (id int)": "permission denied for schema",
                f"CREATE TABLE {own}.intruder (id int)": "permission denied for schema",
                "CREATE VIEW intruder AS SELECT 1": "permission denied for schema",
                "CREATE FUNCTION intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'": "permission denied",
                "CREATE TEMP TABLE intruder (id int)": "permission denied to create temporary tables",
                "DROP TABLE outbox": "must be owner of table outbox",
                "ALTER TABLE outbox ADD COLUMN intruder int": "must be owner of table outbox",
                "ALTER TABLE dead_letters DISABLE TRIGGER ALL": "must be owner of table dead_letters",
                "CREATE INDEX intruder ON outbox (id)": "must be owner of table outbox",
                "TRUNCATE inbox": "permission denied for table inbox",
                f"DROP SCHEMA {own} CASCADE": f"must be owner of schema {own}",
                f"ALTER SCHEMA {own} RENAME TO intruder": f"must be owner of schema {own}",
                "SELECT * FROM _yoyo_migration": "permission denied for table _yoyo_migration",
                "DELETE FROM _yoyo_migration": "permission denied for table _yoyo_migration",
                "INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now(), 1)": "permission denied",
            }
            for sql, message in forbidden.items():
                with pytest.raises(asyncpg.PostgresError, match=message):
                    await conn.execute(sql)

            # nor another service's schema, nor the public one
            for other, schema in SCHEMAS.items():
                if other == name:
                    continue
                with pytest.raises(DENIED, match=f"permission denied for schema {schema}"):
                    await conn.fetchval(f"SELECT 1 FROM {schema}.outbox")
                with pytest.raises(DENIED, match=f"permission denied for schema {schema}"):
                    await conn.execute(f"DELETE FROM {schema}.inbox")
            with pytest.raises(DENIED, match="permission denied for schema public"):
                await conn.execute("CREATE TABLE public.intruder (id int)")
        finally:
            await conn.close()

    # and it cannot run migrations: the schema is not its to change
    with pytest.raises(MigrationPrivilegeError, match="V2V_MIGRATION_DATABASE_URL"):
        await apply_migrations(migrated["order"], "ordering", [MIGRATIONS_DIR, Path(__file__).parent])


async def test_a_later_migrations_tables_are_usable_and_an_append_only_table_stays_append_only(
    migrated: ProvisionedDatabase, tmp_path: Path
) -> None:
    """What the coming audit trail needs: the owner's migration creates the table and takes UPDATE
    and DELETE back; the service can add rows and read them, never rewrite or remove one."""
    migration = tmp_path / "0099.ordering-audit-probe.sql"
    migration.write_text(
        """CREATE TABLE audit_probe (
               id bigserial PRIMARY KEY, order_id uuid NOT NULL, what text NOT NULL,
               at timestamptz NOT NULL DEFAULT now());
           REVOKE UPDATE, DELETE ON audit_probe FROM v2v_order;
           CREATE TABLE later_probe (id bigserial PRIMARY KEY, n int NOT NULL);"""
    )
    owner_url = migrated.owner_urls["order"]
    assert await apply_migrations(owner_url, "ordering", [MIGRATIONS_DIR, tmp_path]) == [
        "0099.ordering-audit-probe"
    ]
    conn = await connect(migrated["order"])
    try:
        # a table a later migration created: the runtime role may use it (default privileges)
        await conn.execute("INSERT INTO later_probe (n) VALUES (1), (2)")
        await conn.execute("UPDATE later_probe SET n = n + 1")
        await conn.execute("DELETE FROM later_probe WHERE n = 3")
        assert await conn.fetchval("SELECT sum(n) FROM later_probe") == 2

        order_id = uuid.uuid4()
        await conn.execute("INSERT INTO audit_probe (order_id, what) VALUES ($1, 'submitted')", order_id)
        assert (
            await conn.fetchval("SELECT what FROM audit_probe WHERE order_id = $1", order_id) == "submitted"
        )
        for sql, message in {
            "UPDATE audit_probe SET what = 'rewritten'": "permission denied for table audit_probe",
            "DELETE FROM audit_probe": "permission denied for table audit_probe",
            "TRUNCATE audit_probe": "permission denied for table audit_probe",
            "DROP TABLE audit_probe": "must be owner of table audit_probe",
            "ALTER TABLE audit_probe DROP COLUMN what": "must be owner of table audit_probe",
            "ALTER TABLE audit_probe RENAME TO audit_old": "must be owner of table audit_probe",
        }.items():
            with pytest.raises(asyncpg.PostgresError, match=message):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM audit_probe") == 1
    finally:
        await conn.close()


async def test_provisioning_again_keeps_the_split_and_moves_an_earlier_layout_to_it(
    test_db: pytest_plugin.TestDatabase,
) -> None:
    """A database of the earlier layout (the runtime role owned its schema and tables) provisioned
    again: ownership goes to the owner role, the runtime role keeps only its table privileges."""
    admin_db = with_database(test_db.admin_url, test_db.name)
    admin = await connect(admin_db)
    try:
        # the earlier layout, by hand: v2v_site owns its schema and a table in it
        await admin.execute("ALTER SCHEMA site OWNER TO v2v_site")
        await admin.execute("CREATE TABLE site.legacy (id int PRIMARY KEY)")
        await admin.execute("ALTER TABLE site.legacy OWNER TO v2v_site")
    finally:
        await admin.close()

    again = await provision(test_db.admin_url, test_db.name)
    assert dict(again) == dict(provisioned(test_db))  # the same URLs: same roles, same passwords

    admin = await connect(admin_db)
    try:
        owners = await admin.fetch(
            """SELECT pg_get_userbyid(nspowner) AS o FROM pg_namespace WHERE nspname = 'site'
               UNION ALL SELECT tableowner FROM pg_tables WHERE schemaname = 'site'"""
        )
        assert {r["o"] for r in owners} == {"v2v_site_owner"}
    finally:
        await admin.close()
    conn = await connect(again["site"])
    try:
        await conn.execute("INSERT INTO legacy VALUES (1)")
        with pytest.raises(asyncpg.PostgresError, match="must be owner of table legacy"):
            await conn.execute("DROP TABLE legacy")
        with pytest.raises(DENIED, match="permission denied for schema site"):
            await conn.execute("CREATE TABLE site.intruder (id int)")
    finally:
        await conn.close()


def _start_order_service(
    infra: Infrastructure, urls: ProvisionedDatabase, run_dir: Path, *, with_owner: bool
) -> tuple[str, Path, subprocess.Popen[bytes]]:
    platform = Platform(infra, urls.database, f"it{uuid.uuid4().hex[:8]}", run_dir)
    spec, port = BY_NAME["order"], free_port()
    env = platform.service_env(
        spec, port, urls["order"], {}, urls.owner_urls["order"] if with_owner else None
    )
    log_path = run_dir / f"order-{'split' if with_owner else 'runtime-only'}.log"
    proc = spawn([sys.executable, "-m", spec.package], env=env, log_path=log_path)
    return f"http://127.0.0.1:{port}", log_path, proc


def test_a_service_migrates_as_the_owner_and_runs_as_its_runtime_role(
    infra: Infrastructure, state_dir: Path
) -> None:
    import asyncio

    from v2v_harness.provision import drop_database

    database = f"roles_{uuid.uuid4().hex[:8]}"
    urls = asyncio.run(provision(infra.admin_url, database))
    run_dir = state_dir / database
    run_dir.mkdir(parents=True)
    try:
        # only the runtime URL: the migrations cannot run, and the service says what to set
        _, log_path, proc = _start_order_service(infra, urls, run_dir, with_owner=False)
        try:
            assert proc.wait(timeout=90) != 0
        finally:
            stop(proc)
        log = log_path.read_text(errors="replace")
        assert "V2V_MIGRATION_DATABASE_URL" in log, tail(log_path)
        assert urlsplit(urls.owner_urls["order"]).password not in log

        # with the owner's URL for the migrations: up, its database check passing, its start-up writes
        # (the reference data) done as v2v_order
        async def check() -> None:
            admin = await connect(with_database(infra.admin_url, database))
            try:
                applied = await admin.fetchval("SELECT count(*) FROM ordering._yoyo_migration")
                assert applied >= 2
                # the reference data the service loads at start-up, written by its runtime role
                assert await admin.fetchval("SELECT count(*) FROM ordering.treatment_centers") > 0
                owners = await admin.fetch(
                    "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'ordering'"
                )
                assert [r["tableowner"] for r in owners] == ["v2v_order_owner"]
                sessions = await admin.fetch(
                    """SELECT DISTINCT usename FROM pg_stat_activity
                       WHERE datname = $1 AND usename IS NOT NULL AND pid <> pg_backend_pid()""",
                    database,
                )
                # the running service holds its pool as v2v_order; the owner's session is closed
                assert {r["usename"] for r in sessions} == {"v2v_order"}
            finally:
                await admin.close()

        url, log_path, proc = _start_order_service(infra, urls, run_dir, with_owner=True)
        try:
            deadline = time.monotonic() + 90
            answer = "no answer"
            with httpx.Client(timeout=2.0) as client:
                while True:
                    assert proc.poll() is None, f"the service exited:\n{tail(log_path)}"
                    try:
                        # its own readiness waits for a site.registered too: the database is what counts
                        ready = client.get(url + "/ready")
                        answer = ready.text
                        if ready.json().get("checks", {}).get("database") == "ok":
                            break
                    except httpx.HTTPError as exc:
                        answer = repr(exc)
                    assert time.monotonic() < deadline, f"not ready: {answer}\n{tail(log_path)}"
                    time.sleep(0.2)
            asyncio.run(check())
        finally:
            stop(proc)
    finally:
        asyncio.run(drop_database(infra.admin_url, database))
