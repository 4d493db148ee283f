"""The plan: which orders, for which (centre, product, use), when, and with which exception.

Reproducible: the same seed and the same network give the same plan (the run id only names the patients:
every run has patients of its own). Requested apheresis dates lie in the platform's booking window
(tomorrow .. today + 180 days); reasons are the platform's codes.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from v2v_contracts.fields import booking_window

from .clock import as_date
from .config import Config
from .states import STEPS

# Relative weights of the exception kinds (an order gets at most one; printed with the summary).
EXCEPTION_WEIGHTS: dict[str, int] = {
    "cancellation": 14,  # the centre cancels at a random step
    "material_rejected": 12,  # the site refuses the apheresis material at receipt -> recollection
    "inbound_excursion": 12,  # inbound reading out of range -> recollection
    "qc_oos": 14,  # out of specification at QC -> remanufacture (retained material) or recollection
    "manufacturing_failure": 10,  # a step fails -> remanufacture or recollection
    "outbound_excursion": 12,  # outbound reading out of range -> quarantine -> QA release or reject
    "apheresis_moved": 12,  # the centre moves the apheresis date before apheresis -> rebook
    "site_outage": 8,  # in the cohort whose bookings the one site outage of the run hits -> rebook
    "persistent_oos": 6,  # every run out of specification -> remanufacture, recollection, ... failed
}
CANCEL_STAGES = (
    "before_apheresis",
    "material_in_transit",
    "manufacturing",
    "qc_pending",
    "product_in_transit",
)
QA_RELEASE_SHARE = 0.6  # products held after an outbound excursion released by QA (the rest rejected)
# an out-of-specification product (issue 10): QA rejects it (a remanufacture or a recollection follows), or
# releases it on the physician's request, who accepts it (the dose ships, expanded access where the market
# requires it, an authority notification within 48 h of the infusion) or declines it (as a reject)
OOS_DECISIONS: dict[str, float] = {"reject": 0.5, "physician_accepts": 0.35, "physician_declines": 0.15}
# reason codes, from the platform's vocabularies (the order service's `domain/reasons.py`; the site's
# `v2v_contracts.events` ReceiptRejection, StepFailure, QcFinding)
CANCEL_REASONS = ("consent_withdrawn", "disease_progression", "patient_ineligible", "physician_decision")
RESCHEDULE_REASONS = (
    "patient_unwell",
    "patient_unavailable",
    "centre_capacity",
    "apheresis_unit_unavailable",
)
QA_RELEASE_REASONS = ("within_stability_data", "excursion_not_confirmed", "assessed_acceptable")
QA_REJECT_REASONS = ("outside_stability_data", "integrity_compromised", "insufficient_data")
REJECT_REASONS = ("damaged_container", "label_mismatch", "insufficient_volume", "documentation_missing")
OOS_REASONS = ("viability", "potency", "dose", "purity", "vector_copy_number")
FAIL_REASONS = ("insufficient_cell_growth", "transduction_failure", "contamination", "equipment_failure")
FIRST_OFFSET_DAYS = 3  # the earliest apheresis date asked for: today + 3
MOVE_DAYS = (3, 10)  # how far a moved apheresis date moves


@dataclass(frozen=True)
class Combo:
    centre: str
    product: str
    order_type: str
    sites: tuple[str, ...]  # approved sites, in the order scheduling prefers them when all are free
    primary: str


def feasible_combos(
    centres: list[dict[str, Any]], products: list[dict[str, Any]], sites: list[dict[str, Any]]
) -> list[Combo]:
    """Every (centre, product, use) some active site approves; `primary` is where it lands when all sites
    have room (the nearest region first, then by site id, as scheduling chooses)."""
    combos = []
    for centre in centres:
        for product in products:
            for use in ("commercial", "clinical"):
                eligible = [
                    s
                    for s in sites
                    if s.get("active", True)
                    and int((s.get("daily_capacity") or {}).get(product["code"], 0)) > 0
                    and any(
                        a["regulator"] == centre["regulator"]
                        and a["use"] == use
                        and a["product_code"] == product["code"]
                        for a in s.get("approvals") or []
                    )
                ]
                if not eligible:
                    continue
                ranked = sorted(eligible, key=lambda s: (s["region"] != centre["region"], s["site_id"]))
                ids = tuple(s["site_id"] for s in ranked)
                combos.append(Combo(centre["id"], product["code"], use, ids, ids[0]))
    return combos


@dataclass
class OrderPlan:
    index: int
    patient_ref: str
    combo: Combo
    requested_date: date
    place_day: float  # simulated days after the start when the centre places the order
    kind: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    lymph_refusal: bool = False  # tries lymphodepletion before release (must be refused: 409)
    coi_typo: bool = False  # confirms apheresis with a mistyped COI check character first (422)


@dataclass
class Plan:
    orders: list[OrderPlan]
    outage_site: str | None
    outage_gate: date | None  # first requested apheresis date of the outage cohort
    spread_days: int


def site_weights(combos: list[Combo], sites: list[dict[str, Any]]) -> dict[str, float]:
    """A site's share of the orders: its daily capacity for the products that land there first."""
    capacity = {s["site_id"]: s.get("daily_capacity") or {} for s in sites}
    products: dict[str, set[str]] = defaultdict(set)
    for c in combos:
        products[c.primary].add(c.product)
    return {site: float(sum(int(capacity[site].get(p, 0)) for p in ps)) for site, ps in products.items()}


def choose_kinds(n_exceptions: int, rng: random.Random, weights: dict[str, int]) -> list[str]:
    """Exception kinds for `n_exceptions` orders: every kind once while there is room (heaviest first),
    then drawn by weight."""
    kinds = [k for k, w in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0])) if w > 0]
    chosen = kinds[:n_exceptions]
    rest = n_exceptions - len(chosen)
    if rest > 0 and kinds:
        chosen += rng.choices(kinds, weights=[weights[k] for k in kinds], k=rest)
    rng.shuffle(chosen)
    return chosen


def make_plan(
    cfg: Config,
    centres: list[dict[str, Any]],
    products: list[dict[str, Any]],
    sites: list[dict[str, Any]],
    today: date,
) -> Plan:
    rng = random.Random(cfg.seed)
    combos = feasible_combos(centres, products, sites)
    if not combos:
        raise RuntimeError("no (centre, product, use) combination is approved at any site")
    capacity = {s["site_id"]: s.get("daily_capacity") or {} for s in sites}
    weights = site_weights(combos, sites)
    by_site: dict[str, list[Combo]] = defaultdict(list)
    for c in combos:
        by_site[c.primary].append(c)
    site_ids = sorted(by_site)
    total_weight = sum(weights[s] for s in site_ids) or 1.0

    # the outage cohort: combos that land first at one site but have an alternative (else the rebook
    # could only wait); the site with the most capacity for them
    outage_options = [c for c in combos if len(c.sites) > 1]
    kinds_weights = {k: 0 if k in cfg.without else w for k, w in EXCEPTION_WEIGHTS.items()}
    outage_site = None
    outage_combos: list[Combo] = []
    if outage_options:
        outage_site = max(
            {c.primary for c in outage_options},
            key=lambda s: (
                sum(int(capacity[s].get(c.product, 0)) for c in outage_options if c.primary == s),
                s,
            ),
        )
        outage_combos = [c for c in outage_options if c.primary == outage_site]
    else:
        kinds_weights["site_outage"] = 0

    n = cfg.orders
    n_exc = round(n * cfg.exceptions)
    kinds = choose_kinds(n_exc, rng, kinds_weights) + [None] * (n - n_exc)  # type: ignore[list-item]
    rng.shuffle(kinds)
    first_offset = FIRST_OFFSET_DAYS
    latest = booking_window(today)[1]  # the last apheresis date the platform books
    cohort = [i for i, k in enumerate(kinds) if k == "site_outage"]
    per_day = 1
    if cohort and outage_site is not None:
        per_day = max(1, min(int(capacity[outage_site].get(c.product, 1)) for c in outage_combos) // 2)
    # the outage cohort's dates and a moved date must still be bookable after everyone else's
    reserve = (10 + len(cohort) // per_day + 3 if cohort else 0) + MOVE_DAYS[1]
    # enough days for the booked demand to fit the network's capacity about twice over (as far as the
    # booking window allows)
    room = max(1, (latest - today).days - first_offset - reserve)
    spread = min(max(14, math.ceil(2.0 * n / total_weight)), room)
    gate = None
    if cohort and outage_site is not None:
        # after everyone else's dates, and clear of outages the site already has (an earlier run's)
        needed = timedelta(days=len(cohort) // per_day + 3)
        gate = today + timedelta(days=first_offset + spread + 10)
        closed = [
            (as_date(o["start_date"]), as_date(o["end_date"]))
            for s in sites
            if s["site_id"] == outage_site
            for o in s.get("outages") or []
        ]
        while any(lo and hi and lo <= gate + needed and gate <= hi for lo, hi in closed):
            gate += timedelta(days=1)

    orders: list[OrderPlan] = []
    for i, kind in enumerate(kinds):
        if kind == "site_outage" and outage_combos and gate is not None:
            combo = outage_combos[cohort.index(i) % len(outage_combos)]
            requested = min(gate + timedelta(days=cohort.index(i) // per_day), latest)
        else:
            site = rng.choices(site_ids, weights=[weights[s] for s in site_ids])[0]
            group = by_site[site]
            # within a site, products in proportion to its capacity for them
            cw = [
                int(capacity[site].get(c.product, 0)) / sum(1 for g in group if g.product == c.product)
                for c in group
            ]
            combo = rng.choices(group, weights=cw)[0]
            requested = today + timedelta(days=first_offset + rng.randrange(spread))
        # the centre orders some time between now and 5 days before the apheresis date it asks for
        place_day = rng.uniform(0.0, max(0.0, (requested - today).days - 5.0))
        params: dict[str, Any] = {}
        if kind == "cancellation":
            params["stage"] = rng.choice(CANCEL_STAGES)
            params["reason_code"] = rng.choice(CANCEL_REASONS)
        elif kind == "material_rejected":
            params["reason"] = rng.choice(REJECT_REASONS)
        elif kind in {"qc_oos", "persistent_oos"}:
            params["reason"] = rng.choice(OOS_REASONS)
            params["oos_decision"] = (
                rng.choices(list(OOS_DECISIONS), weights=list(OOS_DECISIONS.values()))[0]
                if kind == "qc_oos"
                else "reject"  # every run out of specification: remanufacture, recollection, ... failed
            )
        elif kind == "manufacturing_failure":
            params["step"] = rng.choice(STEPS)
            params["reason"] = rng.choice(FAIL_REASONS)
        elif kind == "outbound_excursion":
            params["decision"] = "release" if rng.random() < QA_RELEASE_SHARE else "reject"
            params["reason_code"] = rng.choice(
                QA_RELEASE_REASONS if params["decision"] == "release" else QA_REJECT_REASONS
            )
        elif kind == "apheresis_moved":
            params["days"] = rng.randint(*MOVE_DAYS)
            params["reason_code"] = rng.choice(RESCHEDULE_REASONS)
        orders.append(
            OrderPlan(
                index=i,
                patient_ref=f"SIM-{cfg.run_id}-{cfg.seed % 1000:03d}-{i + 1:05d}",
                combo=combo,
                requested_date=requested,
                place_day=place_day,
                kind=kind,
                params=params,
            )
        )
    # deliberate mistakes, on orders that are not cancelled on purpose
    candidates = [o for o in orders if o.kind != "cancellation"] or orders
    for o in rng.sample(candidates, min(len(candidates), max(1, n // 20))):
        o.lymph_refusal = True
    for o in rng.sample(candidates, min(len(candidates), max(1, n // 25))):
        o.coi_typo = True
    return Plan(orders, outage_site if cohort else None, gate, spread)
