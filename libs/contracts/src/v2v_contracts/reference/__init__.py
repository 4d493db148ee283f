"""Reference data every service shares, from one source: the product catalogue.

Loaded on first use (never at import time) and cached; `load_products(path)` reads another file (tests).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

PRODUCTS_FILE = Path(__file__).parent / "products.yaml"

Material = Literal["fresh", "cryopreserved"]


class Product(BaseModel):
    """One orderable product and the rules every service applies to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str
    name: str
    apheresis_material: Material
    manufacturing_days: int = Field(ge=1)
    qc_days: int = Field(ge=0)
    retains_material: bool
    max_runs: int = Field(ge=1)
    max_recollections: int = Field(ge=0)
    recollection_lead_days: int = Field(default=7, ge=0)

    def rules(self) -> dict[str, object]:
        """The product's attributes without its identity (as the order service stores them)."""
        return self.model_dump(exclude={"code", "name"})


@cache
def _load(path: Path) -> tuple[Product, ...]:
    raw = yaml.safe_load(path.read_text())
    return tuple(Product.model_validate(p) for p in raw)


def load_products(path: Path | None = None) -> tuple[Product, ...]:
    return _load(path or PRODUCTS_FILE)


def product_catalogue(path: Path | None = None) -> dict[str, Product]:
    return {p.code: p for p in load_products(path)}
