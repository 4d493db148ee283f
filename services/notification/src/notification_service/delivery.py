"""What every notification channel (webhook, e-mail) shares: leased outbox-like delivery rows, retries
with exponential backoff and jitter, bounded attempts, each attempt recorded, dead-lettering.

A channel's deliveries are rows written by the consumer in the same transaction as its inbox entry
(`<table>`, unique per target and event) and woken by `NOTIFY <channel>` on commit. A dispatcher leases
due rows (`FOR UPDATE SKIP LOCKED` plus a lease time, so replicas never send one delivery at once),
sends each through its channel, records the attempt in `<attempts_table>` and then either marks the
delivery delivered, schedules the next attempt, or — after the last attempt, or at once for a
permanent refusal — marks it failed and lets the channel react (`on_dead_lettered`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import random
import time
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, ClassVar

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import Counter, Histogram

from v2v_messaging import Tx, UnitOfWork
from v2v_observability import bind_order, get_logger, set_order_attributes

log = get_logger(__name__)

LEASE = timedelta(seconds=60)


@dataclass(frozen=True)
class DeliveryPolicy:
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 5.0
    batch: int = 50

    @classmethod
    def from_env(cls, prefix: str = "V2V_WEBHOOK_") -> DeliveryPolicy:
        """`<prefix>MAX_ATTEMPTS`, `<prefix>BACKOFF_BASE_S`, `<prefix>BACKOFF_MAX_S`, `<prefix>TIMEOUT_S`."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(prefix + f.name.upper())
            if raw is not None and f.name != "batch":
                values[f.name] = int(raw) if f.name == "max_attempts" else float(raw)
        return cls(**values)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with equal jitter: between half and all of base * 2^(attempt-1), capped."""
        # float power with a bounded exponent: 2 ** n for n >= 1024 cannot be converted to float
        ceiling = min(self.backoff_base_s * 2.0 ** min(attempt - 1, 1000), self.backoff_max_s)
        return ceiling / 2 + random.random() * ceiling / 2


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt: a channel status code (HTTP status, SMTP reply code) and an error."""

    status_code: int | None
    error: str | None = None
    permanent: bool = False  # a refusal that no retry can change: fail the delivery now

    @property
    def ok(self) -> bool:
        return self.error is None


async def notify(tx: Tx, channel_of: Any) -> None:
    """Wake the dispatcher listening on `channel_of(<schema>)` when the transaction commits."""
    schema = await tx.conn.fetchval("SELECT current_schema()")
    await tx.conn.execute("SELECT pg_notify($1, '')", channel_of(schema))


class Dispatcher(abc.ABC):
    """Sends one channel's due deliveries; subclasses say where the rows are and how to send one."""

    kind: ClassVar[str]  # "webhook" | "email": span name, log messages
    table: ClassVar[str]  # the channel's deliveries
    attempts_table: ClassVar[str]  # one row per attempt
    target_table: ClassVar[str]  # what a delivery goes to (joined into the leased row)
    target_key: ClassVar[str]
    target_columns: ClassVar[tuple[str, ...]]
    status_attribute: ClassVar[str]  # span attribute for Outcome.status_code
    outcomes: ClassVar[Counter]
    duration: ClassVar[Histogram]

    def __init__(self, pool: asyncpg.Pool, uow: UnitOfWork, schema: str, policy: DeliveryPolicy) -> None:
        self.pool = pool
        self.uow = uow
        self.schema = schema
        self.policy = policy
        self._wake = asyncio.Event()
        self.tracer = trace.get_tracer(f"v2v.notification.{self.kind}s")

    # ---- what a channel provides ---------------------------------------------------------------

    @staticmethod
    @abc.abstractmethod
    def channel(schema: str) -> str:
        """The LISTEN/NOTIFY channel consumers wake this dispatcher on."""

    @abc.abstractmethod
    async def send(self, row: asyncpg.Record) -> Outcome:
        """One attempt. Expected failures are returned as an Outcome, not raised."""

    def describe(self, row: asyncpg.Record, span: trace.Span) -> None:  # noqa: B027 - optional hook
        """Channel attributes on the delivery span (never an address or a secret)."""

    async def on_dead_lettered(  # noqa: B027 - optional hook
        self, tx: Tx, row: asyncpg.Record, attempt: int, outcome: Outcome
    ) -> None:
        """Called in the transaction that marks the delivery failed."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release the channel's client."""

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        listener = await self.pool.acquire()
        channel = self.channel(self.schema)

        def wake(*_args: object) -> None:
            self._wake.set()

        await listener.add_listener(channel, wake)
        try:
            while True:
                self._wake.clear()
                try:
                    n = await self.dispatch_due()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning(f"{self.kind} dispatcher error", error=repr(exc))
                    await asyncio.sleep(1.0)
                    continue
                if n >= self.policy.batch:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=await self._until_next_due())
        finally:
            await self.aclose()
            with contextlib.suppress(Exception):  # UNLISTEN before the connection goes back to the pool
                await listener.remove_listener(channel, wake)
            with contextlib.suppress(Exception):
                await self.pool.release(listener)

    async def _until_next_due(self) -> float:
        with suppress_instrumentation():
            nxt = await self.pool.fetchval(
                f"SELECT min(next_attempt_at) - now() FROM {self.table} WHERE status = 'pending'"
            )
        if nxt is None:
            return 5.0
        return max(0.05, min(5.0, nxt.total_seconds()))

    async def dispatch_due(self) -> int:
        """Lease the due deliveries, attempt each once (concurrently); returns how many were leased."""
        target = ", ".join(f"t.{c}" for c in self.target_columns)
        with suppress_instrumentation():
            rows = await self.pool.fetch(
                f"""UPDATE {self.table} d SET lease_until = now() + $2::interval
                    FROM {self.target_table} t
                    WHERE d.{self.target_key} = t.{self.target_key} AND d.delivery_id IN (
                        SELECT delivery_id FROM {self.table}
                        WHERE status = 'pending' AND next_attempt_at <= now()
                          AND (lease_until IS NULL OR lease_until < now())
                        ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                    RETURNING d.*, {target}""",
                self.policy.batch,
                LEASE,
            )
        await asyncio.gather(*(self._deliver(r) for r in rows))
        return len(rows)

    async def _deliver(self, row: asyncpg.Record) -> None:
        parent = propagate.extract(row["trace_headers"] or {}, context=otel_context.Context())
        token = otel_context.attach(parent)
        try:
            bind_order(row["order_id"])
            name = f"{self.kind} deliver"
            with self.tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT) as span:
                set_order_attributes(row["order_id"], row["coi"])
                span.set_attribute("v2v.event_type", row["event_type"])
                attempt = row["attempts"] + 1
                span.set_attribute("v2v.attempt", attempt)
                self.describe(row, span)
                started = time.monotonic()
                try:
                    outcome = await self.send(row)
                except Exception as exc:  # a channel bug must not stop the dispatcher: record it
                    outcome = Outcome(None, f"{exc.__class__.__name__}: {exc}"[:500])
                elapsed = int((time.monotonic() - started) * 1000)
                if outcome.status_code is not None:
                    span.set_attribute(self.status_attribute, outcome.status_code)
                if outcome.error:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error))
                await self._record(row, attempt, outcome, elapsed)
        finally:
            otel_context.detach(token)

    async def _record(self, row: asyncpg.Record, attempt: int, outcome: Outcome, elapsed_ms: int) -> None:
        final = outcome.permanent or attempt >= self.policy.max_attempts
        label = "delivered" if outcome.ok else ("failed" if final else "retry")
        self.outcomes.add(1, {"event_type": row["event_type"], "outcome": label})
        self.duration.record(elapsed_ms / 1000, {"outcome": "ok" if outcome.ok else "error"})
        async with self.uow.begin() as tx:
            await tx.conn.execute(
                f"""INSERT INTO {self.attempts_table} (delivery_id, attempt, status_code, error, duration_ms)
                    VALUES ($1, $2, $3, $4, $5)""",
                row["delivery_id"],
                attempt,
                outcome.status_code,
                outcome.error,
                elapsed_ms,
            )
            if outcome.ok:
                await tx.conn.execute(
                    f"""UPDATE {self.table} SET status = 'delivered', attempts = $2, delivered_at = now(),
                               last_status_code = $3, last_error = NULL, lease_until = NULL
                        WHERE delivery_id = $1""",
                    row["delivery_id"],
                    attempt,
                    outcome.status_code,
                )
                return
            if final:
                await tx.conn.execute(
                    f"""UPDATE {self.table} SET status = 'failed', attempts = $2, last_status_code = $3,
                               last_error = $4, lease_until = NULL WHERE delivery_id = $1""",
                    row["delivery_id"],
                    attempt,
                    outcome.status_code,
                    outcome.error,
                )
                await self.on_dead_lettered(tx, row, attempt, outcome)
                log.warning(
                    f"{self.kind} dead-lettered",
                    delivery_id=str(row["delivery_id"]),
                    attempts=attempt,
                    permanent=outcome.permanent,
                )
                return
            delay = self.policy.backoff(attempt)
            await tx.conn.execute(
                f"""UPDATE {self.table} SET attempts = $2, last_status_code = $3, last_error = $4,
                           lease_until = NULL, next_attempt_at = now() + $5::interval
                    WHERE delivery_id = $1""",
                row["delivery_id"],
                attempt,
                outcome.status_code,
                outcome.error,
                timedelta(seconds=delay),
            )
            log.info(
                f"{self.kind} attempt failed, will retry",
                attempt=attempt,
                error=outcome.error,
                retry_in_s=round(delay, 2),
            )
