"""Per-product manufacturing rules of the site service (seed/manufacturing.yaml): data, not code."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from site_service.domain.manufacturing import Rules

MANUFACTURING_SEED = Path(__file__).parent / "seed" / "manufacturing.yaml"


def rules_from_seed(entries: list[dict[str, object]]) -> dict[str, Rules]:
    rules: dict[str, Rules] = {}
    for entry in entries:
        code = str(entry["product_code"])
        max_runs = int(str(entry.get("max_runs", 1)))
        if max_runs < 1:
            raise ValueError(f"{code}: max_runs must be at least 1")
        rules[code] = Rules(retains_material=bool(entry.get("retains_material", False)), max_runs=max_runs)
    return rules


@cache
def product_rules(path: Path = MANUFACTURING_SEED) -> dict[str, Rules]:
    return rules_from_seed(yaml.safe_load(path.read_text()))


def rules_for(product_code: str | None) -> Rules:
    """An unknown product (or a booking from before products were recorded) retains nothing."""
    return product_rules().get(product_code or "", Rules())


def known_products() -> frozenset[str]:
    return frozenset(product_rules())
