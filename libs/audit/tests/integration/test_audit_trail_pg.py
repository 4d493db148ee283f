"""The audit trail on real Postgres, as an inspector would try it.

- the service's runtime role may add entries and read them, never change, remove or truncate them (neither
  by privilege nor past the triggers, which refuse the owner too), nor add one that does not continue the
  chain or is not timed by the server;
- what only a superuser can do (triggers switched off) is found by the verifier, which names the first
  broken entry: a changed value, a removed row, reordered rows, a removed tail (against a signed
  checkpoint), through `python -m v2v_audit verify` (what `make audit-verify` runs);
- two writers (two pools, as two replicas) chain in one total order;
- a change and its entries commit or roll back together.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from v2v_audit import Actor, AuditedTx, PgAuditTrail
from v2v_audit import checkpoints as cps
from v2v_audit.__main__ import main as audit_cli
from v2v_audit.service import checkpoint_once, migrate
from v2v_audit.verifier import verify_database
from v2v_contracts import CloudEvent, source_for
from v2v_harness import pytest_plugin
from v2v_harness.provision import with_database
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool

pytestmark = pytest.mark.integration

SERVICE, SCHEMA = "site", "site"  # any service's schema: the trail is identical in each
SCHEMAS = ["ordering", "scheduling", "site", "logistics", "notification"]
CENTRE = Actor("centre-tc-fr-pa-001", "centre", "TC-FR-PA-001")


@dataclass
class Db:
    test_db: pytest_plugin.TestDatabase
    pool: asyncpg.Pool  # the runtime role
    uow: UnitOfWork[AuditedTx]
    admin_url: str  # the superuser, on the test database
    checkpoints: Path
    key_file: Path

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_url)

    def cli(self, *extra: str) -> list[str]:
        return [
            "verify",
            "--database-url",
            self.test_db.admin_url,
            "--database",
            self.test_db.name,
            "--checkpoints",
            str(self.checkpoints),
            "--key",
            str(self.key_file),
            *extra,
        ]


def audited_tx(conn: asyncpg.Connection, outbox: object) -> AuditedTx:
    return AuditedTx(conn, outbox)  # type: ignore[arg-type]


@pytest.fixture
async def db(test_db: pytest_plugin.TestDatabase, tmp_path: Path) -> AsyncIterator[Db]:
    for name, owner_url in test_db.owner_urls.items():
        schema = dict(
            zip(["order", "scheduling", "site", "logistics", "notification"], SCHEMAS, strict=True)
        )[name]
        await apply_migrations(owner_url, schema, [MIGRATIONS_DIR])
        assert await migrate(owner_url, schema) in (["0000.audit-trail", "0001.audit-append"], [])
    owner = await asyncpg.connect(test_db.owner_urls[SERVICE])
    try:
        await owner.execute("CREATE TABLE it_things (id uuid PRIMARY KEY, status text NOT NULL)")
    finally:
        await owner.close()
    pool = await create_pool(test_db.urls[SERVICE], max_size=8)
    uow: UnitOfWork[AuditedTx] = UnitOfWork(pool, "it.audit", notify_channel(SCHEMA), audited_tx)
    try:
        yield Db(
            test_db,
            pool,
            uow,
            with_database(test_db.admin_url, test_db.name),
            tmp_path / "audit",
            tmp_path / "audit" / "checkpoint-key.jwk.json",
        )
    finally:
        await pool.close()


async def change(uow: UnitOfWork[AuditedTx], n: int = 1, *, actor: Actor = CENTRE) -> list[uuid.UUID]:
    """One transaction: `n` things inserted, each audited."""
    ids = [uuid.uuid4() for _ in range(n)]
    async with uow.begin() as tx:
        assert tx.conn is not None
        for thing in ids:
            await tx.conn.execute("INSERT INTO it_things VALUES ($1, 'new')", thing)
            tx.audit("thing.created", "thing", thing, new={"status": "new"}, reason="it", actor=actor)
    return ids


async def checkpoint(db: Db) -> int:
    key = cps.signing_key(db.key_file)
    return await checkpoint_once(db.pool, db.checkpoints, key, db.test_db.name, SCHEMA, 0)


async def test_the_runtime_role_may_add_and_read_entries_never_change_or_remove_them(db: Db) -> None:
    await change(db.uow, 3)
    conn = await asyncpg.connect(db.test_db.urls[SERVICE])
    try:
        assert await conn.fetchval("SELECT count(*) FROM audit_trail") == 3
        privileges = await conn.fetch(
            """SELECT privilege_type FROM information_schema.role_table_grants
               WHERE table_schema = $1 AND table_name = 'audit_trail' AND grantee = current_user
               ORDER BY privilege_type""",
            SCHEMA,
        )
        assert [r["privilege_type"] for r in privileges] == ["INSERT", "SELECT"]
        for sql, message in {
            "UPDATE audit_trail SET reason = 'rewritten'": "permission denied for table audit_trail",
            "DELETE FROM audit_trail WHERE seq = 2": "permission denied for table audit_trail",
            "TRUNCATE audit_trail": "permission denied for table audit_trail",
            "DROP TABLE audit_trail": "must be owner of table audit_trail",
            "ALTER TABLE audit_trail DISABLE TRIGGER ALL": "must be owner of table audit_trail",
            "SELECT audit_trail_lockdown()": "permission denied for function audit_trail_lockdown",
        }.items():
            with pytest.raises(asyncpg.PostgresError, match=message):
                await conn.execute(sql)
        # a forged entry: not the chain's next, or back-dated
        row = await conn.fetchrow("SELECT * FROM audit_trail WHERE seq = 3")
        assert row is not None
        columns = list(row.keys())
        values = dict(row)
        params = ", ".join(f"${i + 1}" for i in range(len(columns)))
        insert = f"INSERT INTO audit_trail ({', '.join(columns)}) VALUES ({params})"
        forged = {**values, "seq": 4, "entry_id": uuid.uuid4(), "entry_hash": b"\x07" * 32}
        async with conn.transaction():
            forged["recorded_at"] = await conn.fetchval("SELECT clock_timestamp()")
            forged["prev_hash"] = b"\x01" * 32
            with pytest.raises(asyncpg.PostgresError, match="does not continue the chain"):
                await conn.execute(insert, *[forged[c] for c in columns])
        async with conn.transaction():
            forged["prev_hash"] = values["entry_hash"]
            forged["recorded_at"] = values["recorded_at"]  # an earlier transaction's time
            with pytest.raises(asyncpg.PostgresError, match="timed by the server"):
                await conn.execute(insert, *[forged[c] for c in columns])
        assert await conn.fetchval("SELECT count(*) FROM audit_trail") == 3
    finally:
        await conn.close()


async def test_the_triggers_refuse_the_owner_and_the_superuser_too(db: Db) -> None:
    await change(db.uow, 2)
    for url in (db.test_db.owner_urls[SERVICE], db.admin_url):
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"SET search_path = {SCHEMA}")
            for sql, op in {
                "UPDATE audit_trail SET reason = 'x'": "UPDATE",
                "DELETE FROM audit_trail": "DELETE",
                "TRUNCATE audit_trail": "TRUNCATE",
            }.items():
                with pytest.raises(asyncpg.PostgresError, match=f"append-only: {op} refused"):
                    await conn.execute(sql)
        finally:
            await conn.close()


async def test_provisioning_again_is_taken_back_at_the_next_start(db: Db) -> None:
    """Provisioning grants DML on every table to the runtime role; the start-up step takes it back."""
    admin = await db.admin()
    try:
        await admin.execute(f"GRANT UPDATE, DELETE ON {SCHEMA}.audit_trail TO v2v_{SERVICE}")
    finally:
        await admin.close()
    assert await migrate(db.test_db.owner_urls[SERVICE], SCHEMA) == []
    conn = await asyncpg.connect(db.test_db.urls[SERVICE])
    try:
        with pytest.raises(asyncpg.PostgresError, match="permission denied for table audit_trail"):
            await conn.execute("DELETE FROM audit_trail")
    finally:
        await conn.close()


async def test_a_change_and_its_entries_commit_or_roll_back_together(db: Db) -> None:
    class Refused(Exception):
        pass

    thing = uuid.uuid4()
    with pytest.raises(Refused):
        async with db.uow.begin() as tx:
            assert tx.conn is not None
            await tx.conn.execute("INSERT INTO it_things VALUES ($1, 'new')", thing)
            tx.audit("thing.created", "thing", thing, new={"status": "new"})
            raise Refused
    assert await db.pool.fetchval("SELECT count(*) FROM it_things") == 0
    assert await db.pool.fetchval("SELECT count(*) FROM audit_trail") == 0

    # the entry is appended at commit: a failure of the append takes the change back with it
    with pytest.raises(ValueError):
        async with db.uow.begin() as tx:
            assert tx.conn is not None
            await tx.conn.execute("INSERT INTO it_things VALUES ($1, 'new')", thing)
            tx.audit("thing.created", "thing", thing, new={"bad": "\x00"})
    assert await db.pool.fetchval("SELECT count(*) FROM it_things") == 0

    (done,) = await change(db.uow)
    rows = await db.pool.fetch(
        "SELECT object_id, actor_client_id, actor_kind, actor_entity_id FROM audit_trail"
    )
    assert [tuple(r) for r in rows] == [(str(done), CENTRE.client_id, "centre", "TC-FR-PA-001")]
    assert await db.pool.fetchval("SELECT count(*) FROM it_things") == 1


def _count_statements(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Every statement sent on any connection from now on, into `calls` (until `monkeypatch.undo()`)."""
    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        method = getattr(asyncpg.Connection, name)

        async def counted(conn: Any, query: str, *args: object, _method: Any = method) -> Any:
            calls.append(query)
            return await _method(conn, query, *args)

        monkeypatch.setattr(asyncpg.Connection, name, counted)


async def test_writes_with_the_append_go_in_its_statement_and_commit_or_roll_back_with_it(
    db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PgAuditTrail.write_with_append`: a transaction's last writes ride in the append's statement (one
    round trip for both), their parameters renumbered after the append's, in the order given; a rolled
    back transaction runs none; with nothing to append they run on their own."""
    calls: list[str] = []
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    async with db.uow.begin() as tx:
        assert tx.conn is not None and isinstance(tx.audit, PgAuditTrail)
        tx.audit.write_with_append("INSERT INTO it_things VALUES ($1, $2)", first, "new")
        tx.audit.write_with_append("INSERT INTO it_things VALUES ($2, $1)", "later", second)
        tx.audit("thing.created", "thing", first, new={"status": "new"}, actor=CENTRE)
        tx.audit("thing.created", "thing", second, new={"status": "later"}, actor=CENTRE)
        _count_statements(monkeypatch, calls)  # what flush sends from here on
        assert await tx.conn.fetchval("SELECT count(*) FROM it_things") == 0  # nothing written yet
        calls.clear()
    monkeypatch.undo()
    assert len(calls) == 2 and calls[1].startswith("COMMIT")  # the append's statement, then COMMIT
    assert calls[0].startswith("WITH w0 AS (") and "audit_append(" in calls[0]
    rows = await db.pool.fetch("SELECT id, status FROM it_things ORDER BY status")
    assert [tuple(r) for r in rows] == [(second, "later"), (first, "new")]
    entries = await db.pool.fetch("SELECT object_id FROM audit_trail ORDER BY seq")
    assert [r["object_id"] for r in entries] == [str(first), str(second)]

    class Refused(Exception):
        pass

    with pytest.raises(Refused):
        async with db.uow.begin() as tx:
            assert isinstance(tx.audit, PgAuditTrail)
            tx.audit.write_with_append("INSERT INTO it_things VALUES ($1, 'never')", third)
            tx.audit("thing.created", "thing", third, new={"status": "never"}, actor=CENTRE)
            raise Refused
    async with db.uow.begin() as tx:  # nothing to append: the write alone
        assert isinstance(tx.audit, PgAuditTrail)
        tx.audit.write_with_append("INSERT INTO it_things VALUES ($1, 'alone')", third)
    assert await db.pool.fetchval("SELECT status FROM it_things WHERE id = $1", third) == "alone"
    assert await db.pool.fetchval("SELECT count(*) FROM audit_trail") == 2
    (summary,) = await verify_database(db.admin_url, db.test_db.name, [SCHEMA], db.checkpoints, db.key_file)
    assert summary.broken is None and summary.entries == 2


class _LeadingRelay:
    """This process's relay, leading: a commit wakes it in-process (no NOTIFY in the transaction)."""

    def __init__(self) -> None:
        self.woken = 0

    def leads(self) -> bool:
        return True

    def wake(self) -> None:
        self.woken += 1


def _probe(n: int) -> CloudEvent:
    return CloudEvent(source=source_for("site"), type="site.probe.v1", subject=f"key-{n % 2}", data={"n": n})


async def test_an_audited_transactions_events_are_written_with_the_append(
    db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox rows of an audited transaction go in the append's statement (one multi-row INSERT, in
    the order the events were added), not one round trip per event; they commit or roll back with it.
    When another replica's relay leads, the first event still goes at once with its NOTIFY; an event
    added after the trail's flush is written on its own (never handed to a flush that already ran)."""
    relay = _LeadingRelay()
    db.uow.attach_relay(relay)
    events = [_probe(n) for n in range(3)]
    calls: list[str] = []
    thing = uuid.uuid4()
    async with db.uow.begin() as tx:
        assert tx.conn is not None
        await tx.conn.execute("INSERT INTO it_things VALUES ($1, 'new')", thing)
        tx.audit("thing.created", "thing", thing, new={"status": "new"}, actor=CENTRE)
        _count_statements(monkeypatch, calls)
        for event in events:
            await tx.outbox.add(event)
        assert await tx.conn.fetchval("SELECT count(*) FROM outbox") == 0  # nothing written yet
        calls.clear()
    monkeypatch.undo()
    assert len(calls) == 2 and calls[1].startswith("COMMIT")  # the append with the rows, then COMMIT
    assert "INSERT INTO outbox" in calls[0] and "audit_append(" in calls[0]
    assert relay.woken == 1
    rows = await db.pool.fetch(
        "SELECT event_id, event_type, topic, message_key, payload, headers FROM outbox ORDER BY id"
    )
    assert [(r["event_id"], r["message_key"], bytes(r["payload"])) for r in rows] == [
        (e.id, e.subject, e.to_json()) for e in events
    ]
    assert {(r["event_type"], r["topic"]) for r in rows} == {("site.probe.v1", "it.audit")}
    assert all(isinstance(r["headers"], dict) for r in rows)

    class Refused(Exception):
        pass

    with pytest.raises(Refused):  # rolled back: neither the entry nor the rows
        async with db.uow.begin() as tx:
            tx.audit("thing.created", "thing", uuid.uuid4(), new={"status": "never"}, actor=CENTRE)
            await tx.outbox.add(_probe(9))
            raise Refused
    assert await db.pool.fetchval("SELECT count(*) FROM outbox") == 3

    # another replica's relay leads: the first event is written with its NOTIFY, the others ride along
    other = UnitOfWork(db.pool, "it.audit", notify_channel(SCHEMA), audited_tx)
    later = [_probe(n) for n in range(10, 13)]
    async with other.begin() as tx:
        tx.audit("thing.created", "thing", uuid.uuid4(), new={"status": "other"}, actor=CENTRE)
        for event in later[:2]:
            await tx.outbox.add(event)
        assert await tx.conn.fetchval("SELECT count(*) FROM outbox") == 4  # the first, at once
        await tx.audit.flush()  # the trail's flush ran: what comes now is written on its own
        assert not tx.audit.accepts_writes
        with pytest.raises(RuntimeError):
            tx.audit.write_with_append("INSERT INTO it_things VALUES ($1, 'lost')", uuid.uuid4())
        await tx.outbox.add(later[2])
        assert await tx.conn.fetchval("SELECT count(*) FROM outbox") == 6
    ids = await db.pool.fetch("SELECT event_id FROM outbox ORDER BY id")
    assert [r["event_id"] for r in ids] == [e.id for e in [*events, *later]]
    assert await db.pool.fetchval("SELECT count(*) FROM audit_trail") == 2


async def test_two_writers_chain_in_one_total_order(db: Db) -> None:
    """Two pools (two replicas), 8 concurrent transactions each, 3 entries per transaction."""
    other = await create_pool(db.test_db.urls[SERVICE], max_size=8)
    try:
        uows = [db.uow, UnitOfWork(other, "it.audit", notify_channel(SCHEMA), audited_tx)]
        per_writer, concurrency = 40, 8

        async def writer(uow: UnitOfWork[AuditedTx], name: str) -> None:
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with sem:
                    await change(uow, 3, actor=Actor.system(name))

            await asyncio.gather(*(one() for _ in range(per_writer)))

        await asyncio.gather(writer(uows[0], "replica-1"), writer(uows[1], "replica-2"))
    finally:
        await other.close()
    total = 2 * per_writer * 3
    seqs = [r["seq"] for r in await db.pool.fetch("SELECT seq FROM audit_trail ORDER BY seq")]
    assert seqs == list(range(1, total + 1))
    # each transaction's entries are consecutive (appended at once under the chain lock)
    actors = [
        r["actor_client_id"]
        for r in await db.pool.fetch("SELECT actor_client_id FROM audit_trail ORDER BY seq")
    ]
    assert all(len(set(actors[i : i + 3])) == 1 for i in range(0, total, 3))
    assert {"replica-1", "replica-2"} == set(actors)
    await checkpoint(db)
    (summary,) = await verify_database(db.admin_url, db.test_db.name, [SCHEMA], db.checkpoints, db.key_file)
    assert summary.broken is None and summary.entries == total and summary.checkpoints == 1


# ---- tampering as the superuser, found by the verifier ---------------------------------------------------


async def tamper(db: Db, *statements: str) -> None:
    """Run `statements` as the superuser with the triggers off (session_replication_role = replica)."""
    admin = await db.admin()
    try:
        async with admin.transaction():
            await admin.execute("SET LOCAL session_replication_role = replica")
            await admin.execute(f"SET LOCAL search_path = {SCHEMA}")
            for sql in statements:
                await admin.execute(sql)
    finally:
        await admin.close()


async def verify_cli(db: Db, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = await asyncio.to_thread(audit_cli, db.cli())
    return code, capsys.readouterr().out


async def ten_entries_checkpointed(db: Db) -> None:
    for _ in range(5):
        await change(db.uow, 2)
    assert await checkpoint(db) == 10


async def test_an_untouched_platform_verifies_with_one_line_per_schema(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    await ten_entries_checkpointed(db)
    code, out = await verify_cli(db, capsys)
    lines = out.strip().splitlines()
    assert code == 0, out
    assert len(lines) == 5 and all(line.startswith("ok ") for line in lines)
    assert f"ok {SCHEMA}: 10 entries, seq 1..10" in out and "1 checkpoint(s), latest at seq 10" in out
    assert "ok ordering: 0 entries" in out


async def test_a_changed_value_is_found(db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    await ten_entries_checkpointed(db)
    await tamper(db, """UPDATE audit_trail SET new_values = '{"status": "released"}' WHERE seq = 4""")
    code, out = await verify_cli(db, capsys)
    assert code == 1
    assert f"BROKEN {SCHEMA}: entry seq 4: changed" in out


async def test_a_changed_actor_with_its_hash_recomputed_is_found(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even a forger who recomputes the entry's hash is caught: the next entry no longer chains to it."""
    await ten_entries_checkpointed(db)
    rows = await db.pool.fetch("SELECT seq FROM audit_trail WHERE seq = 6")
    assert rows
    from v2v_audit import store

    conn = await asyncpg.connect(db.admin_url)
    try:
        (record,) = [r async for r in store.scan(conn, SCHEMA) if r.seq == 6]
    finally:
        await conn.close()
    import dataclasses

    forged = dataclasses.replace(record, actor=Actor("qa-1", "qa"))
    await tamper(
        db,
        f"""UPDATE audit_trail SET actor_client_id = 'qa-1', actor_kind = 'qa', actor_entity_id = NULL,
            entry_hash = '\\x{forged.computed_hash().hex()}' WHERE seq = 6""",
    )
    code, out = await verify_cli(db, capsys)
    assert code == 1
    assert f"BROKEN {SCHEMA}: entry seq 7: does not chain to seq 6" in out


async def test_a_deleted_row_is_found(db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    await ten_entries_checkpointed(db)
    await tamper(db, "DELETE FROM audit_trail WHERE seq = 5")
    code, out = await verify_cli(db, capsys)
    assert code == 1
    assert f"BROKEN {SCHEMA}: entry seq 5: missing: seq 5 removed (the next entry present is seq 6)" in out


async def test_reordered_rows_are_found(db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    await ten_entries_checkpointed(db)
    await tamper(
        db,
        "UPDATE audit_trail SET seq = 1000 WHERE seq = 3",
        "UPDATE audit_trail SET seq = 3 WHERE seq = 7",
        "UPDATE audit_trail SET seq = 7 WHERE seq = 1000",
    )
    code, out = await verify_cli(db, capsys)
    assert code == 1
    assert f"BROKEN {SCHEMA}: entry seq 3: moved: this entry was written as seq 7" in out


async def test_a_truncated_tail_is_found_against_the_checkpoint(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    await ten_entries_checkpointed(db)
    await tamper(db, "DELETE FROM audit_trail WHERE seq > 7")
    code, out = await verify_cli(db, capsys)
    assert code == 1
    assert f"BROKEN {SCHEMA}: entry seq 8: missing: the signed checkpoint" in out
    assert "records seq 10, the table ends at seq 7 (the tail was removed)" in out
    # TRUNCATE, the same
    await tamper(db, "TRUNCATE audit_trail")
    code, out = await verify_cli(db, capsys)
    assert code == 1 and f"BROKEN {SCHEMA}: entry seq 1: missing" in out


async def test_a_forged_checkpoint_is_refused(db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    await ten_entries_checkpointed(db)
    (path,) = (db.checkpoints / db.test_db.name / SCHEMA).glob("*.jws")
    header, payload, signature = path.read_text().split(".")
    path.write_text(".".join([header, payload[:-4] + "AAAA", signature]))
    code, out = await verify_cli(db, capsys)
    assert code == 1 and f"BROKEN {SCHEMA}: entry seq 0: checkpoint {path.name}: signature invalid" in out


async def test_the_checkpoint_key_is_private_to_its_owner(db: Db) -> None:
    await ten_entries_checkpointed(db)
    assert db.key_file.stat().st_mode & 0o777 == 0o600
    assert cps.public_key_file(db.key_file).exists()
    assert "d" not in cps.verification_key(db.key_file).as_dict(private=False)  # type: ignore[union-attr]


# ---- cost ------------------------------------------------------------------------------------------------


async def test_the_cost_of_auditing_a_transaction(db: Db) -> None:
    """Transactions of one insert, without and with one audit entry, sequential and 16 at once over two
    pools (two replicas): prints the figures (pytest -s); the chain holds afterwards."""
    other = await create_pool(db.test_db.urls[SERVICE], max_size=8)
    plain: UnitOfWork[AuditedTx] = UnitOfWork(db.pool, "it.audit", notify_channel(SCHEMA), audited_tx)
    uows = [db.uow, UnitOfWork(other, "it.audit", notify_channel(SCHEMA), audited_tx)]

    async def tx(uow: UnitOfWork[AuditedTx], audited: bool) -> None:
        async with uow.begin() as t:
            assert t.conn is not None
            thing = uuid.uuid4()
            await t.conn.execute("INSERT INTO it_things VALUES ($1, 'new')", thing)
            if audited:
                t.audit("thing.created", "thing", thing, new={"status": "new"}, reason="bench", actor=CENTRE)

    async def rate(n: int, concurrency: int, audited: bool) -> float:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                await tx(uows[i % 2] if concurrency > 1 else plain, audited)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - started)

    try:
        await rate(100, 16, True)  # warm up
        figures = {}
        for concurrency in (1, 16):
            n = 300 if concurrency == 1 else 600
            without = await rate(n, concurrency, False)
            with_audit = await rate(n, concurrency, True)
            figures[concurrency] = (without, with_audit)
            added_ms = (1 / with_audit - 1 / without) * 1000
            print(
                f"\naudit cost, concurrency {concurrency}: {without:.0f} tx/s without, {with_audit:.0f} tx/s "
                f"with one entry ({added_ms:+.2f} ms per transaction)"
            )
    finally:
        await other.close()
    (summary,) = await verify_database(db.admin_url, db.test_db.name, [SCHEMA], db.checkpoints, db.key_file)
    assert summary.broken is None and summary.entries == 100 + 300 + 600
    for without, with_audit in figures.values():
        assert with_audit > 0 and without > 0


async def test_the_supervised_loop_checkpoints_the_head_when_it_moves(
    db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audit_checkpoints(rt)` as the runtime runs it (V2V_AUDIT_CHECKPOINT_DIR, _INTERVAL_S): a signed
    checkpoint of the head once it moved, none while it stays, a new one when it moves again."""
    from types import SimpleNamespace

    from v2v_audit.service import audit_checkpoints
    from v2v_messaging import Heartbeat

    monkeypatch.setenv("V2V_AUDIT_CHECKPOINT_DIR", str(db.checkpoints))
    monkeypatch.setenv("V2V_AUDIT_CHECKPOINT_INTERVAL_S", "0.05")
    heartbeat = Heartbeat("audit_checkpoints")
    rt = SimpleNamespace(pool=db.pool, definition=SimpleNamespace(schema=SCHEMA), heartbeat=lambda: heartbeat)
    folder = db.checkpoints / db.test_db.name / SCHEMA

    async def files(n: int) -> list[str]:
        for _ in range(100):
            found = sorted(p.name for p in folder.glob("*.jws")) if folder.is_dir() else []
            if len(found) >= n:
                return found
            await asyncio.sleep(0.05)
        return found

    loop = asyncio.create_task(audit_checkpoints(rt))
    try:
        await asyncio.sleep(0.2)
        assert await files(0) == []  # an empty chain: nothing to checkpoint
        await change(db.uow, 2)
        assert await files(1) == ["000000000000002.jws"]
        await asyncio.sleep(0.2)
        assert await files(1) == ["000000000000002.jws"]  # the head did not move
        await change(db.uow, 1)
        assert await files(2) == ["000000000000002.jws", "000000000000003.jws"]
        assert heartbeat.beats > 0
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    (summary,) = await verify_database(db.admin_url, db.test_db.name, [SCHEMA], db.checkpoints, db.key_file)
    assert summary.broken is None and summary.checkpoints == 2


async def test_values_survive_jsonb_and_verify(db: Db) -> None:
    """Old and new values read back from jsonb hash as they were written (numbers, unicode, nesting)."""
    values = {
        "floats": [0.1, 12.0, -150.0, 1.5e-7, 1e16, 2.5e20, 1e300],
        "ints": [0, -1, 2**62, 10**30],
        "text": 'Zürich ✓ "quoted" \\ tab\t',
        "nested": {"b": [True, False, None], "a": {"z": [], "y": {}}},
    }
    async with db.uow.begin() as tx:
        tx.audit("values.checked", "thing", "v-1", old=values, new={"x": values["floats"]})
    (summary,) = await verify_database(db.admin_url, db.test_db.name, [SCHEMA], db.checkpoints, db.key_file)
    assert summary.broken is None and summary.entries == 1
