"""The scheduling service's settings (V2V_* variables), read once at start-up, and the scheduling
parameters file they name (the packaged seed unless `V2V_SCHEDULING_PARAMETERS` points at another one).

Product facts (apheresis material, manufacturing and QC days) are not parameters: they come from the
shared catalogue, `v2v_contracts.reference`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from scheduling_service.domain.selection import Parameters
from scheduling_service.domain.slots import Planning
from v2v_contracts.reference import product_catalogue
from v2v_servicekit.settings import ServiceSettings

SEED = Path(__file__).parent / "seed" / "scheduling.yaml"


class SchedulingSettings(ServiceSettings):
    # V2V_SCHEDULING_PARAMETERS: another parameters file, same format as the seed (empty: the seed)
    scheduling_parameters: str | None = None

    @property
    def parameters_file(self) -> Path:
        return Path(self.scheduling_parameters) if self.scheduling_parameters else SEED

    def planning(self) -> Planning:
        """Read now: the parameters file and the product catalogue."""
        return Planning(load_parameters(self.parameters_file), product_catalogue())


def load_parameters(path: Path = SEED) -> Parameters:
    cfg = yaml.safe_load(path.read_text())
    transit = cfg["inbound_transit_days"]
    lanes = {
        (lane["from"], lane["to"], material): int(days)
        for lane in cfg.get("lanes", [])
        for material, days in lane["days"].items()
    }
    return Parameters(
        same_region_transit_days=int(transit["same_region"]),
        cross_region_transit_days=int(transit["cross_region"]),
        horizon_days=int(cfg["booking_horizon_days"]),
        lanes=lanes,
    )
