"""How each leg travels: the material's condition, its temperature limit, its excursion tolerance, and the
carriers.

A product of the shared catalogue (`v2v_contracts.reference`) with `shipping` limits travels by them: the
limit of its label for the product (outbound) and of its apheresis material (inbound), each with the
minutes in all it may spend outside that limit before the excursion goes to QA. A product without them
(or an unknown one: it cannot be ordered, so this is a safety net) travels by logistics' own seed
(seed/logistics.yaml): the range and tolerance of its material condition, and the seed's outbound lane.
The condition an apheresis material travels in is a product fact of the catalogue
(Product.apheresis_material).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from logistics_service.domain.carriers import Carriers
from v2v_contracts.reference.product import ShippingRules, TemperatureLimit

# A product the catalogue does not know (it cannot be ordered, so this is a safety net): fresh material.
DEFAULT_APHERESIS_MATERIAL: Final = "fresh"


@dataclass(frozen=True)
class Lane:
    """How a leg travels: the material's condition, its temperature limit in °C (both inclusive) and its
    excursion tolerance (minutes in all outside the limit before the excursion goes to QA)."""

    condition: str
    min_c: float
    max_c: float
    tolerance_min: float = 0.0

    def __post_init__(self) -> None:
        if self.min_c > self.max_c:
            raise ValueError(f"temperature range is empty: [{self.min_c}, {self.max_c}]")
        if self.tolerance_min < 0:
            raise ValueError(f"excursion tolerance is negative: {self.tolerance_min}")

    @classmethod
    def of(cls, condition: str, limit: TemperatureLimit) -> Lane:
        return cls(condition, limit.min_c, limit.max_c, limit.excursion_tolerance_min)


@dataclass(frozen=True)
class ShippingLanes:
    """The temperature range and tolerance of each material condition, the outbound product's default
    lane, each product's apheresis material condition and shipping limits, and the carriers."""

    ranges: Mapping[str, tuple[float, float, float]]  # condition -> (min_c, max_c, tolerance_min)
    outbound: Lane  # the default outbound lane (a product without its own limits)
    apheresis_material: Mapping[str, str]  # product code -> condition
    carriers: Carriers
    shipping: Mapping[str, ShippingRules] = field(default_factory=dict)  # product code -> its limits

    def __post_init__(self) -> None:
        for condition in {*self.apheresis_material.values(), DEFAULT_APHERESIS_MATERIAL}:
            if condition not in self.ranges:
                raise ValueError(f"no temperature range for material condition {condition!r}")

    def lane(self, condition: str) -> Lane:
        lo, hi, tolerance = self.ranges[condition]
        return Lane(condition, lo, hi, tolerance)

    def inbound(self, product_code: str) -> Lane:
        """The inbound leg (centre → site) of a product's apheresis material."""
        condition = self.apheresis_material.get(product_code, DEFAULT_APHERESIS_MATERIAL)
        rules = self.shipping.get(product_code)
        return Lane.of(condition, rules.inbound) if rules else self.lane(condition)

    def outbound_for(self, product_code: str | None) -> Lane:
        """The outbound leg (site → centre) of a product: its label's limit, else the default lane."""
        rules = self.shipping.get(product_code) if product_code else None
        return Lane.of(self.outbound.condition, rules.outbound) if rules else self.outbound

    def knows(self, product_code: str) -> bool:
        return product_code in self.apheresis_material
