"""The notification service's settings, read once at start-up (`v2v_servicekit.run`).

Besides the settings every service reads:
- webhook retries: V2V_WEBHOOK_MAX_ATTEMPTS, _BACKOFF_BASE_S, _BACKOFF_MAX_S, _TIMEOUT_S (per HTTP call);
- e-mail retries: V2V_EMAIL_MAX_ATTEMPTS, _BACKOFF_BASE_S, _BACKOFF_MAX_S, _TIMEOUT_S (per SMTP session);
- SMTP: V2V_SMTP_HOST, _PORT, _FROM (defaults 127.0.0.1, 8025, alerts@vein2vein.local), and optional
  V2V_SMTP_USER, _PASSWORD, _STARTTLS (true|false, default false). An empty value means the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr, ValidationInfo, field_validator

from notification_service.domain.delivery import DeliveryPolicy
from v2v_servicekit import ServiceSettings

_DEFAULT = DeliveryPolicy()


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 8025
    sender: str = "alerts@vein2vein.local"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = False


_SMTP = SmtpSettings()


class NotificationSettings(ServiceSettings):
    webhook_max_attempts: int = _DEFAULT.max_attempts
    webhook_backoff_base_s: float = _DEFAULT.backoff_base_s
    webhook_backoff_max_s: float = _DEFAULT.backoff_max_s
    webhook_timeout_s: float = _DEFAULT.timeout_s

    email_max_attempts: int = _DEFAULT.max_attempts
    email_backoff_base_s: float = _DEFAULT.backoff_base_s
    email_backoff_max_s: float = _DEFAULT.backoff_max_s
    email_timeout_s: float = _DEFAULT.timeout_s

    smtp_host: str = _SMTP.host
    smtp_port: int = _SMTP.port
    smtp_from: str = _SMTP.sender
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False

    @field_validator("smtp_host", "smtp_port", "smtp_from", "smtp_user", "smtp_password", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "":
            return cls.model_fields[info.field_name or ""].default
        return value

    @field_validator("smtp_starttls", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return value

    @property
    def webhook_policy(self) -> DeliveryPolicy:
        return DeliveryPolicy(
            max_attempts=self.webhook_max_attempts,
            backoff_base_s=self.webhook_backoff_base_s,
            backoff_max_s=self.webhook_backoff_max_s,
            timeout_s=self.webhook_timeout_s,
        )

    @property
    def email_policy(self) -> DeliveryPolicy:
        return DeliveryPolicy(
            max_attempts=self.email_max_attempts,
            backoff_base_s=self.email_backoff_base_s,
            backoff_max_s=self.email_backoff_max_s,
            timeout_s=self.email_timeout_s,
        )

    @property
    def smtp(self) -> SmtpSettings:
        return SmtpSettings(
            host=self.smtp_host,
            port=self.smtp_port,
            sender=self.smtp_from,
            user=self.smtp_user,
            password=self.smtp_password.get_secret_value() if self.smtp_password else None,
            starttls=self.smtp_starttls,
        )
