"""Chain-of-identity ids: ISBT 128-style Donation Identification Number plus its check character.

DIN = 5-character facility id (a letter, then 4 letters or digits) + 2-digit year + 6-digit sequence;
the check character is ISO 7064 MOD 37-2 over those 13 characters (`G123498654321` → `H`).
The COI is the 13 characters followed by the check character.
"""

from __future__ import annotations

import re

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ*"
# \Z, not $ (which also matches before a trailing newline); [0-9], not \d (which matches any Unicode digit)
FACILITY_RE = re.compile(r"^[A-Z][A-Z0-9]{4}\Z")
COI_RE = re.compile(r"^[A-Z][A-Z0-9]{4}[0-9]{2}[0-9]{6}[0-9A-Z*]\Z")


def check_character(din: str) -> str:
    """ISO 7064 MOD 37-2 check character of a 13-character DIN."""
    total = 0
    for ch in din:
        value = ALPHABET.index(ch)  # ValueError for characters outside the alphabet
        total = ((total + value) * 2) % 37
    return ALPHABET[(38 - total) % 37]


def make_coi(facility_id: str, year: int, sequence: int) -> str:
    if not FACILITY_RE.match(facility_id):
        raise ValueError("facility id must be a letter followed by 4 letters or digits")
    if not 0 < sequence <= 999_999:
        raise ValueError("sequence must be 1..999999")
    din = f"{facility_id}{year % 100:02d}{sequence:06d}"
    return din + check_character(din)


def is_valid_coi(coi: str) -> bool:
    """Shape and check character both right."""
    if not COI_RE.match(coi):
        return False
    return check_character(coi[:13]) == coi[13]


def coi_problem(coi: str) -> str | None:
    """Why a COI is refused, or None when it is valid."""
    if not COI_RE.match(coi):
        return "must be 13 characters (facility id, 2-digit year, 6-digit sequence) and a check character"
    expected = check_character(coi[:13])
    if coi[13] != expected:
        return "check character does not match (ISO 7064 MOD 37-2)"
    return None
