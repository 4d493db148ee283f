"""What the site knows about each product comes from the one shared product catalogue
(`v2v_contracts.reference`): whether part of the material is retained for a remanufacture and how many
runs the material allows. The catalogue's codes are the products a site's capacity may be set for, and
its manufacturers (issue 11) the companies whose sites may make each one."""

from __future__ import annotations

from site_service.domain.manufacturing import Rules
from v2v_contracts.reference import Product, product_catalogue


def rules_of(product: Product) -> Rules:
    return Rules(retains_material=product.retains_material, max_runs=product.max_runs)


def rules_for(product_code: str | None) -> Rules:
    """An unknown product (or a booking from before products were recorded) retains nothing."""
    product = product_catalogue().get(product_code or "")
    return rules_of(product) if product is not None else Rules()


def known_products() -> frozenset[str]:
    return frozenset(product_catalogue())


def makers() -> dict[str, frozenset[str]]:
    """Product code -> the manufacturer codes whose sites may make it (its own and its declared contract
    manufacturers')."""
    return {
        code: frozenset({p.manufacturer, *p.contract_manufacturers})
        for code, p in product_catalogue().items()
    }
