"""Prices written by people become exact integers of atomic units, or a clear refusal (gateway/money.py)."""

from __future__ import annotations

import pytest

from gateway.money import MAX_ATOMIC, format_usd, parse_usd


@pytest.mark.parametrize(
    ("text", "atomic"),
    [("0.10", 100_000), ("$0.10", 100_000), ("1E+2", 100_000_000), ("0.000001", 1), ("0", 0), ("0e-999999999", 0)],
)
def test_a_price_is_read_exactly(text: str, atomic: int) -> None:
    assert parse_usd(text) == atomic


@pytest.mark.parametrize(
    "text",
    [
        "1e-999999999",  # the decimal context rounded it to zero: a price of nothing
        "1e-7",
        "1.5e-6",
        "1.9999999999999999999999999999999",  # more digits than the default context keeps: it was rounded to 2
        "0.0000019999999999999999999999999999",
        "1" * 100,
        "1e999999999999",  # overflowed the decimal context (an exception no caller expected)
        "9e15",
        "-1",
        "NaN",
        "Infinity",
        "0.1.0",
        "\u0663",  # ARABIC-INDIC DIGIT THREE: Decimal() reads it as 3
        "\uff11",  # FULLWIDTH DIGIT ONE
        "1_000",  # Decimal() reads it as 1000
        "+1",
        "0x10",
        "1 0",
    ],
)
def test_a_price_that_is_not_a_whole_number_of_atomic_units_in_range_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_usd(text)


def test_the_largest_amount_kept_exactly_reads_and_prints_back() -> None:
    assert parse_usd(format_usd(MAX_ATOMIC)) == MAX_ATOMIC
    with pytest.raises(ValueError):
        parse_usd(format_usd(MAX_ATOMIC + 1))
