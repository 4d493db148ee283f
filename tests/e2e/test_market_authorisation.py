"""Market authorisation at intake, over the whole matrix: an order from every certified centre for every
product (commercial use) either goes to a site approved by the centre's regulator for that product and
use, or is refused at once with 422 naming the product, the use and the market.

Each centre places its own orders with its own credentials; ops reads the catalogue and the registry.
The expectation comes from the site service's own registry (GET /v1/sites), so the test follows the
seeded network wherever it is edited; the order service decides from its own copy of it, fed by
`site.registered` events.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from v2v_harness.e2e import Parties, eventually, order_body
from v2v_harness.identity import Credentials
from v2v_harness.platform import Platform

pytestmark = pytest.mark.e2e

USE = "commercial"
UNROUTED = {"submitted", "waitlisted", "rescheduling"}


def approved_sites(sites: list[dict[str, Any]], regulator: str, use: str, product: str) -> set[str]:
    """The active sites approved to make `product` for `use` in the market of `regulator` (whichever
    batch-release site the approval names)."""
    wanted = {"regulator": regulator, "use": use, "product_code": product}

    def fits(approval: dict[str, Any]) -> bool:
        return all(approval.get(k) == v for k, v in wanted.items())

    return {s["site_id"] for s in sites if s["active"] and any(fits(a) for a in s["approvals"])}


async def test_every_centre_and_product_is_routed_to_an_approved_site_or_refused_at_intake(
    platform: Platform, credentials: Credentials
) -> None:
    order_url, site_url = platform.url("order"), platform.url("site")
    # idle connections expire before the server's keep-alive does (a burst never reuses a closed one)
    parties = Parties(credentials, timeout=30, limits=httpx.Limits(keepalive_expiry=1.0))
    try:
        ops = parties.ops
        centres = [c for c in (await ops.get(f"{order_url}/v1/treatment-centers")).json() if c["certified"]]
        products = [p["code"] for p in (await ops.get(f"{order_url}/v1/products")).json()]
        sites = (await ops.get(f"{site_url}/v1/sites")).json()
        assert centres and products and sites

        matrix = [
            (centre, product, approved_sites(sites, centre["regulator"], USE, product))
            for centre in centres
            for product in products
        ]
        bodies = [
            {
                **order_body(centre["id"], product, days_ahead=14 + i % 7, patient_ref=f"PAT-MKT-{i:03d}"),
                "order_type": USE,
            }
            for i, (centre, product, _) in enumerate(matrix)
        ]
        responses = await asyncio.gather(
            *(parties.centre(b["treatment_center_id"]).post(f"{order_url}/v1/orders", json=b) for b in bodies)
        )

        accepted: list[tuple[str, str, set[str], str]] = []  # centre, order id, approved sites, what
        refused = 0
        for (centre, product, approved), body, resp in zip(matrix, bodies, responses, strict=True):
            what = f"{product} from {centre['id']} ({centre['regulator']})"
            if approved:
                assert resp.status_code == 201, f"{what}: {resp.status_code} {resp.text}"
                accepted.append((centre["id"], resp.json()["order_id"], approved, what))
                continue
            assert resp.status_code == 422, f"{what} has no approved site: {resp.status_code} {resp.text}"
            assert resp.headers["content-type"].startswith("application/problem+json")
            problem = resp.json()
            reason = (
                f"no manufacturing site is approved to make {product} for {USE} use in the "
                f"{centre['regulator']} market ({centre['country']})"
            )
            assert problem["errors"] == [{"field": "product_code", "reason": reason}], what
            assert problem["type"].endswith("/validation") and problem["status"] == 422
            assert body["patient_ref"] not in resp.text
            refused += 1

        assert refused >= 1, "the seeded network leaves some market without a product"
        assert len(accepted) >= len(matrix) // 2, f"only {len(accepted)} of {len(matrix)} accepted"

        async def routed(centre_id: str, order_id: str) -> dict[str, Any] | None:
            order = (await parties.centre(centre_id).get(f"{order_url}/v1/orders/{order_id}")).json()
            return order if order["site_id"] and order["status"] not in UNROUTED else None

        async def route(centre_id: str, order_id: str, approved: set[str], what: str) -> None:
            order = await eventually(
                lambda: routed(centre_id, order_id), timeout=45, interval=0.3, what=f"{what} routed"
            )
            assert order["site_id"] in approved, f"{what} went to {order['site_id']}, approved: {approved}"

        cancels: list[httpx.Response] = []
        try:
            await asyncio.gather(*(route(*a) for a in accepted))
        finally:  # give the capacity back to the other tests on this platform
            cancels = await asyncio.gather(
                *(
                    parties.centre(centre_id).post(
                        f"{order_url}/v1/orders/{oid}/cancel",
                        json={"reason_code": "other", "note": "market matrix done"},
                    )
                    for centre_id, oid, _, _ in accepted
                )
            )
        assert [r.status_code for r in cancels] == [200] * len(accepted), [r.text for r in cancels]
    finally:
        await parties.aclose()
