"""What every consumer checks on an event before anything handles it.

Each service publishes only to its own topic (`[<namespace>.]v2v.<service>`; broker ACLs enforce it in
deployments), so an event read from a topic must say it comes from that topic's service:
- its `source` is `/v2v/<service>` and its `type` is `<service>.<event>.v<N>`;
- an order-bound event (a payload that is an `OrderEventData`) carries a valid chain-of-identity id
  (`coi` envelope attribute, ISO 7064 MOD 37-2 check character), the same as the payload's `coi`.

An event that fails any of these is poison: the consumer dead-letters it at once with the reason (one
of the `REASONS` codes and a sentence that names only our own topic and source, never what the message
claimed), counts it and never hands it to a handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from v2v_contracts import EVENT_TYPES, CloudEvent, EventData, OrderEventData, source_for
from v2v_contracts.coi import is_valid_coi
from v2v_contracts.services import SERVICE_NAMES

SOURCE_MISMATCH: Final = "source-mismatch"
TYPE_MISMATCH: Final = "type-mismatch"
COI_MISSING: Final = "coi-missing"
COI_INVALID: Final = "coi-invalid"
COI_INCONSISTENT: Final = "coi-inconsistent"
NOT_A_SERVICE_TOPIC: Final = "not-a-service-topic"
REASONS: Final = (
    SOURCE_MISMATCH,
    TYPE_MISMATCH,
    COI_MISSING,
    COI_INVALID,
    COI_INCONSISTENT,
    NOT_A_SERVICE_TOPIC,
)


@dataclass(frozen=True)
class Rejection:
    """Why an event is refused: a code (metrics, tests) and a sentence (the dead letter's error)."""

    code: str
    detail: str

    def __str__(self) -> str:
        return f"rejected ({self.code}): {self.detail}"


def publisher_of(topic: str) -> str | None:
    """The service whose topic this is (`[<namespace>.]v2v.<service>`), or None for any other topic
    (a dead-letter topic, or a name that is no service's)."""
    parts = topic.split(".")
    if len(parts) >= 2 and parts[-2] == "v2v" and parts[-1] in SERVICE_NAMES:
        return parts[-1]
    return None


def check_event(event: CloudEvent, topic: str, model: type[EventData] | None = None) -> Rejection | None:
    """None when `event`, read from `topic`, may be handled; else why not.

    `model` is the payload's contract when the caller knows it (its handler registry); else it is looked
    up in the catalogue of event types, so that an order event nobody here handles is checked too."""
    service = publisher_of(topic)
    if service is None:
        return Rejection(NOT_A_SERVICE_TOPIC, f"topic {topic} is not a service's topic")
    if event.source != source_for(service):
        return Rejection(
            SOURCE_MISMATCH,
            f"the source is not {source_for(service)}, the only publisher on topic {topic}",
        )
    if event.type.split(".", 1)[0] != service:
        return Rejection(TYPE_MISMATCH, f"the type is not one of {service}'s, the only publisher on {topic}")
    contract = model or EVENT_TYPES.get(event.type)
    if contract is not None and issubclass(contract, OrderEventData):
        if not event.coi:
            return Rejection(COI_MISSING, f"{event.type} is order-bound and carries no chain-of-identity id")
        if not is_valid_coi(event.coi):
            return Rejection(COI_INVALID, f"{event.type} carries a chain-of-identity id that is not valid")
        if event.data.get("coi") != event.coi:
            return Rejection(
                COI_INCONSISTENT, f"{event.type}: the payload's chain-of-identity id is not the envelope's"
            )
    return None
