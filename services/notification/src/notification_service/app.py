"""Composition root of the notification service."""

from __future__ import annotations

from pathlib import Path

from notification_service import services
from notification_service.api import router
from notification_service.webhooks import DeliveryPolicy, Dispatcher
from v2v_contracts import WebhookDeliveryFailedV1
from v2v_servicekit import ConsumerSpec, Runtime, ServiceDefinition


async def webhook_dispatcher(rt: Runtime) -> None:
    dispatcher = Dispatcher(rt.pool, rt.uow, rt.definition.schema, DeliveryPolicy.from_env())
    rt.extras["dispatcher"] = dispatcher
    await dispatcher.run()


DEFINITION = ServiceDefinition(
    name="notification",
    schema="notification",
    migrations_dir=Path(__file__).parent / "migrations",
    routers=[router],
    consumers=[ConsumerSpec("webhooks", ["order", "scheduling", "site", "logistics"], services.handlers)],
    publishes=[WebhookDeliveryFailedV1],
    background=[webhook_dispatcher],
    description="Webhooks (Standard Webhooks) to treatment centres, with retries and a delivery log.",
)
