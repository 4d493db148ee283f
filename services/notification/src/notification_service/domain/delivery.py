"""What every notification channel (webhook, e-mail) shares: the deliveries, the outcome of one attempt,
and the policy deciding after each attempt whether a delivery is done, retried later (exponential backoff
with jitter) or given up (after the last attempt, or at once for a permanent refusal)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class DeliveryPolicy:
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 5.0
    batch: int = 50  # deliveries a dispatcher has in flight at most (leased and not yet recorded)

    def backoff(self, attempt: int, rand: Callable[[], float] | None = None) -> float:
        """Exponential backoff with equal jitter: between half and all of base * 2^(attempt-1), capped."""
        # float power with a bounded exponent: 2 ** n for n >= 1024 cannot be converted to float
        ceiling = min(self.backoff_base_s * 2.0 ** min(attempt - 1, 1000), self.backoff_max_s)
        return ceiling / 2 + (rand or random.random)() * ceiling / 2


# What the delivery log says of a failed attempt: a category, never the text of a socket error or an
# exception (which could name internal hosts, or carry what a receiver answered).
DELIVERED = "delivered"
FAILURES: frozenset[str] = frozenset(
    {
        "http_3xx",  # a redirect: never followed
        "http_4xx",
        "http_5xx",
        "http_other",  # a status outside 2xx..5xx
        "timeout",
        "connection_refused",
        "connection_error",  # reset, closed early, protocol error
        "tls_error",  # handshake or certificate verification failed
        "dns_error",  # the name did not resolve
        "blocked_address",  # the URL or a resolved address is not allowed: no request sent
        "signing_secret_unavailable",  # the subscription's secret could not be read (key changed?)
        "smtp_4xx",  # a temporary refusal by the mail server
        "smtp_5xx",  # a permanent refusal by the mail server
        "internal_error",  # the sender itself failed (a bug): see the service's log
        "recipient_removed",  # an e-mail cancelled with its recipient
    }
)


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt: a channel status code (HTTP status, SMTP reply code) and, for a failure,
    its category (one of FAILURES)."""

    status_code: int | None
    error: str | None = None  # a FAILURES category; None when delivered
    permanent: bool = False  # a refusal that no retry can change: fail the delivery now

    def __post_init__(self) -> None:
        if self.error is not None and self.error not in FAILURES:
            raise ValueError("an outcome's error must be one of the failure categories")

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Verdict:
    """What becomes of a delivery after an attempt: `delivered`, `retry` (in `retry_in_s`) or `failed`."""

    label: Literal["delivered", "retry", "failed"]
    retry_in_s: float | None = None


def decide(policy: DeliveryPolicy, attempt: int, outcome: Outcome) -> Verdict:
    if outcome.ok:
        return Verdict("delivered")
    if outcome.permanent or attempt >= policy.max_attempts:
        return Verdict("failed")
    return Verdict("retry", policy.backoff(attempt))


@dataclass(frozen=True, kw_only=True)
class EventRef:
    """The event a delivery is about (as queued by the consumer)."""

    event_id: uuid.UUID
    event_type: str
    order_id: uuid.UUID | None
    coi: str | None
    treatment_center_id: str
    trace_headers: dict[str, str] = field(default_factory=dict)  # W3C context of the consumer's span


@dataclass(frozen=True, kw_only=True)
class Delivery(EventRef):
    """A delivery leased for one attempt."""

    delivery_id: uuid.UUID
    attempts: int  # made so far
    # the lease's token: the attempt's outcome is recorded only while the delivery is still leased by it
    # (a dispatcher paused past its lease, whose delivery another one took over, records nothing)
    lease_token: uuid.UUID | None = None
    seq: int = 0  # queued order: an order's deliveries to one target are attempted in this order


@dataclass(frozen=True, kw_only=True)
class WebhookDelivery(Delivery):
    subscription_id: uuid.UUID
    url: str
    # the subscription's signing secrets, sealed (encrypted at rest): the current one first, then the one
    # it replaced while a rotation's overlap lasts; each signs the delivery
    sealed_secrets: tuple[bytes, ...] = field(repr=False)
    payload: bytes  # the CloudEvent with its allow-listed fields (domain.payloads)


@dataclass(frozen=True, kw_only=True)
class EmailDelivery(Delivery):
    recipient_id: uuid.UUID
    email: str = field(repr=False)
    subject: str
    body: str
