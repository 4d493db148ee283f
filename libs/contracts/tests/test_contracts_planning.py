"""The catalogue's planning facts (issue 11): every product has them, consistent with its material, with
sources; the turnaround is apheresis → release with QC inside (axi-cel in the US: a median of 14 days)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from v2v_contracts.reference import product_catalogue
from v2v_contracts.reference.planning import PlanningFacts


def test_every_product_has_planning_facts_matching_its_material_with_sources() -> None:
    for code, product in product_catalogue().items():
        facts = product.planning
        assert facts is not None, code
        assert facts.starting_material == product.apheresis_material
        assert facts.sources and all(s.strip() for s in facts.sources)
        for region, t in facts.apheresis_to_release.items():
            assert t.source.strip(), (code, region)
            assert t.median_days <= t.p90_days
            assert facts.release_after_start(region) == t.median_days - facts.start_lag_days
        if facts.starting_material == "fresh":
            assert facts.max_fresh_hours is not None and facts.centre_freezing_days == 0
        else:
            assert facts.max_fresh_hours is None


def test_axi_cel_us_median_is_the_published_14_days_qc_inside() -> None:
    facts = product_catalogue()["AXI-CEL"].planning
    assert facts is not None
    us = facts.turnaround("north_america")
    assert us.median_days == 14 and not us.illustrative and "14" in us.source
    assert facts.turnaround("mars") == facts.apheresis_to_release["default"]


def test_tisa_cel_is_frozen_at_the_centre() -> None:
    facts = product_catalogue()["TISA-CEL"].planning
    assert (
        facts is not None and facts.starting_material == "cryopreserved" and facts.centre_freezing_days >= 1
    )


@pytest.mark.parametrize(
    "broken",
    [
        {"starting_material": "fresh"},  # no window
        {"starting_material": "cryopreserved", "max_fresh_hours": 48},
        {"starting_material": "cryopreserved", "apheresis_to_release": {}},
        {"starting_material": "cryopreserved", "start_lag_days": 30},
    ],
)
def test_inconsistent_facts_are_refused(broken: dict[str, object]) -> None:
    base: dict[str, object] = {
        "start_lag_days": 1,
        "apheresis_to_release": {"default": {"median_days": 20, "p90_days": 25, "source": "x"}},
        "sources": ["x"],
    }
    with pytest.raises(ValidationError):
        PlanningFacts.model_validate({**base, **broken})
