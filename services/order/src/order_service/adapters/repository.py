"""asyncpg access to the ordering schema. Every call runs on the caller's connection/transaction."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import yaml

SEED_DIR = Path(__file__).resolve().parent.parent / "seed"


async def load_seed(conn: asyncpg.Connection) -> None:
    """Upsert the seed files; safe to run at every start."""
    centres = yaml.safe_load((SEED_DIR / "treatment_centers.yaml").read_text())
    for c in centres:
        await conn.execute(
            """INSERT INTO treatment_centers (id, name, country, region, regulator, timezone)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (id) DO UPDATE SET name = $2, country = $3, region = $4, regulator = $5,
                                              timezone = $6""",
            c["id"],
            c["name"],
            c["country"],
            c["region"],
            c["regulator"],
            c["timezone"],
        )
    products = yaml.safe_load((SEED_DIR / "products.yaml").read_text())
    for p in products:
        attrs = {k: v for k, v in p.items() if k not in {"code", "name"}}
        await conn.execute(
            """INSERT INTO products (code, name, attributes) VALUES ($1, $2, $3::jsonb)
               ON CONFLICT (code) DO UPDATE SET name = $2, attributes = $3::jsonb""",
            p["code"],
            p["name"],
            attrs,
        )


async def get_centre(conn: asyncpg.Connection, centre_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM treatment_centers WHERE id = $1 AND certified", centre_id)


async def get_product(conn: asyncpg.Connection, code: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM products WHERE code = $1", code)


async def list_centres(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM treatment_centers ORDER BY id"))


async def list_products(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT * FROM products ORDER BY code"))


async def next_coi_sequence(conn: asyncpg.Connection, year: int) -> int:
    return int(
        await conn.fetchval(
            """INSERT INTO coi_sequences (year, last_value) VALUES ($1, 1)
               ON CONFLICT (year) DO UPDATE SET last_value = coi_sequences.last_value + 1
               RETURNING last_value""",
            year,
        )
    )


async def insert_order(conn: asyncpg.Connection, **fields: Any) -> asyncpg.Record:
    cols = ", ".join(fields)
    params = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
    row = await conn.fetchrow(f"INSERT INTO orders ({cols}) VALUES ({params}) RETURNING *", *fields.values())
    assert row is not None
    return row


async def get_order(
    conn: asyncpg.Connection | asyncpg.Pool, order_id: uuid.UUID, *, lock: bool = False
) -> asyncpg.Record | None:
    sql = "SELECT * FROM orders WHERE order_id = $1" + (" FOR UPDATE" if lock else "")
    return await conn.fetchrow(sql, order_id)


async def update_order(conn: asyncpg.Connection, order_id: uuid.UUID, **fields: Any) -> None:
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(fields, start=2))
    await conn.execute(
        f"UPDATE orders SET {sets}, updated_at = now(), version = version + 1 WHERE order_id = $1",
        order_id,
        *fields.values(),
    )


async def add_timeline(
    conn: asyncpg.Connection,
    *,
    order_id: uuid.UUID,
    event_id: uuid.UUID,
    event_type: str,
    source: str,
    occurred_at: datetime,
    status_before: str | None,
    status_after: str | None,
    reason: str,
) -> None:
    await conn.execute(
        """INSERT INTO order_timeline (order_id, event_id, event_type, source, occurred_at,
                                       status_before, status_after, reason)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (order_id, event_id) DO NOTHING""",
        order_id,
        event_id,
        event_type,
        source,
        occurred_at,
        status_before,
        status_after,
        reason,
    )


async def timeline(conn: asyncpg.Connection | asyncpg.Pool, order_id: uuid.UUID) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT * FROM order_timeline WHERE order_id = $1 ORDER BY occurred_at, id", order_id
        )
    )


async def list_orders(
    conn: asyncpg.Connection | asyncpg.Pool, *, centre: str | None, limit: int, offset: int
) -> tuple[list[asyncpg.Record], int]:
    where = "WHERE treatment_center_id = $1" if centre else "WHERE $1::text IS NULL"
    rows = await conn.fetch(
        f"SELECT * FROM orders {where} ORDER BY created_at, order_id LIMIT $2 OFFSET $3",
        centre,
        limit,
        offset,
    )
    total = await conn.fetchval(f"SELECT count(*) FROM orders {where}", centre)
    return list(rows), int(total)


def as_date(value: object) -> date | None:
    return value if isinstance(value, date) else None
