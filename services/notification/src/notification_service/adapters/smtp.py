"""E-mail delivery over SMTP: one message per delivery, with the same Message-ID on every attempt."""

from __future__ import annotations

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
            return Outcome(code, f"{exc.__class__.__name__}: {exc}"[:500], permanent=permanent)
        except (aiosmtplib.SMTPException, OSError) as exc:
            code = _refusal_code(exc) if isinstance(exc, aiosmtplib.SMTPException) else None
            return Outcome(code, f"{exc.__class__.__name__}: {exc}"[:500])
        return Outcome(250)

    async def aclose(self) -> None:
        """Nothing held between sends (one session per message)."""
