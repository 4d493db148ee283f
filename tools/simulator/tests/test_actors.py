"""The actors of one order (hospital, courier, site) against a mocked platform (`httpx.MockTransport`): the
requests they make, as which party (each with its own token), in which order, at which simulated moments
(kept in the case file) while the platform is told the real time, and what they note in the case file."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from v2v_contracts.fields import booking_window
from v2v_simulator.api import Api
from v2v_simulator.config import Config
from v2v_simulator.orders import OrderActor
from v2v_simulator.plan import Combo, OrderPlan
from v2v_simulator.rules import RunStart, fresh_started_in_time
from v2v_simulator.simulation import Simulator
from v2v_simulator.sites import OutageState, declare_outage
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
    "carrier_id": "CRYO-EU",
}


class FakeTokens:
    """A token source like `v2v_harness.identity.Credentials`: the token names the demo client."""

    def client_id(self, kind: str, entity_id: str | None = None) -> str:
        return f"{kind}-{entity_id.lower()}" if entity_id else kind

    async def headers(self, client_id: str, scope: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {client_id}"}


class FakePlatform:
    """Answers by (method, path); records every request with its JSON body, and who sent it."""

    def __init__(self, routes: dict[tuple[str, str], Callable[[Any], httpx.Response]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, Any]] = []
        self.callers: list[str] = []  # the demo client of each request (from its bearer token)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        self.callers.append(request.headers.get("authorization", "").removeprefix("Bearer "))
        return self.routes[(request.method, request.url.path)](body)

    def posted(self) -> list[tuple[str, Any]]:
        return [(path, body) for method, path, body in self.requests if method == "POST"]

    def by(self, method: str = "POST") -> list[tuple[str, str]]:
        """(path, caller) of each request with `method`."""
        return [(r[1], who) for r, who in zip(self.requests, self.callers, strict=True) if r[0] == method]


def real_now() -> datetime:
    return datetime.now(UTC)


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
    cfg = Config(orders=1, day_seconds=0.0, stall_s=1.0, run_id="RUN1")
    tokens = FakeTokens()
    sim = Simulator(cfg, out=lambda line: None, credentials=tokens)
    await sim.api.close()
    sim.api = Api(
        cfg.urls,
        cfg.concurrency,
        sim.stats,
        credentials=tokens,
        transport=httpx.MockTransport(platform),
        backoff_s=0,
    )
    sim.tracker = Tracker(sim.api, cfg.poll_s)
    sim.products = {"TISA-CEL": {"code": "TISA-CEL", "manufacturing_days": 17, "qc_days": 14}}
    plan = OrderPlan(0, "SIM-RUN1-001-00001", COMBO, date(2026, 3, 10), 0.0, kind, params)
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
                "patient_ref": "SIM-RUN1-001-00001",
                "requested_apheresis_date": "2026-03-10",
            },
        )
    ]
    assert platform.callers == ["centre-tc-de-be-001"]  # the centre places its own order
    assert actor.hospital.idempotency_key() == "v2v-sim-RUN1-order-00001"
    assert (actor.order_id, actor.coi, actor.result.order_id) == ("o-1", "V2V0026000001X", "o-1")
    assert actor.row["status"] == "submitted" and actor.who == "order #1 o-1"
    await actor.sim.api.close()


async def test_actions_are_stamped_in_order_and_never_go_back() -> None:
    actor = await actor_for(FakePlatform({}))
    start = actor.floor
    first = actor.stamp(start + timedelta(days=2))
    assert first == start + timedelta(days=2)
    assert actor.stamp(start) == first + timedelta(minutes=5)  # an earlier moment: just after the last one
    assert await actor.at(start + timedelta(days=3), "apheresis") == start + timedelta(days=3)
    assert await actor.at(start, "infusion") == start + timedelta(days=3, minutes=5)
    assert await actor.at(start + timedelta(days=4)) == start + timedelta(days=4)  # unnamed: not noted
    assert actor.moments == [
        ("apheresis", start + timedelta(days=3)),
        ("infusion", start + timedelta(days=3, minutes=5)),
    ]
    assert actor.moment("infusion") == start + timedelta(days=3, minutes=5) and actor.moment("x") is None
    await actor.sim.api.close()


def inbound_routes(platform: FakePlatform) -> None:
    platform.routes[("GET", "/v1/shipments")] = lambda _: httpx.Response(200, json=[SHIPMENT])
    platform.routes[("POST", "/v1/shipments/sh-1/milestones")] = lambda _: httpx.Response(201, json={})
    platform.routes[("POST", "/v1/sites/CH-STEIN/receipts")] = lambda _: httpx.Response(200, json={})
    platform.routes[("GET", "/v1/sites/CH-STEIN/manufacturing/o-1")] = lambda _: httpx.Response(
        200, json={"state": "awaiting_material", "collection": 1, "expected_din": None}
    )
    platform.routes[("POST", "/v1/shipments/sh-1/temperature")] = lambda _: httpx.Response(
        201, json={"excursion_published": True}
    )


async def test_the_inbound_leg_is_scanned_by_the_courier_then_received_by_the_site() -> None:
    platform = FakePlatform({})
    inbound_routes(platform)
    actor = await placed(platform)
    apheresis = actor.sim.clock.at(DAY, 10)
    actor.apheresis_at["slot-1"] = apheresis
    before = real_now()
    await actor.inbound(order_row("apheresis_completed"))
    after = real_now()
    posted = platform.posted()[1:]
    assert [(p, b.get("milestone")) for p, b in posted] == [
        ("/v1/shipments/sh-1/milestones", "booked"),
        ("/v1/shipments/sh-1/milestones", "picked_up"),
        ("/v1/shipments/sh-1/milestones", "in_transit"),
        ("/v1/shipments/sh-1/milestones", "delivered"),
        ("/v1/sites/CH-STEIN/receipts", None),
    ]
    # the shipment is found as ops, scanned by the carrier it names, received by the site's MES
    # the MES reads what the site knows of the collection before it scans the bag
    assert platform.by("GET") == [
        ("/v1/shipments", "ops"),
        ("/v1/sites/CH-STEIN/manufacturing/o-1", "site-ch-stein"),
    ]
    assert [who for _, who in platform.by("POST")[1:]] == ["carrier-cryo-eu"] * 4 + ["site-ch-stein"]
    booked, picked, transit, delivered, receipt = (b for _, b in posted)
    assert "temperature_c" not in booked and 2.0 <= picked["temperature_c"] <= 8.0
    assert picked["received_from"] == "TC-DE-BE-001" and picked["location"] == "TC-DE-BE-001"
    assert transit["location"] == "HUB" and delivered["location"] == "CH-STEIN"
    # the platform is told the real time of each scan (in order); the simulated moments stay in the case
    reported = [datetime.fromisoformat(b["occurred_at"]) for b in (booked, picked, transit, delivered)]
    assert reported == sorted(reported) and all(before <= t <= after for t in reported)
    labels = [
        "inbound booked",
        "inbound picked_up",
        "inbound in_transit",
        "inbound delivered",
        "site receipt",
    ]
    assert [w for w, _ in actor.moments] == labels
    times = [m for _, m in actor.moments]
    assert times == sorted(times) and times[0] == apheresis + timedelta(hours=1)
    assert receipt == {"order_id": "o-1", "coi": "V2V0026000001X", "accepted": True}  # received now
    assert ("inbound", "slot-1") in actor.done and actor.result.sites_manufactured == ["CH-STEIN"]
    # the run starts 3 h after receipt, or at 08:00 on the manufacturing start day if that is later
    received = actor.moment("site receipt")
    assert received == actor.sim.clock.at(DAY + timedelta(days=2), 10)  # two days in transit, then 1 h
    assert actor.run_start[("slot-1", 1)] == received + timedelta(hours=3)
    assert not actor.sim.stats.errors
    # the leg is done: acting again posts nothing more
    await actor.inbound(order_row("material_in_transit"))
    assert len(platform.posted()) == 6
    await actor.sim.api.close()


async def test_fresh_material_reaches_the_site_in_time_to_start_within_its_hours_of_collection() -> None:
    """A fresh product (its catalogue's planning facts: at most 48 h from collection to start), collected
    at noon two days before its booked manufacturing start: two days in transit would start it 51 h after
    collection; the courier delivers it in time and the run starts inside the 48 h. The receipt notes the
    run (collection, start, slot) for the rule checked at the end of the run."""
    platform = FakePlatform({})
    inbound_routes(platform)
    actor = await placed(platform)
    actor.product = {
        "code": "TISA-CEL",
        "manufacturing_days": 17,
        "qc_days": 14,
        "planning": {"starting_material": "fresh", "max_fresh_hours": 48},
    }
    collected = actor.sim.clock.at(DAY, 12)
    actor.moments.append(("apheresis", collected))
    actor.apheresis_at["slot-1"] = collected
    await actor.inbound(order_row("apheresis_completed"))
    delivered, received = actor.moment("inbound delivered"), actor.moment("site receipt")
    assert delivered is not None and received is not None
    assert delivered == collected + timedelta(hours=48 - 6)  # at the site 6 h before the latest start
    start = actor.run_start[("slot-1", 1)]
    assert start == received + timedelta(hours=3) == collected + timedelta(hours=46)  # inside the 48 h
    assert actor.result.collected_runs == [RunStart("CH-STEIN", "slot-1", collected, start)]
    assert actor.result.moments is actor.moments  # the case file goes into the result
    products = {"TISA-CEL": actor.product}
    assert fresh_started_in_time([actor.result], products).violations == []
    # the same leg without the fresh cap: two days in transit, started 51 h after collection
    late = RunStart("CH-STEIN", "slot-1", collected, collected + timedelta(days=2, hours=3))
    actor.result.collected_runs = [late]
    assert len(fresh_started_in_time([actor.result], products).violations) == 1
    await actor.sim.api.close()


async def test_rerouted_material_travels_from_its_collection() -> None:
    """After an outage moved the collected material to a new slot (no collection of its own), the leg is
    timed from the material's collection, not from the order's last action."""
    platform = FakePlatform({})
    inbound_routes(platform)
    actor = await placed(platform)
    collected = actor.sim.clock.at(DAY, 10)
    actor.moments.append(("apheresis", collected))
    actor.apheresis_at["slot-1"] = collected
    actor.floor = collected
    row = order_row("material_in_transit")
    row["slot"] = {**row["slot"], "slot_id": "slot-2"}
    await actor.inbound(row)
    assert actor.moment("inbound booked") == collected + timedelta(hours=1)
    assert [(r.slot_id, r.collected) for r in actor.result.collected_runs] == [("slot-2", collected)]
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
    assert platform.callers[-1] == "carrier-cryo-eu"  # the logger reading is the carrier's report
    measured = datetime.fromisoformat(reading["measured_at"])
    assert abs((measured - real_now()).total_seconds()) < 60  # real time, not the simulated moment
    excursion_at = actor.moment("inbound temperature excursion")
    assert excursion_at is not None and excursion_at > actor.sim.clock.start
    assert actor.result.applied and actor.leave == MATERIAL_ON_THE_WAY
    scans = [b for p, b in platform.posted()[1:] if p.endswith("/milestones")]
    assert [b["milestone"] for b in scans] == ["booked", "picked_up", "in_transit"]
    # the product's rule: readings outside the limit over longer than the tolerance (the shipment does
    # not say it here: 30 minutes), all after the pickup, which is reported as that long before
    readings = [b for p, b in platform.posted()[1:] if p.endswith("/temperature")]
    assert len(readings) == 3 and all(r["reading_c"] >= 8.0 + 4 for r in readings)
    times = [datetime.fromisoformat(r["measured_at"]) for r in readings]
    assert times == sorted(times) and times[-1] - times[0] > timedelta(minutes=30)
    picked_up = datetime.fromisoformat(scans[1]["occurred_at"])
    assert datetime.fromisoformat(scans[0]["occurred_at"]) <= picked_up <= times[0]
    await actor.sim.api.close()


async def test_each_scan_presents_the_labels_pair_and_reads_the_shipment_again_when_it_was_learnt_late() -> (
    None
):
    platform = FakePlatform({})
    inbound_routes(platform)
    learnt = {**SHIPMENT, "din": "V2V0126000001Q"}
    reads = iter([[SHIPMENT], [learnt]])
    platform.routes[("GET", "/v1/shipments")] = lambda _: httpx.Response(200, json=next(reads))
    refused: list[str] = []

    def scan(body: dict[str, Any]) -> httpx.Response:
        if "din" not in body:  # logistics learnt the DIN after the courier read the shipment
            refused.append(body["milestone"])
            return httpx.Response(422, json={"errors": [{"field": "din", "reason": "required"}]})
        return httpx.Response(201, json={})

    platform.routes[("POST", "/v1/shipments/sh-1/milestones")] = scan
    actor = await placed(platform)
    await actor.inbound(order_row("apheresis_completed"))
    scans = [b for p, b in platform.posted() if p.endswith("/milestones")]
    assert refused == ["booked"]
    assert [(b["milestone"], b.get("din")) for b in scans] == [
        ("booked", None),
        ("booked", "V2V0126000001Q"),
        ("picked_up", "V2V0126000001Q"),
        ("in_transit", "V2V0126000001Q"),
        ("delivered", "V2V0126000001Q"),
    ]
    assert all("lot" not in b for b in scans) and not actor.sim.stats.errors
    await actor.sim.api.close()


async def test_the_site_receives_the_bag_once_it_knows_of_its_collection() -> None:
    """The site refuses a receipt before `order.apheresis_completed` reached it (409): its MES reads the
    manufacturing view until it shows the collection and the DIN on the bag, then scans."""
    platform = FakePlatform({})
    inbound_routes(platform)
    views = iter(
        [
            {"collection": None, "expected_din": None},
            {"collection": 1, "expected_din": "V2V0126000001P"},  # an earlier collection's DIN
            {"collection": 2, "expected_din": "V2V0126000002N"},
        ]
    )
    platform.routes[("GET", "/v1/sites/CH-STEIN/manufacturing/o-1")] = lambda _: httpx.Response(
        200, json=next(views)
    )
    actor = await placed(platform)
    actor.din = "V2V0126000002N"
    actor.sim.cfg.poll_s = 0.0
    await actor.inbound(order_row("material_in_transit"))
    reads = [p for m, p, _ in platform.requests if m == "GET" and "/manufacturing/" in p]
    assert len(reads) == 3 and platform.posted()[-1][0] == "/v1/sites/CH-STEIN/receipts"
    assert platform.posted()[-1][1]["din"] == "V2V0126000002N" and not actor.sim.stats.errors
    await actor.sim.api.close()


async def test_a_refused_receipt_is_the_planned_rejection() -> None:
    platform = FakePlatform({})
    inbound_routes(platform)
    actor = await placed(platform, "material_rejected", reason="damaged_container")
    await actor.inbound(order_row("material_in_transit"))
    path, receipt = platform.posted()[-1]
    assert path == "/v1/sites/CH-STEIN/receipts" and platform.callers[-1] == "site-ch-stein"
    assert receipt == {
        "order_id": "o-1",
        "coi": "V2V0026000001X",
        "accepted": False,
        "reason": "damaged_container",  # a ReceiptRejection code
        "reference": "DEV-RUN1-00001",  # the site's own deviation record, an opaque id
    }
    assert actor.result.applied and actor.leave == MATERIAL_ON_THE_WAY and not actor.run_start
    assert actor.sim.stats.calls["site receipt (refused)"] == 1
    await actor.sim.api.close()


async def test_the_site_reports_every_step_at_its_time_then_releases() -> None:
    # the lot of an EU order made in Switzerland: a QP's certification and the import certification at
    # the batch-release site (issue 10), both collected by QA's system
    qp = {"role": "qualified_person", "site_id": "DE-LEIPZIG-IZI", "signed": False}
    required = [{"meaning": "qp-certification", **qp}, {"meaning": "import-certification", **qp}]
    mes = {"run": 1, "state": "material_received", "steps_completed": ["activation"], "release": None}
    passed = {**mes, "state": "qc_passed", "release": {"required": required}}
    views = {"n": 0}

    def view(_: Any) -> httpx.Response:
        views["n"] += 1
        return httpx.Response(200, json=mes if views["n"] == 1 else passed)

    platform = FakePlatform(
        {
            ("GET", "/v1/sites/CH-STEIN/manufacturing/o-1"): view,
            ("POST", "/v1/sites/CH-STEIN/manufacturing/o-1/steps"): lambda _: httpx.Response(200, json={}),
            ("POST", "/v1/sites/CH-STEIN/manufacturing/o-1/qc"): lambda _: httpx.Response(200, json={}),
            ("POST", "/v1/sites/CH-STEIN/manufacturing/o-1/release"): lambda _: httpx.Response(200, json={}),
            ("POST", "/v1/sites/DE-LEIPZIG-IZI/manufacturing/o-1/import-certification"): lambda _: (
                httpx.Response(200, json={})
            ),
        }
    )
    actor = await placed(platform)
    start = actor.sim.clock.at(DAY + timedelta(days=2), 8)
    actor.run_start[("slot-1", 1)] = start
    row = order_row("material_received")
    assert not actor.site.run_done(row)
    await actor.site.manufacture(row)
    posted = platform.posted()[1:]
    assert [b for _, b in posted[:4]] == [{"step": s} for s in STEPS[1:]]  # activation was reported
    qc = posted[4][1]  # passed now (no simulated moment is sent), with its results and certificate
    assert (qc["disposition"], qc["coa_reference"], qc["results"]["sterility"]) == (
        "passed",
        "COA1-RUN1-00001",
        "negative",
    )
    assert "reason" not in qc
    # then the signed release: the QP's certification, and the import at the batch-release site
    assert [p for p, _ in posted[5:]] == [
        "/v1/sites/CH-STEIN/manufacturing/o-1/release",
        "/v1/sites/DE-LEIPZIG-IZI/manufacturing/o-1/import-certification",
    ]
    # the site's MES reads and reports for its own site; QC and the release are the manufacturer's QA's
    assert set(platform.by("GET")) == {
        ("/v1/sites/CH-STEIN/manufacturing/o-1", "site-ch-stein"),
        ("/v1/sites/CH-STEIN/manufacturing/o-1", "qa"),
    }
    assert [who for _, who in platform.by("POST")[1:]] == ["site-ch-stein"] * 4 + ["qa"] * 3
    steps = [(w, m) for w, m in actor.moments if w.startswith("manufacturing step")]
    assert [w for w, _ in steps] == [f"manufacturing step: {s}" for s in STEPS[1:]]
    assert [m for _, m in steps] == sorted(m for _, m in steps)
    cryopreserved = actor.moment("manufacturing step: cryopreservation")
    assert cryopreserved is not None
    assert start + timedelta(days=17) <= cryopreserved <= start + timedelta(days=17, hours=3)
    assert actor.release_at is not None and actor.release_at == actor.moment("QC released")
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


LOT = "CH-STEIN-00000001"


def order_answer(status: str, **kw: Any) -> Callable[[Any], httpx.Response]:
    return lambda _: httpx.Response(200, json=order_row(status, **kw))


async def test_the_centre_collects_on_the_booked_day_after_a_refused_coi_typo() -> None:
    typo_first: list[Any] = []

    def apheresis(body: Any) -> httpx.Response:
        typo_first.append(body)
        if body["coi"] != "V2V0026000001X":
            return httpx.Response(422, json={"detail": "coi: check character"})
        return httpx.Response(200, json=order_row("apheresis_completed"))

    predicted = {"earliest_infusion": (DAY + timedelta(days=40)).isoformat()}
    platform = FakePlatform(
        {
            ("GET", "/v1/orders/o-1"): lambda _: httpx.Response(
                200, json=order_row("inbound_shipment_planned", predicted=predicted)
            ),
            ("POST", "/v1/orders/o-1/apheresis"): apheresis,
        }
    )
    actor = await placed(platform)
    actor.plan.coi_typo = True
    await actor.hospital.apheresis(order_row("inbound_shipment_planned"))
    assert typo_first[0] != {"coi": "V2V0026000001X"} and set(typo_first[0]) == {"coi"}  # no `at`
    assert typo_first[1] == {"coi": "V2V0026000001X"}
    assert set(platform.callers) == {"centre-tc-de-be-001"}  # every call as the order's centre
    assert actor.sim.stats.intended == {"apheresis with mistyped COI -> 422": 1}
    collected = actor.moment("apheresis")
    assert collected is not None and collected.date() == DAY  # on the booked day, simulated
    assert actor.first_apheresis == collected and actor.apheresis_at["slot-1"] == collected
    assert actor.result.predicted_days == 40 and not actor.sim.stats.errors
    await actor.sim.api.close()


async def test_cancel_and_a_moved_date_send_reason_codes_and_a_note() -> None:
    platform = FakePlatform(
        {
            ("POST", "/v1/orders/o-1/cancel"): order_answer("cancelled"),
            ("POST", "/v1/orders/o-1/apheresis-date"): order_answer("rescheduling"),
            ("GET", "/v1/orders/o-1"): order_answer("inbound_shipment_planned"),
        }
    )
    actor = await placed(platform, "cancellation", stage="manufacturing", reason_code="disease_progression")
    await actor.hospital.cancel("manufacturing")
    assert platform.posted()[-1] == (
        "/v1/orders/o-1/cancel",
        {"reason_code": "disease_progression", "note": "simulated cancellation (manufacturing)"},
    )
    assert actor.result.applied
    await actor.sim.api.close()

    platform = FakePlatform(
        {
            ("POST", "/v1/orders/o-1/apheresis-date"): order_answer("rescheduling"),
            ("GET", "/v1/orders/o-1"): order_answer("inbound_shipment_planned"),
        }
    )
    actor = await placed(platform, "apheresis_moved", days=5, reason_code="centre_capacity")
    await actor.hospital.apheresis(order_row("inbound_shipment_planned"))
    path, body = platform.posted()[-1]
    assert path == "/v1/orders/o-1/apheresis-date" and platform.callers[-1] == "centre-tc-de-be-001"
    assert body == {
        "requested_apheresis_date": (DAY + timedelta(days=5)).isoformat(),
        "reason_code": "centre_capacity",
        "note": "simulated: not fit on the day",
    }
    assert actor.result.applied and ("apheresis", "slot-1") in actor.done
    await actor.sim.api.close()


async def test_a_moved_date_stays_in_the_booking_window() -> None:
    far = (datetime.now(UTC) + timedelta(days=178)).date()
    row = order_row("inbound_shipment_planned")
    row["slot"]["apheresis_date"] = far.isoformat()
    platform = FakePlatform(
        {
            ("POST", "/v1/orders/o-1/apheresis-date"): order_answer("rescheduling"),
            ("GET", "/v1/orders/o-1"): order_answer("inbound_shipment_planned"),
        }
    )
    actor = await placed(platform, "apheresis_moved", days=9, reason_code="patient_unwell")
    await actor.hospital.apheresis(row)
    moved = date.fromisoformat(platform.posted()[-1][1]["requested_apheresis_date"])
    assert moved == booking_window()[1] and moved > far
    await actor.sim.api.close()


async def test_after_an_error_the_centre_cancels_with_the_code_other() -> None:
    platform = FakePlatform({("POST", "/v1/orders/o-1/cancel"): order_answer("cancelled")})
    actor = await placed(platform)
    await actor.hospital.tidy_up()
    assert platform.posted()[-1] == (
        "/v1/orders/o-1/cancel",
        {"reason_code": "other", "note": "the simulator gave up on this order after an error"},
    )
    assert platform.callers[-1] == "centre-tc-de-be-001"
    await actor.sim.api.close()


async def test_a_failed_step_and_an_out_of_specification_product_send_codes_and_references() -> None:
    mes = {"run": 1, "state": "material_received", "steps_completed": []}
    platform = FakePlatform(
        {
            ("GET", "/v1/sites/CH-STEIN/manufacturing/o-1"): lambda _: httpx.Response(200, json=mes),
            ("POST", "/v1/sites/CH-STEIN/manufacturing/o-1/steps"): lambda _: httpx.Response(200, json={}),
            ("POST", "/v1/sites/CH-STEIN/manufacturing/o-1/qc"): lambda _: httpx.Response(200, json={}),
        }
    )
    actor = await placed(
        platform, "manufacturing_failure", step="transduction", reason="transduction_failure"
    )
    actor.run_start[("slot-1", 1)] = actor.sim.clock.at(DAY + timedelta(days=2), 8)
    await actor.site.manufacture(order_row("material_received"))
    assert platform.posted()[1:] == [
        ("/v1/sites/CH-STEIN/manufacturing/o-1/steps", {"step": "activation"}),
        (
            "/v1/sites/CH-STEIN/manufacturing/o-1/steps",
            {
                "step": "transduction",
                "failed": True,
                "reason": "transduction_failure",
                "reference": "DEV-RUN1-00001",
            },
        ),
    ]
    assert platform.callers[1:] == ["site-ch-stein"] * 3  # the MES view, then both steps
    assert actor.result.applied and actor.site.run_done(order_row("material_received"))
    await actor.sim.api.close()

    platform.requests.clear()
    platform.callers.clear()
    actor = await placed(platform, "qc_oos", reason="viability")
    actor.run_start[("slot-1", 1)] = actor.sim.clock.at(DAY + timedelta(days=2), 8)
    await actor.site.manufacture(order_row("material_received"))
    path, body = platform.posted()[-1]
    assert path == "/v1/sites/CH-STEIN/manufacturing/o-1/qc" and platform.callers[-1] == "qa"
    assert body == {
        "disposition": "out_of_specification",
        "reason": "viability",
        "reference": "QC1-RUN1-00001",
    }
    assert actor.release_at is None and actor.moment("QC out of specification") is not None
    await actor.sim.api.close()


async def test_qa_disposes_of_a_product_held_after_an_outbound_excursion_with_a_code() -> None:
    platform = FakePlatform({("POST", "/v1/orders/o-1/disposition"): order_answer("released")})
    actor = await placed(
        platform, "outbound_excursion", decision="reject", reason_code="outside_stability_data"
    )
    held = {"cause": "excursion", "reason": "temperature_excursion", "leg": "outbound_product"}
    await actor.site.disposition(order_row("material_at_risk", at_risk=held))
    path, body = platform.posted()[-1]
    assert path == "/v1/orders/o-1/disposition"
    assert body == {
        "outcome": "reject",
        "reason_code": "outside_stability_data",
        "document_reference": body["document_reference"],
    }
    assert body["document_reference"].startswith("QA-")
    assert platform.callers[-1] == "qa" and actor.result.decision == "reject"
    assert actor.result.dispositions == ["excursion reject"]
    assert actor.moment("QA excursion reject") is not None
    # the same material at risk is decided once
    await actor.site.disposition(order_row("material_at_risk", at_risk=held))
    assert len([p for p, _ in platform.posted() if p.endswith("/disposition")]) == 1
    await actor.sim.api.close()


async def test_an_oos_product_goes_to_the_physician_who_accepts_and_the_lot_is_released() -> None:
    platform = FakePlatform(
        {
            ("POST", "/v1/orders/o-1/disposition"): order_answer("awaiting_physician"),
            ("POST", "/v1/orders/o-1/physician-decision"): order_answer("qc_pending"),
            ("GET", "/v1/sites/CH-STEIN/manufacturing/o-1"): lambda body: httpx.Response(
                200, json={"order_id": "o-1", "state": "qc_passed", "release": {"required": []}}
            ),
        }
    )
    actor = await placed(platform, "qc_oos", reason="potency", oos_decision="physician_accepts")
    held = {"cause": "out_of_specification", "reason": "potency", "site_id": "CH-STEIN", "run": 1}
    await actor.site.disposition(order_row("material_at_risk", at_risk=held))
    path, body = platform.posted()[-1]
    assert (path, body["outcome"], body["reason_code"]) == (
        "/v1/orders/o-1/disposition",
        "release_on_physician_request",
        "risk_assessed_for_patient",
    )
    await actor.hospital.physician_decision(order_row("awaiting_physician"))
    path, body = platform.posted()[-1]
    assert (path, body) == (
        "/v1/orders/o-1/physician-decision",
        {"accept": True, "reason_code": "benefit_outweighs_risk"},
    )
    callers = dict(zip((r[1] for r in platform.requests), platform.callers, strict=True))
    assert callers["/v1/orders/o-1/physician-decision"] == "centre-tc-de-be-001"  # signed by its physician
    assert callers["/v1/sites/CH-STEIN/manufacturing/o-1"] == "qa"  # QA then releases the lot
    assert actor.result.dispositions == ["out_of_specification released on physician request, accepted"]
    assert actor.release_at is not None  # the lot released after the acceptance: the product ships
    await actor.sim.api.close()


async def test_a_physician_who_declines_leaves_the_product_rejected() -> None:
    platform = FakePlatform(
        {("POST", "/v1/orders/o-1/physician-decision"): order_answer("material_received")}
    )
    actor = await placed(platform, "qc_oos", reason="potency", oos_decision="physician_declines")
    await actor.hospital.physician_decision(order_row("awaiting_physician"))
    path, body = platform.posted()[-1]
    assert (path, body) == (
        "/v1/orders/o-1/physician-decision",
        {"accept": False, "reason_code": "risk_not_acceptable"},
    )
    assert actor.result.dispositions == ["out_of_specification released on physician request, declined"]
    assert actor.release_at is None
    await actor.sim.api.close()


async def test_the_product_is_received_and_infused_now_and_vein_to_vein_is_simulated() -> None:
    platform = FakePlatform(
        {
            ("POST", "/v1/orders/o-1/product-receipt"): order_answer("product_received", lot=LOT),
            ("POST", "/v1/orders/o-1/lymphodepletion"): order_answer("product_received", lot=LOT),
            ("POST", "/v1/orders/o-1/infusion"): order_answer("completed", lot=LOT),
            ("GET", "/v1/orders/o-1"): order_answer("product_delivered", lot=LOT),
        }
    )
    actor = await placed(platform)
    apheresis = actor.sim.clock.at(DAY, 10)
    actor.first_apheresis = apheresis
    actor.release_at = apheresis + timedelta(days=33)
    await actor.hospital.product_receipt(actor.release_at + timedelta(days=2))
    await actor.hospital.infusion(order_row("product_received"))
    assert platform.posted()[1:] == [  # the label's pair: the COI and the released lot
        ("/v1/orders/o-1/product-receipt", {"coi": "V2V0026000001X", "lot": LOT}),
        ("/v1/orders/o-1/lymphodepletion", {}),
        ("/v1/orders/o-1/infusion", {"coi": "V2V0026000001X", "lot": LOT}),
    ]
    assert set(platform.callers) == {"centre-tc-de-be-001"}
    infused = actor.moment("infusion")
    assert infused is not None and infused >= actor.release_at + timedelta(days=2.5)
    assert actor.result.simulated_days == (infused - apheresis).total_seconds() / 86400
    assert actor.result.simulated_days is not None and actor.result.simulated_days > 35
    await actor.sim.api.close()


async def test_the_registry_declares_the_outage_as_admin_with_a_reason_code() -> None:
    mfg = DAY + timedelta(days=2)
    platform = FakePlatform(
        {
            ("POST", "/v1/sites/CH-STEIN/outages"): lambda body: httpx.Response(
                201, json={**body, "affected_booking_ids": ["b-1"]}
            )
        }
    )
    actor = await placed(platform, "site_outage")
    sim = actor.sim
    sim.actors = [actor]
    sim.outage = OutageState("CH-STEIN", mfg)
    sim.tracker.observe(order_row("inbound_shipment_planned", updated_at="2026-03-02T10:00:00+00:00"))
    await declare_outage(sim)
    assert platform.posted()[-1] == (
        "/v1/sites/CH-STEIN/outages",
        {"start_date": mfg.isoformat(), "end_date": mfg.isoformat(), "reason": "maintenance"},
    )
    assert platform.callers[-1] == "admin"
    assert sim.outage.posted.is_set() and sim.outage.affected == 1 and actor.result.applied
    assert sim.outage.note == f"CH-STEIN {mfg}..{mfg} (maintenance), 1 booking(s) affected"
    await sim.api.close()


async def test_a_retried_scan_resends_the_same_body_under_its_idempotency_key() -> None:
    """A 503 is retried with the same Idempotency-Key, so the body must be the same too (the platform
    answers 422 to a key reused for another body): the scan's time is taken once, not per attempt."""
    platform = FakePlatform({})
    inbound_routes(platform)
    failed: set[str] = set()

    def once_unavailable(body: Any) -> httpx.Response:
        if body["milestone"] not in failed:
            failed.add(body["milestone"])
            return httpx.Response(503, json={"detail": "the database or the broker is unavailable; retry"})
        return httpx.Response(201, json={})

    platform.routes[("POST", "/v1/shipments/sh-1/milestones")] = once_unavailable
    actor = await placed(platform)
    actor.apheresis_at["slot-1"] = actor.sim.clock.at(DAY, 10)
    await actor.inbound(order_row("apheresis_completed"))
    scans = [b for p, b in platform.posted() if p.endswith("/milestones")]
    assert [b["milestone"] for b in scans] == [
        m for m in ("booked", "picked_up", "in_transit", "delivered") for _ in range(2)
    ]
    for first, retry in zip(scans[::2], scans[1::2], strict=True):
        assert retry == first  # occurred_at included
    await actor.sim.api.close()


def test_the_order_names_an_indication_of_its_product_and_infuses_inside_its_window() -> None:
    """Issue 11: the indication (and the weight its dose needs) from the product's treatment facts; the
    infusion whole days after LD's start: the regimen, the window's minimum and one more day (never past
    the maximum, also one calendar day later across a midnight)."""
    import random

    from v2v_simulator.orders import treatment_plan

    mm = {"weight_required": True, "ld_regimen_days": 3, "infusion_window_days": [2, 4]}
    code, weight, days = treatment_plan({"treatment": {"indications": {"mm": mm}}}, random.Random(1))
    assert code == "mm" and weight is not None and 18 <= weight <= 110 and days == 3 + 2 + 1
    fl = {"weight_required": False, "ld_regimen_days": 3, "infusion_window_days": [2, 2]}
    assert treatment_plan({"treatment": {"indications": {"fl": fl}}}, random.Random(1)) == ("fl", None, 5)
    assert treatment_plan({"code": "X"}, random.Random(1)) == (None, None, 3)


async def test_the_platforms_record_of_an_order_is_read_for_the_rules_and_the_lanes() -> None:
    """At the end of the run: the order's site, its centre's market and timezone (the catalogue), the
    indication and infusion window of the recorded LD, the recorded infusion time (its timeline), and the
    booked days of the slot each run from collected material was started from (the slots)."""
    actor = await actor_for(FakePlatform({}))
    actor.sim.centres = {"TC-DE-BE-001": {"id": "TC-DE-BE-001", "country": "DE", "timezone": "Europe/Berlin"}}
    collected = actor.sim.clock.at(DAY, 10)
    actor.result.collected_runs = [RunStart("CH-STEIN", "slot-2", collected, collected + timedelta(days=2))]
    window = {"earliest_infusion": "2026-03-16", "latest_infusion": "2026-03-21"}
    detail = {
        **order_row("completed"),
        "treatment": {"indication": "all_paediatric", "infusion_window": window},
        "timeline": [
            {"type": "order.lymphodepletion_started.v1", "time": "2026-03-10T09:00:00Z"},
            {"type": "order.completed.v1", "time": "2026-03-17T15:30:00Z"},
        ],
    }
    slots = [
        {"slot_id": "slot-1", "apheresis_date": "2026-02-01", "manufacturing_start_date": "2026-02-03"},
        {"slot_id": "slot-2", "apheresis_date": "2026-02-20", "manufacturing_start_date": "2026-02-22"},
    ]
    actor.sim.record_facts(actor, detail, slots)
    r = actor.result
    assert (r.site_id, r.market, r.centre_tz, r.lane) == ("CH-STEIN", "DE", "Europe/Berlin", "DE → CH-STEIN")
    assert r.indication == "all_paediatric" and r.infusion_window == window
    assert r.infused_at == datetime(2026, 3, 17, 15, 30, tzinfo=UTC)
    run = r.collected_runs[0]
    assert (run.booked_collection, run.booked_start) == (date(2026, 2, 20), date(2026, 2, 22))
    await actor.sim.api.close()


def test_a_runs_days_follow_the_products_published_turnaround_for_the_region() -> None:
    """With planning facts: apheresis to release (QC inside) drawn through the region's median and p90,
    less the days before the start, split as manufacturing_days : qc_days; without: those two as they
    are."""
    import random

    from v2v_simulator.report import percentile
    from v2v_simulator.sites import run_days

    product = {
        "manufacturing_days": 14,
        "qc_days": 7,
        "planning": {
            "start_lag_days": 1,
            "apheresis_to_release": {
                "default": {"median_days": 14, "p90_days": 17},
                "europe": {"median_days": 19, "p90_days": 23},
            },
        },
    }
    rng = random.Random(7)
    us = [run_days(product, "north_america", rng) for _ in range(4000)]  # not listed: the default
    eu = [run_days(product, "europe", rng) for _ in range(4000)]
    assert all(m == pytest.approx(2 * q) for m, q in us + eu)  # 14 : 7
    to_release = [m + q + 1 for m, q in us]  # from apheresis: the start lag before it
    assert percentile(to_release, 50) == pytest.approx(14, abs=0.3)
    assert percentile(to_release, 90) == pytest.approx(17, abs=0.4)
    assert percentile([m + q + 1 for m, q in eu], 50) == pytest.approx(19, abs=0.3)
    assert percentile([m + q + 1 for m, q in eu], 90) == pytest.approx(23, abs=0.5)
    assert run_days({"manufacturing_days": 17, "qc_days": 14}, "europe", rng) == (17.0, 14.0)
