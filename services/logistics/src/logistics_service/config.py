"""Settings of the logistics service, read once at start-up (`v2v_servicekit.run()` → `rt.settings`),
and the shipping lanes built from its seed file and the shared product catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from logistics_service.domain.carriers import Carriers
from logistics_service.domain.lanes import Lane, ShippingLanes
from v2v_contracts.reference import product_catalogue
from v2v_servicekit import ServiceSettings

SEED_FILE = Path(__file__).parent / "seed" / "logistics.yaml"


class LogisticsSettings(ServiceSettings):
    # V2V_LOGISTICS_SEED_FILE: the shipping conditions (temperature ranges, outbound product lane) and
    # the carriers
    logistics_seed_file: Path = SEED_FILE


def load_shipping_lanes(settings: ServiceSettings | None = None) -> ShippingLanes:
    """Read the seed's shipping conditions and carriers; each product's apheresis material and shipping
    limits from the catalogue."""
    path = settings.logistics_seed_file if isinstance(settings, LogisticsSettings) else SEED_FILE
    seed: dict[str, Any] = yaml.safe_load(path.read_text())
    ranges = {
        name: (float(r["min_c"]), float(r["max_c"]), float(r.get("excursion_tolerance_min", 0)))
        for name, r in seed["conditions"].items()
    }
    outbound = seed["outbound_product"]
    catalogue = product_catalogue()
    return ShippingLanes(
        ranges=ranges,
        outbound=Lane(
            str(outbound["condition"]),
            float(outbound["min_c"]),
            float(outbound["max_c"]),
            float(outbound.get("excursion_tolerance_min", 0)),
        ),
        apheresis_material={code: p.apheresis_material for code, p in catalogue.items()},
        carriers=Carriers.from_seed(seed["carriers"]),
        shipping={code: p.shipping for code, p in catalogue.items() if p.shipping is not None},
    )
