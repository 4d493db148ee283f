"""How each leg travels: the material's condition, its temperature range, and the carriers.

The ranges per condition, the outbound product's lane and the carriers are logistics' own data
(seed/logistics.yaml);
the condition an apheresis material travels in is a product fact from the shared catalogue
(`v2v_contracts.reference`, Product.apheresis_material).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from logistics_service.domain.carriers import Carriers

# A product the catalogue does not know (it cannot be ordered, so this is a safety net): fresh material.
DEFAULT_APHERESIS_MATERIAL: Final = "fresh"


@dataclass(frozen=True)
class Lane:
    """How a leg travels: the material's condition and its temperature range in °C (both inclusive)."""

    condition: str
    min_c: float
    max_c: float

    def __post_init__(self) -> None:
        if self.min_c > self.max_c:
            raise ValueError(f"temperature range is empty: [{self.min_c}, {self.max_c}]")


@dataclass(frozen=True)
class ShippingLanes:
    """The temperature range of each material condition, the outbound product's lane, each product's
    apheresis material condition, and the carriers that carry the legs."""

    ranges: Mapping[str, tuple[float, float]]  # condition -> (min_c, max_c)
    outbound: Lane
    apheresis_material: Mapping[str, str]  # product code -> condition
    carriers: Carriers

    def __post_init__(self) -> None:
        for condition in {*self.apheresis_material.values(), DEFAULT_APHERESIS_MATERIAL}:
            if condition not in self.ranges:
                raise ValueError(f"no temperature range for material condition {condition!r}")

    def lane(self, condition: str) -> Lane:
        lo, hi = self.ranges[condition]
        return Lane(condition, lo, hi)

    def inbound(self, product_code: str) -> Lane:
        """The inbound leg (centre → site) of a product's apheresis material."""
        return self.lane(self.apheresis_material.get(product_code, DEFAULT_APHERESIS_MATERIAL))

    def knows(self, product_code: str) -> bool:
        return product_code in self.apheresis_material
