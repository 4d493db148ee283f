"""In-memory repositories of the notification service, for unit tests of its service layer.

    store = MemoryStore()
    uow = fake_unit_of_work(store)
    await commands.add_recipient(uow, treatment_center_id=..., email=..., event_types=None)

They keep the Postgres repositories' rules (one active recipient per centre and address, case-insensitive;
one delivery per target and event; leases; cancelled e-mails of a removed recipient). Time is the store's
`now`, moved on by the test (`advance`, `make_due`); a failed transaction leaves no change behind.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from notification_service.adapters.repository import (
    Attempt,
    DeliveryFilter,
    DeliveryLog,
    DeliveryQueue,
    EmailQueue,
    NotificationTx,
    RecipientRepository,
    SubscriptionRepository,
    WebhookQueue,
)
from notification_service.domain.alerts import Rendered
from notification_service.domain.delivery import Delivery, EmailDelivery, EventRef, WebhookDelivery
from notification_service.domain.endpoints import BreakerPolicy, EndpointHealth
from notification_service.domain.subscriptions import Recipient, Subscription
from v2v_audit import MemoryAuditTrail, Record
from v2v_messaging.fakes import FakeOutbox, FakeUnitOfWork

D = TypeVar("D", bound=Delivery)


@dataclass
class Row:
    """A delivery as the tables hold it (both channels)."""

    channel: str
    delivery_id: uuid.UUID
    target_id: uuid.UUID  # subscription or recipient
    event: EventRef
    created_at: datetime
    next_attempt_at: datetime
    content: dict[str, Any]  # payload | subject, body
    status: str = "pending"
    attempts: int = 0
    lease_until: datetime | None = None
    lease_token: uuid.UUID | None = None
    seq: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    attempt_log: list[dict[str, Any]] = field(default_factory=list)

    def log_entry(self, endpoint: EndpointHealth | None = None) -> dict[str, Any]:
        """The row of the `delivery_log` view (`endpoint`: a webhook's endpoint)."""
        webhook = self.channel == "webhook"
        endpoint = endpoint or EndpointHealth()
        return {
            "channel": self.channel,
            "delivery_id": self.delivery_id,
            "subscription_id": self.target_id if webhook else None,
            "recipient_id": None if webhook else self.target_id,
            "event_id": self.event.event_id,
            "event_type": self.event.event_type,
            "order_id": self.event.order_id,
            "coi": self.event.coi,
            "treatment_center_id": self.event.treatment_center_id,
            "status": self.status,
            "attempts": self.attempts,
            "last_status_code": self.last_status_code,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "delivered_at": self.delivered_at,
            "next_attempt_at": self.next_attempt_at,
            "endpoint_state": endpoint.state if webhook else None,
            "parked_until": endpoint.parked_until if webhook else None,
        }


@dataclass
class MemoryStore:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    subscriptions: dict[uuid.UUID, Subscription] = field(default_factory=dict)
    # per subscription: (sealed secret, sealed replaced secret or None) as the table keeps them
    sealed: dict[uuid.UUID, tuple[bytes, bytes | None]] = field(default_factory=dict)
    recipients: dict[uuid.UUID, Recipient] = field(default_factory=dict)
    rows: dict[uuid.UUID, Row] = field(default_factory=dict)  # deliveries of both channels, in order
    wakes: dict[str, int] = field(default_factory=lambda: {"webhook": 0, "email": 0})
    # the webhook endpoints' circuit breakers
    endpoints: dict[uuid.UUID, EndpointHealth] = field(default_factory=dict)
    seq: int = 0  # the last delivery's queue order
    audit: list[Record] = field(default_factory=list)  # the audit trail, chained as in Postgres

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def make_due(self) -> None:
        """As if every backoff had elapsed."""
        for row in self.rows.values():
            if row.status == "pending":
                row.next_attempt_at = self.now

    def deliveries(self, channel: str) -> list[Row]:
        return [r for r in self.rows.values() if r.channel == channel]

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "subscriptions": self.subscriptions,
                "sealed": self.sealed,
                "recipients": self.recipients,
                "rows": self.rows,
                "endpoints": self.endpoints,
                "audit": self.audit,
            }
        ) | {"wakes": dict(self.wakes)}

    def restore(self, saved: dict[str, Any]) -> None:
        self.subscriptions = saved["subscriptions"]
        self.sealed = saved["sealed"]
        self.recipients = saved["recipients"]
        self.rows = saved["rows"]
        self.endpoints = saved["endpoints"]
        self.audit = saved["audit"]
        self.wakes = saved["wakes"]


def _of_tenant(centre: str, tenant: str | None, treatment_center_id: str | None = None) -> bool:
    return (tenant is None or centre == tenant) and (
        treatment_center_id is None or centre == treatment_center_id
    )


class MemorySubscriptions(SubscriptionRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(
        self,
        subscription_id: uuid.UUID,
        treatment_center_id: str,
        url: str,
        sealed_secret: bytes,
        event_types: list[str] | None,
    ) -> Subscription:
        sub = Subscription(
            subscription_id=subscription_id,
            treatment_center_id=treatment_center_id,
            url=url,
            event_types=None if event_types is None else list(event_types),
            active=True,
            created_at=self.store.now,
        )
        self.store.subscriptions[subscription_id] = sub
        self.store.sealed[subscription_id] = (sealed_secret, None)
        return sub

    def _with_endpoint(self, sub: Subscription) -> Subscription:
        endpoint = self.store.endpoints.get(sub.subscription_id, EndpointHealth())
        return dataclasses.replace(sub, endpoint=endpoint)

    async def get(self, subscription_id: uuid.UUID, tenant: str | None = None) -> Subscription | None:
        sub = self.store.subscriptions.get(subscription_id)
        ok = sub is not None and _of_tenant(sub.treatment_center_id, tenant)
        return self._with_endpoint(sub) if sub is not None and ok else None

    async def search(
        self, tenant: str | None, treatment_center_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[Subscription]:
        found = [
            self._with_endpoint(s)
            for s in self.store.subscriptions.values()
            if _of_tenant(s.treatment_center_id, tenant, treatment_center_id)
        ]
        return found[offset : offset + limit]

    async def rotate_secret(
        self, subscription_id: uuid.UUID, tenant: str | None, sealed_secret: bytes, overlap: timedelta
    ) -> Subscription | None:
        sub = await self.get(subscription_id, tenant)
        if sub is None or not sub.active:
            return None
        current, _ = self.store.sealed[subscription_id]
        self.store.sealed[subscription_id] = (sealed_secret, current)
        rotated = dataclasses.replace(
            sub, secret_rotated_at=self.store.now, previous_secret_expires_at=self.store.now + overlap
        )
        self.store.subscriptions[subscription_id] = rotated
        return rotated

    async def matching(self, treatment_center_id: str, event_type: str) -> list[uuid.UUID]:
        return [
            s.subscription_id
            for s in self.store.subscriptions.values()
            if s.treatment_center_id == treatment_center_id and s.wants(event_type)
        ]


class MemoryRecipients(RecipientRepository):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def add(
        self, recipient_id: uuid.UUID, treatment_center_id: str, email: str, event_types: list[str] | None
    ) -> Recipient | None:
        for r in self.store.recipients.values():
            if r.active and r.treatment_center_id == treatment_center_id and r.email.lower() == email.lower():
                return None
        recipient = Recipient(
            recipient_id=recipient_id,
            treatment_center_id=treatment_center_id,
            email=email,
            event_types=None if event_types is None else list(event_types),
            active=True,
            created_at=self.store.now,
        )
        self.store.recipients[recipient_id] = recipient
        return recipient

    async def get(self, recipient_id: uuid.UUID, tenant: str | None = None) -> Recipient | None:
        r = self.store.recipients.get(recipient_id)
        return r if r is not None and r.active and _of_tenant(r.treatment_center_id, tenant) else None

    async def search(
        self, tenant: str | None, treatment_center_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[Recipient]:
        found = [
            r
            for r in self.store.recipients.values()
            if r.active and _of_tenant(r.treatment_center_id, tenant, treatment_center_id)
        ]
        return found[offset : offset + limit]

    async def remove(self, recipient_id: uuid.UUID, tenant: str | None = None) -> bool:
        r = await self.get(recipient_id, tenant)
        if r is None:
            return False
        self.store.recipients[recipient_id] = Recipient(
            recipient_id=r.recipient_id,
            treatment_center_id=r.treatment_center_id,
            email=r.email,
            event_types=r.event_types,
            active=False,
            created_at=r.created_at,
        )
        return True

    async def matching(self, treatment_center_id: str, event_type: str) -> list[uuid.UUID]:
        return [
            r.recipient_id
            for r in self.store.recipients.values()
            if r.treatment_center_id == treatment_center_id and r.wants(event_type)
        ]


class _MemoryQueue(DeliveryQueue[D]):
    channel: str

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def _delivery(self, row: Row) -> D:
        raise NotImplementedError

    def _row(self, delivery_id: uuid.UUID) -> Row:
        return self.store.rows[delivery_id]

    def _enqueue(self, targets: Sequence[uuid.UUID], event: EventRef, content: dict[str, Any]) -> None:
        queued = {(r.target_id, r.event.event_id) for r in self.store.deliveries(self.channel)}
        for target in targets:
            if (target, event.event_id) in queued:
                continue
            delivery_id = uuid.uuid4()
            self.store.seq += 1
            self.store.rows[delivery_id] = Row(
                self.channel,
                delivery_id,
                target,
                event,
                self.store.now,
                self.store.now,
                dict(content),
                seq=self.store.seq,
            )

    async def wake(self) -> None:
        self.store.wakes[self.channel] += 1

    def _leased(self, row: Row) -> bool:
        return row.status == "pending" and row.lease_until is not None and row.lease_until >= self.store.now

    def _due(self, row: Row) -> bool:
        now = self.store.now
        return (
            row.status == "pending"
            and row.next_attempt_at <= now
            and (row.lease_until is None or row.lease_until < now)
        )

    def _lease(self, rows: Sequence[Row], lease: timedelta) -> list[D]:
        for r in rows:
            r.lease_until, r.lease_token = self.store.now + lease, uuid.uuid4()
        return sorted((self._delivery(r) for r in rows), key=lambda d: d.seq)

    async def claim_due(self, limit: int, lease: timedelta, *, per_target: int | None = None) -> list[D]:
        due = sorted(
            (r for r in self.store.deliveries(self.channel) if self._due(r)),
            key=lambda r: (r.next_attempt_at, r.seq),
        )
        return self._lease(due[: max(limit, 0)], lease)

    async def seconds_until_next_due(self, *, per_target: int | None = None) -> float | None:
        now = self.store.now
        pending = [
            r.next_attempt_at
            for r in self.store.deliveries(self.channel)
            if r.status == "pending" and (r.lease_until is None or r.lease_until < now)
        ]
        return None if not pending else (min(pending) - now).total_seconds()

    async def record(self, attempts: Sequence[Attempt]) -> set[uuid.UUID]:
        recorded: set[uuid.UUID] = set()
        for a in attempts:
            row = self.store.rows.get(a.delivery_id)
            if row is None or row.status != "pending" or a.lease_token is None:
                continue
            if row.lease_token != a.lease_token:
                continue
            outcome, verdict = a.outcome, a.verdict
            row.attempt_log.append(
                {
                    "attempt": a.attempt,
                    "attempted_at": self.store.now,
                    "status_code": outcome.status_code,
                    "error": outcome.error,
                    "duration_ms": a.duration_ms,
                }
            )
            row.attempts, row.last_status_code, row.last_error = a.attempt, outcome.status_code, outcome.error
            row.lease_until, row.lease_token = None, None
            if verdict.label == "delivered":
                row.status, row.delivered_at = "delivered", self.store.now
            elif verdict.label == "failed":
                row.status = "failed"
            else:
                row.next_attempt_at = self.store.now + timedelta(seconds=verdict.retry_in_s or 0.0)
            recorded.add(a.lease_token)
        return recorded


def _ref(row: Row) -> dict[str, Any]:
    e = row.event
    return {
        "delivery_id": row.delivery_id,
        "attempts": row.attempts,
        "event_id": e.event_id,
        "event_type": e.event_type,
        "order_id": e.order_id,
        "coi": e.coi,
        "treatment_center_id": e.treatment_center_id,
        "trace_headers": dict(e.trace_headers),
        "lease_token": row.lease_token,
        "seq": row.seq,
    }


class MemoryWebhookQueue(_MemoryQueue[WebhookDelivery], WebhookQueue):
    """Scheduled per endpoint as the Postgres queue is (`adapters.repository._CLAIM_WEBHOOKS`)."""

    channel = "webhook"

    def _delivery(self, row: Row) -> WebhookDelivery:
        sub = self.store.subscriptions[row.target_id]
        current, previous = self.store.sealed[sub.subscription_id]
        overlapping = (
            sub.previous_secret_expires_at is not None and sub.previous_secret_expires_at > self.store.now
        )
        sealed = (current, previous) if previous is not None and overlapping else (current,)
        return WebhookDelivery(
            **_ref(row),
            subscription_id=sub.subscription_id,
            url=sub.url,
            sealed_secrets=sealed,
            **row.content,
        )

    def _health(self, subscription_id: uuid.UUID) -> EndpointHealth:
        return self.store.endpoints.get(subscription_id, EndpointHealth())

    def _room(self, subscription_id: uuid.UUID, rows: Sequence[Row], per_target: int) -> int:
        health = self._health(subscription_id)
        leased = sum(1 for r in rows if self._leased(r))
        if health.state == "open":
            return per_target - leased
        if health.parked_until is not None and health.parked_until <= self.store.now:
            return 1 - leased
        return 0

    def _lane_free(self, row: Row, rows: Sequence[Row]) -> bool:
        order = row.event.order_id
        return order is None or not any(self._leased(r) and r.event.order_id == order for r in rows)

    def _first_of_lane(self, row: Row, rows: Sequence[Row]) -> bool:
        order = row.event.order_id
        return order is None or not any(
            r.status == "pending" and r.event.order_id == order and r.seq < row.seq for r in rows
        )

    def _by_endpoint(self) -> dict[uuid.UUID, list[Row]]:
        out: dict[uuid.UUID, list[Row]] = {}
        for r in self.store.deliveries(self.channel):
            out.setdefault(r.target_id, []).append(r)
        return out

    async def claim_due(
        self, limit: int, lease: timedelta, *, per_target: int | None = None
    ) -> list[WebhookDelivery]:
        per_target = per_target or BreakerPolicy().per_endpoint
        offered: list[tuple[int, datetime, uuid.UUID, Row]] = []  # turn, due, endpoint, row
        for subscription_id, rows in self._by_endpoint().items():
            room = self._room(subscription_id, rows, per_target)
            if room <= 0:
                continue
            free = sorted(
                (r for r in rows if self._due(r) and self._lane_free(r, rows)),
                key=lambda r: (r.next_attempt_at, r.seq),
            )
            newest = sorted(
                (r for r in free if r.attempts == 0 and self._first_of_lane(r, rows)),
                key=lambda r: r.seq,
                reverse=True,
            )[:1]
            picked = newest + [r for r in free[:room] if r not in newest]
            for turn, r in enumerate(picked[:room], start=1):
                offered.append((turn, r.next_attempt_at, subscription_id, r))
        offered.sort(key=lambda o: (o[0], o[1]))
        chosen = offered[: max(limit, 0)]
        for _turn, _due, subscription_id, r in chosen:
            health = self._health(subscription_id)
            if health.state != "open":  # its probe
                probing = dict(state="probing", parked_until=self.store.now + lease)
                self.store.endpoints[subscription_id] = dataclasses.replace(
                    health, **probing, probe_delivery_id=r.delivery_id
                )
        return self._lease([c[3] for c in chosen], lease)

    async def seconds_until_next_due(self, *, per_target: int | None = None) -> float | None:
        per_target = per_target or BreakerPolicy().per_endpoint
        now = self.store.now
        times: list[datetime] = []
        for subscription_id, rows in self._by_endpoint().items():
            health = self._health(subscription_id)
            pending = [r for r in rows if r.status == "pending"]
            if health.state != "open":
                if pending and health.parked_until is not None:
                    times.append(health.parked_until)
            elif self._room(subscription_id, rows, per_target) > 0:
                times += [
                    r.next_attempt_at
                    for r in pending
                    if (r.lease_until is None or r.lease_until < now) and self._lane_free(r, rows)
                ]
        return None if not times else (min(times) - now).total_seconds()

    async def endpoints_for_update(
        self, subscription_ids: Sequence[uuid.UUID]
    ) -> tuple[dict[uuid.UUID, EndpointHealth], datetime]:
        return {s: self._health(s) for s in subscription_ids}, self.store.now

    async def save_endpoints(self, health: Mapping[uuid.UUID, EndpointHealth]) -> None:
        self.store.endpoints.update(health)

    async def subscriptions_of(self, delivery_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        return [self.store.rows[i].target_id for i in delivery_ids]

    async def enqueue(self, subscription_ids: Sequence[uuid.UUID], event: EventRef, payload: bytes) -> None:
        self._enqueue(subscription_ids, event, {"payload": payload})


class MemoryEmailQueue(_MemoryQueue[EmailDelivery], EmailQueue):
    channel = "email"

    def _delivery(self, row: Row) -> EmailDelivery:
        recipient = self.store.recipients[row.target_id]
        return EmailDelivery(
            **_ref(row), recipient_id=recipient.recipient_id, email=recipient.email, **row.content
        )

    async def enqueue(self, recipient_ids: Sequence[uuid.UUID], event: EventRef, message: Rendered) -> None:
        self._enqueue(recipient_ids, event, {"subject": message.subject, "body": message.body})

    async def cancel_pending(self, recipient_id: uuid.UUID) -> None:
        for row in self.store.deliveries(self.channel):
            if row.target_id == recipient_id and row.status == "pending":
                row.status, row.lease_until, row.lease_token = "cancelled", None, None
                row.last_error = row.last_error or "recipient_removed"


class MemoryDeliveryLog(DeliveryLog):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def search(self, where: DeliveryFilter) -> list[dict[str, Any]]:
        entries = [r.log_entry(self._endpoint(r)) for r in reversed(self.store.rows.values())]
        wanted = {
            "order_id": where.order_id,
            "channel": where.channel,
            "subscription_id": where.subscription_id,
            "recipient_id": where.recipient_id,
            "status": where.status,
            "treatment_center_id": where.tenant,
        }
        entries = [e for e in entries if all(v is None or e[k] == v for k, v in wanted.items())]
        if where.treatment_center_id is not None:
            entries = [e for e in entries if e["treatment_center_id"] == where.treatment_center_id]
        entries.sort(key=lambda e: e["created_at"], reverse=True)  # stable: the newest row first on ties
        return entries[where.offset : where.offset + where.limit]

    async def get(self, delivery_id: uuid.UUID, tenant: str | None = None) -> dict[str, Any] | None:
        row = self.store.rows.get(delivery_id)
        if row is None or not _of_tenant(row.event.treatment_center_id, tenant):
            return None
        return {**row.log_entry(self._endpoint(row)), "attempt_log": [dict(a) for a in row.attempt_log]}

    def _endpoint(self, row: Row) -> EndpointHealth | None:
        return self.store.endpoints.get(row.target_id) if row.channel == "webhook" else None


def memory_tx(store: MemoryStore, outbox: FakeOutbox) -> NotificationTx:
    return NotificationTx(
        None,
        outbox,
        subscriptions=MemorySubscriptions(store),
        recipients=MemoryRecipients(store),
        webhooks=MemoryWebhookQueue(store),
        emails=MemoryEmailQueue(store),
        deliveries=MemoryDeliveryLog(store),
        audit=MemoryAuditTrail(store.audit, "notification"),
    )


def fake_unit_of_work(store: MemoryStore | None = None) -> FakeUnitOfWork[NotificationTx]:
    """A unit of work on `store` (a new one if not given); a transaction that raises changes nothing."""
    store = store if store is not None else MemoryStore()
    return FakeUnitOfWork(
        lambda outbox: memory_tx(store, outbox), snapshot=store.snapshot, restore=store.restore
    )
