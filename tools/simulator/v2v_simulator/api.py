"""HTTP with accounting: every call goes through the shared typed client (`v2v_harness.client.V2VClient`)
as one party of the platform (a treatment centre, a carrier, a site's MES, QA, the registry admin or ops)
with that party's own bearer token, is counted, and its answer is sorted into ok, intended refusal, or
error (retried first if 5xx or a transport error; a rate limit or a key still in flight is waited out).

All parties share one httpx connection pool; each has its own `V2VClient` on it, whose header provider
hands out the party's token (`v2v_harness.identity.Credentials`: the real client-credentials exchange with
the demo client of that party). Without credentials (tests against a mocked platform) no token is sent.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

import httpx

from v2v_harness.client import ApiResponse, HeaderProvider, V2VClient

from .report import Stats

Send = Callable[[V2VClient], Awaitable[ApiResponse]]
"""One request, made with the client it is given, e.g. `lambda c: c.get_order(order_id)`."""

Party = tuple[str, str | None]
"""Who calls: (kind, entity) of a demo client, e.g. ("centre", "TC-DE-BE-001"), ("qa", None)."""
QA: Party = ("qa", None)
ADMIN: Party = ("admin", None)
OPS: Party = ("ops", None)


def centre(centre_id: str) -> Party:
    return ("centre", centre_id)


def carrier(carrier_id: str) -> Party:
    return ("carrier", carrier_id)


def site(site_id: str) -> Party:
    return ("site", site_id)


def describe(party: Party) -> str:
    kind, entity = party
    return f"{kind} {entity}" if entity else kind


SERVER_RETRIES = 2
TRANSPORT_RETRIES = 4
RATE_LIMIT_RETRIES = 30  # 429s waited out (Retry-After) before the call counts as failed
IN_FLIGHT_RETRIES = 10  # 409 idempotency-key-in-flight: the first try of the same key still running
MAX_RETRY_AFTER_S = 5.0


class OrderAbort(Exception):
    """An order's actor cannot go on (an unexpected answer, or the order is stuck)."""


class TokenSource(Protocol):
    """Where bearer tokens come from (`v2v_harness.identity.Credentials` is one)."""

    def client_id(self, kind: str, entity_id: str | None = None) -> str: ...

    async def headers(self, client_id: str, scope: str | None = None) -> dict[str, str]: ...


def _request_line(exc: httpx.TransportError) -> str:
    """`METHOD /path` of the request a transport error belongs to."""
    try:
        request = exc.request
    except RuntimeError:  # not attached to a request
        return "?"
    return f"{request.method} {request.url.path}"


def _problem_kind(resp: ApiResponse) -> str:
    body = resp.body
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        return str(body["type"]).rsplit("/", 1)[-1]
    return ""


def _retry_after(resp: ApiResponse, default: float) -> float:
    try:
        wait = float(resp.headers.get("retry-after", default))
    except ValueError:
        wait = default
    return min(max(wait, 0.05), MAX_RETRY_AFTER_S)


class Api:
    def __init__(
        self,
        urls: Mapping[str, str],
        concurrency: int,
        stats: Stats,
        *,
        credentials: TokenSource | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_s: float = 0.5,
        server_retries: int = SERVER_RETRIES,
        transport_retries: int = TRANSPORT_RETRIES,
        in_flight_retries: int = IN_FLIGHT_RETRIES,
    ) -> None:
        """`credentials`: the parties' tokens (none sent without); `transport`: for tests
        (httpx.MockTransport); `backoff_s`: the first retry's pause (the n-th retry waits n times as
        long); the retry budgets (5xx, transport errors, 409 key in flight) default to the module's."""
        self.server_retries = server_retries
        self.transport_retries = transport_retries
        self.in_flight_retries = in_flight_retries
        self.urls = urls
        self.stats = stats
        self.credentials = credentials
        self.backoff_s = backoff_s
        self.sem = asyncio.Semaphore(concurrency)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=5.0),
            limits=httpx.Limits(max_connections=concurrency + 10, max_keepalive_connections=concurrency + 10),
            transport=transport,
        )
        self._clients: dict[Party, V2VClient] = {}

    @property
    def client(self) -> V2VClient:
        """The client of ops (the simulator's own reads: catalogue, order tracking, slots)."""
        return self.client_for(OPS)

    def client_for(self, party: Party) -> V2VClient:
        """The typed client acting as `party`, on the shared connection pool (KeyError: no demo client)."""
        found = self._clients.get(party)
        if found is None:
            found = V2VClient(self.urls, client=self.http, header_provider=self._provider(party))
            self._clients[party] = found
        return found

    def _provider(self, party: Party) -> HeaderProvider | None:
        credentials = self.credentials
        if credentials is None:
            return None
        client_id = credentials.client_id(*party)

        def provide(_service: str) -> Awaitable[Mapping[str, str]]:
            return credentials.headers(client_id)

        return provide

    async def close(self) -> None:
        self._clients.clear()
        await self.http.aclose()

    async def call(
        self,
        label: str,
        send: Send,
        *,
        who: str = "",
        party: Party = OPS,
        ok: Iterable[int] = (200, 201),
        intended: Iterable[int] = (),
        throttle: bool = True,
    ) -> ApiResponse:
        """One request as `party`. Answers in `ok` are returned; in `intended` counted as intended
        refusals and returned; anything else is recorded as an error and raises OrderAbort. 5xx and
        transport errors are recorded and retried (twice, resp. four times) first; a 429 is waited out
        (Retry-After) and a 409 for an Idempotency-Key still in flight retried, neither an error. Every
        POST of the call (its retries included) carries one Idempotency-Key."""
        ok_set, intended_set = set(ok), set(intended)
        try:
            client = self.client_for(party).with_idempotency_key(str(uuid.uuid4()))
        except (KeyError, OSError, ValueError) as exc:
            self.stats.error(f"{who} {label}: no credentials for {describe(party)}: {exc}")
            raise OrderAbort(f"{label}: no credentials for {describe(party)}") from exc
        server_errors = transport_errors = rate_limited = in_flight = 0
        while True:
            try:
                if throttle:
                    async with self.sem:
                        resp = await send(client)
                else:
                    resp = await send(client)
            except httpx.TransportError as exc:
                transport_errors += 1
                if transport_errors <= self.transport_retries:
                    await asyncio.sleep(self.backoff_s * transport_errors)
                    continue
                self.stats.error(f"{who} {label}: {_request_line(exc)}: {type(exc).__name__}: {exc}")
                raise OrderAbort(f"{label}: {exc}") from exc
            except httpx.HTTPStatusError as exc:  # the token endpoint refused the party's client
                self.stats.error(f"{who} {label}: no token for {describe(party)}: {exc}")
                raise OrderAbort(f"{label}: no token for {describe(party)}") from exc
            self.stats.calls[label] += 1
            self.stats.statuses[resp.status] += 1
            if resp.status in ok_set:
                return resp
            if resp.status in intended_set:
                self.stats.intended[f"{label} -> {resp.status}"] += 1
                return resp
            if resp.status == 429 and rate_limited < RATE_LIMIT_RETRIES:
                rate_limited += 1
                self.stats.throttled[describe(party)] += 1
                await asyncio.sleep(_retry_after(resp, self.backoff_s))
                continue
            if (
                resp.status == 409
                and _problem_kind(resp) == "idempotency-key-in-flight"
                and in_flight < self.in_flight_retries
            ):
                in_flight += 1
                await asyncio.sleep(self.backoff_s * in_flight)
                continue
            body = resp.body
            detail = body.get("detail") if isinstance(body, dict) else str(body)[:300]
            self.stats.error(f"{who} {label}: {resp.method} {resp.path} -> {resp.status} {detail}")
            if resp.status >= 500 and server_errors < self.server_retries:
                server_errors += 1
                await asyncio.sleep(self.backoff_s * server_errors)
                continue
            raise OrderAbort(f"{label}: HTTP {resp.status}")
