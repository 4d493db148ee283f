"""Chain-of-identity ids: ISBT 128-style DIN plus ISO 7064 MOD 37-2 check character."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_service.domain.coi import ALPHABET, check_character, coi_problem, is_valid_coi, make_coi

SHAPE_MESSAGE = "must be 13 characters (facility id, 2-digit year, 6-digit sequence) and a check character"
CHECK_MESSAGE = "check character does not match (ISO 7064 MOD 37-2)"

facility_ids = st.from_regex(r"\A[A-Z][A-Z0-9]{4}\Z")
years = st.integers(min_value=0, max_value=9999)
sequences = st.integers(min_value=1, max_value=999_999)
cois = st.builds(make_coi, facility_ids, years, sequences)


def satisfies_mod37_2(coi: str) -> bool:
    """ISO 7064 pure system, written independently of the code under test.

    With the check character at the rightmost position (weight 2^0) and every other character i
    positions to its left weighted 2^i, the weighted sum of all character values is 1 (mod 37).
    """
    values = [ALPHABET.index(ch) for ch in coi]
    n = len(values)
    return sum(v * pow(2, n - 1 - i, 37) for i, v in enumerate(values)) % 37 == 1


# --- check character -------------------------------------------------------------------------------


def test_known_isbt128_example() -> None:
    assert check_character("G123498654321") == "H"
    assert make_coi("G1234", 98, 654321) == "G123498654321H"
    assert is_valid_coi("G123498654321H")
    assert coi_problem("G123498654321H") is None


def test_check_character_can_be_the_asterisk() -> None:
    # value 36 ('*') is a legitimate check character; find a DIN that needs it and accept it
    din = next(
        f"A0000{yy:02d}{seq:06d}"
        for yy in range(100)
        for seq in range(1, 200)
        if check_character(f"A0000{yy:02d}{seq:06d}") == "*"
    )
    assert is_valid_coi(din + "*")


@given(cois)
def test_make_coi_always_yields_a_valid_coi(coi: str) -> None:
    assert len(coi) == 14
    assert is_valid_coi(coi)
    assert coi_problem(coi) is None
    assert satisfies_mod37_2(coi)


@given(facility_ids, years, sequences)
def test_make_coi_lays_out_facility_year_and_sequence(facility: str, year: int, sequence: int) -> None:
    coi = make_coi(facility, year, sequence)
    assert coi[:5] == facility
    assert coi[5:7] == f"{year % 100:02d}"
    assert int(coi[7:13]) == sequence
    assert coi[13] == check_character(coi[:13])


@given(st.text(alphabet=ALPHABET[:36], min_size=13, max_size=13))
def test_check_character_satisfies_the_iso7064_equation(din: str) -> None:
    assert satisfies_mod37_2(din + check_character(din))
    # and it is the only character that does
    assert [c for c in ALPHABET if satisfies_mod37_2(din + c)] == [check_character(din)]


@given(cois, st.integers(min_value=0, max_value=13), st.sampled_from(ALPHABET))
def test_every_single_substitution_is_detected(coi: str, position: int, replacement: str) -> None:
    if coi[position] == replacement:
        replacement = ALPHABET[(ALPHABET.index(replacement) + 1) % len(ALPHABET)]
    corrupted = coi[:position] + replacement + coi[position + 1 :]
    assert corrupted != coi
    assert not is_valid_coi(corrupted)
    assert coi_problem(corrupted) is not None


@given(cois, st.integers(min_value=0, max_value=12))
def test_every_adjacent_transposition_is_detected(coi: str, position: int) -> None:
    a, b = coi[position], coi[position + 1]
    if a == b:
        return  # swapping equal characters is no error at all
    swapped = coi[:position] + b + a + coi[position + 2 :]
    assert not is_valid_coi(swapped)


# --- shape -----------------------------------------------------------------------------------------


@given(st.text(max_size=20))
def test_is_valid_coi_never_raises_and_agrees_with_coi_problem(text: str) -> None:
    valid = is_valid_coi(text)
    assert isinstance(valid, bool)
    assert valid == (coi_problem(text) is None)
    if valid:
        assert len(text) == 14
        assert satisfies_mod37_2(text)


@given(st.from_regex(r"\A[A-Z][A-Z0-9]{4}\d{8}[0-9A-Z*]\s?\Z"))
def test_near_cois_with_unicode_digits_or_trailing_whitespace_are_answered_not_raised(text: str) -> None:
    # Python's \d and \s match far more than ASCII digits and a space
    ascii_shape = len(text) == 14 and text[5:13].isascii() and text[5:13].isdigit()
    assert is_valid_coi(text) == (ascii_shape and check_character(text[:13]) == text[13])
    if not ascii_shape:
        assert coi_problem(text) == SHAPE_MESSAGE


@pytest.mark.parametrize(
    "coi",
    [
        "",
        "G123498654321",  # check character missing
        "G123498654321HH",  # one too many
        "g123498654321H",  # lower case
        "1123498654321H",  # facility must start with a letter
        "G1234A8654321H",  # year must be digits
        "G12349865432AH",  # sequence must be digits
        "G123498654321H\n",  # trailing newline is not part of a COI
        "G1234\u0669\u0668654321H",  # Arabic-Indic digits are not digits here
        " G123498654321H",
    ],
)
def test_badly_shaped_cois_are_refused_with_the_shape_message(coi: str) -> None:
    assert not is_valid_coi(coi)
    assert coi_problem(coi) == SHAPE_MESSAGE


def test_wrong_check_character_gets_the_check_message() -> None:
    assert coi_problem("G123498654321J") == CHECK_MESSAGE
    assert coi_problem("G123498654321*") == CHECK_MESSAGE


# --- make_coi input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "facility", ["", "G123", "G12345", "g1234", "11234", "G12-4", "G1234\n", "G 234", "Ä1234"]
)
def test_make_coi_rejects_bad_facility_ids(facility: str) -> None:
    with pytest.raises(ValueError, match="facility id"):
        make_coi(facility, 2026, 1)


@pytest.mark.parametrize("sequence", [0, -1, 1_000_000, 10**9])
def test_make_coi_rejects_sequences_out_of_range(sequence: int) -> None:
    with pytest.raises(ValueError, match="sequence"):
        make_coi("G1234", 2026, sequence)


def test_make_coi_accepts_sequence_bounds() -> None:
    assert make_coi("G1234", 2026, 1)[7:13] == "000001"
    assert make_coi("G1234", 2026, 999_999)[7:13] == "999999"
