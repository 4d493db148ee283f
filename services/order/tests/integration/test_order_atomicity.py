"""Placing an order is one transaction: order, timeline entry and outbox event, or nothing at all.

Runs `order_service.services.place_order` against the real `ordering` schema (messaging + order
migrations, seed loaded) with the order service's own database role.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import order_service
from order_service import services
from order_service.adapters import repository
from order_service.services import PlaceOrder, place_order
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool, schema_of
from v2v_servicekit import Problem

pytestmark = pytest.mark.integration

ORDER_MIGRATIONS = Path(order_service.__file__).parent / "migrations"
TOPIC = "it.order-atomicity.v2v.order"  # never published to here: only the outbox row is checked
FACILITY = "V2V00"
PATIENT_REF = "PAT-SECRET-7781"
NOW = datetime(2030, 3, 4, 12, 0, tzinfo=UTC)


def command(**overrides: Any) -> PlaceOrder:
    fields: dict[str, Any] = {
        "treatment_center_id": "TC-FR-PA-001",
        "product_code": "AXI-CEL",
        "order_type": "commercial",
        "patient_ref": PATIENT_REF,
        "requested_apheresis_date": NOW.date() + timedelta(days=10),
    }
    fields.update(overrides)
    return PlaceOrder(**fields)


@pytest.fixture
async def ordering(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    url = test_db.urls["order"]
    await apply_migrations(url, "ordering", [MIGRATIONS_DIR, ORDER_MIGRATIONS])
    pool = await create_pool(url, max_size=4)
    assert await schema_of(pool) == "ordering"
    async with pool.acquire() as conn, conn.transaction():
        await repository.load_seed(conn)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def uow(ordering: asyncpg.Pool) -> UnitOfWork:
    return UnitOfWork(ordering, TOPIC, notify_channel("ordering"))


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    return {
        table: int(await pool.fetchval(f"SELECT count(*) FROM {table}"))
        for table in ("orders", "order_timeline", "outbox", "coi_sequences")
    }


NOTHING = {"orders": 0, "order_timeline": 0, "outbox": 0, "coi_sequences": 0}


async def test_place_order_writes_order_timeline_and_one_event_without_patient_data(
    ordering: asyncpg.Pool, uow: UnitOfWork
) -> None:
    assert await ordering.fetchval("SELECT count(*) FROM treatment_centers") > 0  # the seed is loaded

    order_id = await place_order(uow, command(), FACILITY, now=NOW)

    order = await repository.get_order(ordering, order_id)
    assert order is not None
    assert order["status"] == "submitted"
    assert order["treatment_center_id"] == "TC-FR-PA-001"
    assert order["patient_ref"] == PATIENT_REF  # kept here, and only here
    coi = order["coi"]

    timeline = await repository.timeline(ordering, order_id)
    assert len(timeline) == 1
    assert timeline[0]["event_type"] == "order.submitted.v1"
    assert timeline[0]["status_before"] is None and timeline[0]["status_after"] == "submitted"

    outbox = await ordering.fetch("SELECT * FROM outbox")
    assert len(outbox) == 1
    row = outbox[0]
    assert row["event_type"] == "order.submitted.v1"
    assert row["event_id"] == timeline[0]["event_id"]
    assert row["topic"] == TOPIC
    assert row["message_key"] == str(order_id)
    assert row["published_at"] is None
    payload = bytes(row["payload"])
    assert PATIENT_REF.encode() not in payload
    assert b"patient_ref" not in payload
    event = json.loads(payload)
    assert event["type"] == "order.submitted.v1"
    assert event["subject"] == str(order_id)
    assert event["coi"] == coi
    assert event["data"]["order_id"] == str(order_id)
    assert event["data"]["coi"] == coi
    assert event["data"]["regulator"] == "EMA"
    assert "patient_ref" not in event["data"]
    assert PATIENT_REF not in json.dumps(row["headers"])

    assert await counts(ordering) == {"orders": 1, "order_timeline": 1, "outbox": 1, "coi_sequences": 1}


async def test_a_failure_after_the_order_and_its_event_were_written_leaves_nothing(
    ordering: asyncpg.Pool, uow: UnitOfWork, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_inside: dict[str, int] = {}

    async def failing_add_timeline(conn: asyncpg.Connection, **kwargs: Any) -> None:
        # inside the transaction the order and its outbox row are already written...
        seen_inside["orders"] = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE order_id = $1", kwargs["order_id"]
        )
        seen_inside["outbox"] = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE event_id = $1", kwargs["event_id"]
        )
        raise RuntimeError("timeline insert failed")

    monkeypatch.setattr(repository, "add_timeline", failing_add_timeline)
    assert services.repo.add_timeline is failing_add_timeline  # the service layer calls the patched one

    with pytest.raises(RuntimeError, match="timeline insert failed"):
        await place_order(uow, command(), FACILITY, now=NOW)

    assert seen_inside == {"orders": 1, "outbox": 1}
    # ...and after the failure none of it is (not even the COI sequence step)
    assert await counts(ordering) == NOTHING

    monkeypatch.undo()  # the next order goes through and gets the first COI sequence number
    order_id = await place_order(uow, command(), FACILITY, now=NOW)
    assert await counts(ordering) == {"orders": 1, "order_timeline": 1, "outbox": 1, "coi_sequences": 1}
    order = await repository.get_order(ordering, order_id)
    assert order is not None and order["coi"].startswith(f"{FACILITY}30000001")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"treatment_center_id": "TC-XX-NOPE-999"}, "treatment_center_id"),
        ({"product_code": "NOT-A-PRODUCT"}, "product_code"),
        ({"requested_apheresis_date": NOW.date() - timedelta(days=1)}, "requested_apheresis_date"),
    ],
    ids=["unknown-centre", "unknown-product", "past-apheresis-date"],
)
async def test_a_rejected_command_writes_nothing(
    ordering: asyncpg.Pool, uow: UnitOfWork, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(Problem) as excinfo:
        await place_order(uow, command(**overrides), FACILITY, now=NOW)

    problem = excinfo.value
    assert problem.status == 422
    assert problem.errors and problem.errors[0]["field"] == field
    assert field in problem.detail
    assert await counts(ordering) == NOTHING
