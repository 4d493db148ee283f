"""The notification service's settings, read once at start-up (`v2v_servicekit.run`).

Besides the settings every service reads:
- webhook retries: V2V_WEBHOOK_MAX_ATTEMPTS, _BACKOFF_BASE_S, _BACKOFF_MAX_S, _TIMEOUT_S (per HTTP call);
- e-mail retries: V2V_EMAIL_MAX_ATTEMPTS, _BACKOFF_BASE_S, _BACKOFF_MAX_S, _TIMEOUT_S (per SMTP session);
- SMTP: V2V_SMTP_HOST, _PORT, _FROM (defaults 127.0.0.1, 8025, alerts@vein2vein.local), and optional
  V2V_SMTP_USER, _PASSWORD, _STARTTLS (true|false, default false). An empty value means the default.
- webhook signing secrets, sealed at rest (AES-256-GCM): V2V_NOTIFICATION_SECRETS_KEY, the base64 of 32
  random bytes (e.g. `python -c "import os, base64; print(base64.b64encode(os.urandom(32)).decode())"`).
  Without it the service refuses to start, unless V2V_NOTIFICATION_INSECURE_DEV_KEY=true (development
  only: a fixed, published key). Changing the key makes the stored secrets unreadable: deliveries then
  fail with `signing_secret_unavailable` until each subscription's secret is rotated.
- V2V_WEBHOOK_SECRET_OVERLAP_S (default 86400): after a rotation the replaced secret keeps signing
  deliveries (a second `v1,` signature) this long, so receivers can switch over.
- webhook endpoints, each behind a circuit breaker: V2V_WEBHOOK_ENDPOINT_CONCURRENCY (default 4: an
  endpoint's deliveries in flight at once), V2V_WEBHOOK_BREAKER_FAILURES (default 5 consecutive failed
  attempts park an endpoint), V2V_WEBHOOK_BREAKER_COOLDOWN_S (default 10: the first parking; it doubles
  for every failed probe) and V2V_WEBHOOK_BREAKER_COOLDOWN_MAX_S (default 600).
- V2V_WEBHOOK_LEASE_S (default 0: max(60, endpoint concurrency x (3 x timeout + 1) + 10) seconds): how
  long a leased webhook delivery is the dispatcher's; one not recorded by then is attempted again, by
  another replica too (with the same webhook-id), and the late attempt is not recorded. Shorter than the
  default, a slow endpoint's deliveries may be sent twice.
- V2V_WEBHOOK_ALLOW_LOOPBACK (default false): development only — also allows `http` URLs and loopback
  addresses (localhost, 127.0.0.0/8, ::1) for webhooks. Private, link-local and other non-public
  addresses stay refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from notification_service.adapters.secret_box import DEV_KEY, SecretBox, decode_key
from notification_service.domain.delivery import DeliveryPolicy
from notification_service.domain.endpoints import BreakerPolicy
from notification_service.domain.urls import UrlPolicy
from v2v_servicekit import ServiceSettings

_DEFAULT = DeliveryPolicy()
_BREAKER = BreakerPolicy()


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
    webhook_endpoint_concurrency: int = Field(default=_BREAKER.per_endpoint, ge=1, le=64)
    webhook_breaker_failures: int = Field(default=_BREAKER.failures, ge=1, le=1000)
    webhook_breaker_cooldown_s: float = Field(default=_BREAKER.cooldown_s, gt=0, le=86_400)
    webhook_breaker_cooldown_max_s: float = Field(default=_BREAKER.cooldown_max_s, gt=0, le=7 * 86_400)
    webhook_lease_s: float = Field(default=0.0, ge=0, le=86_400)  # 0: long enough for its attempts

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

    notification_secrets_key: SecretStr | None = None
    notification_insecure_dev_key: bool = False
    webhook_secret_overlap_s: int = Field(default=86_400, ge=0, le=30 * 86_400)
    webhook_allow_loopback: bool = False

    @field_validator(
        "smtp_host",
        "smtp_port",
        "smtp_from",
        "smtp_user",
        "smtp_password",
        "notification_secrets_key",
        mode="before",
    )
    @classmethod
    def _empty_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "":
            return cls.model_fields[info.field_name or ""].default
        return value

    @field_validator(
        "smtp_starttls", "notification_insecure_dev_key", "webhook_allow_loopback", mode="before"
    )
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
    def breaker_policy(self) -> BreakerPolicy:
        return BreakerPolicy(
            failures=self.webhook_breaker_failures,
            cooldown_s=self.webhook_breaker_cooldown_s,
            cooldown_max_s=max(self.webhook_breaker_cooldown_max_s, self.webhook_breaker_cooldown_s),
            per_endpoint=self.webhook_endpoint_concurrency,
        )

    @property
    def webhook_lease(self) -> timedelta | None:
        """The lease of a webhook delivery when set (else the dispatcher's own, long enough)."""
        return timedelta(seconds=self.webhook_lease_s) if self.webhook_lease_s > 0 else None

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

    @property
    def url_policy(self) -> UrlPolicy:
        return UrlPolicy(allow_loopback=self.webhook_allow_loopback)

    @property
    def secret_overlap(self) -> timedelta:
        return timedelta(seconds=self.webhook_secret_overlap_s)

    def secret_box(self) -> SecretBox:
        """The box that seals the webhook secrets; RuntimeError (the service does not start) when no key
        is set and the insecure development key is not explicitly allowed, or the key is malformed."""
        if self.notification_secrets_key is not None:
            try:
                return SecretBox(decode_key(self.notification_secrets_key.get_secret_value()))
            except ValueError as exc:
                raise RuntimeError(f"V2V_NOTIFICATION_SECRETS_KEY: {exc}") from None
        if self.notification_insecure_dev_key:
            return SecretBox(DEV_KEY)
        raise RuntimeError(
            "V2V_NOTIFICATION_SECRETS_KEY is not set: the key that seals webhook signing secrets at rest "
            "(base64 of 32 random bytes). For development only, V2V_NOTIFICATION_INSECURE_DEV_KEY=true "
            "uses a fixed, published key instead."
        )
