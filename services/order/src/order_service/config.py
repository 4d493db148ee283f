"""The order service's settings (V2V_* environment variables), read once at start-up."""

from __future__ import annotations

from pydantic import field_validator

from order_service.domain.coi import FACILITY_RE
from v2v_servicekit import ServiceSettings


class OrderSettings(ServiceSettings):
    # the facility id that starts every chain-of-identity id this service issues (ISBT 128 style)
    coi_facility_id: str = "V2V00"  # V2V_COI_FACILITY_ID

    @field_validator("coi_facility_id")
    @classmethod
    def _facility_id(cls, value: str) -> str:
        if not FACILITY_RE.match(value):
            raise ValueError("V2V_COI_FACILITY_ID must be a letter followed by 4 letters or digits")
        return value
