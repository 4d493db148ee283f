"""Per-client rate limit: a token bucket per client id, in the memory of one process.

Why a small bucket here and not the `limits` package: `limits` offers fixed and moving windows (not a
token bucket with a burst), keeps its memory storage tidy with a background timer thread, and would be
one more dependency on the request path for ~40 lines. A token bucket is exact (fractional refill,
monotonic clock), gives the precise `Retry-After`, and its memory is bounded here by evicting idle
(full) buckets. The limit is per process: with N replicas a client gets up to N times the rate, which
is fine for a guard against a runaway or hostile client (a shared limit belongs to the gateway).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """`rate` tokens per second up to `burst`; one request takes one token. `rate <= 0` turns it off."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, client: str) -> float:
        """Takes a token for `client`: 0.0 when allowed, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._evict(now)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _evict(self, now: float) -> None:
        """Drops the buckets that have refilled (forgetting them changes nothing), else the oldest half."""
        full_after = self.burst / self.rate
        idle = [c for c, b in self._buckets.items() if now - b.updated >= full_after]
        for client in idle:
            del self._buckets[client]
        if len(self._buckets) >= self.max_clients:
            for client in list(self._buckets)[: self.max_clients // 2]:
                del self._buckets[client]


def retry_after_seconds(wait_s: float) -> int:
    """The `Retry-After` value (whole seconds, at least 1) for a wait of `wait_s`."""
    return max(1, math.ceil(wait_s))
