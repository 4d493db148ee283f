"""Reference data every service shares, from one source: the product catalogue.

Loaded on first use (never at import time) and cached; `load_products(path)` reads another file (tests).
The `Product` type itself is pure (domain code may use it); only the loader reads YAML.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from v2v_contracts.reference.product import Material, Product, ShippingRules, TemperatureLimit
from v2v_contracts.reference.treatment import IndicationFacts, TreatmentFacts

PRODUCTS_FILE = Path(__file__).parent / "products.yaml"

__all__ = [
    "PRODUCTS_FILE",
    "IndicationFacts",
    "Material",
    "Product",
    "ShippingRules",
    "TemperatureLimit",
    "TreatmentFacts",
    "load_products",
    "product_catalogue",
]


@cache
def _load(path: Path) -> tuple[Product, ...]:
    import yaml  # the loader's alone: importing the Product type reads nothing

    raw = yaml.safe_load(path.read_text())
    return tuple(Product.model_validate(p) for p in raw)


def load_products(path: Path | None = None) -> tuple[Product, ...]:
    return _load(path or PRODUCTS_FILE)


def product_catalogue(path: Path | None = None) -> dict[str, Product]:
    return {p.code: p for p in load_products(path)}
