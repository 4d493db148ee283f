"""The site's part of the lifecycle against the real `site` schema (messaging + site migrations, seed
loaded) with the site service's own database role: registry changes and their effect on bookings, the
booking handlers, the MES commands and the order's compensations. Every state change is checked with
the events it wrote to the outbox in the same transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

import site_service
from site_service.adapters.repository import SiteTx, site_tx
from site_service.entrypoints import api as site_api
from site_service.service_layer import commands, handlers, queries
from v2v_audit.service import migrate as audit_migrate
from v2v_contracts import (
    ApheresisCompletedV1,
    EventData,
    OrderCancelledV1,
    OrderFailedV1,
    OrderSubmittedV1,
    SiteApproval,
    SlotReleasedV1,
    SlotReservedV1,
    new_event,
)
from v2v_contracts.coi import make_coi
from v2v_contracts.errors import DomainError
from v2v_contracts.events import DispositionDecidedV1
from v2v_contracts.fields import lot_problem
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool, schema_of
from v2v_servicekit import current_runtime, edge, problems, signatures
from v2v_servicekit.auth import Principal
from v2v_servicekit.idempotency import MIGRATIONS_DIR as EDGE_MIGRATIONS
from v2v_servicekit.problems import status_of
from v2v_servicekit.signatures import SignatureTokenUses, Signer, check_record
from v2v_servicekit.testing import TestTokens

pytestmark = pytest.mark.integration

SITE_MIGRATIONS = Path(site_service.__file__).parent / "migrations"
TOPIC = "t.v2v.site"  # never published to here: only the outbox rows are checked
SITE = "FR-LES-ULIS"  # Novartis: TISA-CEL 3/day
TWO_PRODUCT_SITE = "US-MORRIS-PLAINS"  # Novartis: TISA-CEL 6/day and CILTA-CEL 2/day (a CMO for Janssen)
KITE_SITE = "NL-HOOFDDORP"  # Kite: AXI-CEL (issue 11: axi-cel is made at Kite's plants only)
OTHER_SITE = "CH-STEIN"
CENTRE = "TC-FR-PA-001"
DAY = date(2031, 5, 12)
TODAY = date(2031, 5, 1)
NOW = datetime(2031, 5, 20, 9, 30, tzinfo=UTC)
_seq = iter(range(1, 999_999))


@pytest.fixture
async def pool(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    url = test_db.urls["site"]
    owner_url = test_db.owner_urls["site"]  # migrations run as the owner
    await apply_migrations(
        owner_url, "site", [MIGRATIONS_DIR, EDGE_MIGRATIONS, SITE_MIGRATIONS]
    )  # as create_app
    await audit_migrate(owner_url, "site")  # the audit trail (v2v_audit), as the service applies it
    pool = await create_pool(url, max_size=4)
    assert await schema_of(pool) == "site"
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def uow(pool: asyncpg.Pool) -> UnitOfWork[SiteTx]:
    uow = UnitOfWork(pool, TOPIC, notify_channel("site"), site_tx)
    assert await commands.load_seed(uow) == 13
    return uow


# ---- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
def outbox(pool: asyncpg.Pool) -> Any:
    """Read the outbox rows written since the last call: [(type, data), ...]."""
    seen = {"id": 0}

    async def new_rows() -> list[tuple[str, dict[str, Any]]]:
        rows = await pool.fetch("SELECT * FROM outbox WHERE id > $1 ORDER BY id", seen["id"])
        if rows:
            seen["id"] = rows[-1]["id"]
        out = []
        for row in rows:
            assert row["topic"] == TOPIC
            event = json.loads(bytes(row["payload"]))
            assert event["type"] == row["event_type"]
            out.append((row["event_type"], event["data"]))
        return out

    return new_rows


async def handle(uow: UnitOfWork[SiteTx], data: EventData) -> None:
    async with uow.begin() as tx:
        assert await handlers.handlers.dispatch(tx, new_event(data))


def new_order() -> tuple[uuid.UUID, str]:
    return uuid.uuid4(), make_coi("V2V00", 31, next(_seq))


async def reserve(
    uow: UnitOfWork,
    *,
    order: tuple[uuid.UUID, str] | None = None,
    site_id: str = SITE,
    day: date = DAY,
    product: str = "TISA-CEL",
) -> dict[str, Any]:
    order_id, coi = order or new_order()
    slot = SlotReservedV1(
        order_id=order_id,
        coi=coi,
        treatment_center_id=CENTRE,
        slot_id=uuid.uuid4(),
        site_id=site_id,
        product_code=product,
        order_type="commercial",
        apheresis_date=day - timedelta(days=2),
        manufacturing_start_date=day,
    )
    await handle(uow, slot)
    if order is None:  # the bag is collected (no DIN: unchecked) before any receipt
        await handle(
            uow,
            ApheresisCompletedV1(order_id=order_id, coi=coi, treatment_center_id=CENTRE, collected_at=NOW),
        )
    return {"order_id": order_id, "coi": coi, "slot_id": slot.slot_id, "site_id": site_id, "slot": slot}


async def booking(pool: asyncpg.Pool, slot_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM bookings WHERE slot_id = $1", slot_id)
    assert row is not None
    return row


async def receive(uow: UnitOfWork, b: dict[str, Any], **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"order_id": b["order_id"], "coi": b["coi"], "accepted": True, "now": NOW}
    args.update(kw)
    return await commands.record_receipt(uow, b["site_id"], **args)


async def steps(uow: UnitOfWork, b: dict[str, Any], names: list[str]) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for name in names:
        view = await commands.record_step(uow, b["site_id"], b["order_id"], step=name, now=NOW)
    return view


ALL_STEPS = ["activation", "transduction", "expansion", "harvest", "cryopreservation"]
RESULTS = {"viability_pct": 91.5, "car_positive_pct": 28.0, "vcn_per_cell": 1.8, "sterility": "negative"}


async def submitted(uow: UnitOfWork, b: dict[str, Any], regulator: str = "EMA", country: str = "FR") -> None:
    """`order.submitted` as the site consumes it: the order's market."""
    await handle(
        uow,
        OrderSubmittedV1(
            order_id=b["order_id"], coi=b["coi"], treatment_center_id=CENTRE, product_code="TISA-CEL",
            order_type="commercial", regulator=regulator, country=country, region="europe",
            requested_apheresis_date=DAY,
        ),
    )  # fmt: skip


async def passed(uow: UnitOfWork, b: dict[str, Any], coa: str = "COA-31-0001") -> dict[str, Any]:
    return await commands.record_qc(
        uow, b["site_id"], b["order_id"], disposition="passed", results=RESULTS, coa_reference=coa, now=NOW
    )


def signer(meaning: str, org_id: str, *, role: str = "qualified_person", client_id: str = "qa-x") -> Signer:
    """A verified signer, as `require_signature` yields it (the verification: servicekit's tests, and
    `test_http_signed_release` below)."""
    return Signer(
        user_id=f"{'qp' if role == 'qualified_person' else 'qu'}.{org_id.lower()}",
        name=f"Test Signer {org_id}",
        roles=frozenset({role}),
        org_kind="site",
        org_id=org_id,
        meaning=meaning,
        client_id=client_id,
        principal=Principal(client_id, "qa", None, frozenset({"qc:release"})),
        auth_time=NOW,
        token_id=str(uuid.uuid4()),
        issuer="https://issuer.test",
        expires_at=NOW + timedelta(minutes=2),
    )


async def released(uow: UnitOfWork, b: dict[str, Any]) -> dict[str, Any]:
    """QC passed and the QP of the (EU, in-market) site certified: the lot is released."""
    await submitted(uow, b)
    await passed(uow, b)
    return await commands.sign_release(uow, b["site_id"], b["order_id"], signer("qp-certification", SITE))


def problem_of(excinfo: pytest.ExceptionInfo[DomainError]) -> tuple[int, str]:
    p = excinfo.value
    assert p.errors, p.detail
    return status_of(p), p.errors[0].field


# ---- the registry ------------------------------------------------------------------------------------


async def test_seed_reload_keeps_api_changes_and_outages(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    await outbox()
    await commands.update_site(uow, SITE, daily_capacity={"TISA-CEL": 1}, active=False, today=TODAY)
    await commands.add_outage(uow, SITE, start_date=DAY, end_date=DAY, reason="maintenance", today=TODAY)
    assert [t for t, _ in await outbox()] == ["site.registered.v1"] * 2

    assert await commands.load_seed(uow) == 0  # nothing the seed says is new: no event
    assert await outbox() == []
    site = await queries.get_site(uow, SITE)
    assert site["daily_capacity"] == {"TISA-CEL": 1}
    assert site["active"] is False
    assert [o["reason"] for o in site["outages"]] == ["maintenance"]


async def test_patch_capacity_and_active_republishes_the_site(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    await outbox()
    # CILTA-CEL: Novartis (Les Ulis' manufacturer) is a declared contract manufacturer of it (issue 11)
    out = await commands.update_site(uow, SITE, daily_capacity={"CILTA-CEL": 5}, today=TODAY)
    assert out["daily_capacity"] == {"TISA-CEL": 3, "CILTA-CEL": 5}
    assert out["affected_booking_ids"] == []
    [(kind, data)] = await outbox()
    assert kind == "site.registered.v1"
    assert data["site_id"] == SITE and data["daily_capacity"] == {"TISA-CEL": 3, "CILTA-CEL": 5}
    assert data["manufacturer"] == out["manufacturer"] == "novartis"
    assert data["outages"] == []

    out = await commands.update_site(uow, SITE, active=False, today=TODAY)
    assert out["active"] is False
    [(kind, data)] = await outbox()
    assert data["active"] is False

    await commands.update_site(uow, SITE, active=False, today=TODAY)  # no change: nothing published
    assert await outbox() == []


async def test_patch_approvals_replaces_them_republishes_and_survives_a_seed_reload(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    await outbox()
    approvals = [
        SiteApproval(regulator="EMA", use="commercial", product_code="TISA-CEL"),
        SiteApproval(regulator="TGA", use="clinical", product_code="CILTA-CEL"),
    ]
    out = await commands.update_site(uow, SITE, approvals=approvals, today=TODAY)
    assert [(a["regulator"], a["use"], a["product_code"]) for a in out["approvals"]] == [
        ("EMA", "commercial", "TISA-CEL"),
        ("TGA", "clinical", "CILTA-CEL"),
    ]
    [(kind, data)] = await outbox()
    assert kind == "site.registered.v1" and data["approvals"] == [a.model_dump() for a in approvals]
    assert await commands.load_seed(uow) == 0  # the registry's approvals win over the seed file
    site = await queries.get_site(uow, SITE)
    assert [a["regulator"] for a in site["approvals"]] == ["EMA", "TGA"]
    with pytest.raises(DomainError) as exc:
        await commands.update_site(
            uow, SITE, approvals=[SiteApproval(regulator="EMA", use="clinical", product_code="NOPE")]
        )
    assert problem_of(exc) == (422, "approvals.0.product_code")


@pytest.mark.parametrize(
    ("capacity", "field"),
    [({"NOT-A-PRODUCT": 1}, "daily_capacity.NOT-A-PRODUCT"), ({"TISA-CEL": -1}, "daily_capacity.TISA-CEL")],
    ids=["unknown-product", "negative"],
)
async def test_patch_refuses_bad_capacity_naming_the_field(
    uow: UnitOfWork, outbox: Any, capacity: dict[str, int], field: str
) -> None:
    await outbox()
    with pytest.raises(DomainError) as exc:
        await commands.update_site(uow, SITE, daily_capacity=capacity)
    assert problem_of(exc) == (422, field)
    assert await outbox() == []


async def test_unknown_site_is_404(pool: asyncpg.Pool, uow: UnitOfWork) -> None:
    for call in (
        commands.update_site(uow, "XX-NOWHERE", active=False),
        commands.add_outage(uow, "XX-NOWHERE", start_date=DAY, end_date=DAY, reason="other", today=TODAY),
        queries.get_site(uow, "XX-NOWHERE"),
        queries.get_manufacturing(uow, "XX-NOWHERE", uuid.uuid4()),
        commands.record_step(uow, "XX-NOWHERE", uuid.uuid4(), step="activation"),
    ):
        with pytest.raises(DomainError) as exc:
            await call
        assert status_of(exc.value) == 404


async def test_capacity_cut_affects_the_latest_bookings_beyond_capacity(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    first, second, third = [await reserve(uow, site_id=TWO_PRODUCT_SITE) for _ in range(3)]
    other_day = await reserve(uow, site_id=TWO_PRODUCT_SITE, day=DAY + timedelta(days=1))
    other_product = await reserve(uow, site_id=TWO_PRODUCT_SITE, product="CILTA-CEL")
    past = await reserve(uow, site_id=TWO_PRODUCT_SITE, day=TODAY - timedelta(days=1))
    await outbox()

    out = await commands.update_site(uow, TWO_PRODUCT_SITE, daily_capacity={"TISA-CEL": 1}, today=TODAY)

    affected = {(await booking(pool, b["slot_id"]))["booking_id"] for b in (second, third)}
    assert set(out["affected_booking_ids"]) == affected
    events = await outbox()
    assert [t for t, _ in events] == ["site.registered.v1"] + ["site.booking_affected.v1"] * 2
    for _, data in events[1:]:
        assert data["reason"] == "capacity_cut"
        assert data["site_id"] == TWO_PRODUCT_SITE
        assert data["treatment_center_id"] == CENTRE
    assert {d["order_id"] for _, d in events[1:]} == {str(second["order_id"]), str(third["order_id"])}
    for b, status in [
        (first, "confirmed"),
        (second, "affected"),
        (third, "affected"),
        (other_day, "confirmed"),
        (other_product, "confirmed"),
        (past, "confirmed"),
    ]:
        assert (await booking(pool, b["slot_id"]))["status"] == status

    # cutting to zero moves every TISA-CEL booking left from today on, never one already affected
    await commands.update_site(uow, TWO_PRODUCT_SITE, daily_capacity={"TISA-CEL": 0}, today=TODAY)
    events = await outbox()
    assert [t for t, _ in events] == ["site.registered.v1"] + ["site.booking_affected.v1"] * 2
    assert {d["order_id"] for _, d in events[1:]} == {str(first["order_id"]), str(other_day["order_id"])}
    assert (await booking(pool, past["slot_id"]))["status"] == "confirmed"

    # raising it again affects nothing
    out = await commands.update_site(uow, TWO_PRODUCT_SITE, daily_capacity={"TISA-CEL": 3}, today=TODAY)
    assert out["affected_booking_ids"] == []
    assert [t for t, _ in await outbox()] == ["site.registered.v1"]


async def test_a_capacity_cut_never_moves_material_already_received(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    early, late = await reserve(uow), await reserve(uow)
    await receive(uow, late)
    await outbox()

    out = await commands.update_site(uow, SITE, daily_capacity={"TISA-CEL": 1}, today=TODAY)

    early_booking = await booking(pool, early["slot_id"])
    assert out["affected_booking_ids"] == [early_booking["booking_id"]]
    assert early_booking["status"] == "affected"
    assert (await booking(pool, late["slot_id"]))["status"] == "confirmed"


async def test_an_outage_affects_confirmed_bookings_in_its_window(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    before = await reserve(uow, day=DAY - timedelta(days=1))
    inside = await reserve(uow, day=DAY)
    last_day = await reserve(uow, day=DAY + timedelta(days=2))
    received = await reserve(uow, day=DAY + timedelta(days=1))
    await receive(uow, received)
    elsewhere = await reserve(uow, site_id=OTHER_SITE, day=DAY)
    await outbox()

    out = await commands.add_outage(
        uow, SITE, start_date=DAY, end_date=DAY + timedelta(days=2), reason="maintenance", today=TODAY
    )

    assert isinstance(out["outage_id"], uuid.UUID)
    events = await outbox()
    kinds = [t for t, _ in events]
    assert kinds == ["site.registered.v1"] + ["site.booking_affected.v1"] * 3
    # issue 11: the order whose material is at the site already is reported (not moved): its centre is told
    *events, (_, at_site) = events
    assert (at_site["order_id"], at_site["material_at_site"], at_site["run"], at_site["state"]) == (
        str(received["order_id"]),
        True,
        1,
        "material_received",
    )
    assert len(out["material_at_site_booking_ids"]) == 1
    registered = events[0][1]
    assert registered["outages"] == [
        {
            "outage_id": str(out["outage_id"]),
            "start_date": DAY.isoformat(),
            "end_date": (DAY + timedelta(days=2)).isoformat(),
            "reason": "maintenance",
        }
    ]
    assert [d["order_id"] for _, d in events[1:]] == [str(inside["order_id"]), str(last_day["order_id"])]
    assert {d["reason"] for _, d in events[1:]} == {"outage:maintenance"}
    assert len(out["affected_booking_ids"]) == 2
    for b, status in [
        (before, "confirmed"),
        (inside, "affected"),
        (last_day, "affected"),
        (received, "confirmed"),
        (elsewhere, "confirmed"),
    ]:
        assert (await booking(pool, b["slot_id"]))["status"] == status


async def test_an_outage_must_end_on_or_after_its_start(uow: UnitOfWork, outbox: Any) -> None:
    await outbox()
    with pytest.raises(DomainError) as exc:
        await commands.add_outage(
            uow, SITE, start_date=DAY, end_date=DAY - timedelta(days=1), reason="other", today=TODAY
        )
    assert problem_of(exc) == (422, "end_date")
    assert await outbox() == []


async def test_a_failure_after_the_registry_change_leaves_nothing(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await reserve(uow)
    await outbox()

    async def broken(*_a: Any, **_k: Any) -> list[uuid.UUID]:
        raise RuntimeError("affect failed")

    monkeypatch.setattr(commands, "affect_bookings", broken)
    with pytest.raises(RuntimeError):
        await commands.add_outage(uow, SITE, start_date=DAY, end_date=DAY, reason="other", today=TODAY)
    assert await outbox() == []
    assert (await queries.get_site(uow, SITE))["outages"] == []


# ---- bookings ----------------------------------------------------------------------------------------


async def test_each_slot_gets_its_own_booking_and_a_released_slot_cancels_it(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    await outbox()
    first = await reserve(uow)
    again = await reserve(uow, order=(first["order_id"], first["coi"]), day=DAY + timedelta(days=7))
    events = await outbox()
    assert [t for t, _ in events] == ["site.booking_confirmed.v1"] * 2
    assert events[0][1]["booking_id"] != events[1][1]["booking_id"]
    await handle(uow, first["slot"])  # the same slot again: nothing new
    assert await outbox() == []
    count = await pool.fetchval("SELECT count(*) FROM bookings WHERE order_id = $1", first["order_id"])
    assert count == 2

    release = SlotReleasedV1(
        order_id=first["order_id"],
        coi=first["coi"],
        treatment_center_id=CENTRE,
        slot_id=first["slot_id"],
        site_id=SITE,
        reason="rebook:reschedule",
    )
    await handle(uow, release)
    [(kind, data)] = await outbox()
    assert kind == "site.booking_cancelled.v1"
    assert data["slot_id"] == str(first["slot_id"])
    assert data["booking_id"] == events[0][1]["booking_id"]
    assert data["reason"] == "rebook:reschedule"
    assert (await booking(pool, first["slot_id"]))["status"] == "cancelled"
    assert (await booking(pool, again["slot_id"]))["status"] == "confirmed"

    await handle(uow, release)  # already cancelled
    await handle(uow, release.model_copy(update={"slot_id": uuid.uuid4()}))  # no such booking
    assert await outbox() == []


async def test_an_affected_booking_is_cancelled_when_its_slot_is_released(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    b = await reserve(uow)
    await commands.add_outage(uow, SITE, start_date=DAY, end_date=DAY, reason="utilities", today=TODAY)
    await outbox()
    await handle(
        uow,
        SlotReleasedV1(
            order_id=b["order_id"],
            coi=b["coi"],
            treatment_center_id=CENTRE,
            slot_id=b["slot_id"],
            site_id=SITE,
            reason="rebook:site_outage",
        ),
    )
    assert [t for t, _ in await outbox()] == ["site.booking_cancelled.v1"]
    assert (await booking(pool, b["slot_id"]))["status"] == "cancelled"


async def test_a_slot_reserved_into_a_declared_outage_is_confirmed_then_affected(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    await commands.add_outage(uow, SITE, start_date=DAY, end_date=DAY, reason="utilities", today=TODAY)
    await outbox()
    b = await reserve(uow)
    events = await outbox()
    assert [t for t, _ in events] == ["site.booking_confirmed.v1", "site.booking_affected.v1"]
    assert events[1][1]["reason"] == "outage:utilities"
    assert (await booking(pool, b["slot_id"]))["status"] == "affected"


# ---- MES: receipt ------------------------------------------------------------------------------------


async def test_receipt_accepted_starts_run_one(pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any) -> None:
    b = await reserve(uow)
    view = await queries.get_manufacturing(uow, SITE, b["order_id"])
    assert (view["state"], view["run"]) == ("awaiting_material", 0)
    await outbox()

    view = await receive(uow, b, received_at=NOW)

    assert (view["state"], view["run"], view["next_step"]) == ("material_received", 1, "activation")
    [(kind, data)] = await outbox()
    assert kind == "site.material_received.v1"
    assert data == {
        "order_id": str(b["order_id"]),
        "coi": b["coi"],
        "treatment_center_id": CENTRE,
        "site_id": SITE,
        "received_at": NOW.isoformat().replace("+00:00", "Z"),
        "lot": view["lot"],  # run 1's lot (issue 10)
        "din": None,
    }
    assert lot_problem(view["lot"]) is None
    assert await receive(uow, b) == view  # the same receipt again: nothing new
    assert await outbox() == []
    with pytest.raises(DomainError) as exc:
        await receive(uow, b, accepted=False, reason="damaged_container")
    assert status_of(exc.value) == 409


async def test_receipt_refused_holds_the_material_with_its_reason_until_qa_decides(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    b = await reserve(uow)
    await outbox()
    with pytest.raises(DomainError) as exc:
        await receive(uow, b, accepted=False)
    assert problem_of(exc) == (422, "reason")

    with pytest.raises(DomainError) as exc:
        await receive(uow, b, accepted=False, reason="bag damaged in transit")  # free text
    assert problem_of(exc) == (422, "reason")

    view = await receive(uow, b, accepted=False, reason="damaged_container", reference="DEV-31-0042")

    assert view["state"] == "held_at_receipt"  # held until QA decides (issue 10)
    [(kind, data)] = await outbox()
    assert kind == "site.material_rejected.v1"
    assert data["reason"] == "damaged_container"
    assert [(h["reason"], h["reference"]) for h in view["history"]] == [("damaged_container", "DEV-31-0042")]
    with pytest.raises(DomainError) as exc:
        await commands.record_step(uow, SITE, b["order_id"], step="activation")
    assert problem_of(exc) == (409, "step")
    with pytest.raises(DomainError) as exc:
        await receive(uow, b)  # held: the MES cannot accept it on its own
    assert problem_of(exc) == (409, "accepted")

    await handle(
        uow,
        DispositionDecidedV1(
            order_id=b["order_id"], coi=b["coi"], treatment_center_id=CENTRE, cause="receipt",
            outcome="release", site_id=SITE, reason="container_intact_on_review",
            document_reference="QA-ASSESS-7",
        ),
    )  # fmt: skip
    view = await queries.get_manufacturing(uow, SITE, b["order_id"])
    assert (view["state"], view["run"]) == ("material_received", 1)
    [(kind, data)] = await outbox()
    assert (kind, data["lot"]) == ("site.material_received.v1", view["lot"])
    assert view["history"][-1]["action"] == "disposition"
    assert view["history"][-1]["lot"] == view["lot"]


async def test_receipt_checks_the_din_of_the_latest_collection(uow: UnitOfWork, outbox: Any) -> None:
    b = await reserve(uow)
    din = make_coi("DIN01", 31, next(_seq))
    await handle(
        uow,
        ApheresisCompletedV1(
            order_id=b["order_id"], coi=b["coi"], treatment_center_id=CENTRE, collected_at=NOW,
            din=din, collection=1,
        ),
    )  # fmt: skip
    await outbox()
    with pytest.raises(DomainError) as exc:
        await receive(uow, b)
    assert problem_of(exc) == (422, "din")
    with pytest.raises(DomainError) as exc:
        await receive(uow, b, din=make_coi("DIN01", 31, next(_seq)))  # another bag
    assert problem_of(exc) == (409, "din") and exc.value.kind == "coi-mismatch"
    [(kind, data)] = await outbox()
    assert (kind, data["mismatched"]) == ("site.coi_mismatch_detected.v1", "din")
    view = await receive(uow, b, din=din)
    assert view["state"] == "material_received"
    [(kind, data)] = await outbox()
    assert (kind, data["din"]) == ("site.material_received.v1", din)


async def test_receipt_checks_the_coi_and_the_booking(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    b = await reserve(uow)
    _, other_coi = new_order()
    await outbox()

    with pytest.raises(DomainError) as exc:
        await receive(uow, b, coi=b["coi"][:-1] + ("A" if b["coi"][-1] != "A" else "B"))
    assert problem_of(exc) == (422, "coi")
    with pytest.raises(DomainError) as exc:
        await receive(uow, b, coi=other_coi)
    assert problem_of(exc) == (409, "coi")
    assert exc.value.kind == "coi-mismatch"
    with pytest.raises(DomainError) as exc:
        await receive(uow, {**b, "site_id": OTHER_SITE})  # booked elsewhere
    assert problem_of(exc) == (409, "order_id")
    with pytest.raises(DomainError) as exc:
        await receive(uow, {**b, "order_id": uuid.uuid4()})
    assert problem_of(exc) == (409, "order_id")

    # the mismatch is refused and alerted (its own committed transaction); nothing else is written
    alerts = await outbox()
    assert [a[0] for a in alerts] == ["site.coi_mismatch_detected.v1"], alerts
    assert await pool.fetchval("SELECT count(*) FROM manufacturing") == 0
    assert (await queries.get_manufacturing(uow, SITE, b["order_id"]))["state"] == "awaiting_material"


# ---- MES: steps and QC -------------------------------------------------------------------------------


async def test_steps_in_order_then_qc_release(pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any) -> None:
    b = await reserve(uow)
    await receive(uow, b)
    await outbox()
    with pytest.raises(DomainError) as exc:
        await commands.record_step(uow, SITE, b["order_id"], step="transduction")
    assert problem_of(exc) == (409, "step")
    with pytest.raises(DomainError) as exc:
        await passed(uow, b)
    assert problem_of(exc) == (409, "disposition")
    with pytest.raises(DomainError) as exc:
        await commands.record_qc(uow, SITE, b["order_id"], disposition="released")
    assert problem_of(exc) == (422, "disposition")  # release is a signed step

    view = await steps(uow, b, ALL_STEPS)
    assert view["state"] == "qc_pending"
    assert view["steps_completed"] == ALL_STEPS
    events = await outbox()
    assert [t for t, _ in events] == ["site.manufacturing_step_completed.v1"] * 5
    assert [(d["step"], d["run"]) for _, d in events] == [(s, 1) for s in ALL_STEPS]

    assert await steps(uow, b, ["harvest"]) == view  # a repeated report: no-op
    assert await outbox() == []

    view = await passed(uow, b)
    assert (view["state"], view["coa_reference"], view["qc_results"]) == ("qc_passed", "COA-31-0001", RESULTS)
    assert await outbox() == []  # nothing ships before the signed release
    assert await passed(uow, b) == view
    await submitted(uow, b)
    view = await commands.sign_release(uow, SITE, b["order_id"], signer("qp-certification", SITE))
    assert view["state"] == "released"
    [(kind, data)] = await outbox()
    assert kind == "site.product_released.v1"
    assert data["run"] == 1 and data["site_id"] == SITE
    assert (data["lot"], data["coa_reference"], data["certification"]) == (
        view["lot"],
        "COA-31-0001",
        "qp_certification",
    )
    # the signature is stored with the lot's record, and still matches it
    [sig] = await pool.fetch("SELECT * FROM signatures WHERE object_id = $1", view["lot"])
    assert (sig["meaning"], sig["signer_user_id"]) == ("qp-certification", "qp.fr-les-ulis")
    async with uow.read() as tx:
        m = await tx.manufacturing.latest(b["order_id"], SITE)
        assert m is not None
        assert (await check_record(pool, queries.lot_record(m), "qp-certification")).signed

    history = view["history"]
    assert [(h["action"], h["step"], h["state_after"]) for h in history] == [
        ("receipt", None, "material_received"),
        *[
            ("step", s, a)
            for s, a in zip(
                ALL_STEPS, ["activation", "transduction", "expansion", "harvest", "qc_pending"], strict=True
            )
        ],
        ("qc", None, "qc_passed"),
        ("signature", None, "qc_passed"),
        ("release", None, "released"),
    ]
    with pytest.raises(asyncpg.RaiseError):  # the history is append-only
        await pool.execute("UPDATE manufacturing_history SET reason = 'edited'")


async def test_qc_needs_a_reason_unless_released(uow: UnitOfWork) -> None:
    b = await reserve(uow)
    await receive(uow, b)
    await steps(uow, b, ALL_STEPS)
    for disposition in ("out_of_specification", "failed"):
        with pytest.raises(DomainError) as exc:
            await commands.record_qc(uow, SITE, b["order_id"], disposition=disposition, reason="  ")
        assert problem_of(exc) == (422, "reason")
        with pytest.raises(DomainError) as exc:
            await commands.record_qc(uow, SITE, b["order_id"], disposition=disposition, reason="CAR+ 8%")
        assert problem_of(exc) == (422, "reason")


async def test_steps_before_receipt_are_refused(pool: asyncpg.Pool, uow: UnitOfWork) -> None:
    b = await reserve(uow)
    with pytest.raises(DomainError) as exc:
        await commands.record_step(uow, SITE, b["order_id"], step="activation")
    assert problem_of(exc) == (409, "order_id")
    with pytest.raises(DomainError) as exc:
        await queries.get_manufacturing(uow, SITE, uuid.uuid4())
    assert status_of(exc.value) == 404


async def test_oos_then_remanufacture_from_retained_material_then_failure(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    b = await reserve(uow, product="TISA-CEL")  # retains material, two runs
    await receive(uow, b)
    await steps(uow, b, ALL_STEPS)
    await outbox()

    await commands.record_qc(uow, SITE, b["order_id"], disposition="out_of_specification", reason="potency")
    [(kind, data)] = await outbox()
    assert kind == "site.product_out_of_specification.v1"
    assert (data["run"], data["retained_material"], data["reason"]) == (1, True, "potency")

    # issue 10: scheduling's slot for the remanufacture at this site starts run 2
    command = b["slot"].model_copy(
        update={"slot_id": uuid.uuid4(), "reason": "remanufacture", "run": 2, "manufacturing_start_date": DAY}
    )
    await handle(uow, command)
    await handle(uow, command)  # the same slot again
    view = await queries.get_manufacturing(uow, SITE, b["order_id"])
    assert (view["state"], view["run"], view["next_step"]) == ("material_received", 2, "activation")
    # booked into the site's plan; nothing published (no material moves): the run starts from retained
    # material
    assert (await booking(pool, command.slot_id))["status"] == "confirmed"
    assert await outbox() == []

    await steps(uow, b, ["activation", "transduction"])
    view = await commands.record_step(
        uow, SITE, b["order_id"], step="expansion", failed=True, reason="insufficient_cell_growth"
    )
    assert (view["state"], view["failed_step"]) == ("failed", "expansion")
    events = await outbox()
    assert [(t, d["step"]) for t, d in events[:2]] == [
        ("site.manufacturing_step_completed.v1", "activation"),
        ("site.manufacturing_step_completed.v1", "transduction"),
    ]
    assert all(d["run"] == 2 for _, d in events)
    kind, data = events[2]
    assert kind == "site.manufacturing_failed.v1"
    assert (data["run"], data["retained_material"]) == (2, False)
    assert data["reason"] == "step_failed:expansion:insufficient_cell_growth"

    await handle(uow, command.model_copy(update={"run": 3}))  # nothing retained: ignored
    assert (await queries.get_manufacturing(uow, SITE, b["order_id"]))["state"] == "failed"
    assert await outbox() == []


async def test_a_failed_step_needs_a_reason_and_a_product_without_retained_material_keeps_none(
    uow: UnitOfWork, outbox: Any
) -> None:
    b = await reserve(uow, site_id=KITE_SITE, product="AXI-CEL")
    await receive(uow, b)
    await outbox()
    with pytest.raises(DomainError) as exc:
        await commands.record_step(uow, KITE_SITE, b["order_id"], step="activation", failed=True)
    assert problem_of(exc) == (422, "reason")
    await commands.record_step(
        uow, KITE_SITE, b["order_id"], step="activation", failed=True, reason="contamination"
    )
    [(kind, data)] = await outbox()
    assert kind == "site.manufacturing_failed.v1"
    assert (data["run"], data["retained_material"]) == (1, False)


# ---- the order's compensations ----------------------------------------------------------------------


async def test_a_cancelled_order_stops_manufacturing_and_cancels_its_booking(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    b = await reserve(uow)
    await receive(uow, b)
    await steps(uow, b, ["activation"])
    await outbox()
    cancelled = OrderCancelledV1(
        order_id=b["order_id"],
        coi=b["coi"],
        treatment_center_id=CENTRE,
        reason="consent_withdrawn",
        previous_status="manufacturing",
    )
    await handle(uow, cancelled)

    events = await outbox()
    assert [t for t, _ in events] == ["site.manufacturing_stopped.v1", "site.booking_cancelled.v1"]
    assert all(d["reason"] == "order_cancelled:consent_withdrawn" for _, d in events)
    assert (
        await pool.fetchval(
            """SELECT count(*) FROM manufacturing_history h JOIN bookings b USING (booking_id)
           WHERE h.reason = 'order_cancelled:consent_withdrawn'
             AND b.status_reason = 'order_cancelled:consent_withdrawn'"""
        )
        == 1
    )
    view = await queries.get_manufacturing(uow, SITE, b["order_id"])
    assert view["state"] == "stopped"
    assert view["history"][-1]["action"] == "stop"
    assert (await booking(pool, b["slot_id"]))["status"] == "cancelled"

    await handle(uow, cancelled)  # idempotent
    await handle(
        uow,
        SlotReleasedV1(
            order_id=b["order_id"],
            coi=b["coi"],
            treatment_center_id=CENTRE,
            slot_id=b["slot_id"],
            site_id=SITE,
            reason="cancelled",
        ),
    )
    assert await outbox() == []
    with pytest.raises(DomainError) as exc:
        await commands.record_step(uow, SITE, b["order_id"], step="transduction")
    assert status_of(exc.value) == 409


async def test_a_failed_order_without_material_only_loses_its_live_bookings(
    pool: asyncpg.Pool, uow: UnitOfWork, outbox: Any
) -> None:
    b = await reserve(uow)
    other = await reserve(uow)
    await commands.add_outage(
        uow, SITE, start_date=DAY, end_date=DAY, reason="utilities", today=TODAY
    )  # both affected
    rebooked = await reserve(uow, order=(b["order_id"], b["coi"]), site_id=OTHER_SITE)
    await outbox()

    await handle(
        uow,
        OrderFailedV1(order_id=b["order_id"], coi=b["coi"], treatment_center_id=CENTRE, reason="no_material"),
    )

    events = await outbox()
    assert [t for t, _ in events] == ["site.booking_cancelled.v1"] * 2  # the affected one and the new one
    assert {d["site_id"] for _, d in events} == {SITE, OTHER_SITE}
    assert (await booking(pool, b["slot_id"]))["status"] == "cancelled"
    assert (await booking(pool, rebooked["slot_id"]))["status"] == "cancelled"
    assert (await booking(pool, other["slot_id"]))["status"] == "affected"


async def test_a_finished_manufacture_is_not_stopped(uow: UnitOfWork, outbox: Any) -> None:
    b = await reserve(uow)
    await receive(uow, b)
    await steps(uow, b, ALL_STEPS)
    await released(uow, b)
    await outbox()
    await handle(
        uow, OrderFailedV1(order_id=b["order_id"], coi=b["coi"], treatment_center_id=CENTRE, reason="x")
    )
    assert [t for t, _ in await outbox()] == ["site.booking_cancelled.v1"]


# ---- the HTTP layer (routes wired to this database, no broker) ---------------------------------------


@pytest.fixture
async def tokens() -> TestTokens:
    return TestTokens()


@pytest.fixture
async def client(pool: asyncpg.Pool, uow: UnitOfWork, tokens: TestTokens) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    problems.install(app)
    app.include_router(site_api.router)
    app.dependency_overrides[current_runtime] = lambda: SimpleNamespace(pool=pool, uow=uow)
    app.state.token_verifier = tokens.verifier()
    signatures.install(app)
    app.state.signature_token_uses = SignatureTokenUses(pool)  # one-time use in Postgres
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://site") as c:
        yield c


async def test_http_registry(client: httpx.AsyncClient, tokens: TestTokens) -> None:
    admin = tokens.headers("admin")
    today = datetime.now(UTC).date()
    soon = today + timedelta(days=10)
    assert (await client.get(f"/v1/sites/{SITE}")).status_code == 401
    r = await client.get(f"/v1/sites/{SITE}", headers=admin)
    assert r.status_code == 200 and r.json()["outages"] == []
    assert (await client.get("/v1/sites/XX-NOWHERE", headers=admin)).status_code == 404
    r = await client.patch(f"/v1/sites/{SITE}", json={"daily_capacity": {"TISA-CEL": 2}}, headers=admin)
    assert r.status_code == 200 and r.json()["daily_capacity"]["TISA-CEL"] == 2
    r = await client.patch(f"/v1/sites/{SITE}", json={"daily_capacity": {"TISA-CEL": -2}}, headers=admin)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["field"] == "daily_capacity.TISA-CEL"
    r = await client.patch(f"/v1/sites/{SITE}", json={"capacity": 3}, headers=admin)
    assert r.status_code == 422
    r = await client.patch(
        f"/v1/sites/{SITE}",
        json={
            "approvals": [{"regulator": "EMA", "use": "commercial", "product_code": "X" * (2 * 1024 * 1024)}]
        },
        headers=admin,
    )
    assert r.status_code == 422 and len(r.content) < 4096
    r = await client.post(
        f"/v1/sites/{SITE}/outages",
        json={"start_date": soon.isoformat(), "end_date": soon.isoformat(), "reason": "utilities"},
        headers=admin,
    )
    assert r.status_code == 201
    assert uuid.UUID(r.json()["outage_id"])
    for body, field in [
        ({"end_date": (soon - timedelta(days=1)).isoformat(), "reason": "other"}, "end_date"),
        ({"end_date": soon.isoformat(), "reason": "power cut"}, "reason"),
        ({"end_date": "9999-12-31", "reason": "other"}, "end_date"),
    ]:
        r = await client.post(
            f"/v1/sites/{SITE}/outages", json={"start_date": soon.isoformat(), **body}, headers=admin
        )
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == field
    r = await client.get(f"/v1/sites/{SITE}", headers=admin)
    assert [o["reason"] for o in r.json()["outages"]] == ["utilities"]  # the refused ones left nothing


async def test_http_tenancy_in_sql(
    pool: asyncpg.Pool, client: httpx.AsyncClient, uow: UnitOfWork, tokens: TestTokens, outbox: Any
) -> None:
    mine = tokens.headers("site", SITE)
    r = await client.get("/v1/sites", headers=mine)
    assert [s["site_id"] for s in r.json()] == [SITE]
    assert len((await client.get("/v1/sites", headers=tokens.headers("qa"))).json()) == 13
    paged = await client.get("/v1/sites", params={"limit": 2, "offset": 12}, headers=tokens.headers("ops"))
    assert len(paged.json()) == 1  # the last page of the thirteen sites
    assert (await client.get(f"/v1/sites/{OTHER_SITE}", headers=mine)).status_code == 404

    b = await reserve(uow, site_id=OTHER_SITE)
    oid = b["order_id"]
    await outbox()
    for path, body in [
        (f"/v1/sites/{OTHER_SITE}/receipts", {"order_id": str(oid), "coi": b["coi"], "accepted": True}),
        (f"/v1/sites/{OTHER_SITE}/manufacturing/{oid}/steps", {"step": "activation"}),
    ]:
        assert (await client.post(path, json=body, headers=mine)).status_code == 404
    r = await client.patch(
        f"/v1/sites/{OTHER_SITE}",
        json={"active": False},
        headers=tokens.headers("site", SITE, scopes=["registry:admin"]),
    )
    assert r.status_code == 404
    assert (await client.get(f"/v1/sites/{OTHER_SITE}/manufacturing/{oid}", headers=mine)).status_code == 404
    assert await outbox() == []
    assert await pool.fetchval("SELECT count(*) FROM manufacturing") == 0
    assert (await queries.get_site(uow, OTHER_SITE))["active"] is True

    theirs = tokens.headers("site", OTHER_SITE)
    r = await client.post(
        f"/v1/sites/{OTHER_SITE}/receipts",
        json={"order_id": str(oid), "coi": b["coi"], "accepted": True},
        headers=theirs,
    )
    assert r.status_code == 200 and r.json()["state"] == "material_received"


async def test_http_mes(client: httpx.AsyncClient, uow: UnitOfWork, tokens: TestTokens) -> None:
    mes, qa = tokens.headers("site", SITE), tokens.headers("qa")
    b = await reserve(uow)
    oid = b["order_id"]
    r = await client.post(
        f"/v1/sites/{SITE}/receipts",
        json={"order_id": str(oid), "coi": "NOPE", "accepted": True},
        headers=mes,
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "coi"
    naive = datetime.now(UTC).replace(tzinfo=None).isoformat()
    r = await client.post(
        f"/v1/sites/{SITE}/receipts",
        json={"order_id": str(oid), "coi": b["coi"], "accepted": True, "received_at": naive},
        headers=mes,
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "received_at"  # needs a time zone
    r = await client.post(
        f"/v1/sites/{SITE}/receipts",
        json={"order_id": str(oid), "coi": b["coi"], "accepted": True, "received_at": "2031-05-20T09:00:00Z"},
        headers=mes,
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "received_at"  # in the future
    r = await client.post(
        f"/v1/sites/{SITE}/receipts",
        json={"order_id": str(oid), "coi": b["coi"], "accepted": True},
        headers=mes,
    )
    assert r.status_code == 200 and r.json()["state"] == "material_received"
    r = await client.post(
        f"/v1/sites/{SITE}/manufacturing/{oid}/steps", json={"step": "formulation"}, headers=mes
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "step"
    r = await client.post(
        f"/v1/sites/{SITE}/manufacturing/{oid}/steps", json={"step": "expansion"}, headers=mes
    )
    assert r.status_code == 409 and r.json()["errors"][0]["field"] == "step"
    completed = (datetime.now(UTC) - timedelta(hours=1)).astimezone(timezone(timedelta(hours=2))).isoformat()
    for step in ALL_STEPS:
        r = await client.post(
            f"/v1/sites/{SITE}/manufacturing/{oid}/steps",
            json={"step": step, "completed_at": completed},
            headers=mes,
        )
        assert r.status_code == 200, r.text
    r = await client.post(
        f"/v1/sites/{SITE}/manufacturing/{oid}/qc", json={"disposition": "failed"}, headers=qa
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "reason"
    r = await client.post(
        f"/v1/sites/{SITE}/manufacturing/{oid}/qc",
        json={"disposition": "failed", "reason": "sterility"},
        headers=mes,
    )
    assert r.status_code == 403  # QC is QA's
    r = await client.post(
        f"/v1/sites/{SITE}/manufacturing/{oid}/qc",
        json={"disposition": "failed", "reason": "sterility"},
        headers=qa,
    )
    assert r.status_code == 200 and r.json()["state"] == "failed"
    r = await client.get(f"/v1/sites/{SITE}/manufacturing/{oid}", headers=mes)
    body = r.json()
    assert (body["state"], body["run"], body["retained_material"]) == ("failed", 1, True)
    assert len(body["history"]) == 7
    assert body["history"][-1]["reason"] == "sterility"


# ---- migrations --------------------------------------------------------------------------------------


async def test_the_reason_code_migration_turns_a_free_text_outage_into_other(
    pool: asyncpg.Pool, uow: UnitOfWork
) -> None:
    """0004 rewrites outages stored before reasons were codes (the published entry must carry a code)."""
    sql = (SITE_MIGRATIONS / "0004.site-reason-codes.sql").read_text()
    rewrite = sql[sql.index("UPDATE sites SET outages") :]
    outages = [
        {"outage_id": str(uuid.uuid4()), "start_date": "2031-01-01", "end_date": "2031-01-02", "reason": r}
        for r in ("cleanroom requalification", "maintenance", "Patient X's spill")
    ]
    await pool.execute("UPDATE sites SET outages = $2::jsonb WHERE site_id = $1", SITE, outages)
    await pool.execute(rewrite)
    stored = await pool.fetchval("SELECT outages FROM sites WHERE site_id = $1", SITE)
    assert [o["reason"] for o in stored] == ["other", "maintenance", "other"]
    assert [o["outage_id"] for o in stored] == [o["outage_id"] for o in outages]
    assert await pool.fetchval("SELECT count(*) FROM sites WHERE outages <> '[]'::jsonb") == 1


# ---- the edge in front of the routes: a retried MES report, an oversized registry change ---------------


@pytest.fixture
async def edge_client(
    pool: asyncpg.Pool, uow: UnitOfWork, tokens: TestTokens
) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    problems.install(app)
    edge.install(app, edge.EdgeConfig(), pool=lambda _app: pool)
    # the routes themselves, not `include_router`: FastAPI 0.165 keeps an included router as one
    # `_IncludedRouter` entry, which the edge does not look into yet (reported to the lead)
    app.router.routes.extend(site_api.router.routes)
    app.state.runtime = SimpleNamespace(pool=pool, uow=uow)
    app.state.token_verifier = tokens.verifier()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://site") as c:
        yield c


async def test_a_retried_mes_report_is_answered_once(
    pool: asyncpg.Pool, edge_client: httpx.AsyncClient, uow: UnitOfWork, tokens: TestTokens, outbox: Any
) -> None:
    b = await reserve(uow)
    await outbox()
    mes = {**tokens.headers("site", SITE), "Idempotency-Key": "mes-receipt-0001"}
    body = {"order_id": str(b["order_id"]), "coi": b["coi"], "accepted": True}
    first = await edge_client.post(f"/v1/sites/{SITE}/receipts", json=body, headers=mes)
    again = await edge_client.post(f"/v1/sites/{SITE}/receipts", json=body, headers=mes)
    assert first.status_code == again.status_code == 200, first.text
    assert again.headers["idempotent-replayed"] == "true" and again.content == first.content
    assert [t for t, _ in await outbox()] == ["site.material_received.v1"]  # one receipt, one event
    other = await edge_client.post(
        f"/v1/sites/{SITE}/receipts", json={**body, "accepted": False, "reason": "other"}, headers=mes
    )
    assert other.status_code == 422  # the same key for another report
    assert await pool.fetchval("SELECT count(*) FROM manufacturing_history") == 1
    assert await pool.fetchval("SELECT client_id FROM idempotency_keys") == "site-fr-les-ulis"


async def test_a_two_megabyte_site_patch_is_refused_at_the_edge_and_the_site_still_publishes(
    edge_client: httpx.AsyncClient, tokens: TestTokens, outbox: Any
) -> None:
    await outbox()
    admin = tokens.headers("admin")
    huge = {"approvals": [{"regulator": "EMA", "use": "commercial", "product_code": "X" * (2 * 1024 * 1024)}]}
    r = await edge_client.patch(f"/v1/sites/{SITE}", json=huge, headers=admin)
    assert r.status_code == 413 and len(r.content) < 4096
    assert await outbox() == []
    r = await edge_client.patch(f"/v1/sites/{SITE}", json={"daily_capacity": {"TISA-CEL": 2}}, headers=admin)
    assert r.status_code == 200
    [(kind, _)] = await outbox()
    assert kind == "site.registered.v1"


# ---- issue 10: the signed release over HTTP, with the signatures and token uses in Postgres -----------


async def test_http_signed_release_of_an_eu_lot_made_in_switzerland(
    pool: asyncpg.Pool, client: httpx.AsyncClient, uow: UnitOfWork, tokens: TestTokens, outbox: Any
) -> None:
    qa = tokens.headers("qa")
    b = await reserve(uow, site_id=OTHER_SITE)  # CH-STEIN: outside the EU
    oid = b["order_id"]
    await submitted(uow, b)
    await receive(uow, b)
    await steps(uow, b, ALL_STEPS)
    r = await client.post(
        f"/v1/sites/{OTHER_SITE}/manufacturing/{oid}/qc", json={"disposition": "released"}, headers=qa
    )
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "disposition"
    assert "signed" in r.json()["errors"][0]["reason"]
    r = await client.post(
        f"/v1/sites/{OTHER_SITE}/manufacturing/{oid}/qc",
        json={"disposition": "passed", "results": RESULTS, "coa_reference": "COA-CH-1"},
        headers=qa,
    )
    assert r.status_code == 200 and r.json()["state"] == "qc_passed", r.text
    await outbox()
    release = f"/v1/sites/{OTHER_SITE}/manufacturing/{oid}/release"
    importing = f"/v1/sites/DE-LEIPZIG-IZI/manufacturing/{oid}/import-certification"

    def qp(site_id: str, role: str = "qualified_person", **kw: Any) -> dict[str, str]:
        kw.setdefault("client_id", "qa-x")
        return tokens.signature_headers(f"qp.{site_id.lower()}", roles=(role,), org_id=site_id, **kw)

    refusals = [
        ({}, 401, "signature-required"),
        (qp("DE-LEIPZIG-IZI", auth_age_s=600), 401, "signature-expired"),
        (qp("DE-LEIPZIG-IZI", role="quality_unit"), 403, "signature-role"),
        (qp(OTHER_SITE), 403, "signature-organisation"),  # the manufacturing site's QP is not the BRS's
        (qp("DE-LEIPZIG-IZI", client_id="site-de-leipzig-izi"), 403, "signature-client"),
    ]
    for headers, status, reason in refusals:
        r = await client.post(release, headers={**qa, **headers})
        assert (r.status_code, r.json()["reason"]) == (status, reason), r.text
    audited = await pool.fetch(
        "SELECT reason, actor_user_id FROM audit_trail WHERE action = 'signature.refused' ORDER BY seq"
    )
    assert [a["reason"] for a in audited] == [reason for _, _, reason in refusals]  # every one audited
    assert await pool.fetchval("SELECT count(*) FROM signatures") == 0
    assert await outbox() == []

    token = qp("DE-LEIPZIG-IZI")
    r = await client.post(release, headers={**qa, **token}, json={"reference": "QP-CERT-0042"})
    assert r.status_code == 200 and r.json()["state"] == "qc_passed", r.text
    r = await client.post(release, headers={**qa, **token})  # the same signing token again
    assert (r.status_code, r.json()["reason"]) == (401, "signature-replayed")
    assert await outbox() == []  # certified but not yet imported: nothing ships
    r = await client.post(importing, headers={**qa, **qp("DE-LEIPZIG-IZI")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "released"
    assert [(x["meaning"], x["signed"]) for x in body["release"]["required"]] == [
        ("qp-certification", True),
        ("import-certification", True),
    ]
    [(kind, data)] = await outbox()
    assert kind == "site.product_released.v1"
    assert (data["certification"], data["import_certified"], data["coa_reference"]) == (
        "qp_certification",
        True,
        "COA-CH-1",
    )
    signed = await pool.fetch(
        "SELECT actor_user_id, actor_client_id FROM audit_trail WHERE action = 'lot.signed' ORDER BY seq"
    )
    assert [(s["actor_user_id"], s["actor_client_id"]) for s in signed] == [("qp.de-leipzig-izi", "qa-x")] * 2
    with pytest.raises(asyncpg.RaiseError):  # signatures cannot be changed
        await pool.execute("UPDATE signatures SET signer_name = 'x'")
