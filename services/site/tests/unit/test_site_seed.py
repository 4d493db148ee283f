"""The seeded seven-site network (shared/DOMAIN.md) and its consistency with the order service's seed
and the shared product catalogue."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

import order_service
from site_service.adapters.repository import SITES_SEED as SEED
from site_service.domain.registry import site_from_seed
from v2v_contracts import SiteRegisteredV1
from v2v_contracts.reference import product_catalogue

REGULATORS = {"FDA", "EMA", "Swissmedic", "PMDA", "NMPA", "TGA"}
USES = {"commercial", "clinical"}
ORDER_SEED = Path(order_service.__file__).parent / "seed"

ENTRIES = yaml.safe_load(SEED.read_text())
SITES = [site_from_seed(e) for e in ENTRIES]
BY_COUNTRY = {s.country: s for s in SITES}
CENTRES = yaml.safe_load((ORDER_SEED / "treatment_centers.yaml").read_text())
PRODUCTS = set(product_catalogue())  # the one product catalogue every service reads


def approved_for(site: SiteRegisteredV1, regulator: str, use: str, product: str) -> bool:
    return any(
        a.regulator == regulator and a.use == use and a.product_code == product for a in site.approvals
    )


def test_seed_path_is_packaged() -> None:
    assert SEED.name == "sites.yaml"
    assert SEED.parent.name == "seed"


def test_seven_sites_on_four_continents() -> None:
    assert len(SITES) == 7
    assert len({s.site_id for s in SITES}) == 7
    assert set(BY_COUNTRY) == {"US", "DE", "FR", "CH", "CN", "JP", "AU"}
    assert {s.region for s in SITES} == {"north_america", "europe", "asia_pacific"}


@pytest.mark.parametrize(
    ("country", "place"),
    [("US", "Morris Plains"), ("DE", "Leipzig"), ("FR", "Les Ulis"), ("CH", "Stein")],
)
def test_named_sites_from_the_domain(country: str, place: str) -> None:
    assert place in BY_COUNTRY[country].name


def test_operators_mix_own_sites_and_cmos() -> None:
    assert {s.operator for s in SITES} == {"own", "cmo"}
    assert BY_COUNTRY["DE"].operator == "cmo"  # Fraunhofer IZI is a contract manufacturer
    assert BY_COUNTRY["US"].operator == "own"


def test_european_sites_approved_by_ema_for_commercial_kymriah() -> None:
    for country in ("FR", "CH"):
        assert approved_for(BY_COUNTRY[country], "EMA", "commercial", "TISA-CEL")


@pytest.mark.parametrize("site", SITES, ids=lambda s: s.site_id)
def test_site_entries_are_well_formed(site: SiteRegisteredV1) -> None:
    assert site.active
    assert site.approvals
    for approval in site.approvals:
        assert approval.regulator in REGULATORS
        assert approval.use in USES
        assert approval.product_code in PRODUCTS
        # an approved product must be manufacturable there
        assert site.daily_capacity.get(approval.product_code, 0) > 0
    assert site.daily_capacity
    assert all(isinstance(n, int) and n > 0 for n in site.daily_capacity.values())
    assert set(site.daily_capacity) <= PRODUCTS
    assert ZoneInfo(site.timezone).key == site.timezone
    assert len(site.approvals) == len(set(site.approvals))


def test_site_from_seed_expands_products_per_approval() -> None:
    entry = next(e for e in ENTRIES if e["site_id"] == "US-MORRIS-PLAINS")
    site = site_from_seed(entry)
    assert len(site.approvals) == sum(len(a["products"]) for a in entry["approvals"])
    assert approved_for(site, "FDA", "commercial", "CILTA-CEL")
    assert not approved_for(site, "EMA", "commercial", "TISA-CEL")
    assert site.daily_capacity == {"TISA-CEL": 6, "AXI-CEL": 4, "CILTA-CEL": 2}


def test_site_from_seed_coerces_types() -> None:
    site = site_from_seed(
        {
            "site_id": "X",
            "name": "X",
            "country": "XX",
            "region": "europe",
            "timezone": "UTC",
            "operator": "cmo",
            "active": 1,
            "daily_capacity": {"TISA-CEL": "3"},
            "approvals": [{"regulator": "EMA", "use": "clinical", "products": ["TISA-CEL", "AXI-CEL"]}],
        }
    )
    assert site.active is True
    assert site.daily_capacity == {"TISA-CEL": 3}
    assert [a.product_code for a in site.approvals] == ["TISA-CEL", "AXI-CEL"]


@pytest.mark.parametrize("centre", CENTRES, ids=lambda c: c["id"])
def test_every_treatment_centre_can_get_commercial_tisa_cel(centre: dict) -> None:
    regulator = centre["regulator"]
    assert regulator in REGULATORS
    serving = [
        s
        for s in SITES
        if s.active
        and approved_for(s, regulator, "commercial", "TISA-CEL")
        and s.daily_capacity["TISA-CEL"] > 0
    ]
    assert serving, f"no site approved by {regulator} for commercial TISA-CEL ({centre['id']})"


def test_centre_regions_are_site_regions() -> None:
    assert {c["region"] for c in CENTRES} <= {s.region for s in SITES}
