"""Composition root of the notification service."""

from __future__ import annotations

from pathlib import Path

from notification_service import services
from notification_service.api import router
from notification_service.delivery import DeliveryPolicy
from notification_service.emails import EmailDispatcher, SmtpSettings
from notification_service.webhooks import Dispatcher
from v2v_contracts import WebhookDeliveryFailedV1
from v2v_servicekit import ConsumerSpec, Runtime, ServiceDefinition


async def webhook_dispatcher(rt: Runtime) -> None:
    dispatcher = Dispatcher(rt.pool, rt.uow, rt.definition.schema, DeliveryPolicy.from_env("V2V_WEBHOOK_"))
    rt.extras["dispatcher"] = dispatcher
    await dispatcher.run()


async def email_dispatcher(rt: Runtime) -> None:
    dispatcher = EmailDispatcher(
        rt.pool, rt.uow, rt.definition.schema, DeliveryPolicy.from_env("V2V_EMAIL_"), SmtpSettings.from_env()
    )
    rt.extras["email_dispatcher"] = dispatcher
    await dispatcher.run()


DEFINITION = ServiceDefinition(
    name="notification",
    schema="notification",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    # one consumer (group `notification.webhooks`, its name kept so that no event is processed anew) for
    # both channels; it reads every topic that carries an event it handles, this service's own included
    # (webhook_delivery_failed is e-mailed, never sent as a webhook: no loop)
    consumers=[ConsumerSpec("webhooks", services.SOURCE_SERVICES, services.handlers)],
    publishes=[WebhookDeliveryFailedV1],
    background=[webhook_dispatcher, email_dispatcher],
    description="Webhooks (Standard Webhooks) and exception e-mails (SMTP) to treatment centres, "
    "with retries and a delivery log.",
)
