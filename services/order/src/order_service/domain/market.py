"""Market authorisation: an order may only go to a site approved by the regulator of the patient's
market, for the order's use (commercial or clinical) and its product (shared/DOMAIN.md)."""

from __future__ import annotations

from dataclasses import dataclass

from v2v_contracts.errors import Invalid, Unavailable


@dataclass(frozen=True)
class Approval:
    """A site may make `product_code` for `use` in the market of `regulator`."""

    regulator: str
    use: str
    product_code: str


def network_unknown() -> Unavailable:
    """No manufacturing site is known yet: the order service cannot tell whether any may serve an order."""
    return Unavailable("the network of manufacturing sites is not known yet; retry shortly")


def not_served(product_code: str, use: str, regulator: str, country: str) -> Invalid:
    """No active site is approved to make the product for this use in the centre's market."""
    return Invalid(
        "product_code",
        f"no manufacturing site is approved to make {product_code} for {use} use in the {regulator} "
        f"market ({country})",
    )
