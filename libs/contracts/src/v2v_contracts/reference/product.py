"""A product of the catalogue: pure data, importable by domain code (the loader reads the catalogue)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from v2v_contracts.reference.planning import PlanningFacts
from v2v_contracts.reference.treatment import IndicationFacts, TreatmentFacts

Material = Literal["fresh", "cryopreserved"]


class TemperatureLimit(BaseModel):
    """How one leg of a product must travel: its temperature limit in °C (both bounds inclusive) and its
    excursion tolerance, the minutes in all the material may spend outside that limit before the
    excursion goes to QA (logistics; `logistics.shipment_excursion.v1`). A shorter time outside is
    recorded and holds nothing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_c: float = Field(ge=-273.15, le=100.0)
    max_c: float = Field(ge=-273.15, le=100.0)
    excursion_tolerance_min: float = Field(ge=0, le=24 * 60)

    @model_validator(mode="after")
    def _not_empty(self) -> TemperatureLimit:
        if self.min_c > self.max_c:
            raise ValueError(f"temperature limit is empty: [{self.min_c}, {self.max_c}]")
        return self


class ShippingRules(BaseModel):
    """A product's shipping limits: the apheresis material (inbound, centre → site) and the product
    (outbound, site → centre), with the public sources they come from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inbound: TemperatureLimit
    outbound: TemperatureLimit
    sources: tuple[str, ...] = Field(min_length=1)


# issue 11: a manufacturer's vendor-neutral code (`novartis`, `fraunhofer-izi` ...; the site registry's
# `manufacturer`); who makes a product is the site registry's concern, not the order service's rules
MAKER_PATTERN = r"^[a-z][a-z0-9-]{1,39}$"
MAKERS = ("manufacturer", "contract_manufacturers")


class Product(BaseModel):
    """One orderable product and the rules every service applies to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: str
    name: str
    # issue 11: who makes it, as vendor-neutral codes (the site registry's `manufacturer` of each site):
    # the marketing authorisation holder's own sites and its declared contract manufacturers' sites only
    manufacturer: str = Field(pattern=MAKER_PATTERN)
    contract_manufacturers: tuple[Annotated[str, Field(pattern=MAKER_PATTERN)], ...] = ()
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
    # logistics: temperature limits and excursion tolerance per leg (None: the shipping conditions of
    # logistics' seed, by material condition)
    shipping: ShippingRules | None = None
    # issue 11 [treatment gates]: per indication, the LD regimen, the infusion window after it, the
    # repeat-LD rule and whether the dose needs the patient's weight (reference/treatment.py); None: the
    # product has no treatment facts and the order service gates LD on release and delivery only
    treatment: TreatmentFacts | None = None

    def indication(self, code: str | None) -> IndicationFacts | None:
        """The facts of one of the product's indications (None: unknown code, or no facts)."""
        if code is None or self.treatment is None:
            return None
        return self.treatment.indications.get(code)

    def rules(self) -> dict[str, object]:
        """The product's attributes without its identity (as the order service stores them); the
        shipping limits are logistics' alone."""
        return self.model_dump(exclude={"code", "name", "shipping", *MAKERS})

    def made_by(self, manufacturer: str | None) -> bool:
        """Whether a site run by `manufacturer` may make this product: the product's manufacturer or one
        of its declared contract manufacturers."""
        return manufacturer is not None and (
            manufacturer == self.manufacturer or manufacturer in self.contract_manufacturers
        )
