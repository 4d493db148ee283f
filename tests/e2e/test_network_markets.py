"""Issue 11, item 6: a network that is true, and the UK (MHRA) and Canada (Health Canada) as markets.

An order from the UK or Canadian centre goes to a site of its product's manufacturer (axi-cel at Kite's
European plant, cilta-cel at the Janssen/Legend US plant), is released there by that site's own rule (a
Qualified Person in the EEA; the quality unit in the US) with no import certification at a site (the
import step is the marketing authorisation holder's importer's, outside the platform), and is released.
An axi-cel order from Shanghai goes to Kite's licensee in China (Fosun Kite), made and released in the
market. The registry names each site's manufacturer; a commercial tisa-cel order from Shanghai (Kymriah
was never approved in China) is refused at intake naming the market.
"""

from __future__ import annotations

import pytest

from v2v_harness.e2e import MANUFACTURING_STEPS, Journey, Parties, order_body
from v2v_harness.platform import Platform

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("centre", "product", "regulator", "site_id", "manufacturer", "meaning", "role", "imported"),
    [
        (
            "TC-GB-LN-001",
            "AXI-CEL",
            "MHRA",
            "NL-HOOFDDORP",
            "kite",
            "qp-certification",
            "qualified_person",
            True,
        ),
        (
            "TC-CA-ON-001",
            "CILTA-CEL",
            "HealthCanada",
            "US-RARITAN",
            "janssen",
            "release",
            "quality_unit",
            True,
        ),
        ("TC-CN-SH-001", "AXI-CEL", "NMPA", "CN-FOSUN-KITE", "fosun-kite", "release", "quality_unit", False),
    ],
)
async def test_an_order_is_made_by_its_products_manufacturer_and_released_where_made(
    platform: Platform,
    parties: Parties,
    centre: str,
    product: str,
    regulator: str,
    site_id: str,
    manufacturer: str,
    meaning: str,
    role: str,
    imported: bool,
) -> None:
    resp = await parties.centre(centre).post(
        f"{platform.url('order')}/v1/orders", json=order_body(centre, product)
    )
    assert resp.status_code == 201, resp.text
    j = Journey(parties, platform.url, resp.json())
    site = await j.up_to_material_received()
    assert site == site_id  # the only site of the product's manufacturer approved for this market
    registry = (await parties.ops.get(f"{platform.url('site')}/v1/sites/{site}")).json()
    assert registry["manufacturer"] == manufacturer
    await j.steps(site, *MANUFACTURING_STEPS)
    await j.wait_status("qc_pending")
    await j.qc_passed(site)

    view = (await j.qa.manufacturing(site, j.id)).body
    release = view["release"]
    assert (release["regulator"], release["imported"], release["batch_release_site_id"]) == (
        regulator,
        imported,
        site,
    )
    # one signature, at the manufacturing site, by its own rule: no import certification at a site
    assert [(r["meaning"], r["role"], r["site_id"]) for r in release["required"]] == [(meaning, role, site)]
    refused = await j.qa.import_certification(site, j.id)
    assert refused.status == 409

    await j.sign_release(site)
    await j.wait_status("released")


async def test_the_shanghai_centre_cannot_order_tisa_cel_for_commercial_use(
    platform: Platform, parties: Parties
) -> None:
    resp = await parties.centre("TC-CN-SH-001").post(
        f"{platform.url('order')}/v1/orders", json=order_body("TC-CN-SH-001", "TISA-CEL")
    )
    assert resp.status_code == 422, resp.text
    assert "NMPA market (CN)" in resp.json()["errors"][0]["reason"]
