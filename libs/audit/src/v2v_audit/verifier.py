"""Verify every service's chain against itself and against its signed checkpoints (make audit-verify).

For each schema: every entry's hash is recomputed from its stored fields and compared, each entry must
chain to the one before it (prev_hash), seqs run from 1 without a gap, every signed checkpoint must name
an entry whose hash it recorded, and none may lie beyond the table's end. The first broken entry is
named: schema, seq and what is wrong (changed, moved, missing, rewritten, tail removed). Runs as a role
that may read every schema (the administrator's URL, as the harness has it).
"""

from __future__ import annotations

from pathlib import Path

import asyncpg

from v2v_audit import checkpoints as cps
from v2v_audit import store
from v2v_audit.chain import Break, ChainSummary, ChainVerifier, Checkpoint
from v2v_persistence import connect


async def verify_schema(
    conn: asyncpg.Connection, database: str, schema: str, checkpoints: list[Checkpoint]
) -> ChainSummary:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".audit_trail')
    if not exists:
        summary = ChainSummary(schema)
        summary.broken = Break(schema, 0, "no audit_trail table (the service's migrations never ran)")
        return summary
    verifier = ChainVerifier(schema, checkpoints)
    async for record in store.scan(conn, schema):
        if not verifier.add(record):
            broken = verifier.summary.broken
            if broken is not None and broken.seq == record.seq and broken.problem.startswith("changed"):
                verifier.explain(record, await store.seq_of_hash(conn, schema, record.prev_hash))
            break
    return verifier.finish()


async def verify_database(
    url: str, database: str, schemas: list[str], directory: Path, key_file: Path
) -> list[ChainSummary]:
    key = cps.verification_key(key_file)
    conn = await connect(url)
    try:
        out = []
        for schema in schemas:
            try:
                found = cps.read_all(directory, key, database, schema)
            except cps.BadCheckpoint as exc:
                summary = ChainSummary(schema)
                summary.broken = Break(schema, 0, f"checkpoint {exc}")
                out.append(summary)
                continue
            out.append(await verify_schema(conn, database, schema, found))
        return out
    finally:
        await conn.close()
