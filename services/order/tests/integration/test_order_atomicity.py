"""Placing an order is one transaction: order, timeline entry and outbox event, or nothing at all.

Runs `order_service.service_layer.commands.place_order` against the real `ordering` schema (messaging +
order migrations, reference data loaded, one approved site known) with the order service's own database
role.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import order_service
from order_service.adapters import repository
from order_service.adapters.repository import OrderTx
from order_service.domain.coi import ALPHABET, make_coi
from order_service.domain.records import TimelineEntry
from order_service.service_layer.commands import PlaceOrder, load_reference_data, place_order
from order_service.service_layer.handlers import handlers
from v2v_audit.service import migrate as audit_migrate
from v2v_contracts import SiteApproval, SiteRegisteredV1, new_event
from v2v_contracts.errors import Invalid
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool, schema_of
from v2v_servicekit.problems import status_of

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
    owner_url = test_db.owner_urls["order"]  # migrations run as the owner
    await apply_migrations(owner_url, "ordering", [MIGRATIONS_DIR, ORDER_MIGRATIONS])
    await audit_migrate(owner_url, "ordering")  # the audit trail (v2v_audit), as the service applies it
    pool = await create_pool(url, max_size=4)
    assert await schema_of(pool) == "ordering"
    uow = UnitOfWork(pool, TOPIC, notify_channel("ordering"), repository.tx_factory)
    await load_reference_data(uow)
    await register_site(uow, "FR-LES-ULIS", [("EMA", "commercial", "AXI-CEL")])
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def uow(ordering: asyncpg.Pool) -> UnitOfWork[OrderTx]:
    return UnitOfWork(ordering, TOPIC, notify_channel("ordering"), repository.tx_factory)


async def register_site(
    uow: UnitOfWork[OrderTx],
    site_id: str,
    approvals: list[tuple[str, str, str]],
    *,
    active: bool = True,
    time: datetime | None = None,
) -> None:
    """Deliver a `site.registered` event to the order service's handlers, as its consumer would."""
    site = SiteRegisteredV1(
        site_id=site_id,
        name=site_id,
        country="FR",
        region="europe",
        timezone="Europe/Paris",
        operator="own",
        active=active,
        approvals=[SiteApproval(regulator=r, use=u, product_code=p) for r, u, p in approvals],  # type: ignore[arg-type]
        daily_capacity={p: 1 for _, _, p in approvals},
    )
    event = new_event(site, subject=site_id)
    if time is not None:
        event = event.model_copy(update={"time": time})
    async with uow.begin() as tx:
        assert await handlers.dispatch(tx, event)


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    found = {
        table: int(await pool.fetchval(f"SELECT count(*) FROM {table}"))
        for table in ("orders", "order_timeline", "outbox", "coi_sequences")
    }
    # the orders' audit entries (the network's registrations are audited too, by the fixture)
    found["audit_trail"] = int(
        await pool.fetchval("SELECT count(*) FROM audit_trail WHERE object_type = 'order'")
    )
    return found


NOTHING = {"orders": 0, "order_timeline": 0, "outbox": 0, "coi_sequences": 0, "audit_trail": 0}
ONE = {"orders": 1, "order_timeline": 1, "outbox": 1, "coi_sequences": 1, "audit_trail": 1}


async def test_place_order_writes_order_timeline_and_one_event_without_patient_data(
    ordering: asyncpg.Pool, uow: UnitOfWork
) -> None:
    assert await ordering.fetchval("SELECT count(*) FROM treatment_centers") > 0  # the seed is loaded

    order_id = await place_order(uow, command(), FACILITY, now=NOW)

    async with uow.read() as tx:
        order = await tx.orders.get(order_id)
        timeline = await tx.timeline.of(order_id)
    assert order is not None
    assert order.status == "submitted"
    assert order.treatment_center_id == "TC-FR-PA-001"
    assert order.patient_ref == PATIENT_REF  # kept here, and only here
    coi = order.coi

    assert len(timeline) == 1
    assert timeline[0].event_type == "order.submitted.v1"
    assert timeline[0].status_before is None and timeline[0].status_after == "submitted"

    outbox = await ordering.fetch("SELECT * FROM outbox")
    assert len(outbox) == 1
    row = outbox[0]
    assert row["event_type"] == "order.submitted.v1"
    assert row["event_id"] == timeline[0].event_id
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

    # its audit entry, in the same transaction: the order placed, by the service itself (no request
    # here), chained after the network's registrations
    audit = await ordering.fetchrow("SELECT * FROM audit_trail WHERE object_type = 'order'")
    assert audit is not None
    assert (audit["action"], audit["object_id"], audit["actor_kind"]) == (
        "order.placed",
        str(order_id),
        "system",
    )
    assert audit["new_values"]["patient_ref"] == PATIENT_REF and audit["new_values"]["status"] == "submitted"
    assert audit["new_values"]["event"]["id"] == str(row["event_id"])
    assert await counts(ordering) == ONE


async def test_a_failure_after_the_order_and_its_event_were_written_leaves_nothing(
    ordering: asyncpg.Pool, uow: UnitOfWork, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_inside: dict[str, int] = {}

    async def failing_add_timeline(self: repository.PgTimeline, entry: TimelineEntry) -> None:
        # inside the transaction the order and its outbox row are already written...
        seen_inside["orders"] = await self.conn.fetchval(
            "SELECT count(*) FROM orders WHERE order_id = $1", entry.order_id
        )
        seen_inside["outbox"] = await self.conn.fetchval(
            "SELECT count(*) FROM outbox WHERE event_id = $1", entry.event_id
        )
        raise RuntimeError("timeline insert failed")

    monkeypatch.setattr(repository.PgTimeline, "add", failing_add_timeline)
    async with uow.begin() as tx:  # the service layer's transactions use the patched repository
        assert (
            isinstance(tx.timeline, repository.PgTimeline)
            and tx.timeline.add.__func__ is failing_add_timeline
        )  # type: ignore[attr-defined]

    with pytest.raises(RuntimeError, match="timeline insert failed"):
        await place_order(uow, command(), FACILITY, now=NOW)

    assert seen_inside == {"orders": 1, "outbox": 1}
    # ...and after the failure none of it is (not even the COI sequence step)
    assert await counts(ordering) == NOTHING

    monkeypatch.undo()  # the next order goes through and gets the first COI sequence number
    order_id = await place_order(uow, command(), FACILITY, now=NOW)
    assert await counts(ordering) == ONE
    async with uow.read() as tx:
        order = await tx.orders.get(order_id)
    assert order is not None and order.coi.startswith(f"{FACILITY}30000001")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"treatment_center_id": "TC-XX-NOPE-999"}, "treatment_center_id"),
        ({"product_code": "NOT-A-PRODUCT"}, "product_code"),
        ({"requested_apheresis_date": NOW.date() - timedelta(days=1)}, "requested_apheresis_date"),
        ({"treatment_center_id": "TC-AU-VI-001"}, "product_code"),  # no site makes AXI-CEL for TGA
        ({"order_type": "clinical"}, "product_code"),  # the one site is approved for commercial use only
    ],
    ids=["unknown-centre", "unknown-product", "past-apheresis-date", "market-not-served", "use-not-served"],
)
async def test_a_rejected_command_writes_nothing(
    ordering: asyncpg.Pool, uow: UnitOfWork, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(Invalid) as excinfo:
        await place_order(uow, command(**overrides), FACILITY, now=NOW)

    problem = excinfo.value
    assert status_of(problem) == 422
    assert problem.errors and problem.errors[0].field == field
    assert field in problem.detail
    assert await counts(ordering) == NOTHING


async def test_the_network_copy_follows_the_latest_registration_of_each_site(
    ordering: asyncpg.Pool, uow: UnitOfWork[OrderTx]
) -> None:
    patients = iter(f"PAT-AU-{n}" for n in range(1, 100))  # one open order per patient and product

    def australia() -> PlaceOrder:
        return command(
            treatment_center_id="TC-AU-VI-001", product_code="TISA-CEL", patient_ref=next(patients)
        )

    with pytest.raises(Invalid, match="TISA-CEL for commercial use in the TGA market"):
        await place_order(uow, australia(), FACILITY, now=NOW)

    t0 = datetime.now(UTC)
    await register_site(uow, "AU-MELBOURNE", [("TGA", "commercial", "TISA-CEL")], time=t0)
    await place_order(uow, australia(), FACILITY, now=NOW)

    # an older registration of the site changes nothing; an inactive site serves no market
    await register_site(uow, "AU-MELBOURNE", [], time=t0 - timedelta(minutes=1))
    await place_order(uow, australia(), FACILITY, now=NOW)
    await register_site(uow, "AU-MELBOURNE", [("TGA", "commercial", "TISA-CEL")], active=False, time=t0)
    with pytest.raises(Invalid, match="TGA market"):
        await place_order(uow, australia(), FACILITY, now=NOW)
    assert await ordering.fetchval("SELECT count(*) FROM site_approvals WHERE site_id = 'AU-MELBOURNE'") == 1

    # a new registration replaces the site's approvals (not adds to them)
    await register_site(
        uow, "AU-MELBOURNE", [("TGA", "clinical", "TISA-CEL")], time=t0 + timedelta(minutes=1)
    )
    with pytest.raises(Invalid, match="TGA market"):
        await place_order(uow, australia(), FACILITY, now=NOW)
    await place_order(
        uow,
        command(
            treatment_center_id="TC-AU-VI-001",
            product_code="TISA-CEL",
            order_type="clinical",
            patient_ref=next(patients),
        ),
        FACILITY,
        now=NOW,
    )
    assert await counts(ordering) == {
        "orders": 3,
        "order_timeline": 3,
        "outbox": 3,
        "coi_sequences": 1,
        "audit_trail": 3,
    }


# ---- the COI counter: taken with the order's insert, by the database's COI function --------------------


async def test_the_database_makes_the_cois_make_coi_makes(ordering: asyncpg.Pool) -> None:
    rng = random.Random(12)
    cases = [("G1234", 1998, 654321), ("V2V00", 2030, 1), ("Z9Z9Z", 2099, 999_999), ("A0000", 2000, 100)]
    alphabet = string.ascii_uppercase + string.digits
    for _ in range(3000):  # every check character comes up: 37 values, ~80 times each
        facility = rng.choice(string.ascii_uppercase) + "".join(rng.choices(alphabet, k=4))
        cases.append((facility, rng.randint(1990, 2200), rng.randint(1, 999_999)))
    made = await ordering.fetch(
        """SELECT coi_of(f, y, s) AS coi
           FROM unnest($1::text[], $2::int[], $3::int[]) WITH ORDINALITY AS t (f, y, s, n) ORDER BY n""",
        *map(list, zip(*cases, strict=True)),
    )
    assert [r["coi"] for r in made] == [make_coi(*c) for c in cases]
    assert made[0]["coi"] == "G123498654321H"  # the ISBT 128 example
    assert {r["coi"][-1] for r in made} == set(ALPHABET)
    for facility, seq in [("g1234", 1), ("G123", 1), ("G1234", 0), ("G1234", 1_000_000)]:
        with pytest.raises(asyncpg.RaiseError):  # refused as make_coi refuses them
            await ordering.fetchval("SELECT coi_of($1, 2030, $2)", facility, seq)


async def test_a_placing_waits_for_the_counter_only_once_every_check_passed(
    ordering: asyncpg.Pool, uow: UnitOfWork[OrderTx]
) -> None:
    """The counter's row lock serialises the placings of a year: it is taken with the order's insert,
    after the checks, so a refused order never waits for it; an accepted one takes the next number once
    the holder ends."""
    await place_order(uow, command(patient_ref="PAT-FIRST"), FACILITY, now=NOW)
    async with ordering.acquire() as holder, holder.transaction():
        await holder.execute("SELECT last_value FROM coi_sequences WHERE year = $1 FOR UPDATE", NOW.year)
        refused = command(patient_ref="PAT-REFUSED", requested_apheresis_date=NOW.date() - timedelta(days=1))
        with pytest.raises(Invalid):  # the calendar's check, made in the service after the intake read
            await asyncio.wait_for(place_order(uow, refused, FACILITY, now=NOW), timeout=10)
        placing = asyncio.create_task(place_order(uow, command(patient_ref="PAT-SECOND"), FACILITY, now=NOW))
        await asyncio.sleep(0.5)
        assert not placing.done()  # waiting for the counter
    order_id = await asyncio.wait_for(placing, timeout=10)
    async with uow.read() as tx:
        order = await tx.orders.get(order_id)
    assert order is not None and order.coi == make_coi(FACILITY, NOW.year, 2)
    assert await ordering.fetchval("SELECT last_value FROM coi_sequences") == 2


async def test_from_the_counter_to_commit_a_placing_makes_three_round_trips(
    ordering: asyncpg.Pool, uow: UnitOfWork[OrderTx], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a placing sends once the COI counter is taken (every other placing of the year waits for
    it): the outbox event, the audit trail's append carrying the timeline entry, COMMIT."""
    await place_order(uow, command(patient_ref="PAT-WARM"), FACILITY, now=NOW)  # the year's row exists
    sent: list[str] = []
    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        method = getattr(asyncpg.Connection, name)

        async def recorded(conn: Any, query: str, *args: object, _method: Any = method) -> Any:
            sent.append(" ".join(query.split()))
            return await _method(conn, query, *args)

        monkeypatch.setattr(asyncpg.Connection, name, recorded)
    order_id = await place_order(uow, command(patient_ref="PAT-COUNTED"), FACILITY, now=NOW)
    monkeypatch.undo()

    [counter] = [i for i, q in enumerate(sent) if "coi_sequences" in q]
    assert sent[counter].startswith("WITH step AS") and "INSERT INTO orders" in sent[counter]
    after = sent[counter + 1 :]
    assert len(after) == 3, after
    assert "INSERT INTO outbox" in after[0]
    assert "INSERT INTO order_timeline" in after[1] and "audit_append(" in after[1]
    assert after[2].startswith("COMMIT")
    assert len(sent) == counter + 4 and counter == 2  # before it: BEGIN and the intake's read
    async with uow.read() as tx:
        [entry] = await tx.timeline.of(order_id)
    assert entry.event_type == "order.submitted.v1"
