"""Webhook delivery over HTTP per the Standard Webhooks specification: each POST is signed
(`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`) with the
subscription's secret — and, while a rotation's overlap lasts, with the replaced secret too (two
space-separated `v1,` signatures, as the specification allows; a receiver accepts either).

Before each attempt the URL is checked against the URL policy again (the deployment's current one), and
the connection goes only to a checked address (`adapters.egress`); redirects are not followed, and at
most MAX_RESPONSE_BYTES of an answer are read. The outcome is a category (`domain.delivery.FAILURES`),
never the text of an error.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
from standardwebhooks.webhooks import Webhook

from notification_service.adapters.egress import (
    AddressGuard,
    BlockedAddress,
    PinnedConnector,
    ResolutionFailed,
)
from notification_service.adapters.secret_box import SecretBox, SecretUnreadable
from notification_service.domain.delivery import Outcome, WebhookDelivery
from notification_service.domain.subscriptions import validate_secret
from notification_service.domain.urls import UrlPolicy, check_url
from v2v_contracts.errors import Invalid

# httpcore asks `import sniffio` several times per request (`current_async_library`); sniffio is not
# installed here, and a failed import is not cached, so every request searched sys.path again (seen in the
# profile of issue 12; webhooks go through aiohttp now, the service's other httpx clients still ask). A
# None entry is Python's own "known to be absent" marker: the same ImportError, raised at once. Nothing
# changes when sniffio is installed.
if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

# per dispatcher: connections to the centres' endpoints (kept alive), more than it has attempts in flight
# (DeliveryPolicy.batch): an attempt never waits for a connection (a wait that ran out would count as
# the endpoint's timeout)
MAX_CONNECTIONS = 64
KEEPALIVE_S = 30.0  # an idle connection is closed after this
MAX_RESPONSE_BYTES = 64 * 1024  # of an answer's body, read so that the connection can be reused


def sign(secrets: str | Sequence[str], msg_id: str, ts: datetime, body: str) -> dict[str, str]:
    """The Standard Webhooks headers, with one `v1,` signature per secret (space-separated)."""
    # the library signs ts.replace(tzinfo=UTC), i.e. it reads the wall clock as UTC: convert first so the
    # signed timestamp and the webhook-timestamp header are the same instant
    ts = ts.astimezone(UTC)
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(ts.timestamp())),
        "webhook-signature": " ".join(Webhook(key).sign(msg_id, ts, body) for key in keys),
        "content-type": "application/json",
    }


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def failure_of(exc: BaseException) -> str:
    """The category of a failed HTTP attempt (never its text)."""
    chain = _causes(exc)
    if any(isinstance(e, BlockedAddress) for e in chain):
        return "blocked_address"
    if any(isinstance(e, ResolutionFailed) for e in chain):
        return "dns_error"
    if any(isinstance(e, TimeoutError) for e in chain):  # aiohttp's timeouts are TimeoutErrors
        return "timeout"
    if any(isinstance(e, ssl.SSLError | ssl.CertificateError) for e in chain):
        return "tls_error"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection_refused"
    return "connection_error"


def failure_of_status(status: int) -> str | None:
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return "http_3xx"
    if 400 <= status < 500:
        return "http_4xx"
    if 500 <= status < 600:
        return "http_5xx"
    return "http_other"


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read (and drop) at most MAX_RESPONSE_BYTES of the answer, undecoded: a small answer read to its
    end leaves the connection reusable; a large one is cut off (its connection is closed, not reused)."""
    read = 0
    content = resp.content
    while not content.at_eof():
        chunk = await content.readany()
        if not chunk:
            return
        read += len(chunk)
        if read > MAX_RESPONSE_BYTES:
            return


class WebhookSender:
    """Posts a delivery's payload to its subscription's URL; one attempt, never raises for a failure.

    The HTTP client is aiohttp (a keep-alive pool of MAX_CONNECTIONS): per request several times cheaper
    in CPU than httpx was (`bench/webhook_sender_cpu.py`). Each attempt: connect, read and the pool wait
    bounded by `timeout_s` each, the whole attempt by twice that; redirects not followed; no cookies,
    no proxies from the environment; the answer's body read undecoded, at most MAX_RESPONSE_BYTES."""

    def __init__(
        self,
        timeout_s: float,
        box: SecretBox,
        policy: UrlPolicy,
        *,
        guard: AddressGuard | None = None,
        verify: ssl.SSLContext | bool = True,
        socket_factory: Callable[[Any], socket.socket] | None = None,
    ) -> None:
        self.box = box
        self.policy = policy
        self.timeout_s = timeout_s
        self.guard = guard or AddressGuard(policy)
        # TLS as before: httpx's context (certifi's CA bundle; or the given context; or no verification)
        self.ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        self.socket_factory = socket_factory  # tests: what a connection is asked to connect to
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """One session for the dispatcher's lifetime (made in its event loop, at the first attempt):
        connections are kept alive and reused."""
        if self._session is None:
            connector = PinnedConnector(
                self.guard,
                limit=MAX_CONNECTIONS,
                keepalive_timeout=KEEPALIVE_S,
                ssl_context=self.ssl_context,
                socket_factory=self.socket_factory,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                trust_env=False,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        return self._session

    def secrets(self, delivery: WebhookDelivery) -> list[str] | None:
        """The delivery's signing secrets, opened; None when one does not open (or is malformed)."""
        opened = []
        try:
            for sealed in delivery.sealed_secrets:
                secret = self.box.open(sealed, delivery.subscription_id)
                validate_secret(secret)
                opened.append(secret)
        except (SecretUnreadable, Invalid):
            return None
        return opened or None

    async def send(self, delivery: WebhookDelivery) -> Outcome:
        try:
            check_url(delivery.url, self.policy)  # the policy in force now, not only when subscribed
        except Invalid:
            return Outcome(None, "blocked_address", permanent=True)
        secrets = self.secrets(delivery)
        if secrets is None:
            return Outcome(None, "signing_secret_unavailable")
        body = delivery.payload.decode()
        headers = sign(secrets, f"msg_{delivery.event_id}", datetime.now(UTC), body)
        try:
            # the whole attempt is bounded, not only each read: a receiver trickling bytes holds no lane
            async with asyncio.timeout(self.timeout_s * 2):
                async with self.session.post(
                    delivery.url, data=delivery.payload, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    await _drain(resp)
        except (aiohttp.ClientError, BlockedAddress, ResolutionFailed, OSError, ValueError) as exc:
            # (TimeoutError, the whole attempt's bound and aiohttp's timeouts, is an OSError; a URL that
            # aiohttp refuses is a ValueError)
            category = failure_of(exc)
            return Outcome(None, category, permanent=category == "blocked_address")
        failure = failure_of_status(status)
        return Outcome(status, failure)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
