"""The consumer's provenance checks, on the in-memory fakes (no broker, no database).

An event read from a service's topic must come from that service (source and type), and an order-bound
event must carry a valid chain-of-identity id that its payload repeats; anything else is poison: dead-
lettered at once with a reason, counted, never handled. The same checks run in `EventConsumer` (see
test_messaging_consumer.py for the real broker).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from faststream.kafka import KafkaBroker

from v2v_contracts import (
    EVENT_TYPES,
    CloudEvent,
    OrderCancelledV1,
    OrderEventData,
    SiteApproval,
    SiteRegisteredV1,
    dead_letter_topic,
    new_event,
    source_for,
    topic_for,
)
from v2v_contracts.coi import make_coi
from v2v_contracts.services import SERVICE_NAMES
from v2v_messaging import EventConsumer, EventMeta, HandlerRegistry, check_event, publisher_of
from v2v_messaging.fakes import FakeInbox, FakeUnitOfWork
from v2v_messaging.provenance import (
    COI_INCONSISTENT,
    COI_INVALID,
    COI_MISSING,
    NOT_A_SERVICE_TOPIC,
    SOURCE_MISMATCH,
    TYPE_MISMATCH,
)

COI = make_coi("V2V00", 2026, 42)
ORDER_TOPIC = topic_for("order")
SITE_TOPIC = topic_for("site")


class World:
    """A handler registry over a fake unit of work that records what was handled."""

    def __init__(self) -> None:
        self.handled: list[uuid.UUID] = []
        self.uow: FakeUnitOfWork[Any] = FakeUnitOfWork(lambda outbox: outbox)
        self.handlers = HandlerRegistry[Any]()

        async def handle(tx: Any, data: Any, meta: EventMeta) -> None:
            self.handled.append(meta.id)

        self.handlers.add(OrderCancelledV1, handle)
        self.handlers.add(SiteRegisteredV1, handle)
        self.inbox = FakeInbox(self.uow, self.handlers)


def cancelled(coi: str = COI) -> CloudEvent:
    return new_event(
        OrderCancelledV1(
            order_id=uuid.uuid4(),
            coi=coi,
            treatment_center_id="TC-DE-BE-001",
            reason="patient_withdrew",
            previous_status="submitted",
        )
    )


def site_registered() -> CloudEvent:
    return new_event(
        SiteRegisteredV1(
            site_id="DE-BER-01",
            name="Berlin",
            country="DE",
            region="europe",
            timezone="Europe/Berlin",
            operator="own",
            active=True,
            approvals=[SiteApproval(regulator="EMA", use="commercial", product_code="AXI-CEL")],
            daily_capacity={"AXI-CEL": 2},
        ),
        subject="DE-BER-01",
    )


def forged(event: CloudEvent, **changes: Any) -> CloudEvent:
    return event.model_copy(update=changes)


async def test_genuine_events_from_their_own_topic_are_handled() -> None:
    world = World()
    order_event, site_event = cancelled(), site_registered()
    await world.inbox.receive(ORDER_TOPIC, order_event)
    await world.inbox.receive(SITE_TOPIC, site_event)  # not order-bound: no COI needed
    await world.inbox.receive(f"it-ns.{ORDER_TOPIC}", cancelled())  # under a topic namespace too

    assert len(world.handled) == 3
    assert world.handled[:2] == [order_event.id, site_event.id]
    assert world.inbox.dead_letters == [] and world.inbox.rejected == {}


async def test_an_event_on_another_services_topic_is_dead_lettered_never_handled() -> None:
    world = World()
    event = cancelled()  # the order service's, as it says: but read from the site topic
    await world.inbox.receive(SITE_TOPIC, event)

    assert world.handled == []
    assert world.uow.commits == 0
    [dead] = world.inbox.dead_letters
    assert (dead.topic, dead.event, dead.rejection.code) == (SITE_TOPIC, event, SOURCE_MISMATCH)
    assert str(dead.rejection) == (
        "rejected (source-mismatch): the source is not /v2v/site, the only publisher on topic v2v.site"
    )
    assert world.inbox.rejected == {SOURCE_MISMATCH: 1}


async def test_a_forged_source_or_type_is_refused() -> None:
    world = World()
    # the site service claiming to be the order service, on its own topic
    await world.inbox.receive(SITE_TOPIC, forged(cancelled(), source=source_for("site")))
    # the right source, but another service's event type (it would reach that type's handler)
    claims_site = forged(site_registered(), source=source_for("order"))
    await world.inbox.receive(ORDER_TOPIC, claims_site)

    assert world.handled == []
    assert [d.rejection.code for d in world.inbox.dead_letters] == [TYPE_MISMATCH, TYPE_MISMATCH]
    assert world.inbox.rejected == {TYPE_MISMATCH: 2}


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"coi": None}, COI_MISSING),
        ({"coi": ""}, COI_MISSING),
        ({"coi": COI[:-1] + ("A" if COI[-1] != "A" else "B")}, COI_INVALID),  # wrong check character
        ({"coi": "V2V00-26-000042-K"}, COI_INVALID),  # not the format at all
        ({"coi": make_coi("V2V00", 2026, 43)}, COI_INCONSISTENT),  # valid, but not the payload's
    ],
    ids=["none", "empty", "check-character", "format", "not-the-payloads"],
)
async def test_an_order_event_without_a_valid_coi_is_refused(change: dict[str, Any], code: str) -> None:
    world = World()
    event = forged(cancelled(), **change)
    await world.inbox.receive(ORDER_TOPIC, event)

    assert world.handled == []
    [dead] = world.inbox.dead_letters
    assert dead.rejection.code == code
    assert "order.cancelled.v1" in dead.rejection.detail


async def test_an_order_event_nobody_here_handles_is_checked_too() -> None:
    """The contract comes from the catalogue when no handler names it: a forged order event is poison
    for every consumer of the topic, not only for the one that handles its type."""
    world = World()
    bad = new_event(
        OrderCancelledV1(
            order_id=uuid.uuid4(), coi=COI, treatment_center_id="X", reason="r", previous_status="s"
        )
    )
    bad = forged(bad, type="order.failed.v1", coi="NOT-A-COI")
    assert not world.handlers.handles(bad.type)
    await world.inbox.receive(ORDER_TOPIC, bad)
    assert [d.rejection.code for d in world.inbox.dead_letters] == [COI_INVALID]
    assert world.inbox.ignored == []

    unknown = CloudEvent(source=source_for("order"), type="order.something_new.v1", data={})
    await world.inbox.receive(ORDER_TOPIC, unknown)  # not a known contract: passes, then ignored
    assert world.inbox.ignored == ["order.something_new.v1"]


@pytest.mark.parametrize("topic_service", SERVICE_NAMES)
@pytest.mark.parametrize("claimed", SERVICE_NAMES)
def test_only_the_topics_own_service_is_believed(topic_service: str, claimed: str) -> None:
    event = CloudEvent(source=source_for(claimed), type=f"{claimed}.probe.v1", data={})
    rejection = check_event(event, topic_for(topic_service, "ns"))
    if claimed == topic_service:
        assert rejection is None
    else:
        assert rejection is not None and rejection.code == SOURCE_MISMATCH


def test_every_order_event_of_the_catalogue_needs_a_coi() -> None:
    order_types = [t for t, model in EVENT_TYPES.items() if issubclass(model, OrderEventData)]
    assert "order.submitted.v1" in order_types and "logistics.shipment_milestone.v1" in order_types
    for event_type in order_types:
        service = event_type.split(".", 1)[0]
        event = CloudEvent(source=source_for(service), type=event_type, data={})
        rejection = check_event(event, topic_for(service))
        assert rejection is not None and rejection.code == COI_MISSING, event_type


def test_publisher_of_a_topic() -> None:
    assert publisher_of("v2v.order") == "order"
    assert publisher_of("e2e_x.v2v.notification") == "notification"
    assert publisher_of(dead_letter_topic("order")) is None
    assert publisher_of("v2v.billing") is None
    assert publisher_of("order") is None
    event = CloudEvent(source=source_for("order"), type="order.probe.v1", data={})
    rejection = check_event(event, dead_letter_topic("order"))
    assert rejection is not None and rejection.code == NOT_A_SERVICE_TOPIC


def test_a_consumer_refuses_to_read_a_topic_that_is_no_services() -> None:
    broker = KafkaBroker("127.0.0.1:9", logger=None)  # never connected
    common: dict[str, Any] = {
        "service": "order",
        "purpose": "unit",
        "handlers": HandlerRegistry[Any](),
        "uow": object(),
        "broker": broker,
        "dead_letter_topic": dead_letter_topic("order"),
        "fetch_max_wait_ms": 20,
    }
    with pytest.raises(ValueError, match="not a service's topic"):
        EventConsumer(topics=[topic_for("site"), dead_letter_topic("site")], **common)
    EventConsumer(topics=[topic_for("site"), topic_for("logistics", "ns")], **common)  # fine
