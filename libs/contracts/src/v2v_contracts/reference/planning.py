"""A product's planning facts (issue 11): how its starting material travels and waits, and how long
apheresis to release takes, per region, with the public sources they come from.

Pure data, as `product.py`: scheduling plans with it (`scheduling_service.domain.planning`).

- `starting_material`: `fresh` material (2-8 °C) must start manufacturing within `max_fresh_hours` of
  collection, so the plan runs backwards from the manufacturing day; `cryopreserved` material is frozen
  (at the centre's cell lab for tisa-cel: `centre_freezing_days`), stored, then booked.
- `apheresis_to_release`: days from apheresis to product release, median and p90, per region (the key
  `default` for a region not listed). Published turnaround figures run from apheresis (leukapheresis) to
  release and so already include QC and the inbound leg: nothing is added on top. `start_lag_days` is the
  part of the median before manufacturing starts (inbound transit, and freezing where it applies): the
  plan predicts release as manufacturing start + (days - start_lag_days).
- Every figure names its source; a figure no public source gives is marked `illustrative`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StartingMaterial = Literal["fresh", "cryopreserved"]
DEFAULT_REGION = "default"


class Turnaround(BaseModel):
    """Apheresis → release, days (QC inside): the median and the 90th percentile."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    median_days: int = Field(ge=1, le=120)
    p90_days: int = Field(ge=1, le=180)
    source: str = Field(min_length=1)
    illustrative: bool = False  # True: no public source gives this figure; the platform's demo value

    @model_validator(mode="after")
    def _ordered(self) -> Turnaround:
        if self.p90_days < self.median_days:
            raise ValueError("p90_days is below median_days")
        return self


class PlanningFacts(BaseModel):
    """What scheduling needs to know of a product to plan it (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    starting_material: StartingMaterial
    max_fresh_hours: int | None = Field(default=None, ge=1, le=240)  # fresh only: collection → start
    centre_freezing_days: int = Field(default=0, ge=0, le=14)  # the centre freezes the material first
    start_lag_days: int = Field(ge=0, le=30)  # apheresis → manufacturing start inside the median
    apheresis_to_release: dict[str, Turnaround]
    sources: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> PlanningFacts:
        if self.starting_material == "fresh" and self.max_fresh_hours is None:
            raise ValueError("fresh starting material needs max_fresh_hours")
        if self.starting_material == "cryopreserved" and self.max_fresh_hours is not None:
            raise ValueError("max_fresh_hours applies to fresh starting material only")
        if DEFAULT_REGION not in self.apheresis_to_release:
            raise ValueError(f"apheresis_to_release needs a {DEFAULT_REGION!r} entry")
        for region, t in self.apheresis_to_release.items():
            if t.median_days <= self.start_lag_days:
                raise ValueError(f"{region}: the median must be longer than start_lag_days")
        return self

    def turnaround(self, region: str) -> Turnaround:
        return self.apheresis_to_release.get(region) or self.apheresis_to_release[DEFAULT_REGION]

    def release_after_start(self, region: str, *, p90: bool = False) -> int:
        """Days from manufacturing start to release (QC inside), median or p90, for the region."""
        t = self.turnaround(region)
        return (t.p90_days if p90 else t.median_days) - self.start_lag_days
