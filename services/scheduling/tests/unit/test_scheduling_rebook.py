"""Site selection for rebooks and outages: never the excluded site, never a day inside an outage of the
chosen site, and otherwise still the earliest free day among the allowed sites (ties: smallest site id)."""

from __future__ import annotations

import uuid
from datetime import date, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduling_service.domain.selection import (
    Approval,
    Choice,
    NoChoice,
    Parameters,
    Request,
    Site,
    Window,
    select_site,
)
from scheduling_service.domain.slots import (
    APPROVAL_WITHDRAWN,
    SITE_INACTIVE,
    Slot,
    SlotRequest,
    move_off,
)
from v2v_contracts import OrderSubmittedV1, RebookRequestedV1
from v2v_contracts.reference import product_catalogue

REGULATORS = ["EMA", "NMPA"]
USES = ["commercial", "clinical"]
PRODUCTS = ["TISA-CEL", "CILTA-CEL"]
REGIONS = ["europe", "asia_pacific"]
SITE_IDS = [f"SITE-{c}" for c in "ABCDE"]
BASE = date(2026, 6, 1)


def day(n: int) -> date:
    return BASE + timedelta(days=n)


windows = st.tuples(st.integers(0, 16), st.integers(0, 6)).map(lambda t: Window(day(t[0]), day(t[0] + t[1])))
approvals = st.builds(Approval, st.sampled_from(REGULATORS), st.sampled_from(USES), st.sampled_from(PRODUCTS))
sites_st = st.lists(
    st.builds(
        Site,
        site_id=st.sampled_from(SITE_IDS),
        region=st.sampled_from(REGIONS),
        active=st.sampled_from([True, True, True, False]),
        approvals=st.frozensets(approvals, min_size=1, max_size=4),
        daily_capacity=st.fixed_dictionaries({p: st.integers(0, 2) for p in PRODUCTS}),
        outages=st.lists(windows, max_size=3).map(tuple),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda s: s.site_id,
)
params_st = st.builds(
    Parameters,
    same_region_transit_days=st.integers(0, 2),
    cross_region_transit_days=st.integers(0, 3),
    horizon_days=st.integers(1, 12),
)
usage_st = st.dictionaries(
    st.tuples(st.sampled_from(SITE_IDS), st.sampled_from(PRODUCTS), st.integers(0, 20).map(day)),
    st.integers(0, 3),
    max_size=30,
)


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[list[Site], dict[tuple[str, str, date], int], Request, Parameters, str | None]:
    sites = draw(sites_st)
    known = sorted(
        {a for s in sites if s.active for a in s.approvals},
        key=lambda a: (a.regulator, a.use, a.product_code),
    )
    approval = draw(st.sampled_from(known)) if known and draw(st.integers(0, 4)) else draw(approvals)
    req = Request(
        approval.product_code,
        approval.use,
        approval.regulator,
        draw(st.sampled_from(REGIONS)),
        day(draw(st.integers(0, 4))),
    )
    exclude = draw(st.one_of(st.none(), st.sampled_from([*SITE_IDS, "NOT-A-SITE"])))
    return sites, draw(usage_st), req, draw(params_st), exclude


def approved(site: Site, req: Request) -> bool:
    return site.active and Approval(req.regulator, req.order_type, req.product_code) in site.approvals


def allowed_days(site: Site, req: Request, params: Parameters) -> list[date]:
    transit = (
        params.same_region_transit_days if site.region == req.region else params.cross_region_transit_days
    )
    first = req.apheresis_date + timedelta(days=transit)
    days = [first + timedelta(days=k) for k in range(params.horizon_days)]
    return [d for d in days if not any(w.start_date <= d <= w.end_date for w in site.outages)]


def oracle(
    sites: list[Site],
    used: dict[tuple[str, str, date], int],
    req: Request,
    params: Parameters,
    exclude: str | None,
) -> tuple[str, date | None, set[str]]:
    if not sites:
        return "no_site_known", None, set()
    candidates = [s for s in sites if approved(s, req) and s.site_id != exclude]
    if not candidates:
        return "no_approved_site", None, set()
    free = [
        (d, s.site_id)
        for s in candidates
        for d in allowed_days(s, req, params)
        if used.get((s.site_id, req.product_code, d), 0) < s.daily_capacity.get(req.product_code, 0)
    ]
    if not free:
        return "no_capacity", None, set()
    earliest = min(d for d, _ in free)
    return "ok", earliest, {sid for d, sid in free if d == earliest}


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_never_the_excluded_site_nor_an_outage_day_and_still_the_earliest(scenario) -> None:
    sites, used, req, params, exclude = scenario
    result = select_site(sites, used, req, params, exclude_site_id=exclude)
    reason, earliest, best = oracle(sites, used, req, params, exclude)
    if reason != "ok":
        assert isinstance(result, NoChoice)
        assert result.reason == reason
        if reason == "no_approved_site" and exclude is not None:
            assert exclude in result.detail
        return
    assert isinstance(result, Choice)
    assert result.site_id != exclude
    site = next(s for s in sites if s.site_id == result.site_id)
    assert not site.closed_on(result.manufacturing_start_date)
    assert all(not w.covers(result.manufacturing_start_date) for w in site.outages)
    assert result.manufacturing_start_date == earliest
    assert result.site_id == min(best)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_without_exclusion_or_outages_the_result_is_unchanged(scenario) -> None:
    """The extension is backwards compatible: no exclusion and no outages behave exactly as before."""
    sites, used, req, params, _ = scenario
    plain = [Site(s.site_id, s.region, s.active, s.approvals, s.daily_capacity) for s in sites]
    assert select_site(plain, used, req, params) == select_site(
        plain, used, req, params, exclude_site_id=None
    )
    reason, earliest, best = oracle(plain, used, req, params, None)
    result = select_site(plain, used, req, params)
    if reason == "ok":
        assert result == Choice(min(best), earliest)  # type: ignore[arg-type]
    else:
        assert isinstance(result, NoChoice) and result.reason == reason


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_repeated_rebooking_away_from_a_site_never_lands_there_nor_in_an_outage(scenario) -> None:
    sites, used, req, params, exclude = scenario
    used = dict(used)
    booked = 0
    while isinstance(result := select_site(sites, used, req, params, exclude_site_id=exclude), Choice):
        site = next(s for s in sites if s.site_id == result.site_id)
        assert result.site_id != exclude
        assert not site.closed_on(result.manufacturing_start_date)
        key = (result.site_id, req.product_code, result.manufacturing_start_date)
        used[key] = used.get(key, 0) + 1
        assert used[key] <= site.daily_capacity[req.product_code]
        booked += 1
        assert booked <= 200
    assert oracle(sites, used, req, params, exclude)[0] != "ok"


# --- examples ------------------------------------------------------------------------------------------

PARAMS = Parameters(same_region_transit_days=1, cross_region_transit_days=2, horizon_days=10)
REQ = Request("CILTA-CEL", "clinical", "EMA", "europe", day(0))
APPROVAL = frozenset({Approval("EMA", "clinical", "CILTA-CEL")})


def site(site_id: str, region: str = "europe", cap: int = 1, outages: tuple[Window, ...] = ()) -> Site:
    return Site(site_id, region, True, APPROVAL, {"CILTA-CEL": cap}, outages)


def test_the_excluded_site_is_skipped_even_when_it_is_the_earliest() -> None:
    sites = [site("A-NEAR"), site("B-FAR", region="asia_pacific")]
    assert select_site(sites, {}, REQ, PARAMS) == Choice("A-NEAR", day(1))
    assert select_site(sites, {}, REQ, PARAMS, exclude_site_id="A-NEAR") == Choice("B-FAR", day(2))


def test_excluding_the_only_approved_site_leaves_no_approved_site() -> None:
    result = select_site([site("A-NEAR")], {}, REQ, PARAMS, exclude_site_id="A-NEAR")
    assert isinstance(result, NoChoice)
    assert result.reason == "no_approved_site"
    assert "other than A-NEAR" in result.detail


def test_an_outage_pushes_past_its_last_day_inclusive() -> None:
    closed = site("A-NEAR", outages=(Window(day(1), day(3)),))
    assert select_site([closed], {}, REQ, PARAMS) == Choice("A-NEAR", day(4))
    # another site that is open earlier wins
    other = site("B-FAR", region="asia_pacific")
    assert select_site([closed, other], {}, REQ, PARAMS) == Choice("B-FAR", day(2))


def test_outage_days_count_within_the_horizon() -> None:
    closed = site("A-NEAR", outages=(Window(day(1), day(10)),))
    result = select_site([closed], {}, REQ, PARAMS)  # days 1..10 are the whole horizon
    assert isinstance(result, NoChoice)
    assert result.reason == "no_capacity"
    assert select_site([closed], {}, REQ, Parameters(1, 2, horizon_days=11)) == Choice("A-NEAR", day(11))


def test_one_day_outage_and_full_days_combine() -> None:
    s = site("A", outages=(Window(day(2), day(2)),))
    used = {("A", "CILTA-CEL", day(1)): 1, ("A", "CILTA-CEL", day(3)): 1}
    assert select_site([s], used, REQ, PARAMS) == Choice("A", day(4))


# --- what a waitlisted request remembers --------------------------------------------------------------


def _common() -> dict[str, object]:
    return {"order_id": uuid.uuid4(), "coi": "V2V0026000001X", "treatment_center_id": "TC-DE-BE-001"}


def test_a_rebook_request_keeps_its_exclusion_and_kind() -> None:
    rebook = RebookRequestedV1(
        **_common(),  # type: ignore[arg-type]
        kind="site_outage",
        reason="outage:maintenance",
        product_code="CILTA-CEL",
        order_type="clinical",
        regulator="EMA",
        region="europe",
        apheresis_date=day(3),
        exclude_site_id="DE-LEIPZIG-IZI",
    )
    req = SlotRequest.rebook(rebook)
    assert req.exclude_site_id == "DE-LEIPZIG-IZI"
    assert req.apheresis_date == day(3)
    # the product's facts from the shared catalogue: fresh material, 19 + 14 days of manufacturing and QC
    assert req.selection(product_catalogue()) == Request(
        "CILTA-CEL", "clinical", "EMA", "europe", day(3), material="fresh", processing_days=33
    )
    assert req.reserved_reason(from_waitlist=False) == "rebook:site_outage"
    assert req.reserved_reason(from_waitlist=True) == "rebook:site_outage"


def test_a_submitted_order_is_initial_or_waitlist() -> None:
    submitted = OrderSubmittedV1(
        **_common(),  # type: ignore[arg-type]
        product_code="CILTA-CEL",
        order_type="clinical",
        regulator="EMA",
        country="DE",
        region="europe",
        requested_apheresis_date=day(5),
    )
    req = SlotRequest.submitted(submitted)
    assert req.exclude_site_id is None and req.rebook_kind is None
    assert req.apheresis_date == day(5)
    assert req.reserved_reason(from_waitlist=False) == "initial"
    assert req.reserved_reason(from_waitlist=True) == "waitlist"


# --- issue 11: a slot moved off a site that may no longer make it -------------------------------------


def live_slot(collected_on: date | None = None) -> Slot:
    return Slot(
        uuid.uuid4(),
        uuid.uuid4(),
        "V2V0026000001X",
        "TC-DE-BE-001",
        "A-NEAR",
        "CILTA-CEL",
        day(4),
        day(1),
        "confirmed",
        order_type="clinical",
        regulator="EMA",
        region="europe",
        collected_on=collected_on,
    )


def test_a_slot_whose_material_was_not_collected_moves_for_its_planned_date_today_at_the_earliest() -> None:
    withdrawn = Site("A-NEAR", "europe", True, frozenset(), {"CILTA-CEL": 1})
    request = move_off(live_slot(), withdrawn, day(0))
    assert request is not None
    assert (request.kind, request.reason, request.exclude_site_id) == (
        "site_outage",
        APPROVAL_WITHDRAWN,
        "A-NEAR",
    )
    assert request.apheresis_date == day(1) and not request.material_collected
    late = move_off(live_slot(), withdrawn, day(3))
    assert late is not None and late.apheresis_date == day(3) and not late.material_collected
    # a site that still approves the market keeps the slot
    assert move_off(live_slot(), site("A-NEAR"), day(0)) is None


def test_a_slot_whose_material_was_collected_moves_as_collected_material_on_its_collection_date() -> None:
    withdrawn = Site("A-NEAR", "europe", True, frozenset(), {"CILTA-CEL": 1})
    inactive = Site("A-NEAR", "europe", False, APPROVAL, {"CILTA-CEL": 1})
    for at, reason in ((withdrawn, APPROVAL_WITHDRAWN), (inactive, SITE_INACTIVE)):
        # collected on day 2 (a day after the planned date), moved on day 3: the collection date is kept
        request = move_off(live_slot(collected_on=day(2)), at, day(3))
        assert request is not None and request.reason == reason
        assert request.material_collected and request.apheresis_date == day(2)
        assert (request.kind, request.exclude_site_id) == ("site_outage", "A-NEAR")
        # the planner takes it as collected material: its date fixed, the fresh window from it
        req = SlotRequest.rebook(request)
        planned = req.plan(product_catalogue())
        assert req.collected and planned.collected and planned.apheresis_date == day(2)
        assert planned.max_fresh_days == 3  # CILTA-CEL: 72 h


def test_a_slot_booked_for_collected_material_keeps_its_collection_date() -> None:
    rebook = RebookRequestedV1(
        **_common(),  # type: ignore[arg-type]
        kind="site_outage",
        reason="approval_withdrawn",
        product_code="CILTA-CEL",
        order_type="clinical",
        regulator="EMA",
        region="europe",
        apheresis_date=day(2),
        exclude_site_id="A-NEAR",
        material_collected=True,
    )
    booked = Slot.booked(
        uuid.uuid4(), SlotRequest.rebook(rebook), "B-FAR", day(4), "rebook:site_outage", day(2)
    )
    assert booked.collected_on == day(2)
    fresh = Slot.booked(
        uuid.uuid4(),
        SlotRequest.rebook(rebook.model_copy(update={"material_collected": False})),
        "B-FAR",
        day(4),
        "rebook:site_outage",
    )
    assert fresh.collected_on is None
