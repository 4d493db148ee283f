"""The courier: finds the order's shipment, scans its custody milestones with logger readings, and reports
out-of-range readings when the plan injects a temperature excursion.

Each scan presents the label's pair: the COI and, as the shipment shows it, the collection's DIN (inbound)
or the run's lot (outbound); when logistics learnt it after the shipment was read (it answers 422 naming
`din`/`lot`), the shipment is read again and the scan sent once more.

An excursion is judged by the product's rule (limit and cumulative minutes outside it beyond the
shipment's `excursion_tolerance_min`): the logger reports readings outside the limit over a span longer
than the tolerance. Readings count only after the pickup, and the platform takes no time ahead of now, so
the pickup of a leg whose excursion is planned is reported as it happened that long before (`EXCURSION_LAG`
plus the tolerance), the readings up to now.

The shipment is looked up as ops (the order's centre reads no shipments); its milestones and readings are
reported as the carrier the shipment names (`carrier_id`), with that carrier's own token. The platform
takes only real times (`occurred_at`, `measured_at` within [now - 30 days, now + 5 min]): each report
carries the moment it is sent, and the simulated moment stays in the order's case file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .api import OPS, OrderAbort, Party, carrier
from .states import SHIPMENT_LIVE

if TYPE_CHECKING:
    from .orders import OrderActor


EXCURSION_LAG = timedelta(minutes=30)  # margin of the backdated pickup beyond the excursion's span
DEFAULT_TOLERANCE_MIN = 30.0  # a shipment that does not say its tolerance (an older platform)


class Courier:
    def __init__(self, order: OrderActor) -> None:
        self.order = order

    def excursion_planned(self, ship: dict[str, Any]) -> bool:
        return self.order.injects(f"{ship['leg'].split('_')[0]}_excursion")

    @staticmethod
    def excursion_span(ship: dict[str, Any]) -> timedelta:
        """How long the injected excursion lasts: beyond the shipment's tolerance."""
        tolerance = ship.get("excursion_tolerance_min")
        return timedelta(minutes=float(DEFAULT_TOLERANCE_MIN if tolerance is None else tolerance) + 10)

    @staticmethod
    def pair(ship: dict[str, Any]) -> dict[str, Any]:
        """The label's second id as the shipment shows it: DIN inbound, lot outbound (none if not known)."""
        key = "din" if ship["leg"] == "inbound_apheresis" else "lot"
        return {key: ship[key]} if ship.get(key) else {}

    async def shipment(self, leg: str, run: int | None = None) -> dict[str, Any] | None:
        """The live shipment of `leg` (of `run`), once logistics has planned it; None if the order ended."""
        o = self.order

        async def fetch() -> Any:
            return (
                await o.call("list shipments", lambda c: c.shipments(order_id=o.order_id), party=OPS)
            ).body

        def accept(ships: list[dict[str, Any]]) -> dict[str, Any] | None:
            live = [
                s
                for s in ships
                if s["leg"] == leg
                and s["status"] in SHIPMENT_LIVE | {"delivered"}
                and (run is None or s.get("run") in (None, run))
                and not (leg == "inbound_apheresis" and s["status"] == "delivered")
            ]
            return live[-1] if live else None

        def describe(ships: list[dict[str, Any]]) -> str:
            mine = [f"{s.get('run') or '-'}:{s['status']}" for s in ships if s["leg"] == leg]
            return f"{leg} shipments (run:status): {', '.join(mine) or 'none'}"

        found: dict[str, Any] | None = await o.poll(f"the {leg} shipment", fetch, accept, describe)
        return found

    def party(self, ship: dict[str, Any]) -> Party:
        """The carrier that carries the shipment (and alone may report on it)."""
        carrier_id = ship.get("carrier_id")
        if not carrier_id:
            o = self.order
            o.sim.stats.error(f"{o.who}: shipment {ship['shipment_id']} names no carrier")
            raise OrderAbort("shipment without a carrier")
        return carrier(str(carrier_id))

    def reading(self, ship: dict[str, Any], *, excursion: bool = False) -> float:
        lo, hi = float(ship["min_temp_c"]), float(ship["max_temp_c"])
        if excursion:
            return round(hi + self.order.rng.uniform(4, 10), 1)
        return round(lo + (hi - lo) * self.order.rng.uniform(0.3, 0.7), 1)

    async def milestone(
        self, ship: dict[str, Any], milestone: str, when: datetime, location: str, temperature: float | None
    ) -> None:
        o = self.order
        sid = str(ship["shipment_id"])
        if milestone in o.posted[sid]:
            return
        label = f"{ship['leg'].split('_')[0]} {milestone}"
        await o.at(when, label)
        handled_by = f"courier-{o.rng.randrange(100, 999)}"
        received_from = ship["origin"] if milestone == "picked_up" else None
        # once: a retry resends the same body under the same Idempotency-Key
        real = datetime.now(UTC)
        if milestone in ("booked", "picked_up") and self.excursion_planned(ship):
            real -= self.excursion_span(ship) + EXCURSION_LAG  # the logger's readings follow it
        occurred_at = real.isoformat()

        async def scan(pair: dict[str, Any], ok: tuple[int, ...]) -> Any:
            return await o.call(
                label,
                lambda c: c.milestone(
                    sid,
                    milestone,
                    occurred_at=occurred_at,
                    location=location,
                    handled_by=handled_by,
                    coi=o.coi,
                    received_from=received_from,
                    temperature_c=temperature,
                    **pair,
                ),
                party=self.party(ship),
                ok=ok,
            )

        resp = await scan(self.pair(ship), (201, 422))
        if resp.status == 422:
            fields = {e.get("field") for e in (resp.body or {}).get("errors", [])}
            if not fields & {"din", "lot"}:
                o.sim.stats.error(f"{o.who}: {label} refused: {resp.body}")
                raise OrderAbort(f"{label}: refused")
            fresh = await self.shipment(ship["leg"], ship.get("run"))  # logistics learnt it meanwhile
            if fresh is None:
                raise OrderAbort(f"{label}: the shipment is gone")
            ship.update(fresh)
            await scan(self.pair(ship), (201,))
        o.posted[sid].add(milestone)

    async def excursion(self, ship: dict[str, Any], when: datetime) -> None:
        """Readings outside the limit over a span beyond the shipment's tolerance, the last one now: one of
        the answers says the excursion was published (the shipment is then compromised)."""
        o = self.order
        label = f"{ship['leg'].split('_')[0]} temperature excursion"
        await o.at(when, label)
        end = datetime.now(UTC)  # once: a retry resends the same bodies under the same Idempotency-Keys
        span = self.excursion_span(ship)
        readings = [
            (self.reading(ship, excursion=True), (end - span * (1 - i / 2)).isoformat()) for i in range(3)
        ]
        resp: Any = None
        published = False
        for reading, measured_at in readings:
            resp = await o.call(
                label,
                lambda c, r=reading, m=measured_at: c.temperature_reading(
                    ship["shipment_id"], r, measured_at=m, coi=o.coi
                ),
                party=self.party(ship),
                ok=(201,),
            )
            published = published or bool(resp.body.get("excursion_published"))
        if not published and resp.body.get("shipment_status") != "compromised":
            o.sim.stats.error(
                f"{o.who}: readings beyond the tolerance did not raise an excursion: {resp.body}"
            )
        o.result.applied = True

    async def pick_up(self, ship: dict[str, Any], booked_at: datetime, picked_up_at: datetime) -> None:
        """Booked, then picked up at the origin (with a reading)."""
        await self.milestone(ship, "booked", booked_at, ship["origin"], None)
        await self.milestone(ship, "picked_up", picked_up_at, ship["origin"], self.reading(ship))

    async def carry(
        self,
        ship: dict[str, Any],
        in_transit_at: datetime,
        delivered_at: datetime,
        *,
        excursion_at: datetime | None = None,
    ) -> bool:
        """In transit through the hub, then delivered at the destination; with `excursion_at`, an
        out-of-range reading then instead of the delivery (False)."""
        await self.milestone(ship, "in_transit", in_transit_at, "HUB", self.reading(ship))
        if excursion_at is not None:
            await self.excursion(ship, excursion_at)
            return False
        await self.milestone(ship, "delivered", delivered_at, ship["destination"], self.reading(ship))
        return True


def now() -> str:
    """The real time of a report (the platform refuses simulated moments days ahead)."""
    return datetime.now(UTC).isoformat()
