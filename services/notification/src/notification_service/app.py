"""Composition root of the notification service."""

from __future__ import annotations

from pathlib import Path

from notification_service.adapters.repository import tx_factory
from notification_service.config import NotificationSettings
from notification_service.domain.routing import SOURCE_SERVICES
from notification_service.entrypoints.api import router
from notification_service.service_layer.dispatch import (
    check_secrets_key,
    email_dispatcher,
    email_listener,
    webhook_dispatcher,
    webhook_listener,
)
from notification_service.service_layer.handlers import handlers
from v2v_audit.service import audited
from v2v_contracts import WebhookDeliveryFailedV1
from v2v_servicekit import ConsumerSpec, ServiceDefinition

DEFINITION = ServiceDefinition(
    name="notification",
    schema="notification",
    migrations_dir=Path(__file__).parent / "migrations",
    settings_class=NotificationSettings,
    tx_factory=tx_factory,
    routers=[router],
    # one consumer (group `notification.webhooks`, its name kept so that no event is processed anew) for
    # both channels; it reads every topic that carries an event it handles, this service's own included
    # (webhook_delivery_failed is e-mailed, never sent as a webhook: no loop)
    consumers=[ConsumerSpec("webhooks", SOURCE_SERVICES, handlers)],
    publishes=[WebhookDeliveryFailedV1],
    on_startup=[check_secrets_key],  # refuses to start without V2V_NOTIFICATION_SECRETS_KEY (config.py)
    # supervised by the runtime (restarted with backoff, shown in /ready): each channel's dispatcher and
    # the listener that wakes it on commit (LISTEN, established again after a Postgres restart)
    background=[webhook_dispatcher, webhook_listener, email_dispatcher, email_listener],
    description="Webhooks (Standard Webhooks) and exception e-mails (SMTP) to treatment centres, "
    "with retries and a delivery log.",
)
# the audit trail: its migration and start-up step, the caller as actor of a request's entries, and the
# supervised loop writing signed checkpoints outside the database (v2v_audit.service)
DEFINITION = audited(DEFINITION)
