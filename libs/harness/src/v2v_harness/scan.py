"""Scanners over everything that leaves a service, for the privacy and canary tests: every record on
every topic of a namespace (dead-letter topics too), exported telemetry, logs, and the rows of every table
of a database's schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

Record = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]


async def namespace_topics(bootstrap: str, namespace: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.startswith(namespace + "."))
    finally:
        await admin.close()


async def read_everything(bootstrap: str, topics: list[str]) -> dict[str, list[Record]]:
    """Every record on every partition of `topics`, from offset 0 to the end as of now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = {t: consumer.partitions_for_topic(t) or set() for t in topics}
        assert all(partitions.values()), (
            f"no partitions known for {[t for t, p in partitions.items() if not p]}"
        )
        tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in sorted(ps)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[str, list[Record]] = {t: [] for t in topics}

        async def behind() -> list[TopicPartition]:
            return [tp for tp in tps if await consumer.position(tp) < ends[tp]]

        while await behind():
            batch = await consumer.getmany(*(await behind()), timeout_ms=500)
            for records in batch.values():
                for r in records:
                    out[r.topic].append((r.topic, r.key, r.value, list(r.headers)))
        # at least up to the end as of now: Tansu reports a partition's end as the base offset of its last
        # record batch + 1 (so a batched publish reads as fewer records than there are); fetches return
        # whole batches, so everything up to the real end is read
        assert sum(len(v) for v in out.values()) >= sum(ends.values())
        return out
    finally:
        await consumer.stop()


def records_containing(messages: dict[str, list[Record]], needle: bytes) -> list[tuple[str, bytes | None]]:
    """(topic, first bytes of the value) of every record whose key, value or headers contain `needle`."""
    return [
        (topic, value[:120] if value else value)
        for topic, records in messages.items()
        for (topic, key, value, headers) in records
        if needle in (key or b"")
        or needle in (value or b"")
        or any(needle in k.encode() or needle in (v or b"") for k, v in headers)
    ]


def telemetry_files(state_dir: Path) -> list[Path]:
    return sorted(Path(state_dir, "telemetry").glob("*.jsonl"))


def exported_spans(state_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in Path(state_dir, "telemetry").glob("spans-*.jsonl"):
        text = path.read_text(encoding="utf-8")
        out += [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]
    return out


async def rows_containing(
    admin_url: str, database: str, needle: str, *, exclude_schemas: tuple[str, ...] = ()
) -> dict[str, int]:
    """`schema.table` -> how many of its rows contain `needle` anywhere (any column, as text), for every
    table of every non-system schema of `database` except `exclude_schemas`."""
    url = admin_url.rsplit("/", 1)[0] + "/" + database
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            """SELECT table_schema, table_name FROM information_schema.tables
               WHERE table_type = 'BASE TABLE'
                 AND table_schema NOT IN ('pg_catalog', 'information_schema')
                 AND table_schema <> ALL($1::text[])""",
            list(exclude_schemas),
        )
        found: dict[str, int] = {}
        for t in tables:
            name = f'"{t["table_schema"]}"."{t["table_name"]}"'
            count = await conn.fetchval(
                f"SELECT count(*) FROM {name} AS r WHERE strpos(r::text, $1) > 0",
                needle,
            )
            if count:
                found[f"{t['table_schema']}.{t['table_name']}"] = int(count)
        return found
    finally:
        await conn.close()


async def schemas_of(admin_url: str, database: str) -> list[str]:
    url = admin_url.rsplit("/", 1)[0] + "/" + database
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT schema_name FROM information_schema.schemata "
            "WHERE schema_name NOT LIKE 'pg_%' AND schema_name <> 'information_schema'"
        )
        return sorted(r["schema_name"] for r in rows)
    finally:
        await conn.close()
