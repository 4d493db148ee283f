"""The scheduling service's settings (V2V_* variables), read once at start-up, and the scheduling
parameters file they name (the packaged seed unless `V2V_SCHEDULING_PARAMETERS` points at another one).

Product facts (apheresis material, manufacturing and QC days) are not parameters: they come from the
shared catalogue, `v2v_contracts.reference`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from scheduling_service.domain.planning import Allocation, Calendar
from scheduling_service.domain.selection import Parameters
from scheduling_service.domain.slots import Planning
from v2v_contracts.reference import product_catalogue
from v2v_servicekit.settings import ServiceSettings

SEED = Path(__file__).parent / "seed" / "scheduling.yaml"
CALENDARS_SEED = SEED.parent / "calendars.yaml"
ALLOCATION_SEED = SEED.parent / "allocation.yaml"


class SchedulingSettings(ServiceSettings):
    # V2V_SCHEDULING_PARAMETERS: another parameters file, same format as the seed (empty: the seed)
    scheduling_parameters: str | None = None
    # V2V_SCHEDULING_CALENDARS / V2V_SCHEDULING_ALLOCATION: other site calendars / centre quotas files
    # (same format as seed/calendars.yaml, seed/allocation.yaml; empty: the seed)
    scheduling_calendars: str | None = None
    scheduling_allocation: str | None = None
    # V2V_SCHEDULING_HOLD_TTL_S: how long a centre's hold on an offer lasts unless an order claims it
    scheduling_hold_ttl_s: int = Field(default=7200, ge=60, le=14 * 86400)
    # V2V_SCHEDULING_HOLD_SWEEP_INTERVAL_S: how often expired holds are returned to the pool
    scheduling_hold_sweep_interval_s: float = Field(default=30.0, gt=0, le=3600)

    @property
    def parameters_file(self) -> Path:
        return Path(self.scheduling_parameters) if self.scheduling_parameters else SEED

    @property
    def calendars_file(self) -> Path:
        return Path(self.scheduling_calendars) if self.scheduling_calendars else CALENDARS_SEED

    @property
    def allocation_file(self) -> Path:
        return Path(self.scheduling_allocation) if self.scheduling_allocation else ALLOCATION_SEED

    def planning(self) -> Planning:
        """Read now: the parameters, calendars and allocation files and the product catalogue."""
        return Planning(
            load_parameters(self.parameters_file),
            product_catalogue(),
            calendars=load_calendars(self.calendars_file),
            allocation=load_allocation(self.allocation_file),
        )


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


def load_calendars(path: Path = CALENDARS_SEED) -> dict[str, Calendar]:
    """Site id -> its calendar (a site the file does not name starts runs every day)."""
    cfg = yaml.safe_load(path.read_text()) or {}
    return {
        site_id: Calendar.of(entry["working_days"], entry.get("holidays") or ())
        for site_id, entry in (cfg.get("sites") or {}).items()
    }


def load_allocation(path: Path = ALLOCATION_SEED) -> Allocation:
    cfg = yaml.safe_load(path.read_text()) or {}
    period = cfg.get("period", "month")
    if period not in ("month", "week"):
        raise ValueError(f"{path}: period must be month or week")
    quotas = {
        (str(q["treatment_center_id"]), str(q["product_code"])): int(q["per_period"])
        for q in cfg.get("quotas") or []
    }
    if any(n < 0 for n in quotas.values()):
        raise ValueError(f"{path}: a quota is negative")
    return Allocation(period, quotas)
