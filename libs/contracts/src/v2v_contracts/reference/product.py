"""A product of the catalogue: pure data, importable by domain code (the loader reads the catalogue)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from v2v_contracts.reference.planning import PlanningFacts

Material = Literal["fresh", "cryopreserved"]


class Product(BaseModel):
    """One orderable product and the rules every service applies to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str
    name: str
    apheresis_material: Material
    manufacturing_days: int = Field(ge=1)
    qc_days: int = Field(ge=0)
    # ---- issue 11 [scheduling]: starting material, fresh window, apheresis → release per region (QC
    # inside), with sources (reference/planning.py); None: scheduling plans with the two fields above
    planning: PlanningFacts | None = None
    retains_material: bool
    max_runs: int = Field(ge=1)
    max_recollections: int = Field(ge=0)
    recollection_lead_days: int = Field(default=7, ge=0)

    def rules(self) -> dict[str, object]:
        """The product's attributes without its identity (as the order service stores them)."""
        return self.model_dump(exclude={"code", "name"})
