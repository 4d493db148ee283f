"""Versioned SQL migrations per service, applied with yoyo-migrations inside the service's own schema.

yoyo keeps its bookkeeping tables (`_yoyo_migration`, `_yoyo_log`, `yoyo_lock`, ...) in that schema too,
so every service's migration history is its own. A lock serialises replicas starting together.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from yoyo import get_backend, read_migrations


def _yoyo_url(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["schema"] = schema
    return urlunsplit(("postgresql+psycopg", parts.netloc, parts.path, urlencode(query), ""))


def apply_migrations_sync(url: str, schema: str, directories: list[Path]) -> list[str]:
    backend = get_backend(_yoyo_url(url, schema))
    try:
        migrations = read_migrations(*[str(d) for d in directories])
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [m.id for m in pending]
    finally:
        backend.connection.close()


async def apply_migrations(url: str, schema: str, directories: list[Path]) -> list[str]:
    return await asyncio.to_thread(apply_migrations_sync, url, schema, directories)
