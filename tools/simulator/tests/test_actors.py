"""The actors of one order (hospital, courier, site) against a mocked platform (`httpx.MockTransport`): the
requests they make, in which order, with which simulated times, and what they note in the case file."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx

from v2v_simulator.api import Api
from v2v_simulator.config import Config
from v2v_simulator.orders import OrderActor
from v2v_simulator.plan import Combo, OrderPlan
from v2v_simulator.simulation import Simulator
from v2v_simulator.states import MATERIAL_ON_THE_WAY, STEPS
from v2v_simulator.tracker import Tracker

COMBO = Combo("TC-DE-BE-001", "TISA-CEL", "commercial", ("CH-STEIN", "DE-LEIPZIG-IZI"), "CH-STEIN")
SHIPMENT = {
    "shipment_id": "sh-1",
    "leg": "inbound_apheresis",
    "status": "planned",
    "run": None,
    "origin": "TC-DE-BE-001",
    "destination": "CH-STEIN",
    "min_temp_c": 2.0,
    "max_temp_c": 8.0,
}


class FakePlatform:
    """Answers by (method, path); records every request with its JSON body."""

    def __init__(self, routes: dict[tuple[str, str], Callable[[Any], httpx.Response]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        return self.routes[(request.method, request.url.path)](body)

    def posted(self) -> list[tuple[str, Any]]:
        return [(path, body) for method, path, body in self.requests if method == "POST"]


DAY = (datetime.now(UTC) + timedelta(days=10)).date()  # the booked apheresis day (the clock starts now)


def order_row(status: str = "submitted", **kw: Any) -> dict[str, Any]:
    return {
        "order_id": "o-1",
        "coi": "V2V0026000001X",
        "status": status,
        "run": 1,
        "recollections": 0,
        "site_id": "CH-STEIN",
        "slot": {
            "slot_id": "slot-1",
            "site_id": "CH-STEIN",
            "apheresis_date": DAY.isoformat(),
            "manufacturing_start_date": (DAY + timedelta(days=2)).isoformat(),
        },
        "updated_at": "2026-03-02T09:00:00+00:00",
        **kw,
    }


async def actor_for(platform: FakePlatform, kind: str | None = None, **params: Any) -> OrderActor:
    cfg = Config(orders=1, day_seconds=0.0, stall_s=1.0)
    sim = Simulator(cfg, out=lambda line: None)
    await sim.api.close()
    sim.api = Api(cfg.urls, cfg.concurrency, sim.stats, transport=httpx.MockTransport(platform), backoff_s=0)
    sim.tracker = Tracker(sim.api, cfg.poll_s)
    sim.products = {"TISA-CEL": {"code": "TISA-CEL", "manufacturing_days": 17, "qc_days": 14}}
    plan = OrderPlan(0, "SIM-001-00001", COMBO, date(2026, 3, 10), 0.0, kind, params)
    return OrderActor(sim, plan)


async def placed(platform: FakePlatform, kind: str | None = None, **params: Any) -> OrderActor:
    platform.routes[("POST", "/v1/orders")] = lambda body: httpx.Response(201, json=order_row())
    actor = await actor_for(platform, kind, **params)
    await actor.hospital.place()
    return actor


async def test_the_hospital_places_the_planned_order_and_the_tracker_follows_it() -> None:
    platform = FakePlatform({})
    actor = await placed(platform)
    assert platform.posted() == [
        (
            "/v1/orders",
            {
                "treatment_center_id": "TC-DE-BE-001",
                "product_code": "TISA-CEL",
                "order_type": "commercial",
                "patient_ref": "SIM-001-00001",
                "requested_apheresis_date": "2026-03-10",
            },
        )
    ]
    assert (actor.order_id, actor.coi, actor.result.order_id) == ("o-1", "V2V0026000001X", "o-1")
    assert actor.row["status"] == "submitted" and actor.who == "order #1 o-1"
    await actor.sim.api.close()


async def test_actions_are_stamped_in_order_and_never_go_back() -> None:
    actor = await actor_for(FakePlatform({}))
    start = actor.floor
    first = actor.stamp(start + timedelta(days=2))
    assert first == start + timedelta(days=2)
    assert actor.stamp(start) == first + timedelta(minutes=5)  # an earlier moment: just after the last one
    assert await actor.at(start + timedelta(days=3)) == (start + timedelta(days=3)).isoformat()
    await actor.sim.api.close()


def inbound_routes(platform: FakePlatform) -> None:
    platform.routes[("GET", "/v1/shipments")] = lambda _: httpx.Response(200, json=[SHIPMENT])
    platform.routes[("POST", "/v1/shipments/sh-1/milestones")] = lambda _: httpx.Response(201, json={})
    platform.routes[("POST", "/v1/sites/CH-STEIN/receipts")] = lambda _: httpx.Response(200, json={})
    platform.routes[("POST", "/v1/shipments/sh-1/temperature")] = lambda _: httpx.Response(
        201, json={"excursion_published": True}
    )


async def test_the_inbound_leg_is_scanned_by_the_courier_then_received_by_the_site() -> None:
    platform = FakePlatform({})
    inbound_routes(platform)
    actor = await placed(platform)
    apheresis = actor.sim.clock.at(DAY, 10)
    actor.apheresis_at["slot-1"] = apheresis
    await actor.inbound(order_row("apheresis_completed"))
    posted = platform.posted()[1:]
    assert [(p, b.get("milestone")) for p, b in posted] == [
        ("/v1/shipments/sh-1/milestones", "booked"),
        ("/v1/shipments/sh-1/milestones", "picked_up"),
        ("/v1/shipments/sh-1/milestones", "in_transit"),
        ("/v1/shipments/sh-1/milestones", "delivered"),
        ("/v1/sites/CH-STEIN/receipts", None),
    ]
    booked, picked, transit, delivered, receipt = (b for _, b in posted)
    assert "temperature_c" not in booked and 2.0 <= picked["temperature_c"] <= 8.0
    assert picked["received_from"] == "TC-DE-BE-001" and picked["location"] == "TC-DE-BE-001"
    assert transit["location"] == "HUB" and delivered["location"] == "CH-STEIN"
    times = [b["occurred_at"] for b in (booked, picked, transit, delivered)] + [receipt["received_at"]]
    assert times == sorted(times) and times[0] == (apheresis + timedelta(hours=1)).isoformat()
    assert receipt == {"order_id": "o-1", "coi": "V2V0026000001X", "accepted": True, "received_at": times[-1]}
    assert ("inbound", "slot-1") in actor.done and actor.result.sites_manufactured == ["CH-STEIN"]
    # the run starts 3 h after receipt, or at 08:00 on the manufacturing start day if that is later
    received = datetime.fromisoformat(receipt["received_at"])
    assert received == actor.sim.clock.at(DAY + timedelta(days=2), 10)  # two days in transit, then 1 h
    assert actor.run_start[("slot-1", 1)] == received + timedelta(hours=3)
    assert not actor.sim.stats.errors
    # the leg is done: acting again posts nothing more
    await actor.inbound(order_row("material_in_transit"))
    assert len(platform.posted()) == 6
    await actor.sim.api.close()


async def test_an_inbound_excursion_replaces_the_delivery_and_waits_for_the_platform() -> None:
    platform = FakePlatform({})
    inbound_routes(platform)
    actor = await placed(platform, "inbound_excursion")
    await actor.inbound(order_row("apheresis_completed"))
    paths = [p for p, _ in platform.posted()[1:]]
    assert paths[-1] == "/v1/shipments/sh-1/temperature" and "/v1/sites/CH-STEIN/receipts" not in paths
    reading = platform.posted()[-1][1]
    assert reading["reading_c"] >= 8.0 + 4 and reading["coi"] == "V2V0026000001X"
    assert actor.result.applied and actor.leave == MATERIAL_ON_THE_WAY
    assert [b["milestone"] for p, b in platform.posted()[1:-1]] == ["booked", "picked_up", "in_transit"]
    await actor.sim.api.close()


async def test_a_refused_receipt_is_the_planned_rejection() -> None:
    platform = FakePlatform({})
    inbound_routes(platform)
    actor = await placed(platform, "material_rejected", reason="bag leaking on arrival")
    await actor.inbound(order_row("material_in_transit"))
    path, receipt = platform.posted()[-1]
    assert path == "/v1/sites/CH-STEIN/receipts"
    assert receipt["accepted"] is False and receipt["reason"] == "bag leaking on arrival"
    assert actor.result.applied and actor.leave == MATERIAL_ON_THE_WAY and not actor.run_start
    assert actor.sim.stats.calls["site receipt (refused)"] == 1
    await actor.sim.api.close()


async def test_the_site_reports_every_step_at_its_time_then_releases() -> None:
    mes = {"run": 1, "state": "material_received", "steps_completed": ["activation"]}
    platform = FakePlatform(
        {
            ("GET", "/v1/sites/CH-STEIN/manufacturing/o-1"): lambda _: httpx.Response(200, json=mes),
            ("POST", "/v1/sites/CH-STEIN/manufacturing/o-1/steps"): lambda _: httpx.Response(200, json={}),
            ("POST", "/v1/sites/CH-STEIN/manufacturing/o-1/qc"): lambda _: httpx.Response(200, json={}),
        }
    )
    actor = await placed(platform)
    start = actor.sim.clock.at(DAY + timedelta(days=2), 8)
    actor.run_start[("slot-1", 1)] = start
    row = order_row("material_received")
    assert not actor.site.run_done(row)
    await actor.site.manufacture(row)
    posted = platform.posted()[1:]
    assert [b.get("step") for _, b in posted[:-1]] == list(STEPS[1:])  # activation was already reported
    assert posted[-1][1]["disposition"] == "released"
    cryopreserved = datetime.fromisoformat(posted[-2][1]["completed_at"])
    assert start + timedelta(days=17) <= cryopreserved <= start + timedelta(days=17, hours=3)
    assert actor.release_at == datetime.fromisoformat(posted[-1][1]["decided_at"])
    assert actor.release_at >= start + timedelta(days=17 + 14)
    assert actor.site.run_done(row)
    await actor.sim.api.close()


async def test_lymphodepletion_before_release_is_tried_once_and_must_be_refused() -> None:
    platform = FakePlatform(
        {("POST", "/v1/orders/o-1/lymphodepletion"): lambda _: httpx.Response(409, json={"detail": "no"})}
    )
    actor = await placed(platform)
    actor.plan.lymph_refusal = True
    await actor.hospital.lymphodepletion_before_release()
    await actor.hospital.lymphodepletion_before_release()
    assert [p for p, _ in platform.posted()].count("/v1/orders/o-1/lymphodepletion") == 1
    assert actor.sim.stats.intended == {"lymphodepletion before release -> 409": 1}
    assert not actor.lymphodepleted and not actor.sim.stats.errors
    await actor.sim.api.close()
