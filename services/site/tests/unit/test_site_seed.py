"""The seeded network (issue 11): the seven-site tisa-cel network of shared/DOMAIN.md, the other products
at their own manufacturers' sites, each site's manufacturer and sources, and its consistency with the
order service's seed and the shared product catalogue."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

import order_service
from site_service.adapters.repository import SITES_SEED as SEED
from site_service.domain.registry import check_made_by, site_from_seed
from site_service.service_layer.products import makers
from v2v_contracts import SiteRegisteredV1
from v2v_contracts.errors import Invalid
from v2v_contracts.reference import product_catalogue

REGULATORS = {"FDA", "EMA", "Swissmedic", "PMDA", "NMPA", "TGA", "MHRA", "HealthCanada"}
USES = {"commercial", "clinical"}
ORDER_SEED = Path(order_service.__file__).parent / "seed"

ENTRIES = yaml.safe_load(SEED.read_text())
SITES = [site_from_seed(e) for e in ENTRIES]
BY_ID = {s.site_id: s for s in SITES}
CATALOGUE = product_catalogue()
TISA_CEL_NETWORK = {
    "US-MORRIS-PLAINS",
    "DE-LEIPZIG-IZI",
    "FR-LES-ULIS",
    "CH-STEIN",
    "CN-SHANGHAI",
    "JP-KOBE",
    "AU-MELBOURNE",
}
CENTRES = yaml.safe_load((ORDER_SEED / "treatment_centers.yaml").read_text())
PRODUCTS = set(product_catalogue())  # the one product catalogue every service reads


def approved_for(site: SiteRegisteredV1, regulator: str, use: str, product: str) -> bool:
    return any(
        a.regulator == regulator and a.use == use and a.product_code == product for a in site.approvals
    )


def test_seed_path_is_packaged() -> None:
    assert SEED.name == "sites.yaml"
    assert SEED.parent.name == "seed"


def test_the_seven_tisa_cel_sites_on_four_continents_and_their_makers() -> None:
    """The seed document's network: seven sites on four continents, owned plants and CMOs, all making
    tisa-cel; the other sites are other manufacturers' plants, making no tisa-cel."""
    assert len({s.site_id for s in SITES}) == len(SITES) == 13
    tisa = [s for s in SITES if s.daily_capacity.get("TISA-CEL")]
    assert {s.site_id for s in tisa} == TISA_CEL_NETWORK
    assert {s.country for s in tisa} == {"US", "DE", "FR", "CH", "CN", "JP", "AU"}
    assert {s.region for s in tisa} == {"north_america", "europe", "asia_pacific"}
    assert {s.operator for s in tisa} == {"own", "cmo"}
    own = {s.site_id for s in tisa if s.operator == "own"}
    assert own == {"US-MORRIS-PLAINS", "FR-LES-ULIS", "CH-STEIN"}
    assert all(s.manufacturer == "novartis" for s in tisa if s.operator == "own")
    assert {s.manufacturer for s in tisa if s.operator == "cmo"} == set(
        CATALOGUE["TISA-CEL"].contract_manufacturers
    )


@pytest.mark.parametrize(
    ("site_id", "place", "manufacturer", "products"),
    [
        ("US-MORRIS-PLAINS", "Morris Plains", "novartis", {"TISA-CEL", "CILTA-CEL"}),
        ("DE-LEIPZIG-IZI", "Leipzig", "fraunhofer-izi", {"TISA-CEL"}),
        ("FR-LES-ULIS", "Les Ulis", "novartis", {"TISA-CEL"}),
        ("CH-STEIN", "Stein", "novartis", {"TISA-CEL"}),
        ("JP-KOBE", "Kobe", "fbri", {"TISA-CEL"}),
        ("AU-MELBOURNE", "Melbourne", "cell-therapies", {"TISA-CEL"}),
        ("CN-SHANGHAI", "Shanghai", "cbmg", {"TISA-CEL"}),
        ("US-EL-SEGUNDO", "El Segundo", "kite", {"AXI-CEL"}),
        ("US-FREDERICK", "Frederick", "kite", {"AXI-CEL"}),
        ("NL-HOOFDDORP", "Hoofddorp", "kite", {"AXI-CEL"}),
        ("CN-FOSUN-KITE", "Fosun Kite", "fosun-kite", {"AXI-CEL"}),
        ("US-RARITAN", "Raritan", "janssen", {"CILTA-CEL"}),
        ("BE-GHENT", "Ghent", "janssen", {"CILTA-CEL"}),
    ],
)
def test_who_makes_what_where(site_id: str, place: str, manufacturer: str, products: set[str]) -> None:
    """Axi-cel at Kite's plants (in China at its licensee Fosun Kite's), cilta-cel at the Janssen/Legend
    plants and Morris Plains (a contract manufacturer for it), tisa-cel in the seed document's network
    (shared/DOMAIN.md, "Who makes what")."""
    site = BY_ID[site_id]
    assert place in site.name
    assert site.manufacturer == manufacturer
    assert set(site.daily_capacity) == products
    assert {a.product_code for a in site.approvals} == products


def test_no_site_makes_a_product_of_another_manufacturer() -> None:
    for site in SITES:
        for product in {a.product_code for a in site.approvals} | set(site.daily_capacity):
            assert CATALOGUE[product].made_by(site.manufacturer), (site.site_id, product)
        # and the site service's own check agrees (it refuses such a seed entry at start-up)
        check_made_by(
            site.manufacturer, makers(), approvals=site.approvals, daily_capacity=site.daily_capacity
        )
    with pytest.raises(Invalid):
        check_made_by("novartis", makers(), daily_capacity={"AXI-CEL": 1})


def test_tisa_cel_has_no_commercial_approval_in_china() -> None:
    """Kymriah was never approved in China: the Shanghai CMO's only route is an illustrative clinical one.
    The one CAR-T of the catalogue approved there is axi-cel, made in China by Fosun Kite (NMPA, 2021)."""
    china = {(s.site_id, p) for s in SITES for p in PRODUCTS if approved_for(s, "NMPA", "commercial", p)}
    assert china == {("CN-FOSUN-KITE", "AXI-CEL")}
    assert [s.site_id for s in SITES if approved_for(s, "NMPA", "clinical", "TISA-CEL")] == ["CN-SHANGHAI"]


def test_european_sites_approved_by_ema_for_commercial_kymriah() -> None:
    for site_id in ("FR-LES-ULIS", "CH-STEIN", "DE-LEIPZIG-IZI"):
        assert approved_for(BY_ID[site_id], "EMA", "commercial", "TISA-CEL")


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e["site_id"])
def test_every_site_cites_its_sources_and_says_what_is_illustrative(entry: dict) -> None:
    """Issue 11: a site's facts come with sources beside them, and a figure that is not public (every
    capacity) says `illustrative` with a reason; so does an approval that names no site in public."""
    assert entry["sources"] and all(isinstance(x, str) and "http" in x for x in entry["sources"])
    assert len(entry["illustrative"]["daily_capacity"]) > 20
    for approval in entry["approvals"]:
        if "illustrative" in approval:
            assert isinstance(approval["illustrative"], str) and len(approval["illustrative"]) > 20


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
    assert site.manufacturer == "novartis"
    assert site.daily_capacity == {"TISA-CEL": 6, "CILTA-CEL": 2}


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


def serving(centre: dict, product: str, use: str = "commercial") -> list[str]:
    return [
        s.site_id
        for s in SITES
        if s.active and approved_for(s, centre["regulator"], use, product) and s.daily_capacity[product] > 0
    ]


@pytest.mark.parametrize("centre", CENTRES, ids=lambda c: c["id"])
def test_every_treatment_centre_can_get_tisa_cel(centre: dict) -> None:
    """Commercially in every market but China, where only the (illustrative) clinical route exists."""
    assert centre["regulator"] in REGULATORS
    use = "clinical" if centre["regulator"] == "NMPA" else "commercial"
    assert serving(centre, "TISA-CEL", use), f"no site approved by {centre['regulator']} for {use} TISA-CEL"


@pytest.mark.parametrize(
    ("regulator", "products"),
    [("MHRA", {"TISA-CEL", "AXI-CEL", "CILTA-CEL"}), ("HealthCanada", {"TISA-CEL", "AXI-CEL", "CILTA-CEL"})],
)
def test_the_uk_and_canada_are_markets_with_centres_and_approved_sites(
    regulator: str, products: set[str]
) -> None:
    """Issue 11: MHRA and Health Canada approved Kymriah, Yescarta and Carvykti; each market has a certified
    centre and each product an approved site for it."""
    [centre] = [c for c in CENTRES if c["regulator"] == regulator]
    assert {p for p in PRODUCTS if serving(centre, p)} == products


def test_centre_regions_are_site_regions() -> None:
    assert {c["region"] for c in CENTRES} <= {s.region for s in SITES}
