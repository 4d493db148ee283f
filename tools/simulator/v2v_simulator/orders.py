"""One order's life: the coordinator that hands the turn to the hospital, the couriers and the site.

Each order is one asyncio task. It places the order (as the hospital), then whenever the order reaches a
state where some actor acts, lets that actor act, and waits for the platform's reaction in between. The
order's case file (what was done, when, the simulated time of its last action) lives here; the actors
(`hospitals`, `couriers`, `sites`) act on it, each as its own party of the platform (`api.Party`): the
order's treatment centre, the carrier named in each shipment, the site's MES, the manufacturer's QA.

Simulated moments pace the actions and are kept in the case file (`moments`) for the report; the
platform is told the real time (it refuses reported times outside [now - 30 days, now + 5 min]).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from v2v_harness.client import ApiResponse

from .api import OrderAbort, Party, Send, centre
from .clock import as_date
from .couriers import Courier
from .hospitals import Hospital
from .plan import OrderPlan
from .report import OrderResult
from .rules import fresh_planning
from .sites import Site
from .states import IN_MANUFACTURE, MATERIAL_ON_THE_WAY, PRODUCT_OUT, TERMINAL
from .tracker import signature

if TYPE_CHECKING:
    from .simulation import Simulator

# fresh material is delivered this long before its latest start (the product's max hours after collection):
# the site's receipt (1 h after the delivery) and its preparation before the start (3 h), and 2 h to spare
FRESH_START_MARGIN = timedelta(hours=6)


def treatment_plan(product: dict[str, Any], rng: random.Random) -> tuple[str | None, float | None, int]:
    """The order's indication (one of the product's, from its catalogue `treatment`), the weight its dose
    needs (else None), and when the centre infuses: the days from LD's start, whole days so that the
    platform (which counts calendar days at the centre) sees the infusion inside the window (the regimen,
    the window's minimum, one day more: at most one day later across a midnight, never past the maximum).
    No treatment facts: no indication, and infusion 3 days after LD."""
    indications = ((product.get("treatment") or {}).get("indications")) or {}
    if not indications:
        return None, None, 3
    code = rng.choice(sorted(indications))
    facts = indications[code]
    weight = round(rng.uniform(18.0, 110.0), 1) if facts.get("weight_required") else None
    low, high = facts["infusion_window_days"]
    return code, weight, int(facts["ld_regimen_days"]) + int(low) + min(1, int(high) - int(low))


class OrderActor:
    def __init__(self, sim: Simulator, plan: OrderPlan) -> None:
        self.sim = sim
        self.plan = plan
        self.product = sim.products[plan.combo.product]
        self.result = OrderResult(plan)
        self.rng = random.Random(f"{sim.cfg.seed}-{plan.index}")  # one stream for all of the order's actors
        self.centre: Party = centre(plan.combo.centre)  # the order's treatment centre, as a party
        self.order_id = ""
        self.coi = ""
        self.din: str | None = None  # the DIN of the latest collection (the apheresis answer)
        self.floor = sim.clock.start  # simulated time of the last action (actions never go back)
        # (what, simulated moment) of each timed action: kept in the result, for the rules checked at the end
        self.moments: list[tuple[str, datetime]] = self.result.moments
        self.done: set[Any] = set()
        self.posted: dict[str, set[str]] = defaultdict(set)  # milestones posted per shipment
        self.leave: frozenset[str] = frozenset()  # after an injected exception: wait until these are left
        self.first_apheresis: datetime | None = None
        self.apheresis_at: dict[str, datetime] = {}  # per slot id
        self.run_start: dict[tuple[str, int], datetime] = {}  # per (slot id, run)
        self.run_days: dict[tuple[str, int], tuple[float, float]] = {}  # manufacture, QC days per run
        self.cycle_slot: str | None = None  # the slot the current collection's material was received for
        self.release_at: datetime | None = None
        self.lymphodepleted = False  # the centre recorded LD (cleared again when the platform clears it)
        self.ld_moment: datetime | None = None  # simulated moment of the recorded LD
        # issue 11: the order's indication (and weight) from the product's treatment facts, and how many
        # days after LD's start the centre infuses (inside the indication's window)
        self.indication, self.weight_kg, self.infusion_after_ld_days = treatment_plan(
            self.product, random.Random(f"{sim.cfg.seed}-{plan.index}-indication")
        )
        self.refusal_done = False
        self.hospital = Hospital(self)
        self.courier = Courier(self)
        self.site = Site(self)

    # -- helpers ---------------------------------------------------------------------------------------

    @property
    def who(self) -> str:
        return f"order #{self.plan.index + 1} {self.order_id[:8]}"

    @property
    def row(self) -> dict[str, Any]:
        return self.sim.tracker.rows[self.order_id]

    def stamp(self, when: datetime) -> datetime:
        """A simulated moment for the next action: never before the previous one."""
        when = max(when, self.floor + timedelta(minutes=5))
        self.floor = when
        return when

    async def at(self, when: datetime, what: str = "") -> datetime:
        """Wait for the simulated moment of an action (noted in `moments` as `what`); that moment."""
        moment = self.stamp(when)
        await self.sim.clock.until(moment)
        if what:
            self.moments.append((what, moment))
        return moment

    def moment(self, what: str) -> datetime | None:
        """The simulated moment of the last action noted as `what`."""
        return next((m for w, m in reversed(self.moments) if w == what), None)

    async def call(self, label: str, send: Send, *, party: Party | None = None, **kw: Any) -> ApiResponse:
        """One counted call (see `Api.call`) as `party` (default: the order's centre); an order the order
        service returns updates the tracker."""
        resp = await self.sim.api.call(label, send, who=self.who, party=party or self.centre, **kw)
        body = resp.body
        if (
            resp.service == "order"
            and resp.status in (200, 201)
            and isinstance(body, dict)
            and "status" in body
        ):
            self.sim.tracker.observe(body)
        return resp

    async def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        try:
            return await self.sim.tracker.wait_for(self.order_id, predicate, self.sim.cfg.stall_s)
        except TimeoutError:
            raise await self.stuck(f"waiting for {what}") from None

    async def stuck(self, what: str) -> OrderAbort:
        """Record the order as stuck, with the timeline entries that show why (facts the order ignored)."""
        row = self.row
        message = (
            f"{self.who} ({self.plan.combo.product} at {row.get('site_id')}, "
            f"{self.plan.kind or 'no exception'}) stuck {what}: status {row['status']} run {row.get('run')} "
            f"for {self.sim.cfg.stall_s:.0f} s"
        )
        with contextlib.suppress(OrderAbort, KeyError, TypeError):
            detail = (await self.call("get order", lambda c: c.get_order(self.order_id))).body  # as centre
            ignored = []
            for t in detail.get("timeline") or []:
                if "not applicable while" not in (t.get("reason") or ""):
                    continue
                state = t["reason"].rsplit(" ", 1)[-1]
                if t["type"].startswith("logistics.shipment_milestone") or (
                    t["type"].startswith("logistics.shipment_planned")
                    and state in IN_MANUFACTURE | PRODUCT_OUT
                ):
                    continue  # courier scans the order does not need, the outbound leg planned
                ignored.append(f"{t['type']} while {state}")
            if ignored:
                message += "; facts the order ignored: " + ", ".join(ignored)
        self.sim.stats.error(message)
        return OrderAbort(message)

    async def poll(
        self,
        what: str,
        fetch: Callable[[], Any],
        accept: Callable[[Any], Any],
        describe: Callable[[Any], str] | None = None,
    ) -> Any:
        """Call `fetch` with backoff until `accept(result)` gives something (or the order ends)."""
        deadline = time.monotonic() + self.sim.cfg.stall_s
        delay = 0.1
        while True:
            result = await fetch()
            found = accept(result)
            if found:
                return found
            if self.row["status"] in TERMINAL:
                return None
            if time.monotonic() > deadline:
                seen = f" ({describe(result)})" if describe else ""
                raise await self.stuck(f"waiting for {what}{seen}")
            await asyncio.sleep(delay)
            delay = min(delay * 1.6, 1.5)

    def ld_recorded(self) -> bool:
        """Whether an LD stands for the current product: recorded, and not cleared by the platform since
        (a product lost after LD clears it: a repeat is then due)."""
        if self.lymphodepleted and self.row.get("lymphodepletion_at") is None:
            self.lymphodepleted = False
            self.ld_moment = None
        return self.lymphodepleted

    def cancels_at(self, stage: str) -> bool:
        return (
            self.plan.kind == "cancellation"
            and self.plan.params["stage"] == stage
            and not self.result.applied
        )

    def injects(self, kind: str) -> bool:
        return self.plan.kind == kind and not self.result.applied

    # -- the order's life ------------------------------------------------------------------------------

    async def run(self) -> OrderResult:
        try:
            await self.sim.clock.until(self.sim.clock.start + timedelta(days=self.plan.place_day))
            await self.hospital.place()
            while True:
                row = self.row
                if row["status"] in TERMINAL:
                    break
                sig = signature(row)
                if await self.act(row):
                    continue  # look again at once
                if self.row["status"] in TERMINAL:
                    break
                try:
                    await self.sim.tracker.wait_change(self.order_id, sig, self.sim.cfg.stall_s)
                except TimeoutError:
                    raise await self.stuck("waiting for the platform") from None
        except OrderAbort as abort:
            self.result.aborted = str(abort)
            await self.hospital.tidy_up()
        except asyncio.CancelledError:
            self.result.aborted = "timeout"
            raise
        return self.result

    async def act(self, row: dict[str, Any]) -> bool:
        """Do what the order's state asks of the centre, courier or site; True: look again at once."""
        status = row["status"]
        if status in self.leave:
            return False
        self.leave = frozenset()
        if status == "inbound_shipment_planned":
            return await self.hospital.apheresis(row)
        if status in MATERIAL_ON_THE_WAY:
            await self.inbound(row)
        elif status in IN_MANUFACTURE:
            if not self.site.run_done(row):
                await self.hospital.lymphodepletion_before_release()
                await self.site.manufacture(row)
        elif status in PRODUCT_OUT:
            await self.outbound(row)
        elif status == "material_at_risk":
            await self.site.disposition(row)
        elif status == "awaiting_physician":
            await self.hospital.physician_decision(row)
        elif status == "product_received":
            await self.hospital.infusion(row)
        # submitted, waitlisted, slot_reserved, booking_confirmed, rescheduling: the platform acts
        return False

    # -- the two shipments: courier legs between the hospital and the site -----------------------------

    async def inbound(self, row: dict[str, Any]) -> None:
        """The apheresis material from the centre to the site: the courier, then the site's receipt."""
        slot = row.get("slot") or {}
        slot_id = str(slot.get("slot_id"))
        if ("inbound", slot_id) in self.done:
            return
        ship = await self.courier.shipment("inbound_apheresis")
        if ship is None:
            return
        # the collection this material comes from (rerouted to a new slot after an outage: the last one)
        a = self.apheresis_at.get(slot_id) or self.moment("apheresis") or self.floor
        booked = as_date(slot.get("apheresis_date"))
        mfg = as_date(slot.get("manufacturing_start_date"))
        transit = min(2, max(1, (mfg - booked).days)) if booked and mfg else 1
        await self.courier.pick_up(ship, a + timedelta(hours=1), a + timedelta(hours=3))
        if self.cancels_at("material_in_transit"):
            await self.hospital.cancel("material_in_transit")
            return
        excursion = self.injects("inbound_excursion")
        delivered = a + timedelta(days=transit, hours=-1)
        limit = fresh_planning(self.product)
        if limit is not None:  # fresh material: at the site in time to start within its hours of collection
            delivered = min(delivered, a + timedelta(hours=limit) - FRESH_START_MARGIN)
        if not await self.courier.carry(
            ship,
            a + timedelta(days=transit / 2),
            delivered,
            excursion_at=a + timedelta(days=transit / 2, hours=2) if excursion else None,
        ):
            self.done.add(("inbound", slot_id))
            self.leave = MATERIAL_ON_THE_WAY
            return
        await self.site.receipt(ship, slot_id, mfg, delivered)

    async def outbound(self, row: dict[str, Any]) -> None:
        """The product from the site to the centre: the courier, lymphodepletion at the centre meanwhile,
        then the centre's receipt."""
        run = int(row.get("run") or 1)
        key = ("outbound", str((row.get("slot") or {}).get("slot_id")), run)
        if key in self.done:
            return
        ship = await self.courier.shipment("outbound_product", run)
        if ship is None:
            return
        r = self.release_at or self.floor
        await self.courier.pick_up(ship, r + timedelta(hours=2), r + timedelta(hours=6))
        if self.cancels_at("product_in_transit"):
            await self.hospital.cancel("product_in_transit")
            return
        if not self.ld_recorded():  # LD once the platform knows the delivery is confirmed (picked up)
            await self.hospital.lymphodepletion(r + timedelta(hours=self.rng.uniform(8, 20)))
        excursion = self.injects("outbound_excursion")
        delivered = r + timedelta(days=2)
        if not await self.courier.carry(
            ship,
            r + timedelta(days=1),
            delivered,
            excursion_at=r + timedelta(days=1, hours=3) if excursion else None,
        ):
            self.leave = PRODUCT_OUT
            return
        await self.wait_for(
            "the product on its way", lambda o: o["status"] in {"product_in_transit", "product_delivered"}
        )
        if self.row["status"] in TERMINAL:
            return
        await self.hospital.product_receipt(delivered + timedelta(hours=1))
        self.done.add(key)
