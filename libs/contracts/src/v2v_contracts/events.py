"""Versioned event contracts. Additive changes only within a version; a breaking change is a new type.

Every order event carries the order id, the chain-of-identity id (COI) and the treatment centre id:
opaque references only, never patient-identifying data.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from v2v_contracts.envelope import CloudEvent, source_for

OrderType = Literal["commercial", "clinical"]


class EventData(BaseModel):
    """Base of every event payload; TYPE is the CloudEvents `type`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    TYPE: ClassVar[str]
    SERVICE: ClassVar[str]


class OrderEventData(EventData):
    order_id: uuid.UUID
    coi: str
    treatment_center_id: str


class OrderSubmittedV1(OrderEventData):
    """A treatment centre placed an order; scheduling should find it a manufacturing slot."""

    TYPE = "order.submitted.v1"
    SERVICE = "order"
    product_code: str
    order_type: OrderType
    regulator: str  # regulator of the centre's market (FDA, EMA, ...)
    country: str
    region: str
    requested_apheresis_date: date


class SlotReservedV1(OrderEventData):
    """Scheduling holds a manufacturing slot at a site for the order."""

    TYPE = "scheduling.slot_reserved.v1"
    SERVICE = "scheduling"
    slot_id: uuid.UUID
    site_id: str
    product_code: str
    order_type: OrderType
    apheresis_date: date
    manufacturing_start_date: date


class SlotUnavailableV1(OrderEventData):
    """No approved site with free capacity; the order waits on the waitlist."""

    TYPE = "scheduling.slot_unavailable.v1"
    SERVICE = "scheduling"
    reason: str  # machine-readable code
    detail: str
    waitlisted: bool


class SiteApproval(BaseModel):
    model_config = ConfigDict(frozen=True)
    regulator: str
    use: OrderType
    product_code: str


class SiteRegisteredV1(EventData):
    """A manufacturing site's registry entry (published on start and on every change)."""

    TYPE = "site.registered.v1"
    SERVICE = "site"
    site_id: str
    name: str
    country: str
    region: str
    timezone: str
    operator: Literal["own", "cmo"]
    active: bool
    approvals: list[SiteApproval]
    daily_capacity: dict[str, int]  # product code -> manufacturing starts per day


class BookingConfirmedV1(OrderEventData):
    """The site accepted the slot into its manufacturing plan."""

    TYPE = "site.booking_confirmed.v1"
    SERVICE = "site"
    booking_id: uuid.UUID
    slot_id: uuid.UUID
    site_id: str
    product_code: str
    manufacturing_start_date: date
    apheresis_date: date


class ShipmentPlannedV1(OrderEventData):
    """Logistics planned a shipment leg for the order."""

    TYPE = "logistics.shipment_planned.v1"
    SERVICE = "logistics"
    shipment_id: uuid.UUID
    leg: Literal["inbound_apheresis", "outbound_product"]
    origin: str  # treatment centre id or site id
    destination: str
    material_condition: Literal["fresh", "cryopreserved"]
    temperature_range_c: tuple[float, float]
    planned_pickup_date: date


Milestone = Literal["booked", "picked_up", "in_transit", "delivered"]


class ShipmentMilestoneV1(OrderEventData):
    """A courier reported a custody handoff or movement of the shipment (chain of custody)."""

    TYPE = "logistics.shipment_milestone.v1"
    SERVICE = "logistics"
    shipment_id: uuid.UUID
    leg: Literal["inbound_apheresis", "outbound_product"]
    milestone: Milestone
    occurred_at: datetime
    location: str
    handled_by: str  # opaque courier/staff reference, never a person's name
    received_from: str | None = None
    temperature_c: float | None = None


class WebhookDeliveryFailedV1(OrderEventData):
    """A webhook could not be delivered after every attempt; it is dead-lettered."""

    TYPE = "notification.webhook_delivery_failed.v1"
    SERVICE = "notification"
    subscription_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    attempts: int
    last_error: str


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.TYPE: cls
    for cls in (
        OrderSubmittedV1,
        SlotReservedV1,
        SlotUnavailableV1,
        SiteRegisteredV1,
        BookingConfirmedV1,
        ShipmentPlannedV1,
        ShipmentMilestoneV1,
        WebhookDeliveryFailedV1,
    )
}

D = TypeVar("D", bound=EventData)


def new_event(data: EventData, *, subject: str | None = None) -> CloudEvent:
    """Wrap a payload in a CloudEvent from its own service; order events get subject and COI set."""
    payload: dict[str, Any] = data.model_dump(mode="json")
    if isinstance(data, OrderEventData):
        subject = subject or str(data.order_id)
        coi: str | None = data.coi
    else:
        coi = None
    return CloudEvent(source=source_for(data.SERVICE), type=data.TYPE, subject=subject, coi=coi, data=payload)


def parse_data(event: CloudEvent, model: type[D]) -> D:
    if event.type != model.TYPE:
        raise ValueError(f"event type {event.type} is not {model.TYPE}")
    return model.model_validate(event.data)
