"""Issue 10 on the real `ordering` schema (the order service's own database role): material at risk held
for QA's signed disposition, the physician's signed decision on an OOS product, the 48 h
authority-notification task, a DIN per collection and the lot checked at receipt and infusion; every
signature stored in `signatures`, bound to its decision (a decision changed afterwards, even by the
schema's owner, shows unsigned); migration 0008 turns a product quarantined before it into held material.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import order_service
from order_service.adapters import repository
from order_service.adapters.repository import OrderTx
from order_service.domain.coi import make_coi
from order_service.service_layer import commands, queries
from order_service.service_layer.commands import Action, PlaceOrder, act, load_reference_data, place_order
from order_service.service_layer.handlers import handlers
from v2v_audit.service import migrate as audit_migrate
from v2v_audit.store import of_objects
from v2v_contracts import (
    MaterialRejectedV1,
    ProductOutOfSpecificationV1,
    ProductReleasedV1,
    SiteApproval,
    SiteRegisteredV1,
    new_event,
)
from v2v_contracts.coi import coi_problem
from v2v_contracts.errors import CoiMismatch, Invalid
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool
from v2v_servicekit.auth import Principal
from v2v_servicekit.idempotency import MIGRATIONS_DIR as SERVICEKIT_MIGRATIONS
from v2v_servicekit.signatures import SignatureUnauthenticated, Signer

pytestmark = pytest.mark.integration

ORDER_MIGRATIONS = Path(order_service.__file__).parent / "migrations"
TOPIC = "it.order-at-risk.v2v.order"  # never published to here: only the outbox rows are checked
FACILITY = "V2V00"
US = "TC-US-NJ-001"
SOON = datetime.now(UTC).date() + timedelta(days=12)


async def register(uow: UnitOfWork[OrderTx]) -> None:
    site = SiteRegisteredV1(
        site_id="US-MORRIS-PLAINS",
        name="US-MORRIS-PLAINS",
        country="US",
        region="north_america",
        timezone="America/New_York",
        operator="own",
        active=True,
        approvals=[SiteApproval(regulator="FDA", use="commercial", product_code="TISA-CEL")],  # type: ignore[arg-type]
        daily_capacity={"TISA-CEL": 2},
    )
    async with uow.begin() as tx:
        assert await handlers.dispatch(tx, new_event(site, subject=site.site_id))


async def prepare(owner_url: str, url: str, migrations: Path = ORDER_MIGRATIONS) -> asyncpg.Pool:
    await apply_migrations(owner_url, "ordering", [MIGRATIONS_DIR, SERVICEKIT_MIGRATIONS, migrations])
    await audit_migrate(owner_url, "ordering")
    return await create_pool(url, max_size=4)


@pytest.fixture
async def uow(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[UnitOfWork[OrderTx]]:
    pool = await prepare(test_db.owner_urls["order"], test_db.urls["order"])
    uow = UnitOfWork(pool, TOPIC, notify_channel("ordering"), repository.tx_factory)
    await load_reference_data(uow)
    await register(uow)
    try:
        yield uow
    finally:
        await pool.close()


def signer(meaning: str, *, user: str, roles: tuple[str, ...], org: tuple[str, str], client: str) -> Signer:
    now = datetime.now(UTC)
    principal = Principal(client, org[0] if org[0] == "centre" else "qa", org[1], frozenset())
    return Signer(
        user_id=user,
        name=f"Printed {user}",
        roles=frozenset(roles),
        org_kind=org[0],
        org_id=org[1],
        meaning=meaning,
        client_id=client,
        principal=principal,
        auth_time=now,
        token_id=str(uuid.uuid4()),
        issuer="https://issuer.test",
        expires_at=now + timedelta(minutes=2),
    )


def qa() -> Signer:
    return signer(
        "disposition", user="qa.mp", roles=("qa_reviewer",), org=("site", "US-MORRIS-PLAINS"), client="qa"
    )


def physician(meaning: str = "physician-acceptance") -> Signer:
    return signer(meaning, user="dr.nj", roles=("physician",), org=("centre", US), client="centre-us")


async def place(uow: UnitOfWork[OrderTx], patient: str = "PAT-AR-1") -> uuid.UUID:
    cmd = PlaceOrder(
        treatment_center_id=US,
        product_code="TISA-CEL",
        order_type="commercial",
        patient_ref=patient,
        requested_apheresis_date=SOON,
    )
    return await place_order(uow, cmd, FACILITY)


async def deliver(uow: UnitOfWork[OrderTx], data: Any) -> None:
    async with uow.begin() as tx:
        assert await handlers.dispatch(tx, new_event(data))


async def put(uow: UnitOfWork[OrderTx], order_id: uuid.UUID, status: str, **fields: Any) -> Any:
    async with uow.begin() as tx:
        await tx.orders.update(order_id, status=status, **fields)
        order = await tx.orders.get(order_id)
    assert order is not None
    return order


async def outbox(pool: asyncpg.Pool, order_id: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
    rows = await pool.fetch("SELECT event_type, payload FROM outbox ORDER BY id")
    events = [(r["event_type"], json.loads(bytes(r["payload"]))) for r in rows]
    return [(t, e["data"]) for t, e in events if e.get("subject") == str(order_id)]


async def one_read_is_the_separate_reads(uow: UnitOfWork[OrderTx], order_id: uuid.UUID) -> Any:
    """`orders.history` (the view's one statement) reads what the repositories read one by one."""
    async with uow.read() as tx:
        found = await tx.orders.history(order_id)
        order = await tx.orders.get(order_id)
        assert found is not None and order is not None and found.order == order
        centre = await tx.catalogue.centre(order.treatment_center_id, certified_only=False)
        assert centre is not None and found.region == centre.region
        assert found.timeline == await tx.timeline.of(order_id)
        assert found.collections == await tx.collections.of(order_id)
        assert found.materials == await tx.materials.of_order(order_id)
        assert found.tasks == await tx.tasks.of_order(order_id)
        assert found.decisions == await tx.decisions.of_order(order_id)
    return found


async def test_oos_physician_acceptance_lot_checks_and_the_notification_task_on_postgres(
    uow: UnitOfWork[OrderTx],
) -> None:
    pool = uow.pool  # type: ignore[attr-defined]
    oid = await place(uow)
    order = await put(uow, oid, "qc_pending", site_id="US-MORRIS-PLAINS")
    await deliver(
        uow,
        ProductOutOfSpecificationV1(
            **order.ref(), site_id="US-MORRIS-PLAINS", run=1, reason="viability", retained_material=True
        ),
    )
    await act(
        uow,
        oid,
        Action(
            "disposition",
            outcome="release_on_physician_request",
            reason_code="no_alternative_treatment",
            document_reference="QA-RA-3",
            signer=qa(),
        ),
    )
    await act(
        uow,
        oid,
        Action("physician", accept=True, reason_code="benefit_outweighs_risk", signer=physician()),
        centre=US,
    )
    row = await pool.fetchrow("SELECT status, expanded_access, at_risk FROM orders WHERE order_id = $1", oid)
    assert (row["status"], row["expanded_access"], row["at_risk"]) == ("qc_pending", True, None)
    await deliver(
        uow,
        ProductReleasedV1(
            **order.ref(),
            site_id="US-MORRIS-PLAINS",
            run=1,
            released_at=datetime.now(UTC),
            lot="LOT-NJ-0042",  # type: ignore[call-arg]  # the site's field (issue 10, [site])
        ),
    )
    await put(uow, oid, "product_delivered")
    with pytest.raises(Invalid):
        await act(uow, oid, Action("receipt", coi=order.coi), centre=US)
    with pytest.raises(CoiMismatch):
        await act(uow, oid, Action("receipt", coi=order.coi, lot="LOT-NJ-0043"), centre=US)
    await act(uow, oid, Action("receipt", coi=order.coi, lot="LOT-NJ-0042"), centre=US)
    # issue 11: LD names the order's indication; started 8 days ago, the infusion 50 h ago is in its window
    ld_at = datetime.now(UTC) - timedelta(days=8)
    await act(uow, oid, Action("lymphodepletion", indication="dlbcl", at=ld_at), centre=US)
    infused = datetime.now(UTC) - timedelta(hours=50)
    await act(uow, oid, Action("infusion", coi=order.coi, lot="LOT-NJ-0042", at=infused), centre=US)

    events = await outbox(pool, oid)
    types = [t for t, _ in events]
    assert types.count("order.coi_mismatch_detected.v1") == 1
    assert "order.physician_decision_requested.v1" in types and types[-1] == "order.completed.v1"
    [decided] = [d for t, d in events if t == "order.disposition_decided.v1"]
    assert (decided["outcome"], decided["reason"], decided["document_reference"]) == (
        "release_on_physician_request",
        "no_alternative_treatment",
        "QA-RA-3",
    )
    # the task fell due 48 h after the infusion, and is overdue now (the infusion was 50 h ago)
    tasks, total = await queries.tasks_page(uow, state=None, overdue_at=datetime.now(UTC), limit=10, offset=0)
    assert total == 1 and tasks[0].due_at == infused + timedelta(hours=48)
    await commands.complete_task(uow, tasks[0].task_id, by="qa", reference="FDA-3500A-1")
    tasks, total = await queries.tasks_page(uow, state="open", overdue_at=None, limit=10, offset=0)
    assert total == 0
    # two signed decisions, their signatures in `signatures`, each bound to its decision
    view = await queries.order_view(uow, oid)
    assert [(d.meaning, d.signed) for d in view.decisions] == [
        ("disposition", True),
        ("physician-acceptance", True),
    ]
    stored = await pool.fetch("SELECT meaning, signer_user_id FROM signatures ORDER BY signed_at")
    assert [(r["meaning"], r["signer_user_id"]) for r in stored] == [
        ("disposition", "qa.mp"),
        ("physician-acceptance", "dr.nj"),
    ]
    trail, _ = await of_objects(pool, "ordering", [("order", str(oid))], limit=100, offset=0)
    actions = [r.action for r in trail]
    assert {"order.disposition.signed", "order.physician.signed", "task.opened", "task.due"} <= set(actions)
    assert {"task.completed", "order.receipt.refused"} <= set(actions)
    found = await one_read_is_the_separate_reads(uow, oid)
    assert len(found.tasks) == 1 and len(found.decisions) == 2 and len(found.timeline) > 5


async def test_a_decision_changed_after_signing_shows_unsigned(
    uow: UnitOfWork[OrderTx], test_db: pytest_plugin.TestDatabase
) -> None:
    oid = await place(uow)
    order = await put(uow, oid, "qc_pending", site_id="US-MORRIS-PLAINS")
    await deliver(
        uow,
        ProductOutOfSpecificationV1(
            **order.ref(), site_id="US-MORRIS-PLAINS", run=1, reason="potency", retained_material=True
        ),
    )
    await act(
        uow,
        oid,
        Action(
            "disposition",
            outcome="reject",
            reason_code="confirmed_out_of_specification",
            document_reference="QA-9",
            signer=qa(),
        ),
    )
    [decision] = (await queries.order_view(uow, oid)).decisions
    assert decision.signed
    owner = await asyncpg.connect(test_db.owner_urls["order"], server_settings={"search_path": "ordering"})
    try:  # as the schema's owner: the runtime role could do the same to this table
        await owner.execute(
            """UPDATE signed_decisions SET fields = jsonb_set(fields, '{outcome}', '"release"')
               WHERE decision_id = $1""",
            decision.decision_id,
        )
    finally:
        await owner.close()
    [changed] = (await queries.order_view(uow, oid)).decisions
    assert not changed.signed and changed.signatures == []


async def test_a_signed_cancellation_and_two_dins_under_one_coi(uow: UnitOfWork[OrderTx]) -> None:
    pool = uow.pool  # type: ignore[attr-defined]
    oid = await place(uow, "PAT-AR-2")
    order = await put(uow, oid, "inbound_shipment_planned", site_id="US-MORRIS-PLAINS")
    await act(uow, oid, Action("apheresis", coi=order.coi), centre=US, facility_id=FACILITY)
    await deliver(uow, MaterialRejectedV1(**order.ref(), site_id="US-MORRIS-PLAINS", reason="other"))
    await act(
        uow,
        oid,
        Action(
            "disposition",
            outcome="reject",
            reason_code="insufficient_data",
            document_reference="Q",
            signer=qa(),
        ),
    )
    await put(uow, oid, "inbound_shipment_planned")
    await act(uow, oid, Action("apheresis", coi=order.coi), centre=US, facility_id=FACILITY)
    dins = await pool.fetch("SELECT collection, din FROM collections WHERE order_id = $1 ORDER BY 1", oid)
    assert [r["collection"] for r in dins] == [1, 2]
    assert len({r["din"] for r in dins} | {order.coi}) == 3
    assert all(coi_problem(r["din"]) is None for r in dins)
    # cancelling once manufacture started: refused without a signature (audited), done with one
    await put(uow, oid, "manufacturing")
    with pytest.raises(SignatureUnauthenticated):
        await act(uow, oid, Action("cancel", reason_code="consent_withdrawn"), centre=US)
    await act(
        uow,
        oid,
        Action("cancel", reason_code="consent_withdrawn", signer=physician("cancellation")),
        centre=US,
    )
    assert await pool.fetchval("SELECT status FROM orders WHERE order_id = $1", oid) == "cancelled"
    trail, _ = await of_objects(pool, "ordering", [("order", str(oid))], limit=100, offset=0)
    assert [r.reason for r in trail if r.action == "order.cancel.refused"] == ["signature-required"]
    found = await one_read_is_the_separate_reads(uow, oid)
    assert len(found.collections) == 2 and len(found.decisions) == 2


async def test_a_product_quarantined_before_the_workflow_is_held_material_after_it(
    test_db: pytest_plugin.TestDatabase, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for sql in sorted(ORDER_MIGRATIONS.glob("*.sql")):
        if sql.name < "0008":
            shutil.copy(sql, before / sql.name)
    pool = await prepare(test_db.owner_urls["order"], test_db.urls["order"], before)
    try:
        uow = UnitOfWork(pool, TOPIC, notify_channel("ordering"), repository.tx_factory)
        await load_reference_data(uow)
        await register(uow)
        # an order as the schema before 0008 holds it (today's code writes columns added since: 0009)
        oid = uuid.uuid4()
        await pool.execute(
            """INSERT INTO orders (order_id, coi, treatment_center_id, product_code, order_type, patient_ref,
                                   requested_apheresis_date, status, status_before_quarantine, site_id)
               VALUES ($1, $2, $3, 'TISA-CEL', 'commercial', 'PAT-AR-OLD', $4, 'quarantined',
                       'product_in_transit', 'US-MORRIS-PLAINS')""",
            oid,
            make_coi("T0000", 20, 1),
            US,
            SOON,
        )
        await prepare(test_db.owner_urls["order"], test_db.urls["order"])
        async with uow.read() as tx:
            order = await tx.orders.get(oid)
        assert order is not None and order.status == "material_at_risk"
        assert order.state().at_risk is not None and order.state().at_risk.leg == "outbound_product"  # type: ignore[union-attr]
        await act(
            uow,
            oid,
            Action(
                "disposition",
                outcome="release",
                reason_code="within_stability_data",
                document_reference="QA-OLD",
                signer=qa(),
            ),
        )
        assert (
            await pool.fetchval("SELECT status FROM orders WHERE order_id = $1", oid) == "product_in_transit"
        )
    finally:
        await pool.close()
