"""Webhook delivery over HTTP per the Standard Webhooks specification: each POST is signed
(`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`) with the
subscription's secret; redirects are not followed."""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from notification_service.domain.delivery import Outcome, WebhookDelivery

# httpcore asks `import sniffio` several times per request (`current_async_library`); sniffio is not
# installed here, and a failed import is not cached, so every request searched sys.path again (seen in the
# profile of issue 12). A None entry is Python's own "known to be absent" marker: the same ImportError,
# raised at once. Nothing changes when sniffio is installed.
if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

MAX_CONNECTIONS = 32  # per dispatcher: kept-alive connections to the centres' endpoints


def sign(secret: str, msg_id: str, ts: datetime, body: str) -> dict[str, str]:
    # the library signs ts.replace(tzinfo=UTC), i.e. it reads the wall clock as UTC: convert first so the
    # signed timestamp and the webhook-timestamp header are the same instant
    ts = ts.astimezone(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(ts.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, ts, body),
        "content-type": "application/json",
    }


class WebhookSender:
    """Posts a delivery's payload to its subscription's URL; one attempt, never raises for a failure."""

    def __init__(self, timeout_s: float, client: httpx.AsyncClient | None = None) -> None:
        # one client for the dispatcher's lifetime: connections are kept alive and reused
        self.client = client or httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS,
                max_keepalive_connections=MAX_CONNECTIONS,
                keepalive_expiry=30.0,
            ),
        )

    async def send(self, delivery: WebhookDelivery) -> Outcome:
        body = delivery.payload.decode()
        headers = sign(delivery.secret, f"msg_{delivery.event_id}", datetime.now(UTC), body)
        try:
            resp = await self.client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return Outcome(None, f"{exc.__class__.__name__}: {exc}"[:500])
        status = resp.status_code
        return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}")

    async def aclose(self) -> None:
        await self.client.aclose()
