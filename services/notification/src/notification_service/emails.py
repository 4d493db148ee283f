"""E-mail alerts to a treatment centre's recipients when something goes wrong with an order.

The consumer renders each alert when it queues it (`render`): only the order id, the COI, the event
type and the allow-listed status fields of the event (`ALLOWED_FIELDS`) ever reach the message, so a
field that should not be in an event (a patient reference, say) never reaches a mailbox — nor the
database row it is sent from. The dispatcher (the shared machinery in `delivery`) sends the rows over
SMTP with retries and backoff, recording every attempt.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import aiosmtplib
import asyncpg
from opentelemetry import trace

from notification_service.delivery import DeliveryPolicy, Dispatcher, Outcome
from v2v_contracts import CloudEvent
from v2v_messaging import UnitOfWork
from v2v_observability import meter

# The events that are exceptions in an order's life: a centre's e-mail recipients hear of these.
# notification.webhook_delivery_failed.v1 comes from this service's own topic; e-mail never publishes
# an event of its own, so alerting on it cannot loop.
EXCEPTION_EVENT_TYPES: tuple[str, ...] = (
    "order.cancelled.v1",
    "order.failed.v1",
    "site.material_rejected.v1",
    "site.product_out_of_specification.v1",
    "site.manufacturing_failed.v1",
    "site.booking_affected.v1",
    "logistics.shipment_excursion.v1",
    "logistics.coi_mismatch_detected.v1",
    "order.coi_mismatch_detected.v1",
    "site.coi_mismatch_detected.v1",
    "notification.webhook_delivery_failed.v1",
)

# Event data keys that may appear in an e-mail: statuses, reasons and opaque references, never a person.
ALLOWED_FIELDS: tuple[str, ...] = (
    "reason",
    "previous_status",
    "disposition",
    "site_id",
    "run",
    "retained_material",
    "step",
    "leg",
    "milestone",
    "where",
    "reading_c",
    "min_c",
    "max_c",
    "event_type",  # webhook_delivery_failed: the type of the event that could not be delivered
    "attempts",
    "last_error",
)
MAX_VALUE_CHARS = 200

_meter = meter("v2v.notification")
OUTCOMES = _meter.create_counter("v2v.email.deliveries", description="E-mail delivery attempts by outcome")
DURATION = _meter.create_histogram("v2v.email.duration", unit="s", description="SMTP send duration")


# ---- the message ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


def _clean(value: Any) -> str | None:
    """One line of at most MAX_VALUE_CHARS; None for anything but a scalar (no nested structures)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not isinstance(value, str | int | float):
        return None
    try:
        raw = str(value)
    except ValueError:  # an int too long to print
        return None
    text = " ".join("".join(c if c.isprintable() else " " for c in raw).split())
    if len(text) > MAX_VALUE_CHARS:
        text = text[: MAX_VALUE_CHARS - 1] + "…"
    return text or None


def render(event: CloudEvent) -> Rendered:
    """The alert for an exception event. Raises ValueError when the event names no valid order id."""
    order_id = uuid.UUID(str(event.data.get("order_id")))
    coi = _clean(event.coi or event.data.get("coi")) or "(none)"
    details = [(key, text) for key in ALLOWED_FIELDS if (text := _clean(event.data.get(key))) is not None]
    width = max([len("event"), *(len(k) for k, _ in details)]) + 2
    lines = [
        "An order of your treatment centre needs attention.",
        "",
        f"{'order':<{width}}{order_id}",
        f"{'coi':<{width}}{coi}",
        f"{'event':<{width}}{event.type}",
        *(f"{key:<{width}}{text}" for key, text in details),
        "",
        f"Details: GET /v1/orders/{order_id} (order service)",
        "",
        "No patient data here: order id, chain-of-identity id and status only.",
    ]
    return Rendered(f"[vein2vein] {event.type} — order {order_id}", "\n".join(lines) + "\n")


# ---- recipients' addresses --------------------------------------------------------------------------

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def address_problem(address: str) -> str | None:
    """Why `address` is not a plain `local@domain.tld` address (dot-atom, ASCII), or None if it is."""
    if len(address) > 254:
        return "must be at most 254 characters"
    if address.count("@") != 1:
        return "must be an address of the form name@domain.example"
    local, domain = address.split("@")
    if not local or len(local) > 64 or not _LOCAL.fullmatch(local):
        return "the part before '@' must be 1..64 letters, digits or !#$%&'*+/=?^_`{|}~.- (no spaces)"
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return "the part after '@' must be a domain name such as hospital.example"
    return None


# ---- sending ----------------------------------------------------------------------------------------


def _flag(raw: str | None) -> bool:
    return (raw or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 8025
    sender: str = "alerts@vein2vein.local"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = False

    @classmethod
    def from_env(cls) -> SmtpSettings:
        """V2V_SMTP_HOST, _PORT, _FROM (defaults 127.0.0.1, 8025, alerts@vein2vein.local), and optional
        V2V_SMTP_USER, _PASSWORD, _STARTTLS (true|false, default false)."""
        env = os.environ.get
        return cls(
            host=env("V2V_SMTP_HOST") or cls.host,
            port=int(env("V2V_SMTP_PORT") or cls.port),
            sender=env("V2V_SMTP_FROM") or cls.sender,
            user=env("V2V_SMTP_USER") or None,
            password=env("V2V_SMTP_PASSWORD") or None,
            starttls=_flag(env("V2V_SMTP_STARTTLS")),
        )


def channel(schema: str) -> str:
    return f"v2v_email_{schema}"


def _refusal_code(exc: aiosmtplib.SMTPException) -> int | None:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return exc.recipients[0].code if exc.recipients else None
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code
    return None


class EmailDispatcher(Dispatcher):
    """Sends `email_deliveries` to their recipient over SMTP."""

    kind = "email"
    table = "email_deliveries"
    attempts_table = "email_delivery_attempts"
    target_table = "email_recipients"
    target_key = "recipient_id"
    target_columns = ("email",)
    status_attribute = "v2v.smtp.reply_code"
    outcomes = OUTCOMES
    duration = DURATION

    def __init__(
        self,
        pool: asyncpg.Pool,
        uow: UnitOfWork,
        schema: str,
        policy: DeliveryPolicy,
        smtp: SmtpSettings,
    ) -> None:
        super().__init__(pool, uow, schema, policy)
        self.smtp = smtp

    @staticmethod
    def channel(schema: str) -> str:
        return channel(schema)

    def describe(self, row: asyncpg.Record, span: trace.Span) -> None:
        span.set_attribute("v2v.recipient_id", str(row["recipient_id"]))

    def message(self, row: asyncpg.Record) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.smtp.sender
        msg["To"] = row["email"]
        msg["Subject"] = row["subject"]
        msg["Date"] = formatdate(usegmt=True)
        # the same id on every attempt: a receiving system can drop a copy it already has
        msg["Message-ID"] = f"<{row['delivery_id']}@{self.smtp.sender.rpartition('@')[2] or 'vein2vein'}>"
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(row["body"])
        return msg

    async def send(self, row: asyncpg.Record) -> Outcome:
        try:
            await aiosmtplib.send(
                self.message(row),
                hostname=self.smtp.host,
                port=self.smtp.port,
                username=self.smtp.user,
                password=self.smtp.password,
                start_tls=self.smtp.starttls,
                timeout=self.policy.timeout_s,
            )
        except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPRecipientRefused) as exc:
            code = _refusal_code(exc)
            # 5xx for the recipient: the address is refused for good; retrying cannot help
            permanent = code is not None and 500 <= code < 600
            return Outcome(code, f"{exc.__class__.__name__}: {exc}"[:500], permanent=permanent)
        except (aiosmtplib.SMTPException, OSError) as exc:
            code = _refusal_code(exc) if isinstance(exc, aiosmtplib.SMTPException) else None
            return Outcome(code, f"{exc.__class__.__name__}: {exc}"[:500])
        return Outcome(250)
