"""A product's treatment facts per indication (issue 11, treatment gates at the centre): the
lymphodepleting (LD) regimen, the infusion window after it, the repeat-LD rule, and whether the dose
depends on the patient's weight, with the public sources they come from.

Pure data, as `product.py`: the order service gates lymphodepletion and infusion with it
(`order_service.domain.order`).

Day counting, one convention for every product: the LD regimen runs `ld_regimen_days` calendar days from
the day of its first dose (the start), and it is *completed* `ld_regimen_days` days after the start (the
day after the last dose). The infusion window is `infusion_window_days` = (min, max) days after that
completion, both bounds inclusive, in the centre's calendar. This is the labels' own arithmetic: cilta-cel's
earlier US label said "5 to 7 days after the start" of its 3-day regimen, its current one "2 to 4 days
after the completion"; axi-cel's LD on days -5, -4 and -3 before infusion on day 0 is infusion 2 days
after completion.

`repeat_ld_after_days`: days after completion beyond which the label asks for (or suggests) a repeat LD
before infusion. The order service allows a repeat LD once the recorded LD can no longer lead to an
infusion: its window has closed or this delay has passed, whichever comes first (or the product was
lost after LD).

Codes are short and stable (`b_all`, `dlbcl`, `fl`, `lbcl`, `mm`). A figure no public label gives is
marked `illustrative` with the reason.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

INDICATION_CODE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class IndicationFacts(BaseModel):
    """One indication of a product: its LD regimen, infusion window and repeat-LD rule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    weight_required: bool  # the dose is per kg of body weight (for some or all patients)
    ld_regimen_days: int = Field(ge=1, le=7)
    infusion_window_days: tuple[int, int]  # (min, max) days after LD completion, inclusive
    repeat_ld_after_days: int = Field(ge=1, le=60)
    sources: tuple[str, ...] = Field(min_length=1)
    illustrative: str | None = None  # why a figure here is the platform's own, not a label's

    @model_validator(mode="after")
    def _ordered(self) -> IndicationFacts:
        low, high = self.infusion_window_days
        if not 0 <= low <= high <= 60:
            raise ValueError(f"infusion window must satisfy 0 <= min <= max <= 60: {low}..{high}")
        return self


class TreatmentFacts(BaseModel):
    """A product's indications, by code."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    indications: dict[str, IndicationFacts] = Field(min_length=1)

    @model_validator(mode="after")
    def _codes(self) -> TreatmentFacts:
        for code in self.indications:
            if not INDICATION_CODE.fullmatch(code):
                raise ValueError(f"indication code {code!r} must be short snake_case")
        return self

    def codes(self) -> list[str]:
        return sorted(self.indications)
