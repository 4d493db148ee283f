"""The workload's HTTP path: a client-side balancer over a service's replicas that records every call.

The simulator talks to one URL per service (the first replica's); this transport spreads its requests
over all replicas of that service (round robin) and fails over to the next replica when one refuses the
connection (killed, restarting). Nothing else is retried here: the simulator's own retries resend a POST
with the same Idempotency-Key. Every answer (or transport error) is recorded: time, service, status,
latency."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class Call:
    t: float  # run clock when it was sent
    service: str
    method: str
    status: int  # 0: transport error
    ms: float


@dataclass
class ReplicaBalancer(httpx.AsyncBaseTransport):
    replicas: dict[int, tuple[str, list[int]]]  # first replica's port -> (service, every replica's port)
    clock: Callable[[], float]
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=80, max_keepalive_connections=40)
        )
        self._turn = itertools.count()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        found = self.replicas.get(request.url.port or 0)
        if found is None:
            return await self.inner.handle_async_request(request)
        service, ports = found
        first = next(self._turn)
        last_exc: Exception | None = None
        for i in range(len(ports)):
            port = ports[(first + i) % len(ports)]
            request.url = request.url.copy_with(port=port)
            request.headers["host"] = f"{request.url.host}:{port}"
            t0 = time.monotonic()
            sent = self.clock()
            try:
                resp = await self.inner.handle_async_request(request)
            except httpx.ConnectError as exc:  # nobody listening: the next replica
                self.calls.append(Call(sent, service, request.method, 0, (time.monotonic() - t0) * 1000))
                last_exc = exc
                continue
            except httpx.TransportError:
                self.calls.append(Call(sent, service, request.method, 0, (time.monotonic() - t0) * 1000))
                raise
            self.calls.append(
                Call(sent, service, request.method, resp.status_code, (time.monotonic() - t0) * 1000)
            )
            return resp
        assert last_exc is not None
        raise last_exc

    async def aclose(self) -> None:
        """Shared by every wave's client: closing one of them leaves it open (see `shutdown`)."""

    async def shutdown(self) -> None:
        await self.inner.aclose()
