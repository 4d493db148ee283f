"""A webhook endpoint's circuit breaker: one dead endpoint costs the others nothing.

An endpoint (a subscription's URL) is `open` while it answers: its due deliveries are attempted, at most
`per_endpoint` at once. After `failures` consecutive failed attempts it is `parked`: its deliveries wait
(no attempt is made, none of their attempts is used up) until `parked_until`; then one of them is sent as
a probe (`probing`). A probe that succeeds closes the breaker (the endpoint is `open` again, and its
backlog drains); a probe that fails parks it again, for twice as long (up to `cooldown_max_s`). Any
success — a probe's or that of an attempt made before the endpoint was parked — opens it.

Only the endpoint's own failures count: a refusal, a timeout, an HTTP error. A failure on this side
(the URL blocked by policy, an unreadable signing secret, a bug) says nothing about the endpoint.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from notification_service.domain.delivery import Outcome

EndpointState = Literal["open", "parked", "probing"]

# failures that tell nothing about the endpoint: no request was sent, or this side failed
NOT_THE_ENDPOINTS_FAULT: frozenset[str] = frozenset(
    {"blocked_address", "signing_secret_unavailable", "internal_error"}
)


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int = 5  # consecutive failed attempts that park an endpoint
    cooldown_s: float = 10.0  # the first parking; doubled for every probe that fails
    cooldown_max_s: float = 600.0
    per_endpoint: int = 4  # an open endpoint's deliveries in flight at once (all replicas together)

    def __post_init__(self) -> None:
        if self.failures < 1 or self.per_endpoint < 1:
            raise ValueError("failures and per_endpoint must be at least 1")
        if not 0 < self.cooldown_s <= self.cooldown_max_s:
            raise ValueError("cooldown_s must be positive and at most cooldown_max_s")

    def cooldown(self, parks: int) -> timedelta:
        """How long an endpoint parked for the `parks`-th time in a row waits before its probe."""
        seconds = self.cooldown_s * 2.0 ** min(max(parks - 1, 0), 1000)
        return timedelta(seconds=min(seconds, self.cooldown_max_s))


@dataclass(frozen=True)
class EndpointHealth:
    state: EndpointState = "open"
    consecutive_failures: int = 0
    parks: int = 0  # times parked since the last success: the next cool-down grows with it
    parked_until: datetime | None = None  # parked: when it is probed; probing: when the probe's lease ends
    probe_delivery_id: uuid.UUID | None = None  # the delivery sent as the probe


def counts_against_endpoint(outcome: Outcome) -> bool:
    return not outcome.ok and outcome.error not in NOT_THE_ENDPOINTS_FAULT


def after_attempts(
    policy: BreakerPolicy,
    health: EndpointHealth,
    results: Iterable[tuple[uuid.UUID, Outcome]],
    now: datetime,
) -> EndpointHealth:
    """The endpoint's health after the recorded attempts `results` (delivery id, outcome), in the order
    they finished."""
    for delivery_id, outcome in results:
        was_probe = health.state == "probing" and delivery_id == health.probe_delivery_id
        if outcome.ok:
            health = EndpointHealth()
        elif counts_against_endpoint(outcome):
            failures = health.consecutive_failures + 1
            if was_probe or (health.state == "open" and failures >= policy.failures):
                parks = health.parks + 1
                health = EndpointHealth("parked", failures, parks, now + policy.cooldown(parks))
            else:
                health = replace(health, consecutive_failures=failures)
        elif was_probe:  # the probe told nothing about the endpoint: probe again after the same wait
            until = now + policy.cooldown(health.parks)
            health = replace(health, state="parked", parked_until=until, probe_delivery_id=None)
    return health
