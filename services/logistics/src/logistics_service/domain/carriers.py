"""Carriers (the specialist couriers that carry shipments), which one carries a leg, and whose shipments a
tenant-bound caller may see.

A carrier serves regions of the network (`north_america`, `europe`, `asia_pacific`, as the sites' and
centres' seeds name them). A leg is carried by the most specialised carrier that serves the regions of
both its ends (fewest regions); among equally specialised ones a stable hash of the lane (origin,
destination) picks one, so a lane always gets the same carrier. When the region of an end is not known
(logistics learns them from `site.registered` and `order.submitted`), or no carrier serves both ends, the
broadest carrier (most regions, then the smallest id) carries the leg. The choice is made once, when the
shipment is planned, and stored with it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from v2v_contracts.fields import CODE_PATTERN

if TYPE_CHECKING:
    from logistics_service.domain.shipment import Shipment


@dataclass(frozen=True)
class Carrier:
    carrier_id: str
    name: str
    regions: frozenset[str]

    def serves(self, regions: Iterable[str]) -> bool:
        return set(regions) <= self.regions


@dataclass(frozen=True)
class Carriers:
    """The carriers of the seed, in seed order."""

    carriers: tuple[Carrier, ...]

    def __post_init__(self) -> None:
        if not self.carriers:
            raise ValueError("no carriers: every shipment needs one")
        ids = [c.carrier_id for c in self.carriers]
        if len(set(ids)) != len(ids):
            raise ValueError("carrier ids must be unique")
        for c in self.carriers:
            if not re.fullmatch(CODE_PATTERN, c.carrier_id):
                raise ValueError(f"carrier id {c.carrier_id!r} is not a code")
            if not c.regions:
                raise ValueError(f"carrier {c.carrier_id} serves no region")

    @classmethod
    def from_seed(cls, entries: Iterable[Mapping[str, Any]]) -> Carriers:
        return cls(
            tuple(
                Carrier(str(e["id"]), str(e["name"]), frozenset(str(r) for r in e["regions"]))
                for e in entries
            )
        )

    def ids(self) -> list[str]:
        return [c.carrier_id for c in self.carriers]

    @property
    def broadest(self) -> Carrier:
        """The carrier with the most regions (then the smallest id): it carries what no other can."""
        return min(self.carriers, key=lambda c: (-len(c.regions), c.carrier_id))

    def for_lane(
        self, origin: str, destination: str, origin_region: str | None, destination_region: str | None
    ) -> Carrier:
        """The carrier of a leg from `origin` to `destination` (see the module's docstring)."""
        if origin_region is None or destination_region is None:
            return self.broadest
        ends = {origin_region, destination_region}
        able = [c for c in self.carriers if c.serves(ends)]
        if not able:
            return self.broadest
        fewest = min(len(c.regions) for c in able)
        candidates = sorted((c for c in able if len(c.regions) == fewest), key=lambda c: c.carrier_id)
        digest = hashlib.sha256(f"{origin}>{destination}".encode()).digest()
        return candidates[int.from_bytes(digest[:8], "big") % len(candidates)]


@dataclass(frozen=True)
class Tenant:
    """Whose shipments a tenant-bound caller sees and reports on: a carrier its own; a treatment centre or
    a site the legs that start or end there. QA, ops and admin are not confined (no Tenant at all)."""

    carrier_id: str | None = None
    location_id: str | None = None

    def __post_init__(self) -> None:
        if (self.carrier_id is None) == (self.location_id is None):
            raise ValueError("a tenant is either a carrier or a location")

    def admits(self, ship: Shipment) -> bool:
        if self.carrier_id is not None and ship.carrier_id != self.carrier_id:
            return False
        return self.location_id is None or self.location_id in (ship.origin, ship.destination)
