"""Lean HTTP/1.1 on asyncio streams for the hot path: a keep-alive client pool that posts orders and a
webhook receiver that records when each webhook arrives.

httpx and a thread-per-request server cost the generator more CPU per request than the services it
measures share their two cores with; these do the minimum (content-length and chunked bodies,
keep-alive, a few request headers such as `Authorization` and `Idempotency-Key`) and nothing else. The
receiver checks the Standard Webhooks signature of the first webhook on each path against the secret
the platform returned when that path was subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

CHAIN_END = "logistics.shipment_planned.v1"
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024


class HttpError(Exception):
    pass


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError(f"malformed header line {line[:40]!r}")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # trailers, then the empty line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise HttpError("body too large")
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY:
        raise HttpError("body too large")
    return await reader.readexactly(length) if length else b""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HttpPool:
    """Keep-alive connections to one host:port, opened on demand, at most `limit` at once."""

    def __init__(self, host: str, port: int, limit: int = 256) -> None:
        self.host, self.port = host, port
        self._idle: list[_Conn] = []
        self._sem = asyncio.Semaphore(limit)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One request; `headers` are sent as given (a retry on a fresh connection sends the same ones,
        so an `Idempotency-Key` makes it safe)."""
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        async with self._sem:
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()
                if conn.reader.at_eof():  # closed by the server while idle (keep-alive timeout)
                    conn.close()
                    conn = None
            reused = conn is not None
            if conn is None:
                conn = _Conn(*await asyncio.open_connection(self.host, self.port))
            try:
                status, answer, payload = await self._exchange(conn, method, path, body, content_type, extra)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                conn.close()
                if not reused:
                    raise HttpError(f"{exc.__class__.__name__}: {exc}") from exc
                # the server closed an idle keep-alive connection: one retry on a fresh one
                conn = _Conn(*await asyncio.open_connection(self.host, self.port))
                try:
                    status, answer, payload = await self._exchange(
                        conn, method, path, body, content_type, extra
                    )
                except BaseException:
                    conn.close()
                    raise
            except BaseException:
                conn.close()
                raise
            if answer.get("connection", "").lower() == "close":
                conn.close()
            else:
                self._idle.append(conn)
            return status, payload

    async def _exchange(
        self, conn: _Conn, method: str, path: str, body: bytes, content_type: str, extra: str = ""
    ) -> tuple[int, dict[str, str], bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
        ).encode("latin-1")
        conn.writer.write(head + body)
        await conn.writer.drain()
        raw = await conn.reader.readuntil(b"\r\n\r\n")
        status_line, headers = _parse_head(raw[:-4])
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"not an HTTP/1.x status line: {status_line[:40]!r}")
        status = int(parts[1])
        payload = await _read_body(conn.reader, headers)
        return status, headers, payload

    async def aclose(self) -> None:
        while self._idle:
            conn = self._idle.pop()
            conn.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()


@dataclass
class Arrival:
    at: float  # wall clock (time.time()) when the webhook's body was read
    event_time: str  # the CloudEvent's own `time`


@dataclass
class WebhookSink:
    """Records the first arrival of each (order id, event type) webhook; answers 204 at once. The first
    webhook on each path of `secrets` (path -> the signing secret its subscription was given) has its
    signature checked: `verified` paths, `bad_signatures` webhooks that did not verify."""

    arrivals: dict[str, dict[str, Arrival]] = field(default_factory=lambda: defaultdict(dict))
    chain_ends: int = 0
    received: int = 0
    duplicates: int = 0
    malformed: int = 0
    secrets: dict[str, str] = field(default_factory=dict)
    verified: set[str] = field(default_factory=set)
    bad_signatures: int = 0
    on_chain_end: Callable[[str], None] | None = None
    _server: asyncio.Server | None = None
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> WebhookSink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def record(self, body: bytes, at: float) -> None:
        self.received += 1
        try:
            event: dict[str, Any] = json.loads(body)
            order_id, kind, event_time = str(event["subject"]), str(event["type"]), str(event["time"])
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        seen = self.arrivals[order_id]
        if kind in seen:
            self.duplicates += 1
            return
        seen[kind] = Arrival(at, event_time)
        if kind == CHAIN_END:
            self.chain_ends += 1
            if self.on_chain_end is not None:
                self.on_chain_end(order_id)

    def check_signature(self, path: str, headers: dict[str, str], body: bytes) -> None:
        """Verify the first webhook of a subscribed path (then trust the path: verifying every one
        would cost the generator the CPU the services need)."""
        secret = self.secrets.get(path)
        if secret is None or path in self.verified:
            return
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError):
            self.bad_signatures += 1
            return
        self.verified.add(path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                line, headers = _parse_head(raw[:-4])
                body = await _read_body(reader, headers)
                at = time.time()
                parts = line.split(" ")
                if len(parts) >= 2:
                    self.check_signature(parts[1], headers, body)
                self.record(body, at)
                keep = headers.get("connection", "").lower() != "close"
                writer.write(
                    b"HTTP/1.1 204 No Content\r\n" + (b"" if keep else b"connection: close\r\n") + b"\r\n"
                )
                await writer.drain()
                if not keep:
                    return
        except (HttpError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
