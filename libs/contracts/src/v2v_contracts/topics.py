"""Topic names: one topic per publishing service, `v2v.<service>`, optionally under a namespace."""

from __future__ import annotations

from v2v_contracts.services import SERVICE_NAMES

PUBLISHERS = SERVICE_NAMES  # every service publishes on its own topic
MIN_PARTITIONS = 6


def topic_for(service: str, namespace: str = "") -> str:
    base = f"v2v.{service}"
    return f"{namespace}.{base}" if namespace else base


def dead_letter_topic(service: str, namespace: str = "") -> str:
    """Where a service's consumers put messages they cannot process: `v2v.<service>.dlq`."""
    return topic_for(service, namespace) + ".dlq"


def all_topics(namespace: str = "") -> list[str]:
    return [topic_for(s, namespace) for s in PUBLISHERS] + [
        dead_letter_topic(s, namespace) for s in PUBLISHERS
    ]
