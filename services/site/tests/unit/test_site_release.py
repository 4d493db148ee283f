"""Who must sign a lot's release (pure): the market's rule, the approval's batch-release site, an import
certification for a lot made outside the market; the seed's approvals all leave someone who may release;
lot numbers have the shape the contracts check."""

from __future__ import annotations

import pytest
import yaml

from site_service.adapters.repository import SITES_SEED
from site_service.domain.registry import site_from_seed
from site_service.domain.release import NoReleasePath, Requirement, make_lot, missing, release_plan
from v2v_contracts.fields import lot_problem


def test_us_release_by_the_quality_unit_of_the_site() -> None:
    plan = release_plan("FDA", "US-MORRIS-PLAINS", "US", None, None)
    assert plan.requirements == (Requirement("release", "quality_unit", "US-MORRIS-PLAINS"),)
    assert (plan.certification, plan.imported) == ("quality_unit_release", False)


def test_eu_release_by_a_qp_and_an_import_certification_when_made_outside_the_eu() -> None:
    inside = release_plan("EMA", "FR-LES-ULIS", "FR", None, None)
    assert inside.requirements == (Requirement("qp-certification", "qualified_person", "FR-LES-ULIS"),)
    swiss = release_plan("EMA", "CH-STEIN", "CH", "DE-LEIPZIG-IZI", "DE")  # Switzerland is outside the EU
    assert swiss.imported and swiss.certification == "qp_certification"
    assert swiss.requirements == (
        Requirement("qp-certification", "qualified_person", "DE-LEIPZIG-IZI"),
        Requirement("import-certification", "qualified_person", "DE-LEIPZIG-IZI"),
    )
    assert missing(swiss, {"qp-certification"}) == [swiss.requirements[1]]
    assert missing(swiss, {"qp-certification", "import-certification"}) == []


def test_other_markets_import_through_their_quality_unit() -> None:
    plan = release_plan("PMDA", "US-MORRIS-PLAINS", "US", "JP-KOBE", "JP")
    assert [(r.meaning, r.role, r.site_id) for r in plan.requirements] == [
        ("release", "quality_unit", "JP-KOBE"),
        ("import-certification", "quality_unit", "JP-KOBE"),
    ]


def test_uk_and_canada_take_lots_released_where_they_are_made_their_importer_does_the_rest() -> None:
    """Issue 11: no manufacturing site is in the UK or Canada; the UK takes lots QP-certified in the EEA
    (its importer's Responsible Person (import) checks that), Canada lots released by the fabricator's
    quality unit or QP (its importer approves them for sale): neither step is a site's."""
    uk = release_plan("MHRA", "NL-HOOFDDORP", "NL", None, None)
    assert uk.requirements == (Requirement("qp-certification", "qualified_person", "NL-HOOFDDORP"),)
    assert (uk.imported, uk.certification, uk.batch_release_site_id) == (
        True,
        "qp_certification",
        "NL-HOOFDDORP",
    )
    ca = release_plan("HealthCanada", "US-EL-SEGUNDO", "US", None, None)
    assert ca.requirements == (Requirement("release", "quality_unit", "US-EL-SEGUNDO"),)
    assert (ca.imported, ca.certification) == (True, "quality_unit_release")
    # a lot made outside the EEA needs a UK QP under a UK import authorisation: no such site here
    with pytest.raises(NoReleasePath) as exc:
        release_plan("MHRA", "US-MORRIS-PLAINS", "US", None, None)
    assert exc.value.field == "batch_release_site_id"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("EMA", "CH-STEIN", "CH", None, None), "batch_release_site_id"),  # nobody in the EU named
        (("EMA", "US-MORRIS-PLAINS", "US", "JP-KOBE", "JP"), "batch_release_site_id"),
        (("XYZ", "FR-LES-ULIS", "FR", None, None), "regulator"),
    ],
)
def test_no_release_path_when_the_approval_names_no_batch_release_site_in_the_market(
    args: tuple[str, str, str, str | None, str | None], field: str
) -> None:
    with pytest.raises(NoReleasePath) as exc:
        release_plan(*args)
    assert exc.value.field == field


def test_every_seeded_approval_leaves_someone_who_may_release() -> None:
    entries = yaml.safe_load(SITES_SEED.read_text())
    sites = {e["site_id"]: site_from_seed(e) for e in entries}
    for site in sites.values():
        for approval in site.approvals:
            brs = approval.batch_release_site_id
            assert brs is None or brs in sites, brs
            plan = release_plan(
                approval.regulator,
                site.site_id,
                site.country,
                brs,
                sites[brs].country if brs else None,
            )
            assert plan.requirements, (site.site_id, approval)
    for entry in entries:  # every batch-release site named in the seed says why (its source)
        for approval in entry["approvals"]:
            if "batch_release_site" in approval:
                assert approval.get("source"), (entry["site_id"], approval)


def test_lot_numbers_have_the_contracts_shape() -> None:
    for site_id in ("CH-STEIN", "US-MORRIS-PLAINS", "a-very-long-site-identifier-of-sixty-four-characters-x"):
        lot = make_lot(site_id, 42)
        assert lot_problem(lot) is None and lot.endswith("-00000042")
    assert make_lot("CH-STEIN", 1) != make_lot("CH-STEIN", 2)
    for bad in ("", "abc", "L_1", "-LOT1", "LOT1\n", "X" * 33):
        assert lot_problem(bad) is not None
    with pytest.raises(ValueError):
        make_lot("CH-STEIN", 0)
