"""Chain-of-identity ids. The rules are shared by every service that receives a COI, so they live in
the contracts library; the order service is the one that issues them (`make_coi`)."""

from v2v_contracts.coi import (
    ALPHABET,
    COI_RE,
    FACILITY_RE,
    check_character,
    coi_problem,
    is_valid_coi,
    make_coi,
)

__all__ = ["ALPHABET", "COI_RE", "FACILITY_RE", "check_character", "coi_problem", "is_valid_coi", "make_coi"]
