"""What the order service keeps: orders, their timelines, the certified treatment centres. Plain data
(no I/O); the repositories in `adapters/repository.py` read and write them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from typing import Any

from order_service.domain.order import TERMINAL, AtRisk, OrderState, OrderStatus
from v2v_contracts.errors import Conflict

OPEN_ORDER_EXISTS = "open-order-exists"


def open_order_exists() -> Conflict:
    """A centre has one open order per patient and product (409, problem type `open-order-exists`); a
    second one is refused, however the two requests interleave (a unique index keeps it)."""
    return Conflict(
        "patient_ref",
        "an open order for this patient and product already exists at the centre",
        kind=OPEN_ORDER_EXISTS,
        title="An open order exists for this patient and product",
    )


@dataclass(frozen=True)
class Centre:
    """A treatment centre: its market is its regulator (FDA, EMA, ...) in its country."""

    id: str
    name: str
    country: str
    region: str
    regulator: str
    timezone: str
    certified: bool = True


@dataclass(frozen=True)
class OrderRecord:
    """One order as stored (`patient_ref` never leaves the order service)."""

    order_id: uuid.UUID
    coi: str
    treatment_center_id: str
    product_code: str
    order_type: str
    patient_ref: str
    requested_apheresis_date: date
    status: str
    created_at: datetime
    updated_at: datetime
    site_id: str | None = None
    slot_id: uuid.UUID | None = None
    apheresis_date: date | None = None
    manufacturing_start_date: date | None = None
    version: int = 1
    run: int = 1
    recollections: int = 0
    status_before_quarantine: str | None = None
    apheresis_collected_at: datetime | None = None
    material_received_at: datetime | None = None
    released_at: datetime | None = None
    delivered_at: datetime | None = None
    product_received_at: datetime | None = None
    lymphodepletion_at: datetime | None = None
    infused_at: datetime | None = None
    ended_reason: str | None = None
    first_trace: dict[str, str] = field(default_factory=dict)
    rebook_pending: bool = False
    at_risk: dict[str, Any] | None = None
    din: str | None = None  # the current collection's donation identification number
    lot: str | None = None  # the released run's lot (site.product_released)
    expanded_access: bool = False
    # issue 11: clinical data of the order (stay in the order service) and the treatment gates
    indication: str | None = None
    weight_kg: float | None = None
    delivery_confirmed: bool = False
    lymphodepletion_on: date | None = None
    lymphodepletions: int = 0
    paused_from: str | None = None  # on hold: where the order's own steps stand
    hold_reason: str | None = None
    end_material: dict[str, Any] | None = None  # what existed when the order ended (cancelled, failed)

    @classmethod
    def from_mapping(cls, row: Any) -> OrderRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def state(self) -> OrderState:
        """The order as its state machine sees it."""
        return OrderState(
            status=OrderStatus(self.status),
            run=self.run,
            recollections=self.recollections,
            slot_id=str(self.slot_id) if self.slot_id else None,
            site_id=self.site_id,
            apheresis_date=self.apheresis_date or self.requested_apheresis_date,
            lymphodepletion=self.lymphodepletion_at is not None,
            rebook_pending=self.rebook_pending,
            status_before_hold=OrderStatus(self.status_before_quarantine)
            if self.status_before_quarantine
            else None,
            at_risk=AtRisk.of(self.at_risk),
            expanded_access=self.expanded_access,
            delivery_confirmed=self.delivery_confirmed,
            lymphodepletion_on=self.lymphodepletion_on,
            lymphodepletions=self.lymphodepletions,
            paused_from=OrderStatus(self.paused_from) if self.paused_from else None,
        )

    @property
    def collection(self) -> int:
        """The current collection's number (1, then 2 after a recollection, ...)."""
        return self.recollections + 1

    @property
    def shown_order_type(self) -> str:
        """The order type as the centre sees it: `expanded_access` once an OOS product was accepted in a
        market that treats it so; the approval use (commercial, clinical) otherwise."""
        return "expanded_access" if self.expanded_access else self.order_type

    def is_open(self) -> bool:
        """Not ended yet (completed, cancelled or failed)."""
        return OrderStatus(self.status) not in TERMINAL

    def ref(self) -> dict[str, Any]:
        """The references every order event carries (no patient data)."""
        return {"order_id": self.order_id, "coi": self.coi, "treatment_center_id": self.treatment_center_id}


@dataclass(frozen=True)
class TimelineEntry:
    """One line of an order's timeline: an event about it and what it did to the status."""

    order_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    source: str
    occurred_at: datetime
    status_before: str | None
    status_after: str | None
    reason: str
    note: str | None = None  # free text staff typed with the action: kept here, never in an event or log


@dataclass(frozen=True)
class MaterialDisposition:
    """What was done with material or product that existed when the order ended: destroyed or returned,
    recorded by the centre (or the manufacturer's QA for the site)."""

    disposition_id: uuid.UUID
    order_id: uuid.UUID
    material: str  # apheresis_material | product
    location: str  # centre | in_transit | site (when the order ended)
    outcome: str  # destroyed | returned
    reason_code: str
    performed_at: datetime
    recorded_by: str
    recorded_at: datetime
    document_reference: str | None = None

    @classmethod
    def from_mapping(cls, row: Any) -> MaterialDisposition:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class AuthorityTask:
    """Notify the competent authority of a non-conforming product administered on physician request,
    within 48 hours of administration (EU GMP for ATMPs Part IV §11.5). `due_at` is known once the
    infusion is recorded."""

    task_id: uuid.UUID
    order_id: uuid.UUID
    kind: str
    regulator: str
    cause: str
    run: int
    created_at: datetime
    state: str = "open"
    administered_at: datetime | None = None
    due_at: datetime | None = None
    completed_at: datetime | None = None
    completed_by: str | None = None
    reference: str | None = None

    def overdue(self, now: datetime) -> bool:
        return self.state == "open" and self.due_at is not None and now > self.due_at

    @classmethod
    def from_mapping(cls, row: Any) -> AuthorityTask:
        return cls(**{f.name: row[f.name] for f in fields(cls)})
