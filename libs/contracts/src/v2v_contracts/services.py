"""The five services as every tool knows them: name, package, schema, login role, default port, topic.

One list, used by the harness (processes, provisioning), the compose tests and telemetry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # logical service name, also the topic suffix (v2v.<name>) and the event type prefix
    package: str  # import package, run with `python -m <package>`
    schema: str  # the only Postgres schema the service may touch
    role: str  # its login role
    port: int  # default HTTP port under `make run`

    def topic(self, namespace: str = "") -> str:
        from v2v_contracts.topics import topic_for

        return topic_for(self.name, namespace)

    def dead_letter_topic(self, namespace: str = "") -> str:
        from v2v_contracts.topics import dead_letter_topic

        return dead_letter_topic(self.name, namespace)


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("order", "order_service", "ordering", "v2v_order", 8001),
    ServiceSpec("scheduling", "scheduling_service", "scheduling", "v2v_scheduling", 8002),
    ServiceSpec("site", "site_service", "site", "v2v_site", 8003),
    ServiceSpec("logistics", "logistics_service", "logistics", "v2v_logistics", 8004),
    ServiceSpec("notification", "notification_service", "notification", "v2v_notification", 8005),
)

BY_NAME = {s.name: s for s in SERVICES}
SERVICE_NAMES = tuple(s.name for s in SERVICES)
