"""All the SQL of the notification service, and its unit of work's `NotificationTx`.

- `subscriptions`: the centres' webhook endpoints; `recipients`: the addresses their alerts go to.
- `webhooks`, `emails`: each channel's delivery queue. The consumer writes deliveries in the same
  transaction as its inbox entry (one per target and event) and wakes the channel's dispatcher with
  `NOTIFY` on commit. A dispatcher leases due rows (`FOR UPDATE SKIP LOCKED` plus a lease time, so
  replicas never send one delivery at once), and records each attempt and its verdict in one transaction.
- `deliveries`: the delivery log across both channels, with every attempt (read only).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Generic, TypeVar

import asyncpg

from notification_service.domain.alerts import Rendered
from notification_service.domain.delivery import (
    Delivery,
    EmailDelivery,
    EventRef,
    Outcome,
    WebhookDelivery,
)
from notification_service.domain.subscriptions import Recipient, Subscription
from v2v_messaging import EventSink, Tx

D = TypeVar("D", bound=Delivery)

WEBHOOK_CHANNEL = "v2v_webhooks_"  # + schema: LISTEN/NOTIFY channel of the webhook dispatcher
EMAIL_CHANNEL = "v2v_email_"  # + schema: ... of the e-mail dispatcher


def webhook_channel(schema: str) -> str:
    return WEBHOOK_CHANNEL + schema


def email_channel(schema: str) -> str:
    return EMAIL_CHANNEL + schema


@contextlib.asynccontextmanager
async def wakeups(pool: asyncpg.Pool, channel: str) -> AsyncIterator[asyncio.Event]:
    """An event set whenever a transaction that notified `channel` commits (LISTEN on a pooled
    connection held for as long as the context lasts)."""
    wake = asyncio.Event()

    def on_notify(*_args: object) -> None:
        wake.set()

    listener = await pool.acquire()
    try:
        await listener.add_listener(channel, on_notify)
        yield wake
    finally:
        with contextlib.suppress(Exception):  # UNLISTEN before the connection goes back to the pool
            await listener.remove_listener(channel, on_notify)
        with contextlib.suppress(Exception):
            await pool.release(listener)


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
    return Subscription(
        subscription_id=row["subscription_id"],
        treatment_center_id=row["treatment_center_id"],
        url=row["url"],
        event_types=row["event_types"],
        active=row["active"],
        created_at=row["created_at"],
        secret_rotated_at=row["secret_rotated_at"],
        previous_secret_expires_at=row["previous_secret_expires_at"],
    )


_SUBSCRIPTION_COLUMNS = """subscription_id, treatment_center_id, url, event_types, active, created_at,
                           secret_rotated_at, previous_secret_expires_at"""


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
            f"""SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions
                WHERE subscription_id = $1 AND ($2::text IS NULL OR treatment_center_id = $2)""",
            subscription_id,
            tenant,
        )
        return None if row is None else _subscription(row)

    async def search(
        self, tenant: str | None, treatment_center_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[Subscription]:
        rows = await self.conn.fetch(
            f"""SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions
                WHERE ($1::text IS NULL OR treatment_center_id = $1)
                  AND ($2::text IS NULL OR treatment_center_id = $2)
                ORDER BY created_at, subscription_id LIMIT $3 OFFSET $4""",
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
            f"""UPDATE subscriptions
                SET previous_secret_sealed = secret_sealed, previous_secret_expires_at = now() + $4::interval,
                    secret_sealed = $3, secret_rotated_at = now()
                WHERE subscription_id = $1 AND ($2::text IS NULL OR treatment_center_id = $2) AND active
                RETURNING {_SUBSCRIPTION_COLUMNS}""",
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
    """One attempt of a delivery, as recorded."""

    delivery_id: uuid.UUID
    attempt: int
    outcome: Outcome
    duration_ms: int


class DeliveryQueue(abc.ABC, Generic[D]):
    """One channel's deliveries: leased for an attempt, then delivered, retried later or failed."""

    @abc.abstractmethod
    async def wake(self) -> None:
        """Wake the channel's dispatcher when the transaction commits."""

    @abc.abstractmethod
    async def claim_due(self, limit: int, lease: timedelta) -> list[D]:
        """Lease up to `limit` pending deliveries that are due and not leased, the longest due first."""

    @abc.abstractmethod
    async def seconds_until_next_due(self) -> float | None:
        """When the next pending delivery falls due (negative: overdue); None when none is pending."""

    @abc.abstractmethod
    async def record_attempt(
        self, delivery_id: uuid.UUID, attempt: int, outcome: Outcome, duration_ms: int
    ) -> None: ...

    @abc.abstractmethod
    async def mark_delivered(self, delivery_id: uuid.UUID, attempt: int, status_code: int | None) -> None: ...

    @abc.abstractmethod
    async def mark_failed(self, delivery_id: uuid.UUID, attempt: int, outcome: Outcome) -> None: ...

    @abc.abstractmethod
    async def schedule_retry(
        self, delivery_id: uuid.UUID, attempt: int, outcome: Outcome, delay_s: float
    ) -> None: ...

    async def record_delivered(self, attempts: Sequence[Attempt]) -> None:
        """Record successful attempts and mark their deliveries delivered (one by one unless overridden)."""
        for a in attempts:
            await self.record_attempt(a.delivery_id, a.attempt, a.outcome, a.duration_ms)
            await self.mark_delivered(a.delivery_id, a.attempt, a.outcome.status_code)


class WebhookQueue(DeliveryQueue[WebhookDelivery]):
    @abc.abstractmethod
    async def enqueue(self, subscription_ids: Sequence[uuid.UUID], event: EventRef, payload: bytes) -> None:
        """One delivery per subscription; an event already queued for a subscription is not queued again."""

    async def enqueue_matching(
        self, subscriptions: SubscriptionRepository, event: EventRef, payload: bytes
    ) -> None:
        """Queue `event` for each of its centre's subscriptions that want it; wake the dispatcher on commit
        when any does."""
        matching = await subscriptions.matching(event.treatment_center_id, event.event_type)
        if matching:
            await self.enqueue(matching, event, payload)
            await self.wake()


class EmailQueue(DeliveryQueue[EmailDelivery]):
    @abc.abstractmethod
    async def enqueue(self, recipient_ids: Sequence[uuid.UUID], event: EventRef, message: Rendered) -> None:
        """One e-mail per recipient; an event already queued for a recipient is not queued again."""

    @abc.abstractmethod
    async def cancel_pending(self, recipient_id: uuid.UUID) -> None:
        """Cancel what a removed recipient was still to receive."""


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

    async def claim_due(self, limit: int, lease: timedelta) -> list[D]:
        target = self.target_select
        rows = await self.conn.fetch(
            f"""UPDATE {self.table} d SET lease_until = now() + $2::interval
                FROM {self.target_table} t
                WHERE d.{self.target_key} = t.{self.target_key} AND d.delivery_id IN (
                    SELECT delivery_id FROM {self.table}
                    WHERE status = 'pending' AND next_attempt_at <= now()
                      AND (lease_until IS NULL OR lease_until < now())
                    ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                RETURNING d.*, {target}""",
            limit,
            lease,
        )
        return [self._delivery(r) for r in rows]

    async def seconds_until_next_due(self) -> float | None:
        nxt = await self.conn.fetchval(
            f"SELECT min(next_attempt_at) - now() FROM {self.table} WHERE status = 'pending'"
        )
        return None if nxt is None else float(nxt.total_seconds())

    async def record_attempt(
        self, delivery_id: uuid.UUID, attempt: int, outcome: Outcome, duration_ms: int
    ) -> None:
        await self.conn.execute(
            f"""INSERT INTO {self.attempts_table} (delivery_id, attempt, status_code, error, duration_ms)
                VALUES ($1, $2, $3, $4, $5)""",
            delivery_id,
            attempt,
            outcome.status_code,
            outcome.error,
            duration_ms,
        )

    async def mark_delivered(self, delivery_id: uuid.UUID, attempt: int, status_code: int | None) -> None:
        await self.conn.execute(
            f"""UPDATE {self.table} SET status = 'delivered', attempts = $2, delivered_at = now(),
                       last_status_code = $3, last_error = NULL, lease_until = NULL
                WHERE delivery_id = $1""",
            delivery_id,
            attempt,
            status_code,
        )

    async def mark_failed(self, delivery_id: uuid.UUID, attempt: int, outcome: Outcome) -> None:
        await self.conn.execute(
            f"""UPDATE {self.table} SET status = 'failed', attempts = $2, last_status_code = $3,
                       last_error = $4, lease_until = NULL WHERE delivery_id = $1""",
            delivery_id,
            attempt,
            outcome.status_code,
            outcome.error,
        )

    async def schedule_retry(
        self, delivery_id: uuid.UUID, attempt: int, outcome: Outcome, delay_s: float
    ) -> None:
        await self.conn.execute(
            f"""UPDATE {self.table} SET attempts = $2, last_status_code = $3, last_error = $4,
                       lease_until = NULL, next_attempt_at = now() + $5::interval
                WHERE delivery_id = $1""",
            delivery_id,
            attempt,
            outcome.status_code,
            outcome.error,
            timedelta(seconds=delay_s),
        )

    async def record_delivered(self, attempts: Sequence[Attempt]) -> None:
        # one statement (one round trip) for a batch: the attempts inserted, their deliveries marked
        if not attempts:
            return
        await self.conn.execute(
            f"""WITH a AS (
                    SELECT * FROM unnest($1::uuid[], $2::int[], $3::int[], $4::int[])
                        AS a(delivery_id, attempt, status_code, duration_ms)),
                ins AS (
                    INSERT INTO {self.attempts_table} (delivery_id, attempt, status_code, error, duration_ms)
                    SELECT delivery_id, attempt, status_code, NULL, duration_ms FROM a)
                UPDATE {self.table} d SET status = 'delivered', attempts = a.attempt, delivered_at = now(),
                       last_status_code = a.status_code, last_error = NULL, lease_until = NULL
                FROM a WHERE d.delivery_id = a.delivery_id""",
            [a.delivery_id for a in attempts],
            [a.attempt for a in attempts],
            [a.outcome.status_code for a in attempts],
            [a.duration_ms for a in attempts],
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
    }


class PgWebhookQueue(_PgQueue[WebhookDelivery], WebhookQueue):
    channel = WEBHOOK_CHANNEL
    table = "deliveries"
    attempts_table = "delivery_attempts"
    target_table = "subscriptions"
    target_key = "subscription_id"
    # the replaced secret signs too until its overlap ends (the database's clock decides)
    target_select = """t.url, t.secret_sealed,
        CASE WHEN t.previous_secret_expires_at > now() THEN t.previous_secret_sealed END
            AS previous_secret_sealed"""

    def _delivery(self, row: asyncpg.Record) -> WebhookDelivery:
        sealed = (row["secret_sealed"], row["previous_secret_sealed"])
        return WebhookDelivery(
            **_ref(row),
            subscription_id=row["subscription_id"],
            url=row["url"],
            sealed_secrets=tuple(bytes(s) for s in sealed if s is not None),
            payload=bytes(row["payload"]),
        )

    async def enqueue_matching(
        self, subscriptions: SubscriptionRepository, event: EventRef, payload: bytes
    ) -> None:
        # one statement (one round trip) instead of three: the matching subscriptions, their deliveries
        # inserted and the dispatcher's NOTIFY (delivered on commit) when any was queued
        await self.conn.execute(
            """WITH ins AS (
                   INSERT INTO deliveries (delivery_id, subscription_id, event_id, event_type, order_id, coi,
                                           treatment_center_id, payload, trace_headers, status)
                   SELECT gen_random_uuid(), s.subscription_id, $2, $3, $4, $5, $1, $6, $7::jsonb, 'pending'
                   FROM subscriptions s
                   WHERE s.treatment_center_id = $1 AND s.active
                     AND (s.event_types IS NULL OR $3 = ANY(s.event_types))
                   ON CONFLICT (subscription_id, event_id) DO NOTHING
                   RETURNING 1)
               SELECT CASE WHEN n > 0 THEN pg_notify($8 || current_schema(), '') END
               FROM (SELECT count(*) AS n FROM ins) c""",
            event.treatment_center_id,
            event.event_id,
            event.event_type,
            event.order_id,
            event.coi,
            payload,
            event.trace_headers,
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
            """UPDATE email_deliveries SET status = 'cancelled', lease_until = NULL,
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


class NotificationTx(Tx):
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
    ) -> None:
        super().__init__(conn, outbox)
        self.subscriptions = subscriptions
        self.recipients = recipients
        self.webhooks = webhooks
        self.emails = emails
        self.deliveries = deliveries


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
