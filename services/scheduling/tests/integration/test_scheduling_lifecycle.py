"""Scheduling's part of the order lifecycle against the real `scheduling` schema (real Postgres).

The handlers get CloudEvents exactly as the consumer hands them over, each in its own unit of work;
the tests read the slots, the waitlist and the outbox. Capacity is kept tiny (1-2 starts a day, a few
days of horizon) so that waiting, releasing and rebooking all happen with a handful of orders.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import scheduling_service
from scheduling_service.adapters.repository import postgres_tx
from scheduling_service.domain.selection import Choice, Parameters
from scheduling_service.domain.slots import Planning, SlotRequest
from scheduling_service.service_layer import booking
from scheduling_service.service_layer.handlers import build_handlers
from v2v_audit.service import migrate as audit_migrate
from v2v_contracts import (
    ApheresisCompletedV1,
    BookingConfirmedV1,
    CloudEvent,
    EventData,
    MaterialReceivedV1,
    OrderCancelledV1,
    OrderFailedV1,
    OrderSubmittedV1,
    Outage,
    RebookRequestedV1,
    SiteApproval,
    SiteRegisteredV1,
    new_event,
)
from v2v_contracts.reference import product_catalogue
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_messaging.handlers import PoisonMessage
from v2v_persistence import apply_migrations, create_pool, schema_of

pytestmark = pytest.mark.integration

SCHEDULING_MIGRATIONS = Path(scheduling_service.__file__).parent / "migrations"
TOPIC = "t.v2v.scheduling"
PRODUCT = "CILTA-CEL"
APHERESIS = date(2031, 3, 3)  # same region: manufacturing can start the next day at the earliest
D1 = APHERESIS + timedelta(days=1)


def d(n: int) -> date:
    return APHERESIS + timedelta(days=n)


@pytest.fixture
async def pool(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    url = test_db.urls["scheduling"]
    owner_url = test_db.owner_urls["scheduling"]  # migrations run as the owner
    applied = await apply_migrations(owner_url, "scheduling", [MIGRATIONS_DIR, SCHEDULING_MIGRATIONS])
    assert applied[-1] == "0006.scheduling-capacity-used"
    await audit_migrate(owner_url, "scheduling")  # the audit trail (v2v_audit), as the service applies it
    p = await create_pool(url, min_size=2, max_size=34)
    assert await schema_of(p) == "scheduling"
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def uow(pool: asyncpg.Pool) -> UnitOfWork:
    return UnitOfWork(pool, TOPIC, notify_channel("scheduling"), postgres_tx)


# a short horizon (three days): waiting, releasing and rebooking all happen with a handful of orders
PLANNING = Planning(
    Parameters(same_region_transit_days=1, cross_region_transit_days=2, horizon_days=3), product_catalogue()
)
HANDLERS = build_handlers(PLANNING)


# ---- building events ---------------------------------------------------------------------------------


def site_event(
    site_id: str,
    *,
    capacity: int = 1,
    region: str = "europe",
    regulators: tuple[str, ...] = ("EMA",),
    outages: list[tuple[date, date]] | None = None,
    active: bool = True,
    products: tuple[str, ...] = (PRODUCT,),
) -> CloudEvent:
    return new_event(
        SiteRegisteredV1(
            site_id=site_id,
            name=site_id,
            country="DE",
            region=region,
            timezone="Europe/Berlin",
            operator="own",
            active=active,
            approvals=[
                SiteApproval(regulator=r, use="clinical", product_code=p)
                for r in regulators
                for p in products
            ],
            daily_capacity=dict.fromkeys(products, capacity),
            outages=[
                Outage(outage_id=uuid.uuid4(), start_date=a, end_date=b, reason="maintenance")
                for a, b in (outages or [])
            ],
        ),
        subject=site_id,
    )


class Order:
    """One order's identity, as every order event carries it."""

    def __init__(self, n: int, centre: str = "TC-DE-BE-001") -> None:
        self.order_id = uuid.uuid4()
        self.coi = f"V2V0031{n:06d}X"
        self.centre = centre

    def ids(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "coi": self.coi, "treatment_center_id": self.centre}

    def submitted(
        self, apheresis: date = APHERESIS, regulator: str = "EMA", product: str = PRODUCT
    ) -> CloudEvent:
        return new_event(
            OrderSubmittedV1(
                **self.ids(),
                product_code=product,
                order_type="clinical",
                regulator=regulator,
                country="DE",
                region="europe",
                requested_apheresis_date=apheresis,
            )
        )

    def rebook(
        self,
        apheresis: date = APHERESIS,
        *,
        kind: str = "reschedule",
        reason: str = "patient_unwell",
        exclude: str | None = None,
    ) -> CloudEvent:
        return new_event(
            RebookRequestedV1(
                **self.ids(),
                kind=kind,  # type: ignore[arg-type]
                reason=reason,
                product_code=PRODUCT,
                order_type="clinical",
                regulator="EMA",
                region="europe",
                apheresis_date=apheresis,
                exclude_site_id=exclude,
            )
        )

    def cancelled(self) -> CloudEvent:
        return new_event(OrderCancelledV1(**self.ids(), reason="consent_withdrawn", previous_status="x"))

    def failed(self) -> CloudEvent:
        return new_event(OrderFailedV1(**self.ids(), reason="no_material_left"))

    def event(self, data: type[EventData], **fields: Any) -> CloudEvent:
        return new_event(data(**self.ids(), **fields))  # type: ignore[arg-type]


async def handle(uow: UnitOfWork, event: CloudEvent) -> None:
    async with uow.begin() as tx:
        assert await HANDLERS.dispatch(tx, event), event.type


def waitlisted_request(row: asyncpg.Record) -> SlotRequest:
    """The request a waitlist row remembers (the data of the event that asked for the slot)."""
    if row["request_type"] == RebookRequestedV1.TYPE:
        return SlotRequest.rebook(RebookRequestedV1.model_validate(row["request"]))
    return SlotRequest.submitted(OrderSubmittedV1.model_validate(row["request"]))


# ---- reading -----------------------------------------------------------------------------------------


async def slots(pool: asyncpg.Pool, order: Order | None = None) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM slots WHERE ($1::uuid IS NULL OR order_id = $1) ORDER BY created_at, slot_id",
        order.order_id if order else None,
    )


async def live(pool: asyncpg.Pool, order: Order) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT * FROM slots WHERE order_id = $1 AND status IN ('held', 'confirmed')", order.order_id
    )


async def waitlist(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM waitlist ORDER BY enqueued_at, order_id")


async def outbox(pool: asyncpg.Pool, order: Order | None = None) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT payload FROM outbox ORDER BY id")
    events = [json.loads(bytes(r["payload"])) for r in rows]
    if order is not None:
        events = [e for e in events if e["data"].get("order_id") == str(order.order_id)]
    return events


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("scheduling.").removesuffix(".v1") for e in events]


async def assert_never_oversold(pool: asyncpg.Pool) -> None:
    capacity = {
        (r["site_id"], product): int(n)
        for r in await pool.fetch("SELECT site_id, daily_capacity FROM sites")
        for product, n in r["daily_capacity"].items()
    }
    rows = await pool.fetch(
        """SELECT site_id, product_code, manufacturing_start_date AS day, count(*) AS n FROM slots
           WHERE status IN ('held', 'confirmed', 'consumed')
           GROUP BY site_id, product_code, manufacturing_start_date"""
    )
    for r in rows:
        used = (r["site_id"], r["product_code"])
        assert r["n"] <= capacity.get(used, 0), f"{used} oversold on {r['day']}: {r['n']}"


# ---- the migration ----------------------------------------------------------------------------------


async def test_the_migration_keeps_waiting_orders_of_the_first_schema(
    test_db: pytest_plugin.TestDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waitlist written before 0002 (the order.submitted data only) is still served afterwards."""
    url = test_db.urls["scheduling"]
    owner_url = test_db.owner_urls["scheduling"]  # migrations run as the owner
    first_only = tmp_path / "migrations"
    first_only.mkdir()
    initial = SCHEDULING_MIGRATIONS / "0001.scheduling-initial.sql"
    (first_only / initial.name).write_text(initial.read_text())
    assert await apply_migrations(owner_url, "scheduling", [MIGRATIONS_DIR, first_only]) == [
        "0000.messaging-outbox-inbox",
        "0001.messaging-dead-letters-relay-lease",
        "0001.scheduling-initial",
    ]
    order = Order(1)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO waitlist (order_id, request, reason) VALUES ($1, $2::jsonb, 'no_site_known')",
            order.order_id,
            json.dumps(order.submitted().data),
        )
    finally:
        await conn.close()
    assert await apply_migrations(owner_url, "scheduling", [MIGRATIONS_DIR, SCHEDULING_MIGRATIONS]) == [
        "0002.scheduling-lifecycle",
        "0003.scheduling-slot-market",
        "0004.scheduling-offers",
        "0005.scheduling-slot-collected",
        "0006.scheduling-capacity-used",
    ]
    await audit_migrate(owner_url, "scheduling")
    p = await create_pool(url, max_size=2)
    try:
        [entry] = await waitlist(p)
        assert (entry["product_code"], entry["request_type"]) == (PRODUCT, "order.submitted.v1")
        assert entry["exclude_site_id"] is None and entry["rebook_kind"] is None
        await handle(UnitOfWork(p, TOPIC, notify_channel("scheduling"), postgres_tx), site_event("A"))
        slot = await live(p, order)
        assert slot is not None and slot["reserved_reason"] == "waitlist"
        assert await waitlist(p) == []
    finally:
        await p.close()


# ---- submitted, confirmed, consumed ------------------------------------------------------------------


async def test_a_submitted_order_holds_the_earliest_slot_and_the_copy_keeps_outages(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("DE-A", outages=[(d(1), d(1))]))
    site = await pool.fetchrow("SELECT * FROM sites WHERE site_id = 'DE-A'")
    assert [(o["start_date"], o["end_date"]) for o in site["outages"]] == [(d(1).isoformat(),) * 2]

    order = Order(1)
    await handle(uow, order.submitted())
    [slot] = await slots(pool, order)
    assert (slot["site_id"], slot["manufacturing_start_date"], slot["status"]) == ("DE-A", d(2), "held")
    assert slot["reserved_reason"] == "initial"
    assert slot["treatment_center_id"] == "TC-DE-BE-001"
    [event] = await outbox(pool, order)
    assert event["type"] == "scheduling.slot_reserved.v1"
    assert event["data"]["reason"] == "initial"
    assert event["data"]["manufacturing_start_date"] == d(2).isoformat()


async def test_material_received_consumes_the_slot_and_its_capacity_stays_used(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("DE-A", capacity=1))
    first, second = Order(1), Order(2)
    await handle(uow, first.submitted())
    slot = await live(pool, first)
    assert slot is not None
    await handle(
        uow,
        first.event(
            BookingConfirmedV1,
            booking_id=uuid.uuid4(),
            slot_id=slot["slot_id"],
            site_id="DE-A",
            product_code=PRODUCT,
            manufacturing_start_date=slot["manufacturing_start_date"],
            apheresis_date=APHERESIS,
        ),
    )
    assert (await live(pool, first))["status"] == "confirmed"  # type: ignore[index]
    await handle(uow, first.event(MaterialReceivedV1, site_id="DE-A", received_at="2031-03-04T10:00:00Z"))
    [consumed] = await slots(pool, first)
    assert consumed["status"] == "consumed"
    assert await live(pool, first) is None

    # the consumed day is still taken: the next order gets the day after
    await handle(uow, second.submitted())
    assert (await live(pool, second))["manufacturing_start_date"] == d(2)  # type: ignore[index]
    # consumed is not live: a cancellation of the first order releases nothing
    await handle(uow, first.cancelled())
    assert [e["type"] for e in await outbox(pool, first)] == ["scheduling.slot_reserved.v1"]
    assert (await slots(pool, first))[0]["status"] == "consumed"
    await assert_never_oversold(pool)


# ---- rebook ------------------------------------------------------------------------------------------


async def test_rebook_releases_then_books_for_the_new_date_away_from_the_excluded_site(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A-NEAR"))
    await handle(uow, site_event("B-FAR", region="north_america"))
    order = Order(1)
    await handle(uow, order.submitted())
    old = await live(pool, order)
    assert old is not None and old["site_id"] == "A-NEAR"

    await handle(uow, order.rebook(d(1), kind="site_outage", reason="outage:flood", exclude="A-NEAR"))
    events = await outbox(pool, order)
    assert kinds(events) == ["slot_reserved", "slot_released", "slot_reserved"]
    released, reserved = events[1]["data"], events[2]["data"]
    assert released["slot_id"] == str(old["slot_id"])
    assert released["site_id"] == "A-NEAR"
    assert released["reason"] == "outage:flood"
    assert reserved["reason"] == "rebook:site_outage"
    assert reserved["site_id"] == "B-FAR"
    assert reserved["apheresis_date"] == d(1).isoformat()
    assert reserved["manufacturing_start_date"] == d(3).isoformat()  # cross-region transit: 2 days

    rows = await slots(pool, order)
    assert [(r["site_id"], r["status"]) for r in rows] == [("A-NEAR", "released"), ("B-FAR", "held")]
    assert rows[0]["release_reason"] == "outage:flood" and rows[0]["released_at"] is not None
    assert rows[1]["reserved_reason"] == "rebook:site_outage"


async def test_a_reschedule_may_return_to_the_same_site_on_the_new_date(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A-NEAR", capacity=1))
    order = Order(1)
    await handle(uow, order.submitted())
    await handle(uow, order.rebook(d(2)))
    rows = await slots(pool, order)
    assert [(r["status"], r["manufacturing_start_date"]) for r in rows] == [
        ("released", d(1)),
        ("held", d(3)),
    ]
    assert kinds(await outbox(pool, order)) == ["slot_reserved", "slot_released", "slot_reserved"]
    assert (await outbox(pool, order))[-1]["data"]["reason"] == "rebook:reschedule"


async def test_rebook_without_an_alternative_waits_with_its_context_and_is_served_later(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A-NEAR", capacity=2))
    order = Order(1)
    await handle(uow, order.submitted())
    await handle(uow, order.rebook(kind="site_outage", reason="outage:flood", exclude="A-NEAR"))

    assert kinds(await outbox(pool, order)) == ["slot_reserved", "slot_released", "slot_unavailable"]
    unavailable = (await outbox(pool, order))[-1]["data"]
    assert unavailable["reason"] == "no_approved_site" and unavailable["waitlisted"] is True
    assert "A-NEAR" in unavailable["detail"]
    assert await live(pool, order) is None
    [entry] = await waitlist(pool)
    assert entry["order_id"] == order.order_id
    assert entry["request_type"] == "order.rebook_requested.v1"
    assert (entry["exclude_site_id"], entry["rebook_kind"], entry["product_code"]) == (
        "A-NEAR",
        "site_outage",
        PRODUCT,
    )
    assert entry["request"]["reason"] == "outage:flood"

    # more capacity at the excluded site changes nothing for it
    await handle(uow, site_event("A-NEAR", capacity=5))
    assert await live(pool, order) is None and len(await waitlist(pool)) == 1

    # a new approved site: served from the waitlist, still as a rebook, never at A-NEAR
    await handle(uow, site_event("B-OTHER", capacity=1))
    slot = await live(pool, order)
    assert slot is not None and slot["site_id"] == "B-OTHER"
    assert slot["reserved_reason"] == "rebook:site_outage"
    assert await waitlist(pool) == []
    last = (await outbox(pool, order))[-1]
    assert last["type"] == "scheduling.slot_reserved.v1" and last["data"]["reason"] == "rebook:site_outage"


async def test_a_waitlisted_order_rebooked_to_another_date_keeps_its_place(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A", capacity=1))
    holders = [Order(i) for i in range(3)]  # fill d1..d3 (the whole horizon)
    for o in holders:
        await handle(uow, o.submitted())
    first, second = Order(10), Order(11)
    await handle(uow, first.submitted())
    await handle(uow, second.submitted())
    before = {r["order_id"]: r["enqueued_at"] for r in await waitlist(pool)}
    assert list(before) == [first.order_id, second.order_id]

    await handle(uow, first.rebook(d(1)))  # window d2..d4: d2, d3 are full, d4 is free
    slot = await live(pool, first)
    assert slot is not None and slot["manufacturing_start_date"] == d(4)
    assert kinds(await outbox(pool, first)) == ["slot_unavailable", "slot_reserved"]  # nothing to release

    await handle(uow, second.rebook(APHERESIS))  # same window, nothing free: waits again
    [entry] = await waitlist(pool)
    assert entry["order_id"] == second.order_id
    assert entry["enqueued_at"] == before[second.order_id]
    assert entry["request_type"] == "order.rebook_requested.v1" and entry["rebook_kind"] == "reschedule"
    assert kinds(await outbox(pool, second)) == ["slot_unavailable", "slot_unavailable"]
    await assert_never_oversold(pool)


# ---- cancel, fail, waitlist --------------------------------------------------------------------------


async def test_cancel_releases_and_serves_the_waitlist_first_come_first_served(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A", capacity=1))
    booked = [Order(i) for i in range(3)]
    for o in booked:
        await handle(uow, o.submitted())
    waiting = [Order(10 + i) for i in range(3)]
    for o in waiting:
        await handle(uow, o.submitted())
    assert [r["order_id"] for r in await waitlist(pool)] == [o.order_id for o in waiting]
    assert all(r["reason"] == "no_capacity" for r in await waitlist(pool))

    await handle(uow, booked[1].cancelled())
    assert kinds(await outbox(pool, booked[1])) == ["slot_reserved", "slot_released"]
    released = (await outbox(pool, booked[1]))[-1]["data"]
    assert released["reason"] == "cancelled"
    assert (await slots(pool, booked[1]))[0]["status"] == "released"
    # the first waiting order gets the freed day, as a waitlist booking
    slot = await live(pool, waiting[0])
    assert slot is not None and slot["manufacturing_start_date"] == d(2)
    assert slot["reserved_reason"] == "waitlist"
    assert (await outbox(pool, waiting[0]))[-1]["data"]["reason"] == "waitlist"
    assert [r["order_id"] for r in await waitlist(pool)] == [o.order_id for o in waiting[1:]]

    # a waiting order that fails leaves the waitlist without any release
    await handle(uow, waiting[1].failed())
    assert kinds(await outbox(pool, waiting[1])) == ["slot_unavailable"]
    assert [r["order_id"] for r in await waitlist(pool)] == [waiting[2].order_id]

    # a failed booked order releases (reason failed) and the next in line is served
    await handle(uow, booked[0].failed())
    assert (await outbox(pool, booked[0]))[-1]["data"]["reason"] == "failed"
    assert (await live(pool, waiting[2]))["manufacturing_start_date"] == d(1)  # type: ignore[index]
    assert await waitlist(pool) == []

    closed = {r["order_id"]: r["status"] for r in await pool.fetch("SELECT * FROM closed_orders")}
    assert closed == {
        booked[1].order_id: "cancelled",
        waiting[1].order_id: "failed",
        booked[0].order_id: "failed",
    }
    await assert_never_oversold(pool)


async def test_requests_for_a_closed_order_are_recorded_and_ignored(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A", capacity=1))
    order = Order(1)
    await handle(uow, order.submitted())
    await handle(uow, order.cancelled())
    await handle(uow, order.cancelled())  # a second cancellation: nothing more to release
    await handle(uow, order.rebook(d(1)))
    await handle(uow, order.submitted())
    assert kinds(await outbox(pool, order)) == ["slot_reserved", "slot_released"]
    assert [r["status"] for r in await slots(pool, order)] == ["released"]
    assert await waitlist(pool) == []


# ---- the site copy: capacity and outages -------------------------------------------------------------


async def test_outages_are_never_booked_and_removing_one_serves_the_waitlist(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A", capacity=1, outages=[(d(1), d(2))]))
    first, second = Order(1), Order(2)
    await handle(uow, first.submitted())
    assert (await live(pool, first))["manufacturing_start_date"] == d(3)  # type: ignore[index]
    await handle(uow, second.submitted())  # d1, d2 closed, d3 taken
    assert await live(pool, second) is None
    assert [r["order_id"] for r in await waitlist(pool)] == [second.order_id]

    # the outage shrinks to one day: d2 opens and the waiting order gets it
    await handle(uow, site_event("A", capacity=1, outages=[(d(1), d(1))]))
    assert (await live(pool, second))["manufacturing_start_date"] == d(2)  # type: ignore[index]
    assert (await outbox(pool, second))[-1]["data"]["reason"] == "waitlist"
    assert await waitlist(pool) == []


async def test_a_capacity_increase_serves_the_waitlist_in_order(pool: asyncpg.Pool, uow: UnitOfWork) -> None:
    await handle(uow, site_event("A", capacity=1))
    orders = [Order(i) for i in range(7)]
    for o in orders:
        await handle(uow, o.submitted())
    assert [r["order_id"] for r in await waitlist(pool)] == [o.order_id for o in orders[3:]]

    await handle(uow, site_event("A", capacity=2))  # three more starts: the first three waiting
    for o in orders[3:6]:
        assert await live(pool, o) is not None
    assert [r["order_id"] for r in await waitlist(pool)] == [orders[6].order_id]
    await assert_never_oversold(pool)


# ---- a market loses its last approved site -----------------------------------------------------------


async def test_losing_the_last_approved_site_waitlists_and_tells_each_order_once(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    """(a) orders waiting for the market are told `no_approved_site` once; (b) orders holding a slot at
    the site move like a site outage rebook, and with no other approved site are released and wait, told
    the same; a slot whose material arrived stays; a new order for the market waits for that reason."""
    await handle(uow, site_event("A", capacity=1))
    booked = [Order(i) for i in range(3)]  # d1, d2, d3: the whole horizon
    for o in booked:
        await handle(uow, o.submitted())
    waiting = [Order(10), Order(11)]
    for o in waiting:
        await handle(uow, o.submitted())
    assert [(r["order_id"], r["reason"]) for r in await waitlist(pool)] == [
        (o.order_id, "no_capacity") for o in waiting
    ]
    # the first booked order's material has arrived: its slot is consumed
    await handle(uow, booked[0].event(MaterialReceivedV1, site_id="A", received_at="2031-03-04T10:00:00Z"))

    # the registry withdraws A's EMA approval: no site left for EMA's clinical CILTA-CEL
    await handle(uow, site_event("A", capacity=1, regulators=("NMPA",)))

    # (a) each waiting order told once, with the reason, naming product, use and market, no patient data
    for o in waiting:
        events = await outbox(pool, o)
        assert kinds(events) == ["slot_unavailable", "slot_unavailable"]
        told = events[-1]["data"]
        assert told["reason"] == "no_approved_site" and told["waitlisted"] is True
        assert PRODUCT in told["detail"] and "clinical" in told["detail"] and "EMA" in told["detail"]
        assert o.coi not in told["detail"] and str(o.order_id) not in told["detail"]
    # (b) the booked orders whose material has not arrived: released, then waiting, told the same
    for o in booked[1:]:
        events = await outbox(pool, o)
        assert kinds(events) == ["slot_reserved", "slot_released", "slot_unavailable"]
        assert events[1]["data"]["reason"] == "approval_withdrawn" and events[1]["data"]["site_id"] == "A"
        assert events[2]["data"]["reason"] == "no_approved_site" and events[2]["data"]["waitlisted"] is True
        assert "other than A" in events[2]["data"]["detail"]
        assert await live(pool, o) is None
        assert [r["release_reason"] for r in await slots(pool, o)] == ["approval_withdrawn"]
    # the slot whose material arrived stays consumed at A
    assert [r["status"] for r in await slots(pool, booked[0])] == ["consumed"]
    assert kinds(await outbox(pool, booked[0])) == ["slot_reserved"]
    entries = await waitlist(pool)
    # behind the orders already waiting (the two moved in one transaction share their enqueue time)
    assert [r["order_id"] for r in entries[:2]] == [o.order_id for o in waiting]
    assert {r["order_id"] for r in entries[2:]} == {o.order_id for o in booked[1:]}
    assert {r["reason"] for r in entries} == {"no_approved_site"}
    for r in entries[2:]:  # waiting as site outage rebooks away from A
        assert (r["request_type"], r["rebook_kind"], r["exclude_site_id"]) == (
            "order.rebook_requested.v1",
            "site_outage",
            "A",
        )
        assert r["request"]["reason"] == "approval_withdrawn"

    # told once: later site events for the product tell nothing more
    before = len(await outbox(pool))
    await handle(uow, site_event("A", capacity=2, regulators=("NMPA",)))
    await handle(uow, site_event("C-NMPA", capacity=1, regulators=("NMPA",)))
    await handle(uow, site_event("A", capacity=2, regulators=("NMPA",), active=False))
    assert len(await outbox(pool)) == before

    # a new order for the market (racing the intake check) waits for that very reason
    late = Order(20)
    await handle(uow, late.submitted())
    [told] = await outbox(pool, late)
    assert told["data"]["reason"] == "no_approved_site"
    assert (await waitlist(pool))[-1]["reason"] == "no_approved_site"

    # an approved site again: the waitlist is served first come first served, rebooks stay rebooks
    await handle(uow, site_event("B", capacity=2))
    served = [o for o in waiting + booked[1:] + [late] if await live(pool, o) is not None]
    assert served == waiting + booked[1:] + [late]  # B: d1..d3, two a day
    for o in booked[1:]:
        slot = await live(pool, o)
        assert slot is not None and slot["site_id"] == "B" and slot["reserved_reason"] == "rebook:site_outage"
    assert await waitlist(pool) == []
    await assert_never_oversold(pool)


async def test_a_slot_at_a_site_that_loses_the_approval_moves_to_another_approved_site(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A-NEAR", regulators=("EMA", "NMPA")))
    await handle(uow, site_event("B-FAR", region="north_america"))
    order, nmpa = Order(1), Order(2)
    await handle(uow, order.submitted())
    await handle(uow, nmpa.submitted(regulator="NMPA"))
    old = await live(pool, order)
    assert old is not None and old["site_id"] == "A-NEAR"
    assert old["order_type"] == "clinical" and old["regulator"] == "EMA" and old["region"] == "europe"

    await handle(uow, site_event("A-NEAR", regulators=("NMPA",)))
    events = await outbox(pool, order)
    assert kinds(events) == ["slot_reserved", "slot_released", "slot_reserved"]
    assert events[1]["data"]["slot_id"] == str(old["slot_id"])
    assert events[1]["data"]["reason"] == "approval_withdrawn"
    moved = events[2]["data"]
    assert (moved["site_id"], moved["reason"]) == ("B-FAR", "rebook:site_outage")
    assert moved["manufacturing_start_date"] == d(2).isoformat()  # cross-region transit
    # the NMPA order's market is still approved at A-NEAR: it stays
    assert (await live(pool, nmpa))["site_id"] == "A-NEAR"  # type: ignore[index]
    assert kinds(await outbox(pool, nmpa)) == ["slot_reserved"]
    assert await waitlist(pool) == []

    # the site is deactivated: the NMPA order has nowhere else to go and waits, told why
    await handle(uow, site_event("A-NEAR", regulators=("NMPA",), active=False))
    events = await outbox(pool, nmpa)
    assert kinds(events) == ["slot_reserved", "slot_released", "slot_unavailable"]
    assert events[1]["data"]["reason"] == "site_inactive"
    assert events[2]["data"]["reason"] == "no_approved_site"
    assert [r["order_id"] for r in await waitlist(pool)] == [nmpa.order_id]


async def test_collected_material_at_a_site_that_loses_the_approval_moves_with_its_collection_date(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    """Issue 11: the order's material was collected (and may be in transit) when its site loses the
    approval: rebooked elsewhere as collected material, its collection date kept, and fresh material is
    never started outside its window of the collection (CILTA-CEL: 72 h)."""
    await handle(uow, site_event("A-NEAR"))
    await handle(uow, site_event("B-FAR", region="north_america"))
    # C-FAR is closed on the two days that are within the window of a collection on APHERESIS
    await handle(uow, site_event("C-FAR", region="north_america", outages=[(d(2), d(3))]))
    order = Order(1)
    await handle(uow, order.submitted())
    old = await live(pool, order)
    assert old is not None and old["site_id"] == "A-NEAR" and old["collected_on"] is None
    collected = order.event(ApheresisCompletedV1, collected_at=datetime(2031, 3, 3, 9, 30, tzinfo=UTC))
    await handle(uow, collected)
    await handle(uow, collected)  # a redelivery under the inbox's dedup is still harmless
    assert (await live(pool, order))["collected_on"] == APHERESIS  # type: ignore[index]

    await handle(uow, site_event("A-NEAR", regulators=("NMPA",)))
    events = await outbox(pool, order)
    assert kinds(events) == ["slot_reserved", "slot_released", "slot_reserved"]
    assert events[1]["data"]["reason"] == "approval_withdrawn"
    moved = events[2]["data"]
    assert (moved["site_id"], moved["reason"]) == ("B-FAR", "rebook:site_outage")
    assert moved["apheresis_date"] == APHERESIS.isoformat()  # the collection date, kept
    assert moved["manufacturing_start_date"] == d(2).isoformat()  # within 72 h of the collection
    new = await live(pool, order)
    assert new is not None and (new["apheresis_date"], new["collected_on"]) == (APHERESIS, APHERESIS)

    # B-FAR loses it too: C-FAR is open only from d(4), past the window of the collection, so the order
    # waits as collected material (re-planned as if not collected it would have started on d(4))
    await handle(uow, site_event("B-FAR", region="north_america", regulators=("NMPA",)))
    events = await outbox(pool, order)
    assert kinds(events)[3:] == ["slot_released", "slot_unavailable"]
    assert events[4]["data"]["waitlisted"] is True
    assert await live(pool, order) is None
    [entry] = await waitlist(pool)
    request = RebookRequestedV1.model_validate(entry["request"])
    assert request.material_collected and request.apheresis_date == APHERESIS
    assert (request.kind, request.reason, request.exclude_site_id) == (
        "site_outage",
        "approval_withdrawn",
        "B-FAR",
    )
    assert all(r["site_id"] != "C-FAR" for r in await slots(pool, order))


async def test_approvals_changing_while_orders_book_and_cancel_never_leave_a_slot_at_an_unapproved_site(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A", capacity=2))
    await handle(uow, site_event("B", capacity=1, region="north_america"))
    first = [Order(i) for i in range(12)]
    await asyncio.gather(*(handle(uow, o.submitted()) for o in first))

    rnd = random.Random(5)
    work = [o.cancelled() for o in first[:3]]
    work += [Order(100 + i).submitted() for i in range(6)]
    work += [site_event("A", capacity=2, regulators=r) for r in (("NMPA",), ("EMA",), ("NMPA",))]
    work += [site_event("B", capacity=c, region="north_america") for c in (2, 1)]
    rnd.shuffle(work)
    await asyncio.gather(*(handle(uow, e) for e in work))
    # the registry's last word: A approves NMPA only, B has its largest capacity of all
    await handle(uow, site_event("A", capacity=2, regulators=("NMPA",)))
    await handle(uow, site_event("B", capacity=2, region="north_america"))

    await assert_never_oversold(pool)
    at_a = await pool.fetch("SELECT * FROM slots WHERE site_id = 'A' AND status IN ('held', 'confirmed')")
    assert at_a == []
    live_orders = await pool.fetch("SELECT order_id FROM slots WHERE status IN ('held', 'confirmed')")
    assert len(live_orders) + len(await waitlist(pool)) == 12 - 3 + 6
    # every order that waits was told so with the reason it waits for now (at least once)
    for entry in await waitlist(pool):
        told = [
            e["data"]["reason"]
            for e in await outbox(pool)
            if e["type"] == "scheduling.slot_unavailable.v1"
            and e["data"]["order_id"] == str(entry["order_id"])
        ]
        assert told and entry["reason"] in {"no_capacity", *told}


# ---- concurrency -------------------------------------------------------------------------------------


async def test_thirty_concurrent_submissions_never_oversell(pool: asyncpg.Pool, uow: UnitOfWork) -> None:
    await handle(uow, site_event("A", capacity=2))
    await handle(uow, site_event("B", capacity=1, region="north_america"))
    orders = [Order(i) for i in range(30)]
    # each handler in its own transaction on its own pool connection, all at once
    await asyncio.gather(*(handle(uow, o.submitted()) for o in orders))

    await assert_never_oversold(pool)
    rows = await slots(pool)
    per_day = Counter((r["site_id"], r["manufacturing_start_date"]) for r in rows)
    # horizon 3: A d1..d3 (2 a day), B d2..d4 (1 a day): 9 starts, every one of them used
    assert sum(per_day.values()) == 9
    assert all(per_day[("A", d(n))] == 2 for n in (1, 2, 3))
    assert all(per_day[("B", d(n))] == 1 for n in (2, 3, 4))
    await assert_each_order_has_one_live_slot_or_waits(pool, orders)
    events = Counter(e["type"] for e in await outbox(pool))
    assert events == {"scheduling.slot_reserved.v1": 9, "scheduling.slot_unavailable.v1": 21}


async def handle_together(uow: UnitOfWork, events: list[CloudEvent]) -> None:
    """The events in one transaction, one after another, as a consumer applies a poll's batch."""
    async with uow.begin() as tx:
        for event in events:
            assert await HANDLERS.dispatch(tx, event), event.type


async def test_a_batch_books_as_one_transaction_per_event_would(pool: asyncpg.Pool, uow: UnitOfWork) -> None:
    """Events applied one after another in one transaction (a consumer's batch): the batch never
    oversells, a release in it frees its day for the orders after it, a site copy replaced in it is
    planned with at once, and the orders it waitlists keep the order they came in (first come, first
    served within a batch too: enqueued when each is waitlisted, not when the transaction began)."""
    await handle(uow, site_event("A", capacity=2))
    await handle(uow, site_event("B", capacity=1, region="north_america"))
    orders = [Order(i) for i in range(12)]
    # horizon 3: A d1..d3 (2 a day), B d2..d4 (1 a day): 9 starts; the cancel frees one of them
    await handle_together(
        uow,
        [*(o.submitted() for o in orders[:6]), orders[0].cancelled(), *(o.submitted() for o in orders[6:])],
    )
    await assert_never_oversold(pool)
    per_day = Counter(
        (r["site_id"], r["manufacturing_start_date"])
        for r in await slots(pool)
        if r["status"] in ("held", "confirmed")
    )
    assert all(per_day[("A", d(n))] == 2 for n in (1, 2, 3))
    assert all(per_day[("B", d(n))] == 1 for n in (2, 3, 4))
    assert await live(pool, orders[0]) is None
    assert all([await live(pool, o) is not None for o in orders[1:10]])
    assert [r["order_id"] for r in await waitlist(pool)] == [orders[10].order_id, orders[11].order_id]

    # in one batch: a capacity increase (the waiting orders served), then more submissions
    more = [Order(100 + i) for i in range(4)]
    await handle_together(uow, [site_event("A", capacity=3), *(o.submitted() for o in more)])
    await assert_never_oversold(pool)
    per_day = Counter(
        (r["site_id"], r["manufacturing_start_date"])
        for r in await slots(pool)
        if r["status"] in ("held", "confirmed")
    )
    assert all(per_day[("A", d(n))] == 3 for n in (1, 2, 3))  # 3 more starts: 10, 11 and the first new
    assert await live(pool, orders[10]) is not None and await live(pool, orders[11]) is not None
    assert await live(pool, more[0]) is not None
    assert [r["order_id"] for r in await waitlist(pool)] == [o.order_id for o in more[1:]]


async def test_concurrent_cancels_rebooks_and_submissions_keep_capacity_and_one_slot_per_order(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A", capacity=2))
    await handle(uow, site_event("B", capacity=1, region="north_america"))
    first = [Order(i) for i in range(20)]
    await asyncio.gather(*(handle(uow, o.submitted()) for o in first))

    rnd = random.Random(7)
    later = [Order(100 + i) for i in range(10)]
    cancelled = rnd.sample(first, 6)
    rebooked = [o for o in first if o not in cancelled][:8]
    work = [o.cancelled() for o in cancelled]
    work += [
        o.rebook(d(rnd.randint(0, 2)), kind="site_outage", reason="outage:power", exclude="A")
        if i % 2
        else o.rebook(d(rnd.randint(0, 2)))
        for i, o in enumerate(rebooked)
    ]
    work += [o.submitted() for o in later]
    rnd.shuffle(work)
    await asyncio.gather(*(handle(uow, e) for e in work))
    # a capacity increase afterwards serves whoever still waits
    await handle(uow, site_event("A", capacity=3))

    await assert_never_oversold(pool)
    for o in cancelled:
        assert await live(pool, o) is None
    waiting = {r["order_id"] for r in await waitlist(pool)}
    assert not waiting & {o.order_id for o in cancelled}
    await assert_each_order_has_one_live_slot_or_waits(pool, [o for o in first + later if o not in cancelled])
    for i, o in enumerate(rebooked):
        slot = await live(pool, o)
        if slot is not None and i % 2:
            assert slot["site_id"] != "A"
    # every release was announced, exactly once per released slot
    released = {r["slot_id"] for r in await pool.fetch("SELECT slot_id FROM slots WHERE status = 'released'")}
    announced = [
        uuid.UUID(e["data"]["slot_id"])
        for e in await outbox(pool)
        if e["type"] == "scheduling.slot_released.v1"
    ]
    assert sorted(announced) == sorted(released)


async def test_concurrent_registry_changes_and_bookings_of_two_products_never_deadlock(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    """Registry changes lock every product of the site (in one global order) while bookings of either
    product and cancellations run: no deadlock, nothing oversold, nobody lost."""
    both = (PRODUCT, "TISA-CEL")
    await handle(uow, site_event("A", capacity=1, products=both))
    await handle(uow, site_event("B", capacity=1, region="north_america", products=("TISA-CEL",)))
    orders = [Order(i) for i in range(24)]
    await asyncio.gather(*(handle(uow, o.submitted(product=both[i % 2])) for i, o in enumerate(orders)))

    rnd = random.Random(11)
    work = [o.cancelled() for o in orders[:6]]
    work += [Order(100 + i).submitted(product=both[i % 2]) for i in range(10)]
    work += [site_event("A", capacity=c, products=both) for c in (2, 1, 3)]
    work += [site_event("B", capacity=c, region="north_america", products=("TISA-CEL",)) for c in (2, 3)]
    rnd.shuffle(work)
    await asyncio.gather(*(handle(uow, e) for e in work))
    await asyncio.gather(
        handle(uow, site_event("A", capacity=3, products=both)),
        handle(uow, site_event("B", capacity=3, region="north_america", products=("TISA-CEL",))),
    )

    await assert_never_oversold(pool)
    live_orders = await pool.fetch("SELECT order_id FROM slots WHERE status IN ('held', 'confirmed')")
    waiting = await waitlist(pool)
    assert len(live_orders) + len(waiting) == 24 - 6 + 10
    # whoever still waits does so because no day of the window has room (a probe books nothing)
    for entry in waiting:
        req = waitlisted_request(entry)
        async with uow.begin() as tx:
            result = await booking.try_reserve(tx, PLANNING, req, "probe")
        assert not isinstance(result, Choice), f"{req.order_id} waits although there is room"


async def assert_each_order_has_one_live_slot_or_waits(pool: asyncpg.Pool, orders: list[Order]) -> None:
    live_count = Counter(
        r["order_id"]
        for r in await pool.fetch("SELECT order_id FROM slots WHERE status IN ('held', 'confirmed')")
    )
    waiting = {r["order_id"] for r in await waitlist(pool)}
    for o in orders:
        n = live_count.get(o.order_id, 0)
        assert (n, o.order_id in waiting) in {(1, False), (0, True)}, (
            f"{o.order_id}: {n} live, waiting={o.order_id in waiting}"
        )


# ---- reasons are codes; the API's reads are paged and confined in SQL ----------------------------------


async def test_reasons_stored_and_published_are_codes_and_words_are_refused(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    await handle(uow, site_event("A", capacity=2))
    moved, stranded, cancelled = Order(1), Order(2), Order(3)
    for o in (moved, stranded, cancelled):
        await handle(uow, o.submitted())
    await handle(uow, moved.rebook(d(1), reason="patient_unwell"))
    await handle(uow, stranded.rebook(kind="site_outage", reason="outage:maintenance", exclude="A"))
    await handle(uow, cancelled.cancelled())

    released = [e["data"] for e in await outbox(pool) if e["type"] == "scheduling.slot_released.v1"]
    assert sorted(r["reason"] for r in released) == ["cancelled", "outage:maintenance", "patient_unwell"]
    [entry] = await waitlist(pool)
    assert entry["order_id"] == stranded.order_id and entry["request"]["reason"] == "outage:maintenance"
    assert await pool.fetchval("SELECT reason FROM closed_orders") == "consent_withdrawn"

    # words in an order event no longer pass the contract: refused at the consumer, nothing written
    asked = RebookRequestedV1.model_validate(moved.rebook(d(2)).data)
    words = new_event(asked.model_copy(update={"reason": "Patient's infection, moved by Dr. Who"}))
    counts = [await pool.fetchval(f"SELECT count(*) FROM {t}") for t in ("slots", "waitlist", "outbox")]
    with pytest.raises(PoisonMessage):  # dead-lettered by the consumer
        await handle(uow, words)
    assert [
        await pool.fetchval(f"SELECT count(*) FROM {t}") for t in ("slots", "waitlist", "outbox")
    ] == counts
    stored = " ".join(
        [
            str(dict(r))
            for t in ("slots", "waitlist", "closed_orders")
            for r in await pool.fetch(f"SELECT * FROM {t}")
        ]
        + [json.dumps(e) for e in await outbox(pool)]
    )
    assert "infection" not in stored and "Dr. Who" not in stored


async def test_the_reads_are_paged_and_confined_in_sql(pool: asyncpg.Pool, uow: UnitOfWork) -> None:
    await handle(uow, site_event("A", capacity=1))
    await handle(uow, site_event("B", capacity=1))
    orders = [Order(i, centre=("TC-DE-BE-001", "TC-FR-PA-001")[i % 2]) for i in range(8)]  # 6 fit, 2 wait
    for o in orders:
        await handle(uow, o.submitted())
    async with uow.read() as tx:
        every = await tx.slots.view(None, None, None, None, 200)
        assert len(every) == 6
        assert await tx.slots.view(None, None, None, None, 2, 3) == every[3:5]
        at_a = await tx.slots.view(None, None, None, None, 200, site="A")
        assert at_a == [s for s in every if s["site_id"] == "A"] and len(at_a) == 3
        assert await tx.slots.view(None, None, None, "B", 200, site="A") == []
        french = await tx.slots.view(None, None, None, None, 200, centre="TC-FR-PA-001")
        assert french == [s for s in every if s["treatment_center_id"] == "TC-FR-PA-001"] and french
        waiting = await tx.waitlist.view()
        assert [w["order_id"] for w in waiting] == [o.order_id for o in orders[6:]]
        assert await tx.waitlist.view(1, 1) == waiting[1:]
        assert [w["order_id"] for w in await tx.waitlist.view(centre="TC-DE-BE-001")] == [orders[6].order_id]


# the capacity used counted from the rows, as the bookings counted it before migration 0006
_COUNTED = """SELECT product_code, day, site_id, count(*)::int AS n FROM (
    SELECT product_code, manufacturing_start_date AS day, site_id FROM slots
    WHERE status IN ('held', 'confirmed', 'consumed')
    UNION ALL
    SELECT product_code, manufacturing_start_date, site_id FROM holds WHERE status = 'active'
) AS used GROUP BY 1, 2, 3"""
_CENTRE_COUNTED = """SELECT treatment_center_id, product_code, day, count(*)::int AS n FROM (
    SELECT treatment_center_id, product_code, manufacturing_start_date AS day FROM slots
    WHERE status IN ('held', 'confirmed', 'consumed') AND treatment_center_id IS NOT NULL
    UNION ALL
    SELECT treatment_center_id, product_code, manufacturing_start_date FROM holds WHERE status = 'active'
) AS used GROUP BY 1, 2, 3"""


class _RolledBack(Exception):
    pass


Counts = dict[tuple[Any, ...], int]


async def _capacity(conn: asyncpg.Connection) -> tuple[Counts, Counts, Counts, Counts]:
    """(counted from the rows, kept by the triggers) for sites, then the same for centres: each the days
    with at least one run."""
    counted = {tuple(r)[:3]: r["n"] for r in await conn.fetch(_COUNTED)}
    kept = {
        (r["product_code"], r["day"], r["site_id"]): r["n"]
        for r in await conn.fetch("SELECT * FROM capacity_used WHERE n > 0")
    }
    centre_counted = {tuple(r)[:3]: r["n"] for r in await conn.fetch(_CENTRE_COUNTED)}
    centre_kept = {
        (r["treatment_center_id"], r["product_code"], r["day"]): r["n"]
        for r in await conn.fetch("SELECT * FROM centre_capacity_used WHERE n > 0")
    }
    return counted, kept, centre_counted, centre_kept


async def test_the_capacity_used_is_kept_as_the_rows_would_count_it(
    test_db: pytest_plugin.TestDatabase, tmp_path: Path
) -> None:
    """What a booking reads as used (migration 0006's counts) is, after every write of a slot or a hold,
    what counting the rows gives: a book of before the migration is counted by it, and then any mix of
    bookings, confirmations, releases, consumptions, moves, holds and deletions keeps the counts, per
    site and per centre (a slot without a centre counts for its site only)."""
    url = test_db.urls["scheduling"]
    owner_url = test_db.owner_urls["scheduling"]
    before = tmp_path / "migrations"
    before.mkdir()
    for migration in sorted(SCHEDULING_MIGRATIONS.glob("000[1-5].*.sql")):
        (before / migration.name).write_text(migration.read_text())
    await apply_migrations(owner_url, "scheduling", [MIGRATIONS_DIR, before])
    rng = random.Random(12)
    sites, products, centres = ("A", "B"), ("P1", "P2"), ("TC-1", "TC-2", None)
    slot_statuses = ("held", "confirmed", "consumed", "released")
    hold_statuses = ("active", "claimed", "expired")
    conn = await asyncpg.connect(url)

    async def add_slot() -> None:
        await conn.execute(
            """INSERT INTO slots (slot_id, order_id, coi, site_id, product_code, manufacturing_start_date,
                   apheresis_date, status, treatment_center_id)
               VALUES ($1, $2, 'COI', $3, $4, $5, $5, $6, $7)""",
            uuid.uuid4(),
            uuid.uuid4(),
            rng.choice(sites),
            rng.choice(products),
            d(rng.randrange(6)),
            rng.choice(slot_statuses),
            rng.choice(centres),
        )

    async def add_hold() -> None:
        await conn.execute(
            """INSERT INTO holds (hold_id, treatment_center_id, site_id, product_code, order_type, regulator,
                   region, manufacturing_start_date, apheresis_date, status, expires_at)
               VALUES ($1, $2, $3, $4, 'commercial', 'EMA', 'EU', $5, $5, $6, now())""",
            uuid.uuid4(),
            rng.choice(centres[:2]),
            rng.choice(sites),
            rng.choice(products),
            d(rng.randrange(6)),
            rng.choice(hold_statuses),
        )

    try:
        for _ in range(30):  # the book before the migration
            await (add_slot() if rng.random() < 0.7 else add_hold())
        assert await apply_migrations(owner_url, "scheduling", [MIGRATIONS_DIR, SCHEDULING_MIGRATIONS]) == [
            "0006.scheduling-capacity-used"
        ]
        counted, kept, centre_counted, centre_kept = await _capacity(conn)
        assert kept == counted and centre_kept == centre_counted and counted and centre_counted
        for step in range(300):
            table = "slots" if rng.random() < 0.7 else "holds"
            key = "slot_id" if table == "slots" else "hold_id"
            ids = [r[0] for r in await conn.fetch(f"SELECT {key} FROM {table}")]
            what = rng.randrange(5)
            if what == 0 or not ids:
                await (add_slot() if table == "slots" else add_hold())
            elif what == 1:  # a status change (held -> confirmed counts the same; released, expired: not)
                statuses = slot_statuses if table == "slots" else hold_statuses
                await conn.execute(
                    f"UPDATE {table} SET status = $2 WHERE {key} = $1", rng.choice(ids), rng.choice(statuses)
                )
            elif what == 2:  # moved to another day, site or product, whatever its status
                await conn.execute(
                    f"UPDATE {table} SET manufacturing_start_date = $2, site_id = $3, product_code = $4"
                    f" WHERE {key} = $1",
                    rng.choice(ids),
                    d(rng.randrange(6)),
                    rng.choice(sites),
                    rng.choice(products),
                )
            elif what == 3:  # another centre (a slot may have none)
                await conn.execute(
                    f"UPDATE {table} SET treatment_center_id = $2 WHERE {key} = $1",
                    rng.choice(ids),
                    rng.choice(centres if table == "slots" else centres[:2]),
                )
            else:
                await conn.execute(f"DELETE FROM {table} WHERE {key} = $1", rng.choice(ids))
            if step % 10 == 9:
                counted, kept, centre_counted, centre_kept = await _capacity(conn)
                assert kept == counted, f"step {step}"
                assert centre_kept == centre_counted, f"step {step}"
        # what a transaction rolled back wrote counts for nothing
        settled = await _capacity(conn)
        with pytest.raises(_RolledBack):
            async with conn.transaction():
                await add_slot()
                await add_hold()
                await conn.execute("UPDATE slots SET status = 'released'")
                raise _RolledBack
        assert await _capacity(conn) == settled
        # every run released, every hold expired: no day has any left
        await conn.execute("UPDATE slots SET status = 'released'")
        await conn.execute("UPDATE holds SET status = 'expired'")
        counted, kept, centre_counted, centre_kept = await _capacity(conn)
        assert kept == counted == {} and centre_kept == centre_counted == {}
        assert await conn.fetchval("SELECT count(*) FROM capacity_used WHERE n <> 0") == 0
    finally:
        await conn.close()
