"""The simulation: set-up (catalogue, plan), one task per order, the outage, progress lines, the summary;
and the entry points `main` and `cli`."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx

from .api import ADMIN, OPS, QA, Api, OrderAbort, Party, TokenSource, centre, site
from .clock import SimClock, as_date, parse_time
from .config import Config, parse_args
from .orders import OrderActor
from .plan import EXCEPTION_WEIGHTS, Plan, make_plan
from .platform import ensure_platform, find_credentials
from .report import Stats, error_lines, progress_line, reactions_of, render_summary, utilisation
from .rules import TERMINAL_RULE, check_rules
from .sites import OutageState, declare_outage
from .states import TERMINAL
from .tracker import Tracker


class Simulator:
    def __init__(
        self,
        cfg: Config,
        out: Callable[[str], None] = print,
        credentials: TokenSource | None = None,
    ) -> None:
        """`credentials`: the demo clients each party acts as (`v2v_harness.identity.Credentials`);
        without, no token is sent (a mocked platform)."""
        self.cfg = cfg
        self.out = out
        self.stats = Stats()
        self.credentials = credentials
        self.api = Api(cfg.urls, cfg.concurrency, self.stats, credentials=credentials)
        self.tracker = Tracker(self.api, cfg.poll_s)
        self.clock = SimClock(datetime.now(UTC).replace(microsecond=0), cfg.day_seconds)
        self.products: dict[str, dict[str, Any]] = {}
        self.centres: dict[str, dict[str, Any]] = {}
        self.sites: list[dict[str, Any]] = []
        self.plan: Plan | None = None
        self.outage = OutageState(None, None)
        self.actors: list[OrderActor] = []
        self.started = time.monotonic()
        self.summary: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------------------------------

    async def load_catalogue(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """As ops: the certified centres (those with a demo client to act as), products and sites."""
        centres = (await self.api.call("catalogue", lambda c: c.treatment_centers(), party=OPS)).body
        products = (await self.api.call("catalogue", lambda c: c.products(), party=OPS)).body
        sites = (await self.api.call("catalogue", lambda c: c.sites(), party=OPS)).body
        self.products = {p["code"]: p for p in products}
        self.centres = {c["id"]: c for c in centres}
        self.sites = sites
        if self.credentials is not None:
            centres = [c for c in centres if self._has_client("centre", c["id"])]
        return centres, products

    def _has_client(self, kind: str, entity: str) -> bool:
        assert self.credentials is not None
        try:
            self.credentials.client_id(kind, entity)
        except KeyError:
            return False
        return True

    async def check_parties(self) -> None:
        """Each party of the run gets its token before the first order (a demo client missing, or refused
        by the issuer, is a set-up error rather than errors in every order)."""
        if self.credentials is None or self.plan is None:
            return
        parties: set[Party] = {OPS, QA, ADMIN}
        parties |= {centre(o.combo.centre) for o in self.plan.orders}
        parties |= {site(s) for o in self.plan.orders for s in o.combo.sites}
        for kind, entity in sorted(parties, key=lambda p: (p[0], p[1] or "")):
            try:
                await self.credentials.headers(self.credentials.client_id(kind, entity))
            except KeyError as exc:
                raise RuntimeError(f"no demo client for {kind} {entity or ''}".strip()) from exc
            except httpx.HTTPError as exc:
                raise RuntimeError(f"no token for the {kind} {entity or ''} client: {exc}") from exc
        self.out(f"simulator: acting as {len(parties)} parties, each with its own token")

    # -- the outage ------------------------------------------------------------------------------------------

    async def run_outage(self) -> None:
        """Once the cohort is booked: declare one outage at its site over its manufacturing dates."""
        await declare_outage(self)

    # -- progress ------------------------------------------------------------------------------------------

    def progress_line(self) -> str:
        statuses = []
        for actor in self.actors:
            row = self.tracker.rows.get(actor.order_id) if actor.order_id else None
            statuses.append(row["status"] if row else None)
        return progress_line(
            time.monotonic() - self.started,
            self.clock.now(),
            statuses,
            sum(self.stats.calls.values()),
            len(self.stats.errors),
        )

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.progress_s)
            self.out(self.progress_line())

    # -- main ------------------------------------------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.cfg
        try:
            centres, products = await self.load_catalogue()
            today = self.clock.start.date()
            self.plan = make_plan(cfg, centres, products, self.sites, today)
            await self.check_parties()
            self.outage = OutageState(self.plan.outage_site, self.plan.outage_gate)
            await self.tracker.start()
        except (OrderAbort, RuntimeError, KeyError, ValueError) as exc:
            self.stats.error(f"set-up failed: {exc}")
            self.print_errors()
            return 1
        kinds = Counter(o.kind for o in self.plan.orders if o.kind)
        self.out(
            f"simulator: {cfg.orders} orders, {sum(kinds.values())} with an exception "
            f"({cfg.exceptions:.0%}), seed {cfg.seed}, run {cfg.run_id}, 1 simulated day = "
            f"{cfg.day_seconds:g} s, apheresis dates over {self.plan.spread_days} days from "
            f"{today + timedelta(days=3)}"
        )
        self.out(
            "simulator: exception weights "
            + ", ".join(f"{k} {w}" for k, w in EXCEPTION_WEIGHTS.items() if k not in cfg.without)
            + (f"; left out: {', '.join(cfg.without)}" if cfg.without else "")
            + (f"; outage site {self.plan.outage_site}" if self.plan.outage_site else "")
        )
        self.actors = [OrderActor(self, p) for p in self.plan.orders]
        background = [
            asyncio.create_task(self.tracker.run()),
            asyncio.create_task(self.progress()),
        ]
        outage_task = asyncio.create_task(self.run_outage())
        tasks = [asyncio.create_task(a.run()) for a in self.actors]
        try:
            done, pending = await asyncio.wait(tasks, timeout=cfg.timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                self.stats.error(
                    f"timeout: {len(pending)} order(s) still running after {cfg.timeout_s:.0f} s"
                )
                await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    self.stats.error(f"simulator bug: {task.exception()!r}")
        finally:
            # the run itself cancelled (a caller's deadline): no order's actor outlives it, to call
            # through an API its caller then closes
            for task in tasks:
                task.cancel()
            outage_task.cancel()
            for bg in background:
                bg.cancel()
            await asyncio.gather(*tasks, outage_task, *background, return_exceptions=True)
        await self.collect()
        self.out(self.progress_line())
        self.out(self.render_summary())
        self.print_errors()
        return 0 if self.ok() else 1

    def ok(self) -> bool:
        states = self.summary.get("terminal", {})
        return not self.stats.errors and sum(states.values()) == self.cfg.orders

    def print_errors(self) -> None:
        for line in error_lines(self.stats.errors):
            self.out(line)

    # -- the summary -----------------------------------------------------------------------------------------

    async def collect(self) -> None:
        """Read every order (with its timeline) and its slots once more, for the summary."""
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def one(actor: OrderActor) -> tuple[OrderActor, dict[str, Any] | None, list[dict[str, Any]]]:
            if not actor.order_id:
                return actor, None, []
            oid = actor.order_id
            async with sem:
                try:
                    detail = (
                        await self.api.call(
                            "get order", lambda c: c.get_order(oid), who=actor.who, party=actor.centre
                        )
                    ).body
                    slots = (
                        await self.api.call(
                            "list slots", lambda c: c.slots(order_id=oid), who=actor.who, party=OPS
                        )
                    ).body
                except OrderAbort:
                    return actor, None, []
            return actor, detail, slots

        results = await asyncio.gather(*(one(a) for a in self.actors))
        terminal: Counter[str] = Counter()
        reactions: Counter[str] = Counter()
        consumed: Counter[str] = Counter()
        starts: list[date] = []
        for actor, detail, slots in results:
            res = actor.result
            if detail is None:
                self.stats.error(f"{actor.who}: never placed or not readable")
                continue
            res.final_status = detail["status"]
            res.ended_reason = detail.get("ended_reason")
            if res.final_status in TERMINAL:
                terminal[res.final_status] += 1
            else:
                self.stats.error(
                    f"{actor.who} ({actor.plan.kind or 'no exception'}) not terminal: {res.final_status}"
                )
            res.reactions = reactions_of(detail.get("timeline") or [])
            if res.aborted and res.final_status == "cancelled" and res.reactions["cancelled by the centre"]:
                res.reactions["cancelled by the centre"] -= 1
                res.reactions["cancelled by the simulator after an error"] += 1
            reactions.update(res.reactions)
            self.record_facts(actor, detail, slots)
            for slot in slots:
                if slot.get("status") == "consumed":
                    consumed[slot["site_id"]] += 1
                    if d := as_date(slot.get("manufacturing_start_date")):
                        starts.append(d)
        window = (min(starts), max(starts)) if starts else None
        rules = check_rules([a.result for a in self.actors], self.products)
        for check in rules:
            # an order not terminal is an error of its own already (above)
            if check.violations and check.rule != TERMINAL_RULE:
                self.stats.error(
                    f"rule violated: {check.rule}: {len(check.violations)} of {check.checked} "
                    "(the orders are listed under the rules)"
                )
        self.summary = {
            "terminal": dict(terminal),
            "reactions": dict(reactions),
            "utilisation": utilisation(self.sites, consumed, window),
            "window": window,
            "rules": rules,
        }

    def record_facts(self, actor: OrderActor, detail: dict[str, Any], slots: list[dict[str, Any]]) -> None:
        """What the rules and the per-lane table read of the platform's record of an order: its site, its
        centre's market and timezone, its indication and the infusion window of its recorded LD, the
        infusion's recorded time, and the booked days of the slots its runs were started from."""
        res = actor.result
        centre_of = self.centres.get(actor.plan.combo.centre) or {}
        res.site_id = detail.get("site_id")
        res.market = centre_of.get("country")
        res.centre_tz = centre_of.get("timezone")
        treatment = detail.get("treatment") or {}
        res.indication = treatment.get("indication")
        res.infusion_window = treatment.get("infusion_window")
        infused = [t["time"] for t in detail.get("timeline") or [] if t.get("type") == "order.completed.v1"]
        res.infused_at = parse_time(infused[-1]) if infused else None
        by_id = {str(s.get("slot_id")): s for s in slots}
        for run in res.collected_runs:
            slot = by_id.get(run.slot_id) or {}
            run.booked_collection = as_date(slot.get("apheresis_date"))
            run.booked_start = as_date(slot.get("manufacturing_start_date"))

    def render_summary(self) -> str:
        assert self.plan is not None
        return render_summary(
            self.cfg,
            self.stats,
            self.summary,
            [a.result for a in self.actors],
            elapsed=time.monotonic() - self.started,
            start=self.clock.start,
            last=max((a.floor for a in self.actors), default=self.clock.start),
            outage_note=self.outage.note,
        )


async def main(cfg: Config, out: Callable[[str], None] = print) -> int:
    """Start the platform if needed, simulate, print the summary; the exit status."""
    try:
        platform = await ensure_platform(cfg, out)
    except RuntimeError as exc:
        out(f"simulator: {exc}")
        return 2
    try:
        try:
            credentials = await find_credentials(cfg, platform)
        except RuntimeError as exc:
            out(f"simulator: {exc}")
            return 2
        out(f"simulator: demo clients of {credentials.state_dir} (issuer {credentials.issuer})")
        sim = Simulator(cfg, out, credentials)
        try:
            return await sim.run()
        finally:
            await sim.api.close()
    finally:
        if platform is not None:
            out("simulator: stopping the platform it started")
            platform.stop()


def cli(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        return asyncio.run(main(cfg, lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print("simulator: interrupted", flush=True)
        return 130
