"""Reading the audit trail back: the records of one object (an API's page), the chain's head (for the
checkpoints), and every record in seq order (for the verifier)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from v2v_audit.chain import Actor, Record

COLUMNS = """seq, entry_id, recorded_at, actor_client_id, actor_user_id, actor_kind, actor_entity_id, action,
    object_type, object_id, old_values, new_values, reason, cause, prev_hash, entry_hash"""


def _json(value: Any) -> Any:
    # the verifier's own connection may have no jsonb codec: then jsonb arrives as text
    if isinstance(value, str):
        import json

        return json.loads(value)
    return value


def record_of(schema: str, row: Any) -> Record:
    return Record(
        schema=schema,
        seq=int(row["seq"]),
        entry_id=row["entry_id"],
        recorded_at=row["recorded_at"],
        actor=Actor(
            client_id=row["actor_client_id"],
            kind=row["actor_kind"],
            entity_id=row["actor_entity_id"],
            user_id=row["actor_user_id"],
        ),
        action=row["action"],
        object_type=row["object_type"],
        object_id=row["object_id"],
        old=_json(row["old_values"]),
        new=_json(row["new_values"]),
        reason=row["reason"],
        cause=row["cause"],
        prev_hash=bytes(row["prev_hash"]),
        entry_hash=bytes(row["entry_hash"]),
    )


async def of_objects(
    conn: asyncpg.Connection | asyncpg.Pool,
    schema: str,
    objects: list[tuple[str, str]],
    *,
    limit: int,
    offset: int,
) -> tuple[list[Record], int]:
    """A page of the records about any of `objects` ((type, id) pairs), oldest first, and their count."""
    types = [t for t, _ in objects]
    ids = [i for _, i in objects]
    where = """FROM audit_trail a JOIN unnest($1::text[], $2::text[]) AS o(t, i)
               ON a.object_type = o.t AND a.object_id = o.i"""
    rows = await conn.fetch(
        f"SELECT {', '.join('a.' + c.strip() for c in COLUMNS.split(','))} {where} ORDER BY a.seq "
        "LIMIT $3 OFFSET $4",
        types,
        ids,
        limit,
        offset,
    )
    total = await conn.fetchval(f"SELECT count(*) {where}", types, ids)
    return [record_of(schema, r) for r in rows], int(total or 0)


async def head(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[int, bytes] | None:
    """The chain's last entry: (seq, entry_hash), None while it is empty."""
    row = await conn.fetchrow("SELECT seq, entry_hash FROM audit_trail ORDER BY seq DESC LIMIT 1")
    return (int(row["seq"]), bytes(row["entry_hash"])) if row else None


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def scan(conn: asyncpg.Connection, schema: str, *, batch: int = 2000) -> AsyncIterator[Record]:
    """Every record of `schema`'s chain in seq order (keyset pages: no long transaction needed)."""
    after = 0
    table = f"{_ident(schema)}.audit_trail"
    while True:
        rows = await conn.fetch(
            f"SELECT {COLUMNS} FROM {table} WHERE seq > $1 ORDER BY seq LIMIT $2", after, batch
        )
        for row in rows:
            yield record_of(schema, row)
        if len(rows) < batch:
            return
        after = int(rows[-1]["seq"])


async def seq_of_hash(conn: asyncpg.Connection, schema: str, entry_hash: bytes) -> int | None:
    value = await conn.fetchval(
        f"SELECT seq FROM {_ident(schema)}.audit_trail WHERE entry_hash = $1 ORDER BY seq LIMIT 1", entry_hash
    )
    return int(value) if value is not None else None
