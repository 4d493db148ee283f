"""The treatment centre: places the order, collects the cells (apheresis), moves the date or cancels when
the plan says so, starts lymphodepletion, receives the product and infuses the patient. Makes the
deliberate mistakes too (a mistyped COI check character, lymphodepletion before release).

Every call is made as the order's centre (its own demo client: the platform takes the centre from the
token). Reasons are the order service's codes, with a short note that stays in the order service. The
actions are paced by the simulated clock; the platform is told none of the simulated moments (`at` is
left out: the action happened now)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from v2v_contracts.fields import booking_window
from v2v_harness.e2e import din_of

from .api import OrderAbort
from .clock import as_date, days_between
from .states import DELIVERY_CONFIRMED, TERMINAL

if TYPE_CHECKING:
    from .orders import OrderActor


def mistype_check_character(coi: str) -> str:
    """The same COI with another check character (ISO 7064 MOD 37-2 alphabet: 0-9, A-Z, *)."""
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ*"
    last = coi[-1]
    return (
        coi[:-1] + alphabet[(alphabet.index(last) + 1) % len(alphabet)]
        if last in alphabet
        else coi[:-1] + "0"
    )


class Hospital:
    def __init__(self, order: OrderActor) -> None:
        self.order = order

    def idempotency_key(self) -> str:
        """The order's one Idempotency-Key: every retry of its placement sends this same key."""
        o = self.order
        return f"v2v-sim-{o.sim.cfg.run_id}-order-{o.plan.index + 1:05d}"

    async def place(self) -> None:
        o = self.order
        c = o.plan.combo
        body = {
            "treatment_center_id": c.centre,
            "product_code": c.product,
            "order_type": c.order_type,
            "patient_ref": o.plan.patient_ref,
            "requested_apheresis_date": o.plan.requested_date.isoformat(),
        }
        if o.indication is not None:  # issue 11: the indication (and the weight its dose needs)
            body["indication"] = o.indication
            if o.weight_kg is not None:
                body["weight_kg"] = o.weight_kg
        key = self.idempotency_key()
        created = (
            await o.call("place order", lambda api: api.place_order(body, idempotency_key=key), ok=(201,))
        ).body
        o.order_id = str(created["order_id"])
        o.coi = created["coi"]
        o.result.order_id = o.order_id
        o.sim.tracker.add(created)

    async def physician_signature(self) -> dict[str, str]:
        """`V2V-Signature-Token` of the centre's demo physician (`phys.<centre>`), collected by the centre's
        own client (none without credentials: a mocked platform)."""
        credentials: Any = self.order.sim.api.credentials
        if credentials is None or not hasattr(credentials, "signature_headers"):
            return {}
        centre_id = self.order.plan.combo.centre
        user_id = credentials.user_id("physician", centre_id)
        headers: dict[str, str] = await credentials.signature_headers(
            credentials.client_id("centre", centre_id), user_id
        )
        return headers

    async def cancel(self, stage: str) -> None:
        """Cancel at `stage`; once manufacture started the physician signs the cancellation (it discards a
        product made for the patient)."""
        o = self.order
        code = str(o.plan.params.get("reason_code", "other"))
        note = f"simulated cancellation ({stage.replace('_', ' ')})"
        signed = stage in ("manufacturing", "qc_pending", "product_in_transit")
        headers = await self.physician_signature() if signed else None
        await o.call("cancel", lambda c: c.cancel(o.order_id, code, note, headers=headers), ok=(200,))
        o.result.applied = True

    async def physician_decision(self, row: dict[str, Any]) -> None:
        """QA released an out-of-specification product on the physician's request: the centre's physician
        accepts it (signed; the lot is then released and ships) or declines it (as a reject)."""
        o = self.order
        key = ("physician", row.get("run"), row.get("recollections"))
        if key in o.done:
            return
        accept = o.plan.params.get("oos_decision") == "physician_accepts"
        await o.at(o.floor + timedelta(hours=12), "physician accepts" if accept else "physician declines")
        reason = "benefit_outweighs_risk" if accept else "risk_not_acceptable"
        headers = await self.physician_signature()
        await o.call(
            "physician accepts" if accept else "physician declines",
            lambda c: c.physician_decision(o.order_id, accept, reason, headers=headers),
            ok=(200,),
        )
        o.done.add(key)
        o.result.dispositions.append(
            "out_of_specification released on physician request, " + ("accepted" if accept else "declined")
        )
        if accept:
            await o.site.release_after_decision(str(row.get("site_id")))

    async def tidy_up(self) -> None:
        """After an error the centre cancels the order, so the platform is not left with it half done."""
        o = self.order
        if not o.order_id or o.row["status"] in TERMINAL:
            return
        with contextlib.suppress(OrderAbort):
            headers = await self.physician_signature()  # needed once manufacture started
            await o.call(
                "cancel after error",
                lambda c: c.cancel(
                    o.order_id,
                    "other",
                    "the simulator gave up on this order after an error",
                    headers=headers,
                ),
                ok=(200,),
                intended=(409,),
            )

    async def apheresis(self, row: dict[str, Any]) -> bool:
        """Collect on the booked day (or move the date, or cancel before it); True: look again at once."""
        o = self.order
        slot = row.get("slot") or {}
        slot_id = str(slot.get("slot_id"))
        if ("apheresis", slot_id) in o.done:
            return False
        booked = as_date(slot.get("apheresis_date")) or o.plan.requested_date
        mfg_start = as_date(slot.get("manufacturing_start_date"))
        if o.result.predicted_days is None:
            detail = (await o.call("get order", lambda c: c.get_order(o.order_id))).body
            infusion = as_date((detail.get("predicted") or {}).get("earliest_infusion"))
            if infusion is not None:
                o.result.predicted_days = (infusion - booked).days
        outage = o.sim.outage
        if outage.holds(mfg_start):
            await outage.posted.wait()
            return True  # look again: the booking may have to move
        if outage.covers(row.get("site_id"), mfg_start):
            return False  # the platform must move this booking elsewhere: wait for the rebook
        when = max(o.sim.clock.at(booked, 8 + o.rng.uniform(0, 4)), o.floor + timedelta(hours=1))
        if row.get("recollections") and o.floor > o.sim.clock.start:
            lead = int(o.product.get("recollection_lead_days", 7))
            when = max(when, o.floor + timedelta(days=lead))
        if o.injects("apheresis_moved"):
            await o.at(when - timedelta(days=4), "move apheresis date")
            # within the booking window the platform accepts (by the real date: tomorrow .. +180 days)
            new_date = min(booked + timedelta(days=int(o.plan.params["days"])), booking_window()[1])
            code = str(o.plan.params.get("reason_code", "patient_unwell"))
            await o.call(
                "move apheresis date",
                lambda c: c.reschedule(o.order_id, new_date, code, "simulated: not fit on the day"),
                ok=(200,),
            )
            o.result.applied = True
            o.done.add(("apheresis", slot_id))
            return False
        if o.cancels_at("before_apheresis"):
            await o.at(when - timedelta(days=2), "cancel")
            await self.cancel("before_apheresis")
            return False
        moment = await o.at(when, "apheresis")
        if o.plan.coi_typo and not o.refusal_done:
            o.refusal_done = True
            typo = mistype_check_character(o.coi)
            await o.call(
                "apheresis with mistyped COI",
                lambda c: c.apheresis(o.order_id, typo),
                ok=(),
                intended=(422,),
            )
        resp = await o.call("confirm apheresis", lambda c: c.apheresis(o.order_id, o.coi), ok=(200,))
        o.din = din_of(resp.body) if isinstance(resp.body, dict) else None  # the bag's label
        o.done.add(("apheresis", slot_id))
        o.apheresis_at[slot_id] = moment
        if o.first_apheresis is None:
            o.first_apheresis = moment
        return False

    async def lymphodepletion_before_release(self) -> None:
        """The deliberate mistake of the plan's `lymph_refusal` orders: must be refused (409)."""
        o = self.order
        if not o.plan.lymph_refusal or o.lymphodepleted or ("lymph-refusal",) in o.done:
            return
        o.done.add(("lymph-refusal",))
        o.moments.append(("lymphodepletion before release", o.stamp(o.floor)))
        resp = await o.call(
            "lymphodepletion before release",
            lambda c: c.lymphodepletion(o.order_id),
            ok=(200,),
            intended=(409,),
        )
        if resp.status == 200:
            o.lymphodepleted = True
            o.sim.stats.error(f"{o.who}: lymphodepletion before release was accepted")

    async def lymphodepletion(self, when: datetime) -> None:
        """LD once the product is released and its delivery confirmed (the platform refuses it before: the
        centre waits until the order shows the product picked up). The platform is told the LD's start
        `infusion_after_ld_days` before now: the infusion, told as now, then falls on the day of the
        window the simulated clock has it on (the compressed clock cannot be told)."""
        o = self.order
        row = await o.wait_for(
            "the product's confirmed delivery",
            lambda r: r["status"] in DELIVERY_CONFIRMED | TERMINAL | {"material_at_risk", "on_hold"},
        )
        if row["status"] not in DELIVERY_CONFIRMED:
            return  # ended, or held for QA: LD waits for the product (the infusion step starts it)
        moment = await o.at(when, "lymphodepletion")
        # no indication (a product without treatment facts): no window to meet, the LD is told as now
        started = datetime.now(UTC) - timedelta(days=o.infusion_after_ld_days) if o.indication else None
        await o.call("lymphodepletion", lambda c: c.lymphodepletion(o.order_id, started), ok=(200,))
        o.lymphodepleted = True
        o.ld_moment = moment

    async def released_lot(self) -> str | None:
        """The lot on the product's label: the released run's, as the order shows it."""
        o = self.order
        lot = o.row.get("lot")
        if lot is None:  # the tracker's view may predate the release
            body = (await o.call("get order", lambda c: c.get_order(o.order_id))).body
            lot = body.get("lot") if isinstance(body, dict) else None
        return str(lot) if lot else None

    async def product_receipt(self, when: datetime) -> None:
        o = self.order
        await o.at(when, "product receipt")
        lot = await self.released_lot()
        await o.call("product receipt", lambda c: c.product_receipt(o.order_id, o.coi, lot=lot), ok=(200,))

    async def infusion(self, row: dict[str, Any]) -> None:
        """Infuse inside the window after LD (issue 11): `infusion_after_ld_days` after LD's start, on the
        simulated clock as on the platform's."""
        o = self.order
        if not o.ld_recorded():
            await self.lymphodepletion(o.floor + timedelta(hours=1))
        ld = o.ld_moment or o.floor
        when = max(ld + timedelta(days=o.infusion_after_ld_days), o.floor + timedelta(hours=1))
        moment = await o.at(when, "infusion")
        lot = await self.released_lot()
        await o.call("infusion", lambda c: c.infusion(o.order_id, o.coi, lot=lot), ok=(200,))
        if o.first_apheresis is not None:  # vein to vein on the simulated clock
            o.result.simulated_days = days_between(o.first_apheresis, moment)
