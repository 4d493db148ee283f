"""The order service's edge against the real `ordering` schema: one open order per centre, patient and
product is kept by a partial unique index (two racing requests make one order, one COI, one event; the
loser is 409 `open-order-exists`), open duplicates from before the rule do not stop the migration, the
tenant filters are SQL, and an action's note is stored in `ordering.order_timeline` only — its event
carries the reason code.

The HTTP API runs in-process (httpx ASGI transport) with bearer tokens (`TestTokens`) over the service's
Postgres unit of work, with the order service's own database role.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

import order_service
from order_service.adapters import repository
from order_service.adapters.repository import OrderTx
from order_service.config import OrderSettings
from order_service.domain.order import TERMINAL
from order_service.entrypoints.api import router
from order_service.service_layer.commands import PlaceOrder, load_reference_data, place_order
from order_service.service_layer.handlers import handlers
from v2v_audit.http import audited_router
from v2v_audit.service import migrate as audit_migrate
from v2v_contracts import BookingConfirmedV1, SiteApproval, SiteRegisteredV1, SlotReservedV1, new_event
from v2v_contracts.coi import make_coi
from v2v_contracts.errors import Conflict
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool
from v2v_servicekit.problems import PROBLEM_BASE
from v2v_servicekit.problems import install as install_problems
from v2v_servicekit.testing import TestTokens

pytestmark = pytest.mark.integration

ORDER_MIGRATIONS = Path(order_service.__file__).parent / "migrations"
EDGE_MIGRATION = "0006.ordering-edge"
PLACEMENT_MIGRATION = "0007.ordering-placement-key"
AT_RISK_MIGRATION = "0008.ordering-material-at-risk"
TREATMENT_MIGRATION = "0009.ordering-treatment-gates"  # issue 11
COI_MIGRATION = "0010.ordering-coi-function"  # the latest (issue 12)
TOPIC = "it.order-edge.v2v.order"  # never published to here: only the outbox rows are checked
FACILITY = "V2V00"
PARIS, BERLIN = "TC-FR-PA-001", "TC-DE-BE-001"
SOON = datetime.now(UTC).date() + timedelta(days=12)
MARKER = "CANARY-c0ffee42"


async def register_network(uow: UnitOfWork[OrderTx]) -> None:
    site = SiteRegisteredV1(
        site_id="FR-LES-ULIS",
        name="FR-LES-ULIS",
        country="FR",
        region="europe",
        timezone="Europe/Paris",
        operator="own",
        active=True,
        approvals=[
            SiteApproval(regulator="EMA", use="commercial", product_code=p)  # type: ignore[arg-type]
            for p in ("TISA-CEL", "AXI-CEL")
        ],
        daily_capacity={"TISA-CEL": 1, "AXI-CEL": 1},
    )
    async with uow.begin() as tx:
        assert await handlers.dispatch(tx, new_event(site, subject=site.site_id))


@pytest.fixture
async def pool(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[asyncpg.Pool]:
    url = test_db.urls["order"]
    owner_url = test_db.owner_urls["order"]  # migrations run as the owner
    applied = await apply_migrations(owner_url, "ordering", [MIGRATIONS_DIR, ORDER_MIGRATIONS])
    assert EDGE_MIGRATION in applied and AT_RISK_MIGRATION in applied and applied[-1] == COI_MIGRATION
    await audit_migrate(owner_url, "ordering")  # the audit trail (v2v_audit), as the service applies it
    p = await create_pool(url, max_size=6)
    uow = UnitOfWork(p, TOPIC, notify_channel("ordering"), repository.tx_factory)
    await load_reference_data(uow)
    await register_network(uow)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def uow(pool: asyncpg.Pool) -> UnitOfWork[OrderTx]:
    return UnitOfWork(pool, TOPIC, notify_channel("ordering"), repository.tx_factory)


@pytest.fixture
async def api(uow: UnitOfWork[OrderTx]) -> AsyncIterator[tuple[httpx.AsyncClient, TestTokens]]:
    app = FastAPI()
    install_problems(app)
    app.include_router(audited_router(router))  # as the service does (v2v_audit.service.audited)
    app.state.runtime = SimpleNamespace(uow=uow, settings=OrderSettings())
    tokens = TestTokens.install(app)

    async def idempotency_key(request: httpx.Request) -> None:  # POST /v1/orders requires one
        if request.method == "POST":
            request.headers.setdefault("Idempotency-Key", str(uuid.uuid4()))

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://order",
        event_hooks={"request": [idempotency_key]},
    ) as http:
        yield http, tokens


def command(**overrides: Any) -> PlaceOrder:
    fields: dict[str, Any] = {
        "treatment_center_id": PARIS,
        "product_code": "TISA-CEL",
        "order_type": "commercial",
        "patient_ref": "PAT-EDGE-0001",
        "requested_apheresis_date": SOON,
    }
    fields.update(overrides)
    return PlaceOrder(**fields)


def order_body(**overrides: Any) -> dict[str, Any]:
    return {
        "product_code": "TISA-CEL",
        "order_type": "commercial",
        "patient_ref": "PAT-EDGE-0001",
        "requested_apheresis_date": SOON.isoformat(),
        **overrides,
    }


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    return {
        t: int(await pool.fetchval(f"SELECT count(*) FROM {t}"))
        for t in ("orders", "order_timeline", "outbox")
    }


# ---- one open order per centre, patient and product ----------------------------------------------------


async def test_the_index_counts_exactly_the_terminal_statuses_of_the_state_machine(
    pool: asyncpg.Pool,
) -> None:
    definition = await pool.fetchval(
        "SELECT pg_get_indexdef('orders_one_open_per_patient_product'::regclass)"
    )
    assert "UNIQUE" in definition and "(treatment_center_id, patient_ref, product_code)" in definition
    assert sorted(s.value for s in TERMINAL) == sorted(
        q.strip("'") for q in definition.split("ARRAY[")[1].split("]")[0].replace("::text", "").split(", ")
    )


async def test_two_racing_placements_make_one_order_one_coi_one_event(
    pool: asyncpg.Pool, uow: UnitOfWork[OrderTx]
) -> None:
    results = await asyncio.gather(
        *(place_order(uow, command(patient_ref="PAT-RACE"), FACILITY) for _ in range(2)),
        return_exceptions=True,
    )
    placed = [r for r in results if isinstance(r, uuid.UUID)]
    refused = [r for r in results if isinstance(r, Conflict)]
    assert len(placed) == 1 and len(refused) == 1, results
    assert refused[0].kind == "open-order-exists" and "PAT-RACE" not in refused[0].detail
    assert await counts(pool) == {"orders": 1, "order_timeline": 1, "outbox": 1}
    # the COI sequence moved once: the loser's transaction was rolled back entirely
    assert await pool.fetchval("SELECT last_value FROM coi_sequences") == 1


async def test_two_racing_posts_are_one_201_and_one_409(
    pool: asyncpg.Pool, api: tuple[httpx.AsyncClient, TestTokens]
) -> None:
    http, tokens = api
    headers = tokens.headers("centre", PARIS)
    responses = await asyncio.gather(
        *(
            http.post("/v1/orders", json=order_body(patient_ref="PAT-RACE-API"), headers=headers)
            for _ in range(2)
        )
    )
    assert sorted(r.status_code for r in responses) == [201, 409], [r.text for r in responses]
    [conflict] = [r for r in responses if r.status_code == 409]
    assert conflict.json()["type"] == PROBLEM_BASE + "open-order-exists"
    assert "PAT-RACE-API" not in conflict.text
    assert await counts(pool) == {"orders": 1, "order_timeline": 1, "outbox": 1}

    # ended orders do not count: cancel it and the centre may order again for the patient
    [created] = [r.json() for r in responses if r.status_code == 201]
    resp = await http.post(
        f"/v1/orders/{created['order_id']}/cancel",
        json={"reason_code": "physician_decision"},
        headers=headers,
    )
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    resp = await http.post("/v1/orders", json=order_body(patient_ref="PAT-RACE-API"), headers=headers)
    assert resp.status_code == 201


async def test_a_retry_whose_first_answer_was_lost_gets_the_order_its_key_placed(
    pool: asyncpg.Pool, api: tuple[httpx.AsyncClient, TestTokens]
) -> None:
    """The first attempt committed the order, but its Idempotency-Key's answer was never stored (the
    database went away between the two; this app has no edge middleware, so nothing is stored): the retry
    with the same key is answered with that order, not `409 open-order-exists`."""
    http, tokens = api
    headers = {**tokens.headers("centre", PARIS), "Idempotency-Key": "k-answer-lost"}
    body = order_body(patient_ref="PAT-LOST-ANSWER")
    first = await http.post("/v1/orders", json=body, headers=headers)
    assert first.status_code == 201, first.text
    again = await http.post("/v1/orders", json=body, headers=headers)
    assert again.status_code == 201, again.text
    assert again.json()["order_id"] == first.json()["order_id"]
    assert await counts(pool) == {"orders": 1, "order_timeline": 1, "outbox": 1}
    assert await pool.fetchval("SELECT last_value FROM coi_sequences") == 1  # the retry took no number
    # the same key for another request is refused, naming the key, never echoing the body
    other = {**body, "requested_apheresis_date": (SOON + timedelta(days=1)).isoformat()}
    refused = await http.post("/v1/orders", json=other, headers=headers)
    assert refused.status_code == 422 and "Idempotency-Key" in refused.text, refused.text
    assert "PAT-LOST-ANSWER" not in refused.text
    # another key for the same patient and product: one open order, as before
    conflict = await http.post(
        "/v1/orders", json=body, headers={**tokens.headers("centre", PARIS), "Idempotency-Key": "k-other"}
    )
    assert conflict.status_code == 409 and conflict.json()["type"] == PROBLEM_BASE + "open-order-exists"
    assert await counts(pool) == {"orders": 1, "order_timeline": 1, "outbox": 1}
    placed = await pool.fetchrow("SELECT placed_by, placement_key FROM orders")
    assert placed is not None and placed["placement_key"] == "k-answer-lost" and placed["placed_by"]


async def test_open_duplicates_from_before_the_rule_do_not_stop_the_migration(
    test_db: pytest_plugin.TestDatabase, tmp_path: Path
) -> None:
    before_rule = tmp_path / "before"
    before_rule.mkdir()
    for sql in sorted(ORDER_MIGRATIONS.glob("*.sql")):
        if sql.name < "0006":  # the schema as it was before the rule (and what came after it)
            shutil.copy(sql, before_rule / sql.name)
    url = test_db.urls["order"]
    owner_url = test_db.owner_urls["order"]  # migrations run as the owner
    await apply_migrations(owner_url, "ordering", [MIGRATIONS_DIR, before_rule])
    await audit_migrate(owner_url, "ordering")
    pool = await create_pool(url, max_size=2)
    try:
        uow = UnitOfWork(pool, TOPIC, notify_channel("ordering"), repository.tx_factory)
        await load_reference_data(uow)
        await register_network(uow)
        # two open orders for one patient and product, as the service wrote them before the rule
        older, newer, ended = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        for n, (order_id, status) in enumerate(
            [(older, "submitted"), (newer, "slot_reserved"), (ended, "failed")]
        ):
            await pool.execute(
                """INSERT INTO orders (order_id, coi, treatment_center_id, product_code, order_type,
                                       patient_ref, requested_apheresis_date, status, created_at)
                   VALUES ($1, $2, $3, 'TISA-CEL', 'commercial', 'PAT-OLD', $4, $5,
                           now() + $6 * interval '1 s')""",
                order_id,
                make_coi("T0000", 20, n + 1),  # not a COI this service issues today
                PARIS,
                SOON,
                status,
                n,
            )

        assert await apply_migrations(owner_url, "ordering", [MIGRATIONS_DIR, ORDER_MIGRATIONS]) == [
            EDGE_MIGRATION,
            PLACEMENT_MIGRATION,
            AT_RISK_MIGRATION,
            TREATMENT_MIGRATION,
            COI_MIGRATION,
        ]
        marked = await pool.fetch("SELECT order_id FROM orders WHERE predates_open_order_rule")
        assert [r["order_id"] for r in marked] == [newer]  # the oldest open one is the one the rule keeps
        with pytest.raises(Conflict):
            await place_order(uow, command(patient_ref="PAT-OLD"), FACILITY)
        assert {r["order_id"] for r in await pool.fetch("SELECT order_id FROM orders")} == {
            older,
            newer,
            ended,
        }
    finally:
        await pool.close()


# ---- tenancy in SQL ---------------------------------------------------------------------------------


async def test_a_centre_reads_lists_and_acts_on_its_own_orders_only(
    pool: asyncpg.Pool, api: tuple[httpx.AsyncClient, TestTokens]
) -> None:
    http, tokens = api
    paris, berlin = tokens.headers("centre", PARIS), tokens.headers("centre", BERLIN)
    mine = (await http.post("/v1/orders", json=order_body(patient_ref="PAT-P"), headers=paris)).json()
    theirs = (await http.post("/v1/orders", json=order_body(patient_ref="PAT-B"), headers=berlin)).json()
    assert mine["treatment_center_id"] == PARIS and theirs["treatment_center_id"] == BERLIN

    assert (await http.get(f"/v1/orders/{theirs['order_id']}", headers=paris)).status_code == 404
    before = await counts(pool)
    resp = await http.post(
        f"/v1/orders/{theirs['order_id']}/cancel", json={"reason_code": "other"}, headers=paris
    )
    assert resp.status_code == 404
    assert await counts(pool) == before
    assert await pool.fetchval(
        "SELECT status FROM orders WHERE order_id = $1", uuid.UUID(theirs["order_id"])
    ) == ("submitted")

    async def listed(headers: dict[str, str], **params: Any) -> list[str]:
        resp = await http.get("/v1/orders", headers=headers, params=params)
        assert resp.status_code == 200
        return [o["order_id"] for o in resp.json()["items"]]

    assert await listed(paris) == [mine["order_id"]]
    assert await listed(paris, treatment_center_id=BERLIN) == []
    assert await listed(tokens.headers("qa")) == [mine["order_id"], theirs["order_id"]]
    assert await listed(tokens.headers("ops"), treatment_center_id=BERLIN) == [theirs["order_id"]]


# ---- notes stay in `ordering` ------------------------------------------------------------------------


async def test_a_note_is_stored_on_the_timeline_and_the_event_carries_the_code(
    pool: asyncpg.Pool, api: tuple[httpx.AsyncClient, TestTokens]
) -> None:
    http, tokens = api
    headers = tokens.headers("centre", PARIS)
    order = (
        await http.post("/v1/orders", json=order_body(patient_ref=f"PAT-{MARKER}"), headers=headers)
    ).json()
    note = f"{MARKER}: patient chose hospice care"
    resp = await http.post(
        f"/v1/orders/{order['order_id']}/cancel",
        json={"reason_code": "patient_ineligible", "note": note},
        headers=headers,
    )
    assert resp.status_code == 200, resp.text

    stored = await pool.fetch("SELECT event_type, reason, note FROM order_timeline WHERE note IS NOT NULL")
    assert [dict(r) for r in stored] == [
        {
            "event_type": "order.cancelled.v1",
            "reason": "cancelled by the centre: patient_ineligible",
            "note": note,
        }
    ]
    events = await pool.fetch("SELECT event_type, payload, headers FROM outbox ORDER BY id")
    assert [e["event_type"] for e in events] == ["order.submitted.v1", "order.cancelled.v1"]
    assert json.loads(bytes(events[1]["payload"]))["data"]["reason"] == "patient_ineligible"
    for e in events:
        assert MARKER.encode() not in bytes(e["payload"]) and MARKER not in json.dumps(e["headers"])
    assert (
        await pool.fetchval("SELECT ended_reason FROM orders")
        == "cancelled by the centre: patient_ineligible"
    )


# ---- the audit trail, over Postgres -----------------------------------------------------------------


async def test_the_audit_trail_of_an_order_is_its_centres_and_qas_to_read(
    pool: asyncpg.Pool, api: tuple[httpx.AsyncClient, TestTokens]
) -> None:
    """Entries written by the requests themselves (the caller as actor) in `ordering.audit_trail`, read
    back page by page; another centre's order is 404."""
    http, tokens = api
    paris = tokens.headers("centre", PARIS)
    order = (await http.post("/v1/orders", json=order_body(patient_ref="PAT-AUDIT"), headers=paris)).json()
    oid = order["order_id"]
    resp = await http.post(f"/v1/orders/{oid}/cancel", json={"reason_code": "other"}, headers=paris)
    assert resp.status_code == 200, resp.text

    resp = await http.get(f"/v1/orders/{oid}/audit", headers=tokens.headers("qa"))
    assert resp.status_code == 200, resp.text
    page = resp.json()
    assert [(e["action"], e["reason"]) for e in page["items"]] == [
        ("order.placed", None),
        ("order.cancel", "other"),
    ]
    assert all(e["actor"]["entity_id"] == PARIS and e["actor"]["kind"] == "centre" for e in page["items"])
    assert page["items"][1]["prev_hash"] == page["items"][0]["entry_hash"]
    assert page["total"] == 2 and page["next_offset"] is None
    second = (await http.get(f"/v1/orders/{oid}/audit", headers=paris, params={"offset": 1})).json()
    assert second["items"] == page["items"][1:] and second["total"] == 2
    other = await http.get(f"/v1/orders/{oid}/audit", headers=tokens.headers("centre", BERLIN))
    assert other.status_code == 404
    rows = await pool.fetchval(
        "SELECT count(*) FROM audit_trail WHERE object_type = 'order' AND object_id = $1", oid
    )
    assert rows == 2


# ---- the answer to a placement, and facts parked until the order admits them ---------------------------


async def test_the_answer_to_a_placement_is_what_reading_the_order_gives_right_after(
    api: tuple[httpx.AsyncClient, TestTokens],
) -> None:
    http, tokens = api
    for headers in (tokens.headers("centre", PARIS), tokens.headers("centre", BERLIN)):
        placed = await http.post("/v1/orders", json=order_body(patient_ref="PAT-VIEW"), headers=headers)
        assert placed.status_code == 201, placed.text
        read = await http.get(placed.headers["Location"], headers=headers)
        assert read.status_code == 200 and read.json() == placed.json()
        assert placed.json()["timeline"] and placed.json()["status"] == "submitted"
        as_qa = await http.get(placed.headers["Location"], headers=tokens.headers("qa"))
        assert as_qa.json() == placed.json()


async def _placed(uow: UnitOfWork[OrderTx], patient: str) -> Any:
    order_id = await place_order(uow, command(patient_ref=patient), FACILITY)
    async with uow.read() as tx:
        return await tx.orders.get(order_id)


def _slot_facts(order: Any) -> tuple[Any, Any]:
    slot = uuid.uuid4()
    reserved = SlotReservedV1(
        **order.ref(),
        slot_id=slot,
        site_id="FR-LES-ULIS",
        product_code=order.product_code,
        order_type="commercial",
        apheresis_date=SOON,
        manufacturing_start_date=SOON + timedelta(days=2),
    )
    confirmed = BookingConfirmedV1(
        **order.ref(),
        booking_id=uuid.uuid4(),
        slot_id=slot,
        site_id="FR-LES-ULIS",
        product_code=order.product_code,
        manufacturing_start_date=SOON + timedelta(days=2),
        apheresis_date=SOON,
    )
    return new_event(reserved), new_event(confirmed)


async def _status_and_parked(pool: asyncpg.Pool, order_id: uuid.UUID) -> tuple[str, int]:
    status = await pool.fetchval("SELECT status FROM orders WHERE order_id = $1", order_id)
    parked = await pool.fetchval("SELECT count(*) FROM parked_facts WHERE order_id = $1", order_id)
    return status, int(parked)


async def test_a_fact_parked_in_postgres_applies_when_the_fact_it_follows_arrives(
    pool: asyncpg.Pool, uow: UnitOfWork[OrderTx]
) -> None:
    order = await _placed(uow, "PAT-PARKED")
    reserved, confirmed = _slot_facts(order)
    async with uow.begin() as tx:
        assert await handlers.dispatch(tx, confirmed)
    assert await _status_and_parked(pool, order.order_id) == ("submitted", 1)
    async with uow.begin() as tx:
        assert await handlers.dispatch(tx, reserved)
    assert await _status_and_parked(pool, order.order_id) == ("booking_confirmed", 0)


async def test_a_fact_parked_while_the_next_one_waits_for_the_order_is_applied_by_it(
    pool: asyncpg.Pool, uow: UnitOfWork[OrderTx]
) -> None:
    """Two consumers (replicas, or topics) at once: one parks a fact while holding the order; the other,
    waiting for the order meanwhile, applies the fact it follows and then the parked one (it sees what
    the first committed, though its wait began before)."""
    order = await _placed(uow, "PAT-PARKED-RACE")
    reserved, confirmed = _slot_facts(order)
    first = await uow.start()
    try:
        assert await handlers.dispatch(first.tx, confirmed)  # parked; the order stays locked
        second = asyncio.create_task(_dispatch(uow, reserved))
        await asyncio.sleep(0.5)
        assert not second.done()  # waiting for the order
    except BaseException:
        await first.rollback()
        raise
    await first.commit()
    await asyncio.wait_for(second, timeout=10)
    assert await _status_and_parked(pool, order.order_id) == ("booking_confirmed", 0)


async def _dispatch(uow: UnitOfWork[OrderTx], event: Any) -> None:
    async with uow.begin() as tx:
        assert await handlers.dispatch(tx, event)
