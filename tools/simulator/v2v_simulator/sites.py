"""The manufacturing site: its MES (receipt of the apheresis material, manufacturing steps), the
manufacturer's QA (QC dispositions, the signed release of a lot, the signed disposition of material at
risk), and the registry (the run's one outage).

A run lasts what the product's catalogue publishes for the centre's region (apheresis to release, QC
inside: `run_days`), drawn per run through its median and p90.

Issue 10: QC passes with a results summary and a certificate-of-analysis reference; the lot is then
released by signature: QA's system collects, for each signature the site names (`release.required` of the
manufacturing view: a quality unit's release or a QP's certification, and an import certification for a
lot made outside its market), a fresh signing token of the demo user with that role at that site
(`qu.<site>` / `qp.<site>`, `Credentials.signature_headers`). The receipt presents the bag's DIN beside
the COI when the order's actor knows it (`OrderActor.din`, from the apheresis answer).

Each acts as its own party: the MES as the site's demo client (confined to its own site), QA as `qa`, the
registry as `admin`. Reasons are the platform's codes (`v2v_contracts.events`: ReceiptRejection,
StepFailure, QcFinding, OutageReason; the order service's quarantine codes), the site's own document is
named by an opaque `reference`. Reports carry no simulated moment (the platform takes now)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from v2v_harness.e2e import site_knows_the_bag

from .api import ADMIN, QA, OrderAbort, site
from .clock import as_date
from .rules import RunStart
from .states import MATERIAL_ON_THE_WAY, MES_RUNNING, STEP_FRACTION, STEPS, TERMINAL

if TYPE_CHECKING:
    from .orders import OrderActor
    from .simulation import Simulator


Z90 = 1.2815515655446004  # the standard normal distribution's 90th percentile


def run_days(product: dict[str, Any], region: str | None, rng: random.Random) -> tuple[float, float]:
    """A run's days from its start to cryopreservation and from there to the release (QC). With the
    product's planning facts: its published apheresis-to-release days for the centre's region (`default`
    for another; QC inside, DOMAIN.md), drawn from a log-normal through their median and p90, less the part
    before the start (`start_lag_days`), split between manufacture and QC as the catalogue's
    manufacturing_days : qc_days. Without them: manufacturing_days and qc_days."""
    mfg = float(product.get("manufacturing_days", 17))
    qc = float(product.get("qc_days", 14))
    planning = product.get("planning") or {}
    table = planning.get("apheresis_to_release") or {}
    facts = table.get(region or "") or table.get("default")
    if not facts:
        return mfg, qc
    median, p90 = float(facts["median_days"]), float(facts["p90_days"])
    total = rng.lognormvariate(math.log(median), math.log(p90 / median) / Z90)
    after_start = max(1.0, total - float(planning.get("start_lag_days", 0)))
    share = mfg / (mfg + qc) if mfg + qc > 0 else 1.0
    return after_start * share, after_start * (1 - share)


class Site:
    """The site's MES and QA, acting for one order."""

    def __init__(self, order: OrderActor) -> None:
        self.order = order

    def reference(self, what: str) -> str:
        """The site's own document for a report (deviation, batch record): an opaque id."""
        o = self.order
        return f"{what}-{o.sim.cfg.run_id}-{o.plan.index + 1:05d}"

    async def receipt(
        self, ship: dict[str, Any], slot_id: str, mfg: date | None, delivered: datetime
    ) -> None:
        """The material arrived: accepted (the run is scheduled) or refused when the plan says so."""
        o = self.order
        site_id = ship["destination"]
        reject = o.injects("material_rejected")
        label = "site receipt (refused)" if reject else "site receipt"
        moment = await o.at(delivered + timedelta(hours=1), label)
        reason = o.plan.params["reason"] if reject else None
        reference = self.reference("DEV") if reject else None
        await self.knows_the_collection(site_id)
        await o.call(
            label,
            lambda c: c.site_receipt(
                site_id,
                o.order_id,
                o.coi,
                not reject,
                din=o.din,
                reason=reason,
                reference=reference,
            ),
            party=site(site_id),
            ok=(200, 201),
        )
        o.done.add(("inbound", slot_id))
        if reject:
            o.result.applied = True
            o.leave = MATERIAL_ON_THE_WAY
        else:
            o.cycle_slot = slot_id  # the runs of this collection, whatever slot a remanufacture gets
            start = max(moment + timedelta(hours=3), o.sim.clock.at(mfg, 8) if mfg else moment)
            o.run_start[(slot_id, 1)] = start
            o.result.sites_manufactured.append(site_id)
            collected = o.moment("apheresis")
            if collected is not None:  # for the fresh-material rule (`rules.fresh_started_in_time`)
                o.result.collected_runs.append(RunStart(site_id, slot_id, collected, start))

    async def knows_the_collection(self, site_id: str) -> None:
        """As the MES before it scans the bag: the site's view shows the collection (and the DIN) the bag
        is from; a receipt before the site learned of it is refused (409). Gone on: the receipt answers."""
        o = self.order
        deadline = time.monotonic() + o.sim.cfg.stall_s
        while time.monotonic() < deadline:
            resp = await o.call(
                "site manufacturing view",
                lambda c: c.manufacturing(site_id, o.order_id),
                party=site(site_id),
                ok=(200, 404),
            )
            view = resp.body if resp.status == 200 and isinstance(resp.body, dict) else {}
            if resp.status == 404 or site_knows_the_bag(view, o.din):
                return
            await asyncio.sleep(o.sim.cfg.poll_s)

    def run_done(self, row: dict[str, Any]) -> bool:
        """Whether the MES has already reported everything of the order's current run."""
        return ("run", self.cycle(row), int(row.get("run") or 1)) in self.order.done

    def cycle(self, row: dict[str, Any]) -> str:
        """The collection the runs are made from: the slot its material was received for (a
        remanufacture books a slot of its own, issue 10, and is still a run of that collection)."""
        return self.order.cycle_slot or str((row.get("slot") or {}).get("slot_id"))

    async def manufacture(self, row: dict[str, Any]) -> None:
        """The current run: every step at its time (or the planned failure or cancellation), then QC."""
        o = self.order
        slot_id = self.cycle(row)
        run = int(row.get("run") or 1)
        site_id = row["site_id"]
        if ("run", slot_id, run) in o.done:
            return

        async def fetch() -> Any:
            return (
                await o.call("mes view", lambda c: c.manufacturing(site_id, o.order_id), party=site(site_id))
            ).body

        view = await o.poll(
            f"run {run} at {site_id}",
            fetch,
            lambda v: v if int(v.get("run") or 0) == run and v.get("state") in MES_RUNNING else None,
            lambda v: f"the site reports run {v.get('run')} {v.get('state')}",
        )
        if view is None:
            return
        if (slot_id, run) not in o.run_start:  # a remanufacture: the day after the run was lost
            o.run_start[(slot_id, run)] = o.floor + timedelta(days=1)
            o.result.sites_manufactured.append(site_id)
        start = o.run_start[(slot_id, run)]
        if (slot_id, run) not in o.run_days:  # drawn once per run (the MES may be asked again)
            region = (o.sim.centres.get(o.plan.combo.centre) or {}).get("region")
            o.run_days[(slot_id, run)] = run_days(o.product, region, o.rng)
        mfg_days, qc_days = o.run_days[(slot_id, run)]
        completed = set(view.get("steps_completed") or [])
        for step in STEPS:
            if step in completed:
                continue
            when = start + timedelta(days=mfg_days * STEP_FRACTION[step], hours=o.rng.uniform(0, 3))
            if step == "expansion" and o.cancels_at("manufacturing"):
                await o.at(when, "cancel")
                await o.hospital.cancel("manufacturing")
                return
            if o.injects("manufacturing_failure") and step == o.plan.params["step"]:
                await self.step(site_id, step, when, failure=o.plan.params["reason"])
                o.result.applied = True
                o.done.add(("run", slot_id, run))
                return
            await self.step(site_id, step, when)
        cryo = start + timedelta(days=mfg_days)
        if o.cancels_at("qc_pending"):
            await o.at(cryo + timedelta(days=qc_days / 2), "cancel")
            await o.hospital.cancel("qc_pending")
            return
        oos = o.plan.kind == "persistent_oos" or o.injects("qc_oos")
        label = "QC out of specification" if oos else "QC released"
        moment = await o.at(cryo + timedelta(days=qc_days, hours=o.rng.uniform(0, 6)), label)
        reason = o.plan.params["reason"] if oos else None
        reference = self.reference(f"QC{run}") if oos else None
        disposition = "out_of_specification" if oos else "passed"
        results = None if oos else QC_RESULTS
        coa = None if oos else self.reference(f"COA{run}")
        await o.call(  # QC dispositions are the manufacturer's QA's
            label,
            lambda c: c.qc(
                site_id,
                o.order_id,
                disposition,
                reason=reason,
                reference=reference,
                results=results,
                coa_reference=coa,
            ),
            party=QA,
            ok=(200, 201),
        )
        if not oos:
            await self.sign_release(site_id)
        o.done.add(("run", slot_id, run))
        if oos:
            o.result.applied = True
        else:
            o.release_at = moment

    async def sign_release(self, site_id: str) -> None:
        """QA collects every signature the lot still needs, from the demo users the site names, each
        with a fresh signing token (user id + password re-entered: 21 CFR 11.200(a)(1))."""
        o = self.order
        view = (await o.call("release view", lambda c: c.manufacturing(site_id, o.order_id), party=QA)).body
        required = ((view or {}).get("release") or {}).get("required") or []
        for req in required:
            if req.get("signed"):
                continue
            meaning, signing_site = str(req["meaning"]), str(req["site_id"])
            headers = await self.signature(str(req["role"]), signing_site)
            if meaning == "import-certification":
                await o.call(
                    "lot import certification",
                    lambda c, h=headers, s=signing_site: c.import_certification(s, o.order_id, headers=h),
                    party=QA,
                    ok=(200, 201),
                )
            else:
                await o.call(
                    f"lot {meaning}",
                    lambda c, h=headers: c.release(site_id, o.order_id, headers=h),
                    party=QA,
                    ok=(200, 201),
                )

    async def signature(self, role: str, site_id: str) -> dict[str, str]:
        """`V2V-Signature-Token` of the demo signer with `role` at `site_id`, collected by QA's client
        (none without credentials: a mocked platform)."""
        credentials: Any = self.order.sim.api.credentials
        if credentials is None or not hasattr(credentials, "signature_headers"):
            return {}
        user_id = credentials.user_id(role, site_id)
        headers: dict[str, str] = await credentials.signature_headers(credentials.client_id(*QA), user_id)
        return headers

    async def step(self, site_id: str, step: str, when: datetime, failure: str | None = None) -> None:
        """One step reported (as the site's MES) at its simulated time: completed, or failed for the
        reason code `failure`."""
        o = self.order
        label = "manufacturing step failed" if failure is not None else "manufacturing step"
        await o.at(when, f"{label}: {step}")
        reference = self.reference("DEV") if failure is not None else None
        await o.call(
            label,
            lambda c: c.manufacturing_step(
                site_id, o.order_id, step, failed=failure is not None, reason=failure, reference=reference
            ),
            party=site(site_id),
            ok=(200, 201),
        )

    async def disposition(self, row: dict[str, Any]) -> None:
        """QA's signed disposition of material at risk (issue 10): an out-of-specification product, a
        shipment beyond its excursion tolerance, material the site held at receipt. The plan says what QA
        decides: a reject leads to today's remanufacture or recollection; an OOS product may be released
        on the physician's request (the centre's physician decides, `Hospital.physician_decision`); a
        product held after an outbound excursion may be released. Signed by the QA reviewer of the site
        (`qa.<site>`) through QA's client."""
        o = self.order
        at_risk = row.get("at_risk") or {}
        cause = str(at_risk.get("cause") or "")
        key = ("disposition", cause, at_risk.get("run"), at_risk.get("shipment_id"), row.get("recollections"))
        if key in o.done:
            return
        outcome, code = self.qa_outcome(cause, at_risk)
        site_id = str(at_risk.get("site_id") or row.get("site_id"))
        await o.at(o.floor + timedelta(days=1), f"QA {cause} {outcome}")  # QA's assessment
        headers = await self.signature("qa_reviewer", site_id)
        await o.call(
            f"QA disposition {outcome}",
            lambda c: c.disposition(o.order_id, outcome, code, self.reference("QA"), headers=headers),  # type: ignore[arg-type]
            party=QA,
            ok=(200,),
        )
        o.done.add(key)
        o.result.decision = outcome
        if outcome != "release_on_physician_request":
            o.result.dispositions.append(f"{cause} {outcome}")
        if cause == "out_of_specification" and outcome == "release":
            await self.release_after_decision(site_id)

    def qa_outcome(self, cause: str, at_risk: dict[str, Any]) -> tuple[str, str]:
        """(outcome, QA's reason code) the plan gives for material at risk of this cause."""
        params = self.order.plan.params
        if cause == "out_of_specification":
            if str(params.get("oos_decision", "reject")).startswith("physician"):
                return "release_on_physician_request", "risk_assessed_for_patient"
            return "reject", "confirmed_out_of_specification"
        if cause == "excursion" and at_risk.get("leg") == "outbound_product":
            decision = str(params.get("decision", "reject"))
            default = "within_stability_data" if decision == "release" else "outside_stability_data"
            return decision, str(params.get("reason_code") or default)
        if cause == "excursion":
            return "reject", "outside_stability_data"  # fresh material out of 2-8 °C too long: recollect
        return "reject", "integrity_compromised"  # material the site refused at receipt

    async def release_after_decision(self, site_id: str) -> None:
        """After a release of an OOS product (by QA, or on the physician's acceptance): the site holds the
        run in `qc_passed` until the lot is released by signature, as a passed one."""
        o = self.order

        async def fetch() -> Any:
            return (
                await o.call("release view", lambda c: c.manufacturing(site_id, o.order_id), party=QA)
            ).body

        view = await o.poll(
            f"the lot at {site_id} ready for release",
            fetch,
            lambda v: v if v.get("state") == "qc_passed" else None,
            lambda v: f"the site reports {v.get('state')}",
        )
        if view is None:
            return
        moment = await o.at(o.floor + timedelta(hours=6), "release after the disposition")
        await self.sign_release(site_id)
        o.release_at = moment


# a QC results summary that passes (illustrative figures; numbers and codes only)
QC_RESULTS: dict[str, Any] = {
    "viability_pct": 92.5,
    "car_positive_pct": 31.0,
    "vcn_per_cell": 1.9,
    "sterility": "negative",
    "mycoplasma": "negative",
    "endotoxin_eu_ml": 0.2,
}


# ---- the registry: the run's one site outage -------------------------------------------------------------

OUTAGE_REASON = "maintenance"  # an OutageReason: the clean room's requalification


@dataclass
class OutageState:
    site: str | None
    gate: date | None
    posted: asyncio.Event = field(default_factory=asyncio.Event)
    window: tuple[date, date] | None = None
    affected: int = 0
    note: str = ""

    def holds(self, manufacturing_start: date | None) -> bool:
        """Whether an order booked for then must wait for the outage (declared at a site the outage
        cohort was booked at) before its apheresis."""
        return (
            self.gate is not None
            and not self.posted.is_set()
            and manufacturing_start is not None
            and manufacturing_start >= self.gate
        )

    def covers(self, site_id: str | None, manufacturing_start: date | None) -> bool:
        return (
            self.window is not None
            and site_id == self.site
            and manufacturing_start is not None
            and self.window[0] <= manufacturing_start <= self.window[1]
        )


async def declare_outage(sim: Simulator) -> None:
    """Once the cohort is booked: declare one outage at its site over its manufacturing dates."""
    outage = sim.outage
    try:
        if outage.site is None or outage.gate is None:
            return
        cohort = [a for a in sim.actors if a.plan.kind == "site_outage"]
        first = min(a.plan.requested_date for a in cohort)
        await sim.clock.until(sim.clock.at(first, 0) - timedelta(days=5))
        deadline = time.monotonic() + sim.cfg.stall_s
        booked_states = {"inbound_shipment_planned"} | TERMINAL
        while time.monotonic() < deadline:
            rows = [sim.tracker.rows.get(a.order_id) for a in cohort]
            if all(r is not None and r["status"] in booked_states for r in rows):
                break
            await asyncio.sleep(0.3)
        booked: dict[str, list[tuple[OrderActor, date]]] = defaultdict(list)
        for a in cohort:
            r = sim.tracker.rows.get(a.order_id)
            mfg = as_date(((r or {}).get("slot") or {}).get("manufacturing_start_date"))
            if r is not None and r["status"] == "inbound_shipment_planned" and mfg is not None:
                booked[r["site_id"]].append((a, mfg))
        # the site most of the cohort was booked at (the planned one, unless it was full)
        site_id = max(booked, key=lambda k: (len(booked[k]), k == outage.site)) if booked else outage.site
        hit = booked.get(site_id, [])
        dates = sorted(d for _, d in hit)
        start, end = (dates[0], dates[-1]) if dates else (outage.gate, outage.gate + timedelta(days=2))
        resp = await sim.api.call(
            "site outage",
            lambda c: c.add_outage(site_id, start, end, OUTAGE_REASON),
            who="registry",
            party=ADMIN,
            ok=(201,),
        )
        outage.site = site_id
        outage.window = (start, end)
        outage.affected = len(resp.body.get("affected_booking_ids") or [])
        outage.note = (
            f"{site_id} {start.isoformat()}..{end.isoformat()} ({OUTAGE_REASON}), "
            f"{outage.affected} booking(s) affected"
        )
        for a, _ in hit:
            a.result.applied = True
    except OrderAbort as abort:
        outage.note = f"outage not declared: {abort}"
    finally:
        outage.posted.set()
