"""Issue 11 on real Postgres (migration 0009): the order's indication and weight stay in the `ordering`
schema (never in an outbox row); LD, its window day and its clearing after a lost product are columns of
the order; on hold and resumed; what an ended order left and the one disposition record per material
(`material_dispositions`, unique per order and material); each step audited."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import order_service
from order_service.adapters import repository
from order_service.adapters.repository import OrderTx
from order_service.service_layer.commands import Action, PlaceOrder, act, load_reference_data, place_order
from order_service.service_layer.handlers import handlers
from v2v_audit.service import migrate as audit_migrate
from v2v_audit.store import of_objects
from v2v_contracts import ShipmentExcursionV1, SiteApproval, SiteRegisteredV1, new_event
from v2v_contracts.errors import Conflict
from v2v_harness import pytest_plugin
from v2v_messaging import MIGRATIONS_DIR, UnitOfWork, notify_channel
from v2v_persistence import apply_migrations, create_pool
from v2v_servicekit.auth import Principal
from v2v_servicekit.idempotency import MIGRATIONS_DIR as SERVICEKIT_MIGRATIONS
from v2v_servicekit.signatures import Signer

pytestmark = pytest.mark.integration

ORDER_MIGRATIONS = Path(order_service.__file__).parent / "migrations"
TOPIC = "it.order-gates.v2v.order"  # never published to here: only the outbox rows are checked
US = "TC-US-NJ-001"
SITE = "US-MORRIS-PLAINS"
SOON = datetime.now(UTC).date() + timedelta(days=12)


@pytest.fixture
async def uow(test_db: pytest_plugin.TestDatabase) -> AsyncIterator[UnitOfWork[OrderTx]]:
    owner_url = test_db.owner_urls["order"]
    await apply_migrations(owner_url, "ordering", [MIGRATIONS_DIR, SERVICEKIT_MIGRATIONS, ORDER_MIGRATIONS])
    await audit_migrate(owner_url, "ordering")
    pool = await create_pool(test_db.urls["order"], max_size=4)
    uow = UnitOfWork(pool, TOPIC, notify_channel("ordering"), repository.tx_factory)
    await load_reference_data(uow)
    site = SiteRegisteredV1(
        site_id=SITE,
        name=SITE,
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
    try:
        yield uow
    finally:
        await pool.close()


def qa() -> Signer:
    now = datetime.now(UTC)
    return Signer(
        user_id="qa.mp",
        name="Printed qa.mp",
        roles=frozenset({"qa_reviewer"}),
        org_kind="site",
        org_id=SITE,
        meaning="disposition",
        client_id="qa",
        principal=Principal("qa", "qa", None, frozenset()),
        auth_time=now,
        token_id=str(uuid.uuid4()),
        issuer="https://issuer.test",
        expires_at=now + timedelta(minutes=2),
    )


async def place(uow: UnitOfWork[OrderTx], patient: str, **kw: Any) -> uuid.UUID:
    cmd = PlaceOrder(
        treatment_center_id=US,
        product_code="TISA-CEL",
        order_type="commercial",
        patient_ref=patient,
        requested_apheresis_date=SOON,
        **kw,
    )
    return await place_order(uow, cmd, "V2V00")


async def put(uow: UnitOfWork[OrderTx], order_id: uuid.UUID, status: str, **fields: Any) -> None:
    async with uow.begin() as tx:
        await tx.orders.update(order_id, status=status, **fields)


async def row(uow: UnitOfWork[OrderTx], order_id: uuid.UUID) -> Any:
    async with uow.read() as tx:
        found = await tx.orders.get(order_id)
    assert found is not None
    return found


async def outbox(uow: UnitOfWork[OrderTx], order_id: uuid.UUID) -> list[tuple[str, str]]:
    """The order's outbox rows: event type and the CloudEvent as published (text)."""
    pool = uow.pool  # type: ignore[attr-defined]
    rows = await pool.fetch("SELECT event_type, payload FROM outbox ORDER BY id")
    events = [(r["event_type"], bytes(r["payload"]).decode()) for r in rows]
    return [(t, payload) for t, payload in events if json.loads(payload).get("subject") == str(order_id)]


async def test_clinical_data_lymphodepletion_and_its_clearing_are_columns_of_the_order(
    uow: UnitOfWork[OrderTx],
) -> None:
    oid = await place(uow, "PAT-GATES-1", indication="b_all", weight_kg=38.5)
    order = await row(uow, oid)
    assert (order.indication, order.weight_kg) == ("b_all", 38.5)
    await put(uow, oid, "product_in_transit", site_id=SITE, delivery_confirmed=True)
    started = datetime.now(UTC) - timedelta(days=2)
    await act(uow, oid, Action("lymphodepletion", at=started), centre=US)
    order = await row(uow, oid)
    assert order.lymphodepletion_at == started and order.lymphodepletions == 1
    assert order.lymphodepletion_on is not None
    # an outbound excursion, QA's signed reject: the product is lost after LD (remanufacture: retained)
    async with uow.begin() as tx:
        excursion = ShipmentExcursionV1(
            **order.ref(),
            shipment_id=uuid.uuid4(),
            leg="outbound_product",
            reading_c=-90.0,
            min_c=-196.0,
            max_c=-120.0,
            measured_at=datetime.now(UTC),
        )
        assert await handlers.dispatch(tx, new_event(excursion))
    assert (await row(uow, oid)).status == "material_at_risk"
    action = Action(
        "disposition",
        outcome="reject",
        reason_code="outside_stability_data",
        document_reference="QA-1",
        signer=qa(),
    )
    await act(uow, oid, action)
    lost = await row(uow, oid)
    assert (lost.status, lost.run) == ("material_received", 2)
    assert lost.lymphodepletion_at is None and lost.lymphodepletion_on is None and not lost.delivery_confirmed
    assert lost.lymphodepletions == 1
    events = await outbox(uow, oid)
    assert [t for t, _ in events].count("order.lymphodepletion_cleared.v1") == 1
    assert all("b_all" not in payload and "38.5" not in payload for _, payload in events)
    async with uow.read() as tx:
        assert tx.conn is not None
        trail, _ = await of_objects(tx.conn, "ordering", [("order", str(oid))], limit=100, offset=0)
    cleared = [r for r in trail if r.new and "lymphodepletion_at" in (r.old or {})]
    assert cleared and cleared[-1].old["lymphodepletion_at"] is not None  # the audit keeps the value


async def test_hold_resume_and_one_disposition_per_material_an_ended_order_left(
    uow: UnitOfWork[OrderTx],
) -> None:
    oid = await place(uow, "PAT-GATES-2", indication="dlbcl")
    await put(uow, oid, "qc_pending", site_id=SITE)
    await act(uow, oid, Action("hold", reason_code="payer_pending", note="appeal filed"), centre=US)
    held = await row(uow, oid)
    assert (held.status, held.paused_from, held.hold_reason) == ("on_hold", "qc_pending", "payer_pending")
    await act(uow, oid, Action("resume", reason_code="payer_approved"), centre=US)
    back = await row(uow, oid)
    assert (back.status, back.paused_from, back.hold_reason) == ("qc_pending", None, None)
    await put(uow, oid, "material_received")  # at the site, no step reported: an unsigned cancellation
    await act(uow, oid, Action("cancel", reason_code="patient_deceased"), centre=US)
    ended = await row(uow, oid)
    assert ended.end_material == {"material": "apheresis_material", "location": "site"}
    fate = Action(
        "material",
        material="apheresis_material",
        outcome="destroyed",
        reason_code="patient_deceased",
        by="c-1",
    )
    await act(uow, oid, fate, centre=US)
    with pytest.raises(Conflict):
        await act(uow, oid, fate, centre=US)
    async with uow.read() as tx:
        [record] = await tx.materials.of_order(oid)
        assert tx.conn is not None
        trail, _ = await of_objects(tx.conn, "ordering", [("order", str(oid))], limit=100, offset=0)
    assert (record.material, record.outcome, record.location, record.recorded_by) == (
        "apheresis_material",
        "destroyed",
        "site",
        "c-1",
    )
    actions = [r.action for r in trail]
    for expected in ("order.hold", "order.resume", "order.cancel", "order.material_disposition.recorded"):
        assert expected in actions, expected
    types = [t for t, _ in await outbox(uow, oid)]
    assert {"order.put_on_hold.v1", "order.resumed.v1", "order.material_disposition_recorded.v1"} <= set(
        types
    )
    # the view's one statement reads the disposition record as the repository does
    async with uow.read() as tx:
        found = await tx.orders.history(oid)
        assert found is not None and found.materials == await tx.materials.of_order(oid) == [record]
        assert found.timeline == await tx.timeline.of(oid) and found.order == await tx.orders.get(oid)
