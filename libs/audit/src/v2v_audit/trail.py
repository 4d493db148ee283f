"""Writing the audit trail inside a service's unit of work.

Service-layer code records each change where it makes it, in the transaction that makes it:

    tx.audit("order.cancelled", "order", order.order_id,
             old={"status": "submitted"}, new={"status": "cancelled"}, reason="patient-withdrew")

`tx.audit(...)` only buffers the entry (no I/O); the unit of work's `before_commit` appends every buffered
entry right before COMMIT (`PgAuditTrail.flush`): one call (`audit_append`, one round trip) takes the
schema's chain lock (an advisory transaction lock), reads the tail and the server's clock, hashes and adds
the entries, and COMMIT releases the lock. The serialization window is that round trip and the commit,
whatever the transaction did before; two replicas' transactions chain in one total order (the order of
their commits).
A transaction that rolls back leaves no entry; an entry is never written without its change.

Who acted comes, in this order, from `actor=` given to the call, from the trail's own default (an event
consumer's: `AuditedHandlers` sets it from the event, with the event id as cause), from the HTTP request
being served (`v2v_audit.http.audit_context`, the access token's principal), else the service itself.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from functools import partial
from typing import Any, Generic, TypeVar

import asyncpg
from opentelemetry import trace

from v2v_audit.chain import (
    GENESIS,
    UNKNOWN_SYSTEM,
    Actor,
    Entry,
    Record,
    chain,
    jsonable,
    short_text,
    template,
)
from v2v_contracts import CloudEvent
from v2v_messaging import EventSink, HandlerRegistry, Outbox, Tx

# what the current HTTP request's caller is (resolved lazily: the principal is known only once the
# route's scope dependency ran) - set by `v2v_audit.http.audit_context`
_REQUEST_ACTOR: ContextVar[Callable[[], Actor | None] | None] = ContextVar("v2v_audit_request", default=None)
_system_actor: Actor = UNKNOWN_SYSTEM  # one service per process: set once at start-up


def set_request_actor(resolve: Callable[[], Actor | None]) -> None:
    """The current request's actor, read when an entry is recorded (see `v2v_audit.http`)."""
    _REQUEST_ACTOR.set(resolve)


def set_system_actor(actor: Actor) -> None:
    """Who the service itself is, for changes no request or event caused (start-up, background loops)."""
    global _system_actor
    _system_actor = actor


def request_actor() -> Actor | None:
    resolve = _REQUEST_ACTOR.get()
    return resolve() if resolve is not None else None


def trace_cause() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"trace:{ctx.trace_id:032x}" if ctx.is_valid else None


def event_cause(event: CloudEvent) -> str:
    return f"event:{event.id}"


class AuditTrail(ABC):
    """What a `Tx` offers the service layer: `tx.audit(action, object_type, object_id, ...)`."""

    def __init__(self) -> None:
        self._actor: Actor | None = None
        self._cause: str | None = None

    def acting(self, actor: Actor | None, cause: str | None = None) -> None:
        """The actor (and cause) of every entry of this transaction that names none itself."""
        self._actor = actor
        self._cause = cause

    def __call__(
        self,
        action: str,
        object_type: str,
        object_id: object,
        *,
        old: Any = None,
        new: Any = None,
        reason: str | None = None,
        actor: Actor | None = None,
        cause: str | None = None,
    ) -> Entry:
        """Record a change: `old` and `new` values (ids and codes outside the order service), a reason code.
        Returns the entry (appended to the chain at commit)."""
        from_request = request_actor() if actor is None and self._actor is None else None
        who = actor or self._actor or from_request or _system_actor
        why = cause or self._cause or (trace_cause() if from_request is not None else None)
        entry = Entry(
            action=short_text("action", action) or "",
            object_type=short_text("object type", object_type) or "",
            object_id=short_text("object id", object_id) or "",
            actor=who,
            old=jsonable(old),
            new=jsonable(new),
            reason=short_text("reason", reason, optional=True),
            cause=short_text("cause", why, optional=True),
        )
        self._add(entry)
        return entry

    @abstractmethod
    def _add(self, entry: Entry) -> None: ...

    @abstractmethod
    async def flush(self) -> list[Record]:
        """Append what was recorded to the chain (right before COMMIT); returns the sealed records."""

    @property
    @abstractmethod
    def pending(self) -> list[Entry]:
        """Entries recorded in this transaction and not yet appended."""


APPEND = """SELECT chain_schema, seq, recorded_at, prev_hash, entry_hash FROM audit_append(
    $1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
    $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[])"""


def _json_text(value: Any) -> str | None:
    # None is SQL NULL (no value), as the jsonb codec sends it; anything else is its JSON text
    return None if value is None else json.dumps(value, separators=(",", ":"))


def append_arguments(entries: list[Entry]) -> tuple[list[Any], ...]:
    """`audit_append`'s arguments: one array per column, each entry's canonical template first."""
    templates = [template(e) for e in entries]
    return (
        [h for h, _ in templates],
        [m for _, m in templates],
        [e.entry_id for e in entries],
        [e.actor.client_id for e in entries],
        [e.actor.user_id for e in entries],
        [e.actor.kind for e in entries],
        [e.actor.entity_id for e in entries],
        [e.action for e in entries],
        [e.object_type for e in entries],
        [e.object_id for e in entries],
        [_json_text(e.old) for e in entries],
        [_json_text(e.new) for e in entries],
        [e.reason for e in entries],
        [e.cause for e in entries],
    )


Write = tuple[str, tuple[Any, ...]]  # a statement and its arguments ($1, $2, ... in the statement)
_PARAMETER = re.compile(r"\$(\d+)")


class PgAuditTrail(AuditTrail):
    """The trail of one Postgres transaction (the connection of the unit of work)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__()
        self.conn = conn
        self._pending: list[Entry] = []
        self._writes: list[Write] = []
        self._flushed = False

    def _add(self, entry: Entry) -> None:
        self._pending.append(entry)

    def write_with_append(self, sql: str, *args: Any) -> None:
        """Run `sql` (one INSERT, UPDATE or DELETE without RETURNING, parameters from $1) with the
        append, in the same statement and round trip: the transaction's last writes, made right before
        COMMIT, in the order given. Nothing is written until `flush`; a rolled-back transaction never
        runs them. A write given after the flush would never run: it is refused (RuntimeError)."""
        if self._flushed:
            raise RuntimeError("a write given to the audit trail after its flush would never be run")
        self._writes.append((sql, args))

    @property
    def accepts_writes(self) -> bool:
        """Whether `write_with_append` still takes writes (until the flush before COMMIT)."""
        return not self._flushed

    @property
    def pending(self) -> list[Entry]:
        return list(self._pending)

    async def flush(self) -> list[Record]:
        self._flushed = True  # the transaction's last writes: what is given from now on runs on its own
        entries, self._pending = self._pending, []
        writes, self._writes = self._writes, []
        if entries:
            return await append(self.conn, entries, writes)
        if writes:  # nothing to append: the writes alone, still in one statement
            prefix, args = _with_writes(writes, 1)
            await self.conn.execute(prefix + "SELECT 1" if len(writes) > 1 else writes[0][0], *args)
        return []


def _shifted(match: re.Match[str], *, by: int) -> str:
    return f"${int(match.group(1)) + by}"


def _with_writes(writes: list[Write], first: int) -> tuple[str, list[Any]]:
    """`writes` as data-modifying CTEs of one statement (`WITH w0 AS (...), w1 AS (...) `), their
    parameters renumbered from `first`; Postgres runs every one of them whether the statement reads them
    or not."""
    ctes: list[str] = []
    args: list[Any] = []
    for n, (sql, values) in enumerate(writes):
        renumbered = _PARAMETER.sub(partial(_shifted, by=first - 1 + len(args)), sql)
        ctes.append(f"w{n} AS ({renumbered})")
        args.extend(values)
    return ("WITH " + ", ".join(ctes) + " " if ctes else ""), args


async def append(
    conn: asyncpg.Connection, entries: list[Entry], writes: list[Write] | None = None
) -> list[Record]:
    """Append `entries` to the chain of the connection's schema, in the caller's open transaction, in one
    round trip (`audit_append`: the chain lock, held from here to the transaction's end, the tail, the
    server's clock, the hashes and the rows). Every hash the database computed is checked against the
    verifier's own computation: a difference fails the transaction rather than write a chain that would
    not verify. `writes`: statements run in the same statement (`PgAuditTrail.write_with_append`)."""
    arguments = append_arguments(entries)
    prefix, extra = _with_writes(writes or [], len(arguments) + 1)
    rows = await conn.fetch(prefix + APPEND, *arguments, *extra)
    records: list[Record] = []
    for entry, row in zip(entries, rows, strict=True):
        record = entry.seal(row["chain_schema"], int(row["seq"]), row["recorded_at"], bytes(row["prev_hash"]))
        if record.entry_hash != bytes(row["entry_hash"]):
            raise RuntimeError(
                f"audit entry {record.seq}: the database's hash differs from the canonical form's"
            )
        records.append(record)
    return records


class MemoryAuditTrail(AuditTrail):
    """The in-memory counterpart for unit tests: entries are sealed into `records` at once (a list the
    test's store owns, so a rolled-back fake transaction takes them back with everything else), chained
    and hashed exactly as in Postgres, timed by the local clock.

        store.audit  # list[Record]
        assert [(r.action, r.object_id) for r in store.audit] == [("order.submitted", str(order_id))]
    """

    def __init__(
        self, records: list[Record], schema: str = "memory", clock: Callable[[], datetime] | None = None
    ) -> None:
        super().__init__()
        self.records = records
        self.schema = schema
        self.clock = clock or (lambda: datetime.now(UTC))

    def _add(self, entry: Entry) -> None:
        last = self.records[-1] if self.records else None
        after = (last.seq, last.entry_hash) if last else (0, GENESIS)
        self.records.extend(chain(self.schema, [entry], after=after, at=self.clock()))

    @property
    def pending(self) -> list[Entry]:
        return []

    async def flush(self) -> list[Record]:
        return []


class AuditedTx(Tx):
    """A `Tx` with an audit trail: `tx.audit(...)` records, `before_commit` appends. A service's `Tx`
    subclasses this one; its fake passes a `MemoryAuditTrail`."""

    def __init__(
        self, conn: asyncpg.Connection | None, outbox: EventSink, *, audit: AuditTrail | None = None
    ) -> None:
        super().__init__(conn, outbox)
        if audit is None:
            if conn is None:
                raise ValueError("a Tx without a connection needs an in-memory audit trail")
            audit = PgAuditTrail(conn)
        self.audit = audit
        if isinstance(audit, PgAuditTrail) and isinstance(outbox, Outbox):
            # the events' rows go with the append, in its round trip, rather than one trip per event
            outbox.write_last(audit)

    async def before_commit(self) -> None:
        await self.audit.flush()
        await super().before_commit()


TxT = TypeVar("TxT", bound=Tx)


class AuditedHandlers(HandlerRegistry[TxT], Generic[TxT]):
    """A `HandlerRegistry` whose handlers' entries name the consumer as actor (`Actor.system(consumer)`)
    and the event as cause (`event:<id>`): `handlers = AuditedHandlers[OrderTx]("order.saga")`."""

    def __init__(self, consumer: str) -> None:
        super().__init__()
        self.actor = Actor.system(consumer)

    async def dispatch(self, tx: TxT, event: CloudEvent) -> bool:
        audit = getattr(tx, "audit", None)
        if isinstance(audit, AuditTrail):
            audit.acting(self.actor, event_cause(event))
        return await super().dispatch(tx, event)
