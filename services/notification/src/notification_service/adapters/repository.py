"""All the SQL of the notification service, and its unit of work's `NotificationTx`.

- `subscriptions`: the centres' webhook endpoints; `recipients`: the addresses their alerts go to.
- `webhooks`, `emails`: each channel's delivery queue. The consumer writes deliveries in the same
  transaction as its inbox entry (one per target and event) and wakes the channel's dispatcher with
  `NOTIFY` on commit (`Listener`). A dispatcher leases due rows (`FOR UPDATE SKIP LOCKED` plus a lease
  time and a token, so replicas never send one delivery at once) and records each attempt and its verdict
  only while the lease's token is still the delivery's (a late recorder changes nothing). Webhooks are
  leased per endpoint, behind each endpoint's circuit breaker (`webhook_endpoints`).
- `deliveries`: the delivery log across both channels, with every attempt (read only).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Generic, TypeVar

import asyncpg
from opentelemetry.instrumentation.utils import suppress_instrumentation

from notification_service.domain.alerts import Rendered
from notification_service.domain.delivery import (
    Delivery,
    EmailDelivery,
    EventRef,
    Outcome,
    Verdict,
    WebhookDelivery,
)
from notification_service.domain.endpoints import BreakerPolicy, EndpointHealth
from notification_service.domain.subscriptions import Recipient, Subscription
from v2v_audit import AuditedTx, AuditTrail
from v2v_messaging import EventSink, Heartbeat

D = TypeVar("D", bound=Delivery)

WEBHOOK_CHANNEL = "v2v_webhooks_"  # + schema: LISTEN/NOTIFY channel of the webhook dispatcher
EMAIL_CHANNEL = "v2v_email_"  # + schema: ... of the e-mail dispatcher


def webhook_channel(schema: str) -> str:
    return WEBHOOK_CHANNEL + schema


def email_channel(schema: str) -> str:
    return EMAIL_CHANNEL + schema


class Listener:
    """Wakes a dispatcher when a transaction that queued deliveries commits: a LISTEN on `channel`, held
    on a pooled connection and probed every few seconds.

    `run` returns only when cancelled. It raises when the connection is lost (a Postgres restart, a
    terminated backend): its supervisor starts it again, with backoff, and the LISTEN is re-established.
    Each time it starts listening it sets `wake`, so what was committed while nobody listened is seen."""

    def __init__(self, pool: asyncpg.Pool, channel: str, wake: asyncio.Event | None = None) -> None:
        self.pool = pool
        self.channel = channel
        self.wake = wake if wake is not None else asyncio.Event()
        self.listening = False
        self.listens = 0  # times the LISTEN was established

    def _on_notify(self, *_args: object) -> None:
        self.wake.set()

    async def run(self, heartbeat: Heartbeat | None = None, probe_every: float = 5.0) -> None:
        hb = heartbeat or Heartbeat(f"listener:{self.channel}")
        conn: asyncpg.Connection = await self.pool.acquire(timeout=probe_every * 2)
        lost = asyncio.Event()

        def on_lost(_conn: object) -> None:
            lost.set()

        try:
            conn.add_termination_listener(on_lost)
            await asyncio.wait_for(conn.add_listener(self.channel, self._on_notify), probe_every)
            self.listening = True
            self.listens += 1
            self.wake.set()  # whatever was committed while nobody listened
            while True:
                hb.beat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), timeout=probe_every)
                if lost.is_set() or conn.is_closed():
                    raise ConnectionError("the LISTEN connection was closed")
                with suppress_instrumentation():  # a probe every few seconds is not worth a span
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=probe_every)
        finally:
            self.listening = False
            if not conn.is_closed():
                with contextlib.suppress(Exception):
                    conn.remove_termination_listener(on_lost)
                with contextlib.suppress(Exception):  # UNLISTEN before the connection goes back to the pool
                    await asyncio.wait_for(conn.remove_listener(self.channel, self._on_notify), 2.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.release(conn), 2.0)


# ---- subscriptions ----------------------------------------------------------------------------------


class SubscriptionRepository(abc.ABC):
    """`tenant`: the treatment centre the caller is confined to (None: not confined). A subscription of
    another centre is not there for it."""

    @abc.abstractmethod
    async def add(
        self,
        subscription_id: uuid.UUID,
        treatment_center_id: str,
        url: str,
        sealed_secret: bytes,
        event_types: list[str] | None,
    ) -> Subscription: ...

    @abc.abstractmethod
    async def get(self, subscription_id: uuid.UUID, tenant: str | None = None) -> Subscription | None: ...

    @abc.abstractmethod
    async def search(
        self, tenant: str | None, treatment_center_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[Subscription]:
        """The subscriptions of the tenant (and of `treatment_center_id` when given), oldest first."""

    @abc.abstractmethod
    async def rotate_secret(
        self, subscription_id: uuid.UUID, tenant: str | None, sealed_secret: bytes, overlap: timedelta
    ) -> Subscription | None:
        """Replace an active subscription's secret; the replaced one keeps signing for `overlap` (the one
        it had replaced, if any, stops). None when there is no such active subscription for the tenant."""

    @abc.abstractmethod
    async def matching(self, treatment_center_id: str, event_type: str) -> list[uuid.UUID]:
        """The centre's active subscriptions that want `event_type`."""


def _subscription(row: asyncpg.Record) -> Subscription:
    endpoint = _health(row) if row.get("state") is not None else EndpointHealth()
    return Subscription(
        subscription_id=row["subscription_id"],
        treatment_center_id=row["treatment_center_id"],
        url=row["url"],
        event_types=row["event_types"],
        active=row["active"],
        created_at=row["created_at"],
        secret_rotated_at=row["secret_rotated_at"],
        previous_secret_expires_at=row["previous_secret_expires_at"],
        endpoint=endpoint,
    )


_SUBSCRIPTION_COLUMNS = """subscription_id, treatment_center_id, url, event_types, active, created_at,
                           secret_rotated_at, previous_secret_expires_at"""
# a subscription with its endpoint's breaker (`s`: the subscriptions)
_WITH_ENDPOINT = """s.*, e.state, e.consecutive_failures, e.parks, e.parked_until, e.probe_delivery_id
                    FROM s LEFT JOIN webhook_endpoints e ON e.subscription_id = s.subscription_id"""


class PgSubscriptions(SubscriptionRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(
        self,
        subscription_id: uuid.UUID,
        treatment_center_id: str,
        url: str,
        sealed_secret: bytes,
        event_types: list[str] | None,
    ) -> Subscription:
        # (a trigger gives it its endpoint's breaker, open)
        row = await self.conn.fetchrow(
            f"""INSERT INTO subscriptions
                    (subscription_id, treatment_center_id, url, secret_sealed, event_types)
                VALUES ($1, $2, $3, $4, $5) RETURNING {_SUBSCRIPTION_COLUMNS}""",
            subscription_id,
            treatment_center_id,
            url,
            sealed_secret,
            event_types,
        )
        assert row is not None
        return _subscription(row)

    async def get(self, subscription_id: uuid.UUID, tenant: str | None = None) -> Subscription | None:
        row = await self.conn.fetchrow(
            f"""WITH s AS (
                    SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions
                    WHERE subscription_id = $1 AND ($2::text IS NULL OR treatment_center_id = $2))
                SELECT {_WITH_ENDPOINT}""",
            subscription_id,
            tenant,
        )
        return None if row is None else _subscription(row)

    async def search(
        self, tenant: str | None, treatment_center_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[Subscription]:
        rows = await self.conn.fetch(
            f"""WITH s AS (
                    SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions
                    WHERE ($1::text IS NULL OR treatment_center_id = $1)
                      AND ($2::text IS NULL OR treatment_center_id = $2)
                    ORDER BY created_at, subscription_id LIMIT $3 OFFSET $4)
                SELECT {_WITH_ENDPOINT} ORDER BY s.created_at, s.subscription_id""",
            tenant,
            treatment_center_id,
            limit,
            offset,
        )
        return [_subscription(r) for r in rows]

    async def rotate_secret(
        self, subscription_id: uuid.UUID, tenant: str | None, sealed_secret: bytes, overlap: timedelta
    ) -> Subscription | None:
        row = await self.conn.fetchrow(
            f"""WITH s AS (
                    UPDATE subscriptions
                    SET previous_secret_sealed = secret_sealed,
                        previous_secret_expires_at = now() + $4::interval,
                        secret_sealed = $3, secret_rotated_at = now()
                    WHERE subscription_id = $1 AND ($2::text IS NULL OR treatment_center_id = $2) AND active
                    RETURNING {_SUBSCRIPTION_COLUMNS})
                SELECT {_WITH_ENDPOINT}""",
            subscription_id,
            tenant,
            sealed_secret,
            overlap,
        )
        return None if row is None else _subscription(row)

    async def matching(self, treatment_center_id: str, event_type: str) -> list[uuid.UUID]:
        rows = await self.conn.fetch(
            """SELECT subscription_id FROM subscriptions
               WHERE treatment_center_id = $1 AND active
                 AND (event_types IS NULL OR $2 = ANY(event_types))""",
            treatment_center_id,
            event_type,
        )
        return [r["subscription_id"] for r in rows]


# ---- e-mail recipients ------------------------------------------------------------------------------


class RecipientRepository(abc.ABC):
    """`tenant`: the treatment centre the caller is confined to (None: not confined)."""

    @abc.abstractmethod
    async def add(
        self, recipient_id: uuid.UUID, treatment_center_id: str, email: str, event_types: list[str] | None
    ) -> Recipient | None:
        """The new recipient, or None when the address (case-insensitive) already is an active recipient
        of the centre."""

    @abc.abstractmethod
    async def get(self, recipient_id: uuid.UUID, tenant: str | None = None) -> Recipient | None:
        """An active recipient (of the tenant)."""

    @abc.abstractmethod
    async def search(
        self, tenant: str | None, treatment_center_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[Recipient]:
        """The active recipients of the tenant (and of `treatment_center_id` when given), oldest first."""

    @abc.abstractmethod
    async def remove(self, recipient_id: uuid.UUID, tenant: str | None = None) -> bool:
        """Deactivate an active recipient (of the tenant); False when there is none with this id."""

    @abc.abstractmethod
    async def matching(self, treatment_center_id: str, event_type: str) -> list[uuid.UUID]:
        """The centre's active recipients that want `event_type`."""


def _recipient(row: asyncpg.Record) -> Recipient:
    return Recipient(
        recipient_id=row["recipient_id"],
        treatment_center_id=row["treatment_center_id"],
        email=row["email"],
        event_types=row["event_types"],
        active=row["active"],
        created_at=row["created_at"],
    )


class PgRecipients(RecipientRepository):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def add(
        self, recipient_id: uuid.UUID, treatment_center_id: str, email: str, event_types: list[str] | None
    ) -> Recipient | None:
        row = await self.conn.fetchrow(
            """INSERT INTO email_recipients (recipient_id, treatment_center_id, email, event_types)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (treatment_center_id, lower(email)) WHERE active DO NOTHING
               RETURNING *""",
            recipient_id,
            treatment_center_id,
            email,
            event_types,
        )
        return None if row is None else _recipient(row)

    async def get(self, recipient_id: uuid.UUID, tenant: str | None = None) -> Recipient | None:
        row = await self.conn.fetchrow(
            """SELECT * FROM email_recipients
               WHERE recipient_id = $1 AND active AND ($2::text IS NULL OR treatment_center_id = $2)""",
            recipient_id,
            tenant,
        )
        return None if row is None else _recipient(row)

    async def search(
        self, tenant: str | None, treatment_center_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[Recipient]:
        rows = await self.conn.fetch(
            """SELECT * FROM email_recipients
               WHERE active AND ($1::text IS NULL OR treatment_center_id = $1)
                 AND ($2::text IS NULL OR treatment_center_id = $2)
               ORDER BY created_at, recipient_id LIMIT $3 OFFSET $4""",
            tenant,
            treatment_center_id,
            limit,
            offset,
        )
        return [_recipient(r) for r in rows]

    async def remove(self, recipient_id: uuid.UUID, tenant: str | None = None) -> bool:
        removed = await self.conn.fetchval(
            """UPDATE email_recipients SET active = false, removed_at = now()
               WHERE recipient_id = $1 AND active AND ($2::text IS NULL OR treatment_center_id = $2)
               RETURNING true""",
            recipient_id,
            tenant,
        )
        return bool(removed)

    async def matching(self, treatment_center_id: str, event_type: str) -> list[uuid.UUID]:
        rows = await self.conn.fetch(
            """SELECT recipient_id FROM email_recipients
               WHERE treatment_center_id = $1 AND active
                 AND (event_types IS NULL OR $2 = ANY(event_types))""",
            treatment_center_id,
            event_type,
        )
        return [r["recipient_id"] for r in rows]


# ---- the delivery queues ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One attempt of a leased delivery and its verdict, to be recorded by the holder of the lease."""

    delivery_id: uuid.UUID
    attempt: int
    outcome: Outcome
    duration_ms: int
    verdict: Verdict
    lease_token: uuid.UUID | None  # of the lease the attempt was made under


class DeliveryQueue(abc.ABC, Generic[D]):
    """One channel's deliveries: leased for an attempt, then delivered, retried later or failed.

    A lease carries a token; an attempt is recorded only with the token of the delivery's current lease,
    so a dispatcher that was paused past its lease (and whose delivery another one leased and attempted
    meanwhile) records nothing: not its attempt, not its verdict."""

    @abc.abstractmethod
    async def wake(self) -> None:
        """Wake the channel's dispatcher when the transaction commits."""

    @abc.abstractmethod
    async def claim_due(self, limit: int, lease: timedelta, *, per_target: int | None = None) -> list[D]:
        """Lease up to `limit` pending deliveries that are due and not leased, each with a new token
        (`per_target`: at most this many of one target's deliveries leased at once, where the channel
        schedules per target)."""

    @abc.abstractmethod
    async def seconds_until_next_due(self, *, per_target: int | None = None) -> float | None:
        """When the next delivery may be leased (negative: overdue); None when nothing is pending."""

    @abc.abstractmethod
    async def record(self, attempts: Sequence[Attempt]) -> set[uuid.UUID]:
        """Record each attempt and its verdict (delivered; retry after `retry_in_s`; failed) where its lease
        token is still the delivery's; returns the lease tokens of those recorded (the others changed
        nothing)."""


class WebhookQueue(DeliveryQueue[WebhookDelivery]):
    """Webhook deliveries, scheduled per endpoint: each endpoint's due deliveries oldest first, at most
    `per_target` in flight, the endpoints taking turns; a parked endpoint's deliveries are not leased,
    except one as its probe once its cool-down is over (`domain.endpoints`)."""

    @abc.abstractmethod
    async def enqueue(self, subscription_ids: Sequence[uuid.UUID], event: EventRef, payload: bytes) -> None:
        """One delivery per subscription; an event already queued for a subscription is not queued again."""

    async def enqueue_matching(
        self, subscriptions: SubscriptionRepository, event: EventRef, payload: bytes
    ) -> None:
        """Queue `event` for each of its centre's subscriptions that want it; wake the dispatcher on commit
        when any does. (A queue may hold them until `flush`, which its transaction calls before COMMIT.)"""
        matching = await subscriptions.matching(event.treatment_center_id, event.event_type)
        if matching:
            await self.enqueue(matching, event, payload)
            await self.wake()

    async def flush(self) -> None:
        """Write what `enqueue_matching` held back; the transaction calls it right before COMMIT."""

    @abc.abstractmethod
    async def endpoints_for_update(
        self, subscription_ids: Sequence[uuid.UUID]
    ) -> tuple[dict[uuid.UUID, EndpointHealth], datetime]:
        """The endpoints' breakers, locked until the transaction ends, and the database's time."""

    @abc.abstractmethod
    async def save_endpoints(self, health: Mapping[uuid.UUID, EndpointHealth]) -> None: ...

    async def record_locking_endpoints(
        self, attempts: Sequence[Attempt]
    ) -> tuple[set[uuid.UUID], dict[uuid.UUID, EndpointHealth], datetime | None]:
        """`record(attempts)` and then `endpoints_for_update` of the deliveries recorded: the lease tokens
        recorded, their endpoints' breakers (locked until the transaction ends) and the database's time
        (None when nothing was recorded). The subscriptions are the deliveries' own."""
        accepted = await self.record(attempts)
        ids = await self.subscriptions_of([a.delivery_id for a in attempts if a.lease_token in accepted])
        if not ids:
            return accepted, {}, None
        health, now = await self.endpoints_for_update(ids)
        return accepted, health, now

    async def subscriptions_of(self, delivery_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """The subscriptions the deliveries go to (only used by the default `record_locking_endpoints`)."""
        raise NotImplementedError


class EmailQueue(DeliveryQueue[EmailDelivery]):
    @abc.abstractmethod
    async def enqueue(self, recipient_ids: Sequence[uuid.UUID], event: EventRef, message: Rendered) -> None:
        """One e-mail per recipient; an event already queued for a recipient is not queued again."""

    @abc.abstractmethod
    async def cancel_pending(self, recipient_id: uuid.UUID) -> None:
        """Cancel what a removed recipient was still to receive."""


# a pending delivery that may be leased now (`d`), and one that is leased (`l`)
_DUE = """d.status = 'pending' AND d.next_attempt_at <= now()
          AND (d.lease_until IS NULL OR d.lease_until < now())"""
_LEASED = "l.status = 'pending' AND l.lease_until >= now()"


class _PgQueue(DeliveryQueue[D]):
    channel: ClassVar[str]  # the LISTEN/NOTIFY channel's prefix (the schema follows)
    table: ClassVar[str]  # the channel's deliveries
    attempts_table: ClassVar[str]  # one row per attempt
    target_table: ClassVar[str]  # what a delivery goes to (joined into the leased row)
    target_key: ClassVar[str]
    target_select: ClassVar[str]  # SQL expressions over the target `t` joined into the leased row

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @abc.abstractmethod
    def _delivery(self, row: asyncpg.Record) -> D: ...

    async def wake(self) -> None:
        await self.conn.execute("SELECT pg_notify($1 || current_schema(), '')", self.channel)

    async def claim_due(self, limit: int, lease: timedelta, *, per_target: int | None = None) -> list[D]:
        # oldest due first, whatever the target
        rows = await self.conn.fetch(
            f"""UPDATE {self.table} d SET lease_until = now() + $2::interval, lease_token = gen_random_uuid()
                FROM {self.target_table} t
                WHERE d.{self.target_key} = t.{self.target_key} AND d.delivery_id IN (
                    SELECT d.delivery_id FROM {self.table} d WHERE {_DUE}
                    ORDER BY d.next_attempt_at, d.seq LIMIT $1 FOR UPDATE SKIP LOCKED)
                RETURNING d.*, {self.target_select}""",
            limit,
            lease,
        )
        return sorted((self._delivery(r) for r in rows), key=lambda d: d.seq)

    async def seconds_until_next_due(self, *, per_target: int | None = None) -> float | None:
        nxt = await self.conn.fetchval(
            f"""SELECT extract(epoch FROM min(d.next_attempt_at) - now())::float8 FROM {self.table} d
                WHERE d.status = 'pending' AND (d.lease_until IS NULL OR d.lease_until < now())"""
        )
        return None if nxt is None else float(nxt)

    async def record(self, attempts: Sequence[Attempt]) -> set[uuid.UUID]:
        # one statement (one round trip) for a batch: the deliveries whose lease is still the attempt's
        # take its verdict, and only their attempts are inserted
        if not attempts:
            return set()
        rows = await self._record(attempts, "SELECT lease_token FROM done")
        return {r["lease_token"] for r in rows}

    async def _record(self, attempts: Sequence[Attempt], then: str) -> list[asyncpg.Record]:
        """The recording statement (CTEs `a`: the attempts, `done`: those recorded, with the delivery's
        target) followed by the query `then`."""
        return await self.conn.fetch(
            f"""WITH a AS (
                    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::int[], $5::text[], $6::int[],
                                         $7::text[], $8::float8[])
                        AS a(delivery_id, lease_token, attempt, status_code, error, duration_ms, verdict,
                             retry_in_s)),
                done AS (
                    UPDATE {self.table} d SET
                        status = CASE a.verdict WHEN 'retry' THEN 'pending' ELSE a.verdict END,
                        attempts = a.attempt, last_status_code = a.status_code, last_error = a.error,
                        delivered_at = CASE WHEN a.verdict = 'delivered' THEN now() END,
                        next_attempt_at = CASE WHEN a.verdict = 'retry'
                            THEN now() + a.retry_in_s * interval '1 second' ELSE d.next_attempt_at END,
                        lease_until = NULL, lease_token = NULL
                    FROM a
                    WHERE d.delivery_id = a.delivery_id AND d.lease_token = a.lease_token
                      AND d.status = 'pending'
                    RETURNING a.*, d.{self.target_key} AS target),
                ins AS (
                    INSERT INTO {self.attempts_table} (delivery_id, attempt, status_code, error, duration_ms)
                    SELECT delivery_id, attempt, status_code, error, duration_ms FROM done)
                {then}""",
            [a.delivery_id for a in attempts],
            [a.lease_token for a in attempts],
            [a.attempt for a in attempts],
            [a.outcome.status_code for a in attempts],
            [a.outcome.error for a in attempts],
            [a.duration_ms for a in attempts],
            [a.verdict.label for a in attempts],
            [a.verdict.retry_in_s or 0.0 for a in attempts],
        )


def _ref(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "delivery_id": row["delivery_id"],
        "attempts": row["attempts"],
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "order_id": row["order_id"],
        "coi": row["coi"],
        "treatment_center_id": row["treatment_center_id"],
        "trace_headers": row["trace_headers"] or {},
        "lease_token": row["lease_token"],
        "seq": row["seq"],
    }


# the subscription's URL and secrets, joined into a leased delivery: the replaced secret signs too until its
# overlap ends (the database's clock decides)
_WEBHOOK_TARGET = """t.url, t.secret_sealed,
    CASE WHEN t.previous_secret_expires_at > now() THEN t.previous_secret_sealed END
        AS previous_secret_sealed"""

# A webhook delivery's lane (the order's deliveries to the endpoint) is busy while one of them is leased:
# the next is leased once that one is recorded, so the order's webhooks go one after another.
_LANE_FREE = f"""NOT EXISTS (SELECT 1 FROM deliveries l WHERE l.subscription_id = d.subscription_id
                               AND l.order_id = d.order_id AND {_LEASED})"""


def _room(per_endpoint: str) -> str:
    """How many more of endpoint `e`'s deliveries may be leased: at most `per_endpoint` at once while it is
    open, its one probe while it is not."""
    return f"""(CASE WHEN e.state = 'open' THEN {per_endpoint} ELSE 1 END
                - (SELECT count(*) FROM deliveries l
                   WHERE l.subscription_id = e.subscription_id AND {_LEASED}))"""


# Per endpoint (locked: two replicas never lease for one endpoint at once), those that may go now: an open
# endpoint's up to its room; a parked one's one probe once its cool-down is over. Each endpoint offers its
# oldest due deliveries, and its newest first attempt (so new events do not wait behind a backlog, an old
# endpoint's or a catch-up's); the endpoints then take turns: every endpoint's first, then every second...
_CLAIM_WEBHOOKS = f"""
WITH ready AS (
    SELECT e.subscription_id, e.state, {_room("$3::int")} AS room
    FROM webhook_endpoints e
    WHERE (e.state = 'open' OR e.parked_until <= now())
      -- a look at each endpoint's own index (not a scan of every due delivery)
      AND (SELECT true FROM deliveries d WHERE d.subscription_id = e.subscription_id AND {_DUE}
           ORDER BY d.next_attempt_at LIMIT 1)
    FOR UPDATE OF e SKIP LOCKED),
oldest AS (
    SELECT r.subscription_id, r.state, r.room, x.delivery_id, x.next_attempt_at, false AS fresh
    FROM ready r CROSS JOIN LATERAL (
        SELECT d.delivery_id, d.next_attempt_at FROM deliveries d
        WHERE d.subscription_id = r.subscription_id AND {_DUE} AND {_LANE_FREE}
        ORDER BY d.next_attempt_at, d.seq LIMIT greatest(r.room, 0)
        FOR UPDATE OF d SKIP LOCKED) x),
newest AS (
    SELECT r.subscription_id, r.state, r.room, x.delivery_id, x.next_attempt_at, true AS fresh
    FROM ready r CROSS JOIN LATERAL (
        SELECT d.delivery_id, d.next_attempt_at FROM deliveries d
        WHERE d.subscription_id = r.subscription_id AND d.attempts = 0 AND {_DUE} AND {_LANE_FREE}
          AND (d.order_id IS NULL OR d.seq = (
                SELECT min(o.seq) FROM deliveries o WHERE o.subscription_id = d.subscription_id
                  AND o.order_id = d.order_id AND o.status = 'pending'))  -- the first of its lane
        ORDER BY d.seq DESC LIMIT least(greatest(r.room, 0), 1)
        FOR UPDATE OF d SKIP LOCKED) x),
picked AS (
    SELECT DISTINCT ON (delivery_id) * FROM (SELECT * FROM oldest UNION ALL SELECT * FROM newest) u
    ORDER BY delivery_id, fresh DESC),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY subscription_id ORDER BY fresh DESC, next_attempt_at) AS turn
    FROM picked),
chosen AS (
    SELECT * FROM ranked WHERE turn <= room ORDER BY turn, next_attempt_at LIMIT $1),
probes AS (
    UPDATE webhook_endpoints e SET state = 'probing', parked_until = now() + $2::interval,
           probe_delivery_id = c.delivery_id, changed_at = now()
    FROM chosen c WHERE e.subscription_id = c.subscription_id AND c.state <> 'open')
UPDATE deliveries d SET lease_until = now() + $2::interval, lease_token = gen_random_uuid()
FROM chosen c, subscriptions t
WHERE d.delivery_id = c.delivery_id AND t.subscription_id = d.subscription_id
RETURNING d.*, {_WEBHOOK_TARGET}"""

# the first moment something may be leased: an open endpoint with room, its first due delivery whose
# lane is free; a parked endpoint with deliveries waiting, the end of its cool-down (or of its probe's lease)
_NEXT_WEBHOOK = f"""
SELECT extract(epoch FROM min(w.at) - now())::float8 FROM (
    SELECT CASE WHEN e.state = 'open' THEN (
                SELECT min(d.next_attempt_at) FROM deliveries d
                WHERE d.subscription_id = e.subscription_id AND d.status = 'pending'
                  AND (d.lease_until IS NULL OR d.lease_until < now()) AND {_LANE_FREE})
           WHEN EXISTS (SELECT 1 FROM deliveries d
                        WHERE d.subscription_id = e.subscription_id AND d.status = 'pending')
           THEN e.parked_until END AS at
    FROM webhook_endpoints e
    WHERE e.state <> 'open' OR {_room("$1::int")} > 0) w"""


# after recording (`_PgQueue._record`): the lease tokens recorded, and the breakers of their endpoints,
# locked until the transaction ends (sorted first, locked in that order), each row with the database's time
_RECORDED_AND_ENDPOINTS = """,
ep AS (
    SELECT e.* FROM webhook_endpoints e WHERE e.subscription_id IN (SELECT target FROM done)
    ORDER BY e.subscription_id FOR UPDATE)
SELECT done.lease_token, NULL::uuid AS subscription_id, NULL::text AS state,
       NULL::int AS consecutive_failures, NULL::int AS parks, NULL::timestamptz AS parked_until,
       NULL::uuid AS probe_delivery_id, now() AS now
FROM done
UNION ALL
SELECT NULL::uuid, ep.subscription_id, ep.state, ep.consecutive_failures, ep.parks, ep.parked_until,
       ep.probe_delivery_id, now()
FROM ep"""


class PgWebhookQueue(_PgQueue[WebhookDelivery], WebhookQueue):
    channel = WEBHOOK_CHANNEL
    table = "deliveries"
    attempts_table = "delivery_attempts"
    target_table = "subscriptions"
    target_key = "subscription_id"
    target_select = _WEBHOOK_TARGET

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__(conn)
        self._held: list[tuple[EventRef, bytes]] = []  # events queued in this transaction (`flush`)

    def _delivery(self, row: asyncpg.Record) -> WebhookDelivery:
        sealed = (row["secret_sealed"], row["previous_secret_sealed"])
        return WebhookDelivery(
            **_ref(row),
            subscription_id=row["subscription_id"],
            url=row["url"],
            sealed_secrets=tuple(bytes(s) for s in sealed if s is not None),
            payload=bytes(row["payload"]),
        )

    async def claim_due(
        self, limit: int, lease: timedelta, *, per_target: int | None = None
    ) -> list[WebhookDelivery]:
        if limit <= 0:
            return []
        rows = await self.conn.fetch(
            _CLAIM_WEBHOOKS,
            limit,
            lease,
            per_target or BreakerPolicy().per_endpoint,
        )
        return sorted((self._delivery(r) for r in rows), key=lambda d: d.seq)

    async def seconds_until_next_due(self, *, per_target: int | None = None) -> float | None:
        nxt = await self.conn.fetchval(_NEXT_WEBHOOK, per_target or BreakerPolicy().per_endpoint)
        return None if nxt is None else float(nxt)

    async def endpoints_for_update(
        self, subscription_ids: Sequence[uuid.UUID]
    ) -> tuple[dict[uuid.UUID, EndpointHealth], datetime]:
        ids = sorted(set(subscription_ids))  # locked in one order: two recorders never deadlock
        rows = await self.conn.fetch(
            """SELECT e.*, now() AS now FROM webhook_endpoints e
               WHERE e.subscription_id = ANY($1::uuid[]) ORDER BY e.subscription_id FOR UPDATE""",
            ids,
        )
        now = rows[0]["now"] if rows else await self.conn.fetchval("SELECT now()")
        return {r["subscription_id"]: _health(r) for r in rows}, now

    async def record_locking_endpoints(
        self, attempts: Sequence[Attempt]
    ) -> tuple[set[uuid.UUID], dict[uuid.UUID, EndpointHealth], datetime | None]:
        # one statement (one round trip) instead of two: the attempts recorded, then their endpoints'
        # rows locked in one order (as endpoints_for_update: two recorders never deadlock)
        if not attempts:
            return set(), {}, None
        rows = await self._record(attempts, _RECORDED_AND_ENDPOINTS)
        accepted = {r["lease_token"] for r in rows if r["lease_token"] is not None}
        health = {r["subscription_id"]: _health(r) for r in rows if r["subscription_id"] is not None}
        return accepted, health, (rows[0]["now"] if rows else None)

    async def save_endpoints(self, health: Mapping[uuid.UUID, EndpointHealth]) -> None:
        if not health:
            return
        items = sorted(health.items())
        await self.conn.execute(
            """INSERT INTO webhook_endpoints AS e (subscription_id, state, consecutive_failures, parks,
                                                   parked_until, probe_delivery_id, changed_at)
               SELECT *, now() FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::timestamptz[],
                                           $6::uuid[])
               ON CONFLICT (subscription_id) DO UPDATE SET
                   state = EXCLUDED.state, consecutive_failures = EXCLUDED.consecutive_failures,
                   parks = EXCLUDED.parks, parked_until = EXCLUDED.parked_until,
                   probe_delivery_id = EXCLUDED.probe_delivery_id,
                   changed_at = CASE WHEN e.state = EXCLUDED.state THEN e.changed_at ELSE now() END""",
            [k for k, _ in items],
            [h.state for _, h in items],
            [h.consecutive_failures for _, h in items],
            [h.parks for _, h in items],
            [h.parked_until for _, h in items],
            [h.probe_delivery_id for _, h in items],
        )

    async def enqueue_matching(
        self, subscriptions: SubscriptionRepository, event: EventRef, payload: bytes
    ) -> None:
        # held until the transaction's end (`flush`): a consumer's batch queues the deliveries of all its
        # events in one statement instead of one per event
        self._held.append((event, payload))

    async def flush(self) -> None:
        """One statement (one round trip) for every event held: the matching subscriptions of each, their
        deliveries inserted in the order the events came (`seq`: an order's deliveries to one endpoint go
        in this order) and the dispatcher's NOTIFY (delivered on commit) when any was queued."""
        if not self._held:
            return
        held, self._held = self._held, []
        await self.conn.execute(
            """WITH e AS (
                   SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::uuid[], $5::text[],
                                        $6::bytea[], $7::text[])
                       WITH ORDINALITY AS e(centre, event_id, event_type, order_id, coi, payload, trace,
                                            ord)),
               ins AS (
                   INSERT INTO deliveries (delivery_id, subscription_id, event_id, event_type, order_id, coi,
                                           treatment_center_id, payload, trace_headers, status)
                   SELECT gen_random_uuid(), s.subscription_id, e.event_id, e.event_type, e.order_id, e.coi,
                          e.centre, e.payload, e.trace::jsonb, 'pending'
                   FROM e JOIN subscriptions s
                     ON s.treatment_center_id = e.centre AND s.active
                    AND (s.event_types IS NULL OR e.event_type = ANY(s.event_types))
                   ORDER BY e.ord, s.subscription_id
                   ON CONFLICT (subscription_id, event_id) DO NOTHING
                   RETURNING 1)
               SELECT CASE WHEN n > 0 THEN pg_notify($8 || current_schema(), '') END
               FROM (SELECT count(*) AS n FROM ins) c""",
            [event.treatment_center_id for event, _ in held],
            [event.event_id for event, _ in held],
            [event.event_type for event, _ in held],
            [event.order_id for event, _ in held],
            [event.coi for event, _ in held],
            [payload for _, payload in held],
            [json.dumps(event.trace_headers) for event, _ in held],
            self.channel,
        )

    async def enqueue(self, subscription_ids: Sequence[uuid.UUID], event: EventRef, payload: bytes) -> None:
        await self.conn.executemany(
            """INSERT INTO deliveries (delivery_id, subscription_id, event_id, event_type, order_id, coi,
                                       treatment_center_id, payload, trace_headers, status)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, 'pending')
               ON CONFLICT (subscription_id, event_id) DO NOTHING""",
            [
                (
                    uuid.uuid4(),
                    subscription_id,
                    event.event_id,
                    event.event_type,
                    event.order_id,
                    event.coi,
                    event.treatment_center_id,
                    payload,
                    event.trace_headers,
                )
                for subscription_id in subscription_ids
            ],
        )


def _health(row: asyncpg.Record) -> EndpointHealth:
    return EndpointHealth(
        state=row["state"],
        consecutive_failures=row["consecutive_failures"],
        parks=row["parks"],
        parked_until=row["parked_until"],
        probe_delivery_id=row["probe_delivery_id"],
    )


class PgEmailQueue(_PgQueue[EmailDelivery], EmailQueue):
    channel = EMAIL_CHANNEL
    table = "email_deliveries"
    attempts_table = "email_delivery_attempts"
    target_table = "email_recipients"
    target_key = "recipient_id"
    target_select = "t.email"

    def _delivery(self, row: asyncpg.Record) -> EmailDelivery:
        return EmailDelivery(
            **_ref(row),
            recipient_id=row["recipient_id"],
            email=row["email"],
            subject=row["subject"],
            body=row["body"],
        )

    async def enqueue(self, recipient_ids: Sequence[uuid.UUID], event: EventRef, message: Rendered) -> None:
        await self.conn.executemany(
            """INSERT INTO email_deliveries (delivery_id, recipient_id, event_id, event_type, order_id, coi,
                                             treatment_center_id, subject, body, trace_headers, status)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, 'pending')
               ON CONFLICT (recipient_id, event_id) DO NOTHING""",
            [
                (
                    uuid.uuid4(),
                    recipient_id,
                    event.event_id,
                    event.event_type,
                    event.order_id,
                    event.coi,
                    event.treatment_center_id,
                    message.subject,
                    message.body,
                    event.trace_headers,
                )
                for recipient_id in recipient_ids
            ],
        )

    async def cancel_pending(self, recipient_id: uuid.UUID) -> None:
        await self.conn.execute(
            """UPDATE email_deliveries SET status = 'cancelled', lease_until = NULL, lease_token = NULL,
                      last_error = coalesce(last_error, 'recipient_removed')
               WHERE recipient_id = $1 AND status = 'pending'""",
            recipient_id,
        )


# ---- the delivery log (both channels) ---------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryFilter:
    tenant: str | None = None  # the treatment centre the caller is confined to
    order_id: uuid.UUID | None = None
    channel: str | None = None  # webhook | email
    subscription_id: uuid.UUID | None = None
    recipient_id: uuid.UUID | None = None
    status: str | None = None
    limit: int = 100
    offset: int = 0
    treatment_center_id: str | None = None  # a filter (within the tenant's rows)


class DeliveryLog(abc.ABC):
    @abc.abstractmethod
    async def search(self, where: DeliveryFilter) -> list[dict[str, Any]]:
        """Deliveries of both channels, newest first (`last_error`: a failure category)."""

    @abc.abstractmethod
    async def get(self, delivery_id: uuid.UUID, tenant: str | None = None) -> dict[str, Any] | None:
        """One delivery (of the tenant) with its `attempt_log` (attempt, attempted_at, status_code, error,
        duration_ms)."""


class PgDeliveryLog(DeliveryLog):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def search(self, where: DeliveryFilter) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            """SELECT * FROM delivery_log WHERE ($1::uuid IS NULL OR order_id = $1)
                 AND ($2::text IS NULL OR channel = $2) AND ($3::uuid IS NULL OR subscription_id = $3)
                 AND ($4::uuid IS NULL OR recipient_id = $4) AND ($5::text IS NULL OR status = $5)
                 AND ($6::text IS NULL OR treatment_center_id = $6)
                 AND ($9::text IS NULL OR treatment_center_id = $9)
               ORDER BY created_at DESC, delivery_id LIMIT $7 OFFSET $8""",
            where.order_id,
            where.channel,
            where.subscription_id,
            where.recipient_id,
            where.status,
            where.tenant,
            where.limit,
            where.offset,
            where.treatment_center_id,
        )
        return [dict(r) for r in rows]

    async def get(self, delivery_id: uuid.UUID, tenant: str | None = None) -> dict[str, Any] | None:
        row = await self.conn.fetchrow(
            """SELECT * FROM delivery_log
               WHERE delivery_id = $1 AND ($2::text IS NULL OR treatment_center_id = $2)""",
            delivery_id,
            tenant,
        )
        if row is None:
            return None
        attempts = await self.conn.fetch(
            """SELECT attempt, attempted_at, status_code, error, duration_ms FROM delivery_attempt_log
               WHERE delivery_id = $1 AND channel = $2 ORDER BY attempt""",
            delivery_id,
            row["channel"],
        )
        return {**dict(row), "attempt_log": [dict(a) for a in attempts]}


# ---- one transaction's repositories -----------------------------------------------------------------


class NotificationTx(AuditedTx):
    """One transaction of the notification service: its repositories, queues, outbox and audit trail
    (`tx.audit(...)`: ids, codes and opaque references only, appended at commit)."""

    def __init__(
        self,
        conn: asyncpg.Connection | None,
        outbox: EventSink,
        *,
        subscriptions: SubscriptionRepository,
        recipients: RecipientRepository,
        webhooks: WebhookQueue,
        emails: EmailQueue,
        deliveries: DeliveryLog,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(conn, outbox, audit=audit)
        self.subscriptions = subscriptions
        self.recipients = recipients
        self.webhooks = webhooks
        self.emails = emails
        self.deliveries = deliveries

    async def before_commit(self) -> None:
        await self.webhooks.flush()  # the deliveries held back in this transaction, in one statement
        await super().before_commit()


def tx_factory(conn: asyncpg.Connection, outbox: EventSink) -> NotificationTx:
    return NotificationTx(
        conn,
        outbox,
        subscriptions=PgSubscriptions(conn),
        recipients=PgRecipients(conn),
        webhooks=PgWebhookQueue(conn),
        emails=PgEmailQueue(conn),
        deliveries=PgDeliveryLog(conn),
    )
