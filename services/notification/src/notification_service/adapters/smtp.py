"""E-mail delivery over SMTP: one message per delivery, with the same Message-ID on every attempt. The
outcome is a category (`domain.delivery.FAILURES`), never the text of an error."""

from __future__ import annotations

import socket
import ssl
import uuid
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from notification_service.config import SmtpSettings
from notification_service.domain.delivery import EmailDelivery, Outcome


def _refusal_code(exc: aiosmtplib.SMTPException) -> int | None:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return exc.recipients[0].code if exc.recipients else None
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code
    return None


def _reply_category(code: int | None) -> str | None:
    if code is not None and 400 <= code < 500:
        return "smtp_4xx"
    if code is not None and 500 <= code < 600:
        return "smtp_5xx"
    return None


def failure_of(exc: BaseException, code: int | None) -> str:
    """The category of a failed SMTP attempt (never its text)."""
    reply = _reply_category(code)
    if reply:
        return reply
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, aiosmtplib.SMTPTimeoutError | TimeoutError) for e in chain):
        return "timeout"
    if any(isinstance(e, ssl.SSLError | ssl.CertificateError) for e in chain):
        return "tls_error"
    if any(isinstance(e, socket.gaierror) for e in chain):
        return "dns_error"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection_refused"
    if any(isinstance(e, aiosmtplib.SMTPConnectError) for e in chain) and "refused" in str(exc).lower():
        return "connection_refused"  # aiosmtplib keeps only the message of the refusal
    return "connection_error"


class SmtpSender:
    """Sends a delivery to its recipient; one attempt (one SMTP session), never raises for a failure."""

    def __init__(self, smtp: SmtpSettings, timeout_s: float) -> None:
        self.smtp = smtp
        self.timeout_s = timeout_s

    def message(self, *, delivery_id: uuid.UUID, to: str, subject: str, body: str) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.smtp.sender
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = formatdate(usegmt=True)
        # the same id on every attempt: a receiving system can drop a copy it already has
        msg["Message-ID"] = f"<{delivery_id}@{self.smtp.sender.rpartition('@')[2] or 'vein2vein'}>"
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(body)
        return msg

    async def send(self, delivery: EmailDelivery) -> Outcome:
        message = self.message(
            delivery_id=delivery.delivery_id, to=delivery.email, subject=delivery.subject, body=delivery.body
        )
        try:
            await aiosmtplib.send(
                message,
                hostname=self.smtp.host,
                port=self.smtp.port,
                username=self.smtp.user,
                password=self.smtp.password,
                start_tls=self.smtp.starttls,
                timeout=self.timeout_s,
            )
        except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPRecipientRefused) as exc:
            code = _refusal_code(exc)
            # 5xx for the recipient: the address is refused for good; retrying cannot help
            permanent = code is not None and 500 <= code < 600
            return Outcome(code, failure_of(exc, code), permanent=permanent)
        except (aiosmtplib.SMTPException, OSError) as exc:
            code = _refusal_code(exc) if isinstance(exc, aiosmtplib.SMTPException) else None
            return Outcome(code, failure_of(exc, code))
        return Outcome(250)

    async def aclose(self) -> None:
        """Nothing held between sends (one session per message)."""
