"""Who must sign before a lot may leave the site (pure; no I/O), and the lot numbers.

Sources:
- US (FDA): the quality control unit approves or rejects every batch (21 CFR 211.22(a)); a batch is
  released only after its specifications are met (21 CFR 211.165(a)). Signed with the meaning `release`
  by a user with the role `quality_unit`.
- EU/EEA (EMA): each batch is certified by a Qualified Person of the manufacturing authorisation holder
  named for batch release before it is released for sale or supply (Directive 2001/83/EC Art. 51; EU GMP
  Annex 16 §1); a batch made in a third country is certified by a QP at the importing site in the Union,
  who ensures it was imported and tested as the marketing authorisation requires (Annex 16 §1.7, Art. 51(1)
  second subparagraph). Meanings `qp-certification` and `import-certification`, role `qualified_person`.
- Switzerland (Swissmedic): the responsible person (Fachtechnisch verantwortliche Person) releases each
  batch (the Swiss licensing ordinance, AMBV); modelled like the EU (a QP).
- Other markets (PMDA, NMPA, TGA): the manufacturer's quality unit releases, and, for a product made
  outside the market, the market's batch-release site certifies the import (signed `import-certification`
  by its quality unit).
- Importer markets (issue 11: the UK, MHRA; Canada, Health Canada), where no manufacturing site of the
  network is: the import step belongs to the marketing authorisation holder's importer in the market, a
  wholesale/import establishment, not a manufacturing site of the registry (`IMPORTER_MARKETS`). The
  platform requires the release where the lot is made, by that site's own rules (a QP's certification
  in the EU/EEA or Switzerland, else the quality unit's release), and leaves the importer's check to the
  importer (not modelled):
  - UK: a batch QP-certified in a country on the "approved country for import" list (the EEA) may be
    imported into Great Britain by a wholesale dealer without UK QP certification; the dealer's
    Responsible Person (import) confirms the QP certification took place (Human Medicines Regulations
    2012 reg. 45AA-45AB; MHRA, "List of approved countries for authorised human medicines", 2020;
    "Acting as a Responsible Person (import)"). A lot from elsewhere (Switzerland, the US) needs a UK
    QP under a UK manufacturing and import authorisation: no such site here, so none is accepted.
  - Canada: the importer's quality control department approves each imported lot for sale (Food and
    Drug Regulations C.02.014; C.02.019 eases the importer's testing of lots from a fabricator in a
    country with a mutual recognition agreement).

"Made outside the market" is decided by country: the manufacturing site's country is not in the
regulator's territory (`TERRITORY`; the EU/EEA for EMA: a Swiss site is outside the EU). The site that
signs is the **batch-release site** of the approval (product, market, use, manufacturing site): the
approval's `batch_release_site_id`, else the manufacturing site itself — which must then be inside the
market when the product is imported (else the approval is incomplete: nobody may release).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from v2v_contracts.fields import lot_problem

# the countries each regulator's market covers
EU_EEA = frozenset(
    {
        "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT",
        "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK", "IS", "LI", "NO",
    }
)  # fmt: skip
TERRITORY: dict[str, frozenset[str]] = {
    "FDA": frozenset({"US"}),
    "EMA": EU_EEA,
    "Swissmedic": frozenset({"CH", "LI"}),
    "PMDA": frozenset({"JP"}),
    "NMPA": frozenset({"CN"}),
    "TGA": frozenset({"AU"}),
    "MHRA": frozenset({"GB"}),
    "HealthCanada": frozenset({"CA"}),
}
QP_MARKETS = frozenset({"EMA", "Swissmedic"})  # a Qualified Person certifies (Annex 16; CH: the FvP)
QP_COUNTRIES = EU_EEA | TERRITORY["Swissmedic"]  # where a site's own release is a QP's certification
# markets whose import step is the marketing authorisation holder's importer's (not a site's), and the
# countries a lot may be released in for them (see the module's docstring)
IMPORTER_MARKETS: dict[str, frozenset[str]] = {
    "MHRA": EU_EEA,
    "HealthCanada": EU_EEA | frozenset({"US", "CH"}),
}

Meaning = Literal["release", "qp-certification", "import-certification"]
Role = Literal["quality_unit", "qualified_person"]


@dataclass(frozen=True)
class Requirement:
    """One signature a release needs: its meaning, the role of the signer and the signer's site."""

    meaning: Meaning
    role: Role
    site_id: str

    def as_dict(self) -> dict[str, str]:
        return {"meaning": self.meaning, "role": self.role, "site_id": self.site_id}


@dataclass(frozen=True)
class ReleasePlan:
    regulator: str
    manufacturing_site_id: str
    batch_release_site_id: str
    imported: bool  # made outside the market: an import certification is needed too
    requirements: tuple[Requirement, ...]

    @property
    def certification(self) -> Literal["quality_unit_release", "qp_certification"]:
        return (
            "qp_certification" if self.requirements[0].role == "qualified_person" else "quality_unit_release"
        )

    def for_meaning(self, meaning: str) -> Requirement | None:
        return next((r for r in self.requirements if r.meaning == meaning), None)


class NoReleasePath(Exception):
    """The market or the approval leaves nobody who may release (a 409 naming `field`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def in_market(regulator: str, country: str) -> bool:
    return country.upper() in TERRITORY.get(regulator, frozenset())


def release_plan(
    regulator: str,
    manufacturing_site_id: str,
    manufacturing_country: str,
    batch_release_site_id: str | None,
    batch_release_country: str | None,
) -> ReleasePlan:
    """The signatures a lot made at the manufacturing site needs for the market of `regulator`.
    `batch_release_site_id` (and its country): the approval's batch-release site, None for the site
    itself."""
    if regulator not in TERRITORY:
        raise NoReleasePath("regulator", f"no release rules for the market of {regulator}")
    brs = batch_release_site_id or manufacturing_site_id
    brs_country = batch_release_country if batch_release_site_id else manufacturing_country
    imported = not in_market(regulator, manufacturing_country)
    if imported and regulator in IMPORTER_MARKETS:
        return _importer_market_plan(regulator, manufacturing_site_id, brs, brs_country)
    if brs_country is None or not in_market(regulator, brs_country):
        raise NoReleasePath(
            "batch_release_site_id",
            f"the batch-release site {brs} is outside the {regulator} market: the approval must name a "
            "batch-release site in the market",
        )
    role: Role = "qualified_person" if regulator in QP_MARKETS else "quality_unit"
    primary: Meaning = "qp-certification" if regulator in QP_MARKETS else "release"
    reqs = [Requirement(primary, role, brs)]
    if imported:
        reqs.append(Requirement("import-certification", role, brs))
    return ReleasePlan(regulator, manufacturing_site_id, brs, imported, tuple(reqs))


def _importer_market_plan(
    regulator: str, manufacturing_site_id: str, brs: str, brs_country: str | None
) -> ReleasePlan:
    """A lot for an importer market: released where it is made (or at the approval's batch-release site),
    by that site's own rules; the import step is the market's importer's (see the module's docstring)."""
    country = (brs_country or "").upper()
    if country not in IMPORTER_MARKETS[regulator]:
        raise NoReleasePath(
            "batch_release_site_id",
            f"the {regulator} market takes imported lots released in "
            f"{', '.join(sorted(IMPORTER_MARKETS[regulator]))} only: the approval must name a "
            "batch-release site there",
        )
    qp = country in QP_COUNTRIES
    requirement = Requirement(
        "qp-certification" if qp else "release", "qualified_person" if qp else "quality_unit", brs
    )
    return ReleasePlan(regulator, manufacturing_site_id, brs, True, (requirement,))


def missing(plan: ReleasePlan, signed: set[str]) -> list[Requirement]:
    """The requirements of `plan` whose meaning has no current signature yet."""
    return [r for r in plan.requirements if r.meaning not in signed]


# ---- lot numbers -----------------------------------------------------------------------------------
_NOT_LOT = re.compile(r"[^A-Z0-9-]+")
LOT_PREFIX_MAX = 20


def make_lot(site_id: str, number: int) -> str:
    """The lot of a run: the site's id (capitals, digits and `-`, at most 20 characters) and a sequence
    number of 8 digits: `CH-STEIN-00000042`. Unique per site schema (a database sequence)."""
    if not 0 < number <= 99_999_999:
        raise ValueError("lot sequence must be 1..99999999")
    prefix = _NOT_LOT.sub("-", site_id.upper()).strip("-")[:LOT_PREFIX_MAX].rstrip("-") or "LOT"
    lot = f"{prefix}-{number:08d}"
    problem = lot_problem(lot)
    if problem:  # pragma: no cover - the shape above always fits
        raise ValueError(problem)
    return lot
