"""HTTP with accounting: every call goes through the shared typed client (`v2v_harness.client.V2VClient`),
is counted, and its answer is sorted into ok, intended refusal, or error (retried first if 5xx or a
transport error)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping

import httpx

from v2v_harness.client import ApiResponse, HeaderProvider, V2VClient

from .report import Stats

Send = Callable[[V2VClient], Awaitable[ApiResponse]]
"""One request, made with the client it is given, e.g. `lambda c: c.get_order(order_id)`."""

SERVER_RETRIES = 2
TRANSPORT_RETRIES = 4


class OrderAbort(Exception):
    """An order's actor cannot go on (an unexpected answer, or the order is stuck)."""


def _request_line(exc: httpx.TransportError) -> str:
    """`METHOD /path` of the request a transport error belongs to."""
    try:
        request = exc.request
    except RuntimeError:  # not attached to a request
        return "?"
    return f"{request.method} {request.url.path}"


class Api:
    def __init__(
        self,
        urls: Mapping[str, str],
        concurrency: int,
        stats: Stats,
        *,
        header_provider: HeaderProvider | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_s: float = 0.5,
    ) -> None:
        """`transport`: for tests (httpx.MockTransport); `backoff_s`: the first retry's pause (the n-th
        retry waits n times as long)."""
        self.urls = urls
        self.stats = stats
        self.backoff_s = backoff_s
        self.sem = asyncio.Semaphore(concurrency)
        self.client = V2VClient(
            urls,
            header_provider=header_provider,
            timeout=httpx.Timeout(30.0, connect=5.0),
            limits=httpx.Limits(max_connections=concurrency + 10, max_keepalive_connections=concurrency + 10),
            transport=transport,
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def call(
        self,
        label: str,
        send: Send,
        *,
        who: str = "",
        ok: Iterable[int] = (200, 201),
        intended: Iterable[int] = (),
        throttle: bool = True,
    ) -> ApiResponse:
        """One request. Answers in `ok` are returned; in `intended` counted as intended refusals and
        returned; anything else is recorded as an error and raises OrderAbort. 5xx and transport errors
        are recorded and retried (twice, resp. four times) first."""
        ok_set, intended_set = set(ok), set(intended)
        server_errors = transport_errors = 0
        while True:
            try:
                if throttle:
                    async with self.sem:
                        resp = await send(self.client)
                else:
                    resp = await send(self.client)
            except httpx.TransportError as exc:
                transport_errors += 1
                if transport_errors <= TRANSPORT_RETRIES:
                    await asyncio.sleep(self.backoff_s * transport_errors)
                    continue
                self.stats.error(f"{who} {label}: {_request_line(exc)}: {type(exc).__name__}: {exc}")
                raise OrderAbort(f"{label}: {exc}") from exc
            self.stats.calls[label] += 1
            self.stats.statuses[resp.status] += 1
            if resp.status in ok_set:
                return resp
            if resp.status in intended_set:
                self.stats.intended[f"{label} -> {resp.status}"] += 1
                return resp
            body = resp.body
            detail = body.get("detail") if isinstance(body, dict) else str(body)[:300]
            self.stats.error(f"{who} {label}: {resp.method} {resp.path} -> {resp.status} {detail}")
            if resp.status >= 500 and server_errors < SERVER_RETRIES:
                server_errors += 1
                await asyncio.sleep(self.backoff_s * server_errors)
                continue
            raise OrderAbort(f"{label}: HTTP {resp.status}")
