"""Each service's role works in its own schema and is refused everywhere else (real Postgres).

The database is provisioned exactly as for the running platform (`v2v_harness.provision`): one schema
per service, owned by its owner role (migrations), used by its runtime role (the running service),
nothing granted to PUBLIC. Both roles are refused every other schema (tests/integration/test_db_roles.py
shows what the runtime role may and may not do in its own).
"""

from __future__ import annotations

import asyncpg
import pytest

from v2v_harness import pytest_plugin
from v2v_harness.catalog import BY_NAME, SERVICES
from v2v_harness.provision import owner_role, with_database
from v2v_messaging import MIGRATIONS_DIR
from v2v_persistence import apply_migrations

pytestmark = pytest.mark.integration

SCHEMAS = {spec.name: spec.schema for spec in SERVICES}


async def test_each_role_owns_its_schema_and_is_refused_every_other(
    test_db: pytest_plugin.TestDatabase,
) -> None:
    assert set(test_db.urls) == set(SCHEMAS) == set(test_db.owner_urls)
    assert set(SCHEMAS.values()) == {"ordering", "scheduling", "site", "logistics", "notification"}
    # every service's own migrations (the shared outbox/inbox) applied with its own (owner) role
    for service, url in test_db.owner_urls.items():
        applied = await apply_migrations(url, SCHEMAS[service], [MIGRATIONS_DIR])
        assert applied == ["0000.messaging-outbox-inbox", "0001.messaging-dead-letters-relay-lease"]

    logins = [(s, test_db.owner_urls[s], owner_role(BY_NAME[s])) for s in SCHEMAS]
    logins += [(s, test_db.urls[s], BY_NAME[s].role) for s in SCHEMAS]
    for service, url, role in logins:
        own = SCHEMAS[service]
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT current_user") == role
            assert await conn.fetchval("SELECT current_schema()") == own

            # its own schema: the owner creates, both write and read (qualified and through the
            # search_path)
            if role == owner_role(BY_NAME[service]):
                await conn.execute(f"CREATE TABLE {own}.isolation_probe (id int PRIMARY KEY, who text)")
                await conn.execute("INSERT INTO isolation_probe VALUES (1, $1)", service)
                assert await conn.fetchval(f"SELECT who FROM {own}.isolation_probe WHERE id = 1") == service
                await conn.execute("DROP TABLE isolation_probe")
            await conn.execute(
                "INSERT INTO inbox (consumer, event_id, event_type, topic, kafka_partition, kafka_offset) "
                "VALUES ('probe', gen_random_uuid(), 't', 't', 0, 0)"
            )
            assert await conn.fetchval(f"SELECT count(*) FROM {own}.inbox WHERE consumer = 'probe'") == 1
            await conn.execute("DELETE FROM inbox WHERE consumer = 'probe'")
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 0

            for other, schema in SCHEMAS.items():
                if other == service:
                    continue
                with pytest.raises(
                    asyncpg.InsufficientPrivilegeError, match=f"permission denied for schema {schema}"
                ):
                    await conn.fetchval(f"SELECT 1 FROM {schema}.outbox")
                with pytest.raises(
                    asyncpg.InsufficientPrivilegeError, match=f"permission denied for schema {schema}"
                ):
                    await conn.execute(
                        f"INSERT INTO {schema}.inbox (consumer, event_id, event_type, topic, "
                        "kafka_partition, kafka_offset) VALUES ('x', gen_random_uuid(), 't', 't', 0, 0)"
                    )
                with pytest.raises(
                    asyncpg.InsufficientPrivilegeError, match=f"permission denied for schema {schema}"
                ):
                    await conn.execute(f"CREATE TABLE {schema}.intruder (id int)")

            # nor the public schema
            with pytest.raises(
                asyncpg.InsufficientPrivilegeError, match="permission denied for schema public"
            ):
                await conn.execute("CREATE TABLE public.intruder (id int)")
        finally:
            await conn.close()

    # nothing leaked across: every schema holds only its own tables
    admin = await asyncpg.connect(with_database(test_db.admin_url, test_db.name))
    try:
        rows = await admin.fetch(
            """SELECT table_schema, table_name FROM information_schema.tables
               WHERE table_name IN ('intruder', 'isolation_probe') OR table_schema = 'public'"""
        )
        assert rows == []
        for service, schema in SCHEMAS.items():
            owner = await admin.fetchval(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", schema
            )
            assert owner == owner_role(BY_NAME[service])
            assert await admin.fetchval(f"SELECT count(*) FROM {schema}.inbox") == 0
    finally:
        await admin.close()
