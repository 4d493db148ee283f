"""Wiring the audit trail into a service: `DEFINITION = audited(ServiceDefinition(...))`.

It adds to the service's definition
- a start-up step, before the service's own: the audit migration applied to the service's schema by its
  owner role (`V2V_MIGRATION_DATABASE_URL`, as the runtime applies the others), then the runtime role's
  privileges on `audit_trail` cut back to SELECT and INSERT (again at every start: provisioning grants
  every table's DML to the runtime role), and the service named as the actor of its own changes;
- `audit_context` on every route (the caller's principal becomes the actor of a request's entries);
- the supervised `audit_checkpoints` loop (signed checkpoints outside the database, `v2v_audit.checkpoints`).

The definition is taken duck-typed (a `v2v_servicekit.ServiceDefinition`), so that this library does not
depend on the service kit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, TypeVar

from v2v_audit import MIGRATIONS_DIR, store
from v2v_audit import checkpoints as cps
from v2v_audit.chain import Actor, Checkpoint
from v2v_audit.http import audited_router
from v2v_audit.settings import AuditSettings
from v2v_audit.trail import set_system_actor
from v2v_observability import get_logger
from v2v_persistence import apply_migrations, connect

log = get_logger(__name__)
D = TypeVar("D")


def audited(definition: D) -> D:
    """`definition` with the audit trail's start-up step, request context and checkpoint loop."""
    d: Any = definition
    return dataclasses.replace(  # type: ignore[type-var,no-any-return]
        d,
        routers=[audited_router(r) for r in d.routers],
        on_startup=[prepare_audit_trail, *d.on_startup],
        background=[*d.background, audit_checkpoints],
    )


async def migrate(owner_url: str, schema: str) -> list[str]:
    """Apply the audit migration to `schema` and cut the other roles' privileges on the trail back to
    SELECT and INSERT; run as the schema's owner."""
    applied = await apply_migrations(owner_url, schema, [MIGRATIONS_DIR])
    conn = await connect(owner_url, server_settings={"search_path": schema})
    try:
        await conn.fetchval("SELECT audit_trail_lockdown()")
    finally:
        await conn.close()
    return applied


async def prepare_audit_trail(rt: Any) -> None:
    settings = rt.settings
    set_system_actor(Actor.system(rt.definition.name))
    applied = await migrate(settings.migration_database_url or settings.database_url, rt.definition.schema)
    log.info("audit trail ready", migrations_applied=applied)


async def checkpoint_once(pool: Any, directory: Any, key: Any, database: str, schema: str, last: int) -> int:
    """Write a checkpoint when the chain's head moved past `last`; returns the seq checkpointed."""
    head = await store.head(pool)
    if head is None:
        return last
    seq, entry_hash = head
    if seq < last:
        log.error("audit trail shorter than its last checkpoint", schema=schema, seq=seq, checkpoint=last)
        return last
    if seq == last:
        return last
    cp = Checkpoint(database, schema, seq, entry_hash, cps.now())
    await asyncio.to_thread(cps.write, directory, key, cp)
    return seq


async def audit_checkpoints(rt: Any) -> None:
    """Supervised loop: every `V2V_AUDIT_CHECKPOINT_INTERVAL_S`, a signed checkpoint of the chain's head
    when it moved (two replicas may both write one; they agree)."""
    settings = AuditSettings()
    directory = settings.checkpoint_dir()
    key = await asyncio.to_thread(cps.signing_key, settings.key_file())
    database = str(await rt.pool.fetchval("SELECT current_database()"))
    schema = rt.definition.schema
    last = cps.latest_seq(directory, database, schema)
    heartbeat = rt.heartbeat()
    log.info(
        "audit checkpoints",
        directory=str(directory),
        schema=schema,
        interval_s=settings.audit_checkpoint_interval_s,
    )
    while True:
        last = await checkpoint_once(rt.pool, directory, key, database, schema, last)
        deadline = time.monotonic() + settings.audit_checkpoint_interval_s
        while (remaining := deadline - time.monotonic()) > 0:
            heartbeat.beat()
            await asyncio.sleep(min(remaining, 5.0))
