"""Site selection: the approved, active site that can start manufacturing the earliest."""

from __future__ import annotations

from collections import Counter
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
    eligible,
    select_site,
)

REGULATORS = ["FDA", "EMA", "PMDA"]
USES = ["commercial", "clinical"]
PRODUCTS = ["TISA-CEL", "AXI-CEL"]
REGIONS = ["europe", "north_america", "asia_pacific"]
SITE_IDS = [f"SITE-{c}" for c in "ABCDEF"]
BASE = date(2026, 3, 2)

approvals = st.builds(Approval, st.sampled_from(REGULATORS), st.sampled_from(USES), st.sampled_from(PRODUCTS))
sites_st = st.lists(
    st.builds(
        Site,
        site_id=st.sampled_from(SITE_IDS),
        region=st.sampled_from(REGIONS),
        active=st.sampled_from([True, True, True, False]),
        approvals=st.frozensets(approvals, min_size=1, max_size=6),
        daily_capacity=st.fixed_dictionaries({p: st.integers(min_value=0, max_value=3) for p in PRODUCTS}),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda s: s.site_id,
)
params_st = st.builds(
    Parameters,
    same_region_transit_days=st.integers(min_value=0, max_value=3),
    cross_region_transit_days=st.integers(min_value=0, max_value=4),
    horizon_days=st.integers(min_value=1, max_value=8),
)
usage_st = st.dictionaries(
    st.tuples(
        st.sampled_from(SITE_IDS),
        st.sampled_from(PRODUCTS),
        st.integers(min_value=0, max_value=20).map(lambda d: BASE + timedelta(days=d)),
    ),
    st.integers(min_value=0, max_value=4),
    max_size=40,
)


@st.composite
def requests_for(draw: st.DrawFn, sites: list[Site]) -> Request:
    """Mostly a request some active site holds the approval for, so that every outcome is well exercised."""
    known = sorted(
        {a for s in sites if s.active for a in s.approvals},
        key=lambda a: (a.regulator, a.use, a.product_code),
    )
    if known and draw(st.integers(min_value=0, max_value=4)) > 0:
        approval = draw(st.sampled_from(known))
    else:
        approval = draw(approvals)
    return Request(
        product_code=approval.product_code,
        order_type=approval.use,
        regulator=approval.regulator,
        region=draw(st.sampled_from(REGIONS)),
        apheresis_date=BASE + timedelta(days=draw(st.integers(min_value=0, max_value=5))),
    )


scenarios = sites_st.flatmap(
    lambda sites: st.tuples(st.just(sites), usage_st, requests_for(sites), params_st)
)


def window(site: Site, req: Request, params: Parameters) -> list[date]:
    transit = (
        params.same_region_transit_days if site.region == req.region else params.cross_region_transit_days
    )
    first = req.apheresis_date + timedelta(days=transit)
    return [first + timedelta(days=k) for k in range(params.horizon_days)]


def approved(site: Site, req: Request) -> bool:
    return site.active and any(
        a.regulator == req.regulator and a.use == req.order_type and a.product_code == req.product_code
        for a in site.approvals
    )


def oracle(
    sites: list[Site], used: dict[tuple[str, str, date], int], req: Request, params: Parameters
) -> tuple[str, date | None, set[str]]:
    """Brute force: (reason or 'ok', earliest day, site ids free on that day)."""
    if not sites:
        return "no_site_known", None, set()
    candidates = [s for s in sites if approved(s, req)]
    if not candidates:
        return "no_approved_site", None, set()
    free = [
        (day, s.site_id)
        for s in candidates
        for day in window(s, req, params)
        if used.get((s.site_id, req.product_code, day), 0) < s.daily_capacity.get(req.product_code, 0)
    ]
    if not free:
        return "no_capacity", None, set()
    earliest = min(day for day, _ in free)
    return "ok", earliest, {sid for day, sid in free if day == earliest}


@given(scenarios)
def test_selection_matches_brute_force_oracle(scenario) -> None:
    sites, used, req, params = scenario
    result = select_site(sites, used, req, params)
    reason, earliest, best_sites = oracle(sites, used, req, params)
    if reason == "ok":
        assert isinstance(result, Choice)
        assert result.manufacturing_start_date == earliest
        assert result.site_id in best_sites
        # ties are broken deterministically by the smallest site id
        assert result.site_id == min(best_sites)
    else:
        assert isinstance(result, NoChoice)
        assert result.reason == reason
        assert result.detail


@given(scenarios)
def test_the_choice_is_eligible_and_has_free_capacity(scenario) -> None:
    sites, used, req, params = scenario
    result = select_site(sites, used, req, params)
    if not isinstance(result, Choice):
        return
    site = next(s for s in sites if s.site_id == result.site_id)
    assert site.active
    assert Approval(req.regulator, req.order_type, req.product_code) in site.approvals
    assert eligible(site, req)
    assert (
        used.get((site.site_id, req.product_code, result.manufacturing_start_date), 0)
        < (site.daily_capacity[req.product_code])
    )
    assert result.manufacturing_start_date in window(site, req, params)


@given(scenarios, st.randoms(use_true_random=False))
def test_the_order_of_sites_does_not_matter(scenario, rnd) -> None:
    sites, used, req, params = scenario
    shuffled = list(sites)
    rnd.shuffle(shuffled)
    assert select_site(shuffled, used, req, params) == select_site(sites, used, req, params)


@settings(max_examples=60)
@given(scenarios)
def test_repeated_booking_never_oversells_and_uses_every_free_slot(scenario) -> None:
    sites, used, req, params = scenario
    used = dict(used)
    start = dict(used)
    booked: list[Choice] = []
    while isinstance(result := select_site(sites, used, req, params), Choice):
        key = (result.site_id, req.product_code, result.manufacturing_start_date)
        used[key] = used.get(key, 0) + 1
        booked.append(result)
        assert len(booked) <= 500, "booking does not terminate"

    capacity = {s.site_id: s.daily_capacity.get(req.product_code, 0) for s in sites}
    for (site_id, _product, day), n in Counter(
        (c.site_id, req.product_code, c.manufacturing_start_date) for c in booked
    ).items():
        assert start.get((site_id, req.product_code, day), 0) + n <= capacity[site_id]

    # bookings come earliest first
    days = [c.manufacturing_start_date for c in booked]
    assert days == sorted(days)

    # and the loop stops only when every eligible slot in every window is taken
    expected = sum(
        max(0, capacity[s.site_id] - start.get((s.site_id, req.product_code, day), 0))
        for s in sites
        if approved(s, req)
        for day in window(s, req, params)
    )
    assert len(booked) == expected
    final = select_site(sites, used, req, params)
    assert isinstance(final, NoChoice)
    if sites and any(approved(s, req) for s in sites):
        assert final.reason == "no_capacity"


# --- examples ------------------------------------------------------------------------------------------

PARAMS = Parameters(same_region_transit_days=1, cross_region_transit_days=2, horizon_days=42)
REQ = Request("TISA-CEL", "commercial", "EMA", "europe", date(2026, 5, 4))


def site(site_id: str, region: str = "europe", *, active: bool = True, cap: int = 2, **approval) -> Site:
    appr = Approval(approval.get("regulator", "EMA"), approval.get("use", "commercial"), "TISA-CEL")
    return Site(site_id, region, active, frozenset({appr}), {"TISA-CEL": cap})


def test_no_sites_known() -> None:
    result = select_site([], {}, REQ, PARAMS)
    assert isinstance(result, NoChoice)
    assert result.reason == "no_site_known"


def test_inactive_or_unapproved_sites_are_never_chosen() -> None:
    sites = [
        site("A-INACTIVE", active=False),
        site("B-FDA-ONLY", regulator="FDA"),
        site("C-CLINICAL-ONLY", use="clinical"),
        Site("D-OTHER-PRODUCT", "europe", True, frozenset({Approval("EMA", "commercial", "AXI-CEL")}), {}),
    ]
    result = select_site(sites, {}, REQ, PARAMS)
    assert isinstance(result, NoChoice)
    assert result.reason == "no_approved_site"
    assert "TISA-CEL" in result.detail and "EMA" in result.detail

    result = select_site([*sites, site("Z-OK", region="north_america")], {}, REQ, PARAMS)
    assert result == Choice("Z-OK", REQ.apheresis_date + timedelta(days=2))


def test_same_region_site_wins_on_transit() -> None:
    sites = [site("A-FAR", region="north_america"), site("B-NEAR")]
    assert select_site(sites, {}, REQ, PARAMS) == Choice("B-NEAR", REQ.apheresis_date + timedelta(days=1))


def test_a_full_day_pushes_to_the_next_day_or_another_site() -> None:
    near_day = REQ.apheresis_date + timedelta(days=1)
    used = {("B-NEAR", "TISA-CEL", near_day): 2, ("B-NEAR", "TISA-CEL", near_day + timedelta(days=1)): 2}
    sites = [site("A-FAR", region="north_america"), site("B-NEAR")]
    # far site's first day equals near site's second (full) day
    assert select_site(sites, used, REQ, PARAMS) == Choice("A-FAR", near_day + timedelta(days=1))


def test_no_capacity_when_every_day_in_the_horizon_is_full() -> None:
    params = Parameters(1, 2, horizon_days=3)
    first = REQ.apheresis_date + timedelta(days=1)
    used = {("B", "TISA-CEL", first + timedelta(days=k)): 2 for k in range(3)}
    result = select_site([site("B")], used, REQ, params)
    assert isinstance(result, NoChoice)
    assert result.reason == "no_capacity"
    # the day just past the horizon is not offered
    assert select_site([site("B")], used, REQ, Parameters(1, 2, horizon_days=4)) == Choice(
        "B", first + timedelta(days=3)
    )


def test_zero_or_missing_capacity_is_no_capacity() -> None:
    no_entry = Site(
        "C", "europe", True, frozenset({Approval("EMA", "commercial", "TISA-CEL")}), {"AXI-CEL": 5}
    )
    for sites in ([site("B", cap=0)], [no_entry], [site("B", cap=0), no_entry]):
        result = select_site(sites, {}, REQ, PARAMS)
        assert isinstance(result, NoChoice)
        assert result.reason == "no_capacity"


def test_zero_horizon_offers_nothing() -> None:
    result = select_site([site("B")], {}, REQ, Parameters(1, 2, horizon_days=0))
    assert isinstance(result, NoChoice)
    assert result.reason == "no_capacity"


def test_ties_on_the_day_go_to_the_smallest_site_id() -> None:
    sites = [site("C-SITE"), site("A-SITE"), site("B-SITE")]
    assert select_site(sites, {}, REQ, PARAMS) == Choice("A-SITE", REQ.apheresis_date + timedelta(days=1))


# ---- the objective with a lane table: earliest predicted delivery to the patient ------------------

LANES = {
    ("europe", "europe", "fresh"): 1,
    ("europe", "north_america", "fresh"): 2,
    ("europe", "europe", "cryopreserved"): 1,
    ("north_america", "europe", "cryopreserved"): 6,
}


def test_a_later_start_wins_when_it_delivers_earlier() -> None:
    """US starts first (no European slot before day 4) but ships back slowly: Europe delivers earlier."""
    params = Parameters(1, 2, horizon_days=42, lanes=LANES)
    req = Request(
        "TISA-CEL", "commercial", "EMA", "europe", date(2026, 5, 4), material="fresh", processing_days=31
    )
    eu, us = site("EU-SITE", "europe"), site("US-SITE", "north_america")
    full = {("EU-SITE", "TISA-CEL", date(2026, 5, 4) + timedelta(days=d)): 2 for d in (1, 2)}
    choice = select_site([eu, us], full, req, params)
    assert isinstance(choice, Choice)
    # EU: start day 3, delivery 3 + 31 + 1 = 35; US: start day 2, delivery 2 + 31 + 6 = 39
    assert choice == Choice("EU-SITE", date(2026, 5, 7))
    assert choice.predicted_delivery == date(2026, 5, 4) + timedelta(days=35)


@given(
    st.lists(st.sampled_from(["europe", "north_america"]), min_size=1, max_size=4),
    st.lists(st.integers(0, 3), min_size=4, max_size=4),
    st.integers(0, 40),
)
def test_the_choice_minimises_predicted_delivery_over_every_free_day(
    regions: list[str], busy: list[int], processing: int
) -> None:
    params = Parameters(1, 2, horizon_days=6, lanes=LANES)
    req = Request(
        "TISA-CEL",
        "commercial",
        "EMA",
        "europe",
        date(2026, 5, 4),
        material="fresh",
        processing_days=processing,
    )
    sites = [site(f"S{i}", region, cap=1) for i, region in enumerate(regions)]
    used = {
        (s.site_id, "TISA-CEL", req.apheresis_date + timedelta(days=1 + k)): 1
        for i, s in enumerate(sites)
        for k in range(busy[i])
    }
    choice = select_site(sites, used, req, params)
    assert isinstance(choice, Choice)

    def delivery(s: Site, day: date) -> date:
        back = LANES.get((s.region, "europe", "cryopreserved"), 0)
        return day + timedelta(days=processing + back)

    options = [
        (delivery(s, day), day, s.site_id)
        for s in sites
        for day in window(
            s,
            Request("TISA-CEL", "commercial", "EMA", "europe", req.apheresis_date, material="fresh"),
            params,
        )
        if used.get((s.site_id, "TISA-CEL", day), 0) < 1
    ]
    best = min(options)
    assert (choice.predicted_delivery, choice.manufacturing_start_date, choice.site_id) == best
