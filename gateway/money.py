"""Money is an ``int`` of atomic units (USDC has 6 decimals) from the config file to the chain.

``Decimal`` is used only to read prices written by people; floats never touch an amount
(``int(0.0157 * 10**6)`` is 15699).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext

from gateway.networks import USDC_DECIMALS

# The largest amount in atomic units that every store keeps and computes with exactly (Redis scripts compute in Lua
# doubles; SQLite's INTEGER is 64-bit): ~9 billion USDC. No price or limit is ever larger.
MAX_ATOMIC = 2**53 - 1
_MAX_DIGITS = 64  # characters of a price as written: far more than any real one
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def parse_usd(text: str | int | Decimal, *, decimals: int = USDC_DECIMALS) -> int:
    """``"0.10"`` / ``"$0.10"`` -> 100000 atomic units. Refuses floats, negatives, sub-unit precision, and amounts
    above :data:`MAX_ATOMIC`."""
    if isinstance(text, float):
        raise ValueError('prices must be strings or integers, not floats (write price = "0.10")')
    raw = str(text).strip().removeprefix("$").strip()
    if len(raw) > _MAX_DIGITS:  # every digit below is then kept exactly (the context's precision)
        raise ValueError(f"not a price: {raw[:20]!r}... is {len(raw)} characters long")
    if raw.startswith("-"):
        raise ValueError(f"not a non-negative amount: {raw!r}")
    if not _DECIMAL.fullmatch(raw):
        # Decimal() also reads other scripts' digits ("٣" is 3), underscores ("1_000") and "+": a price is
        # written in ASCII digits, so what a person reads is what is charged.
        raise ValueError(f"not a decimal amount: {raw!r} (ASCII digits, one '.', an optional exponent)")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError(f"not a decimal amount: {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"not a non-negative amount: {raw!r}")
    # Checked on the exponent before any arithmetic: "1e999999999999" would overflow the decimal context and
    # "1e-999999999" would be rounded to zero by it (a price of nothing).
    if value.adjusted() > 30:
        raise ValueError(f"{raw!r} is more than the largest amount kept exactly ({MAX_ATOMIC} atomic units)")
    if value and value.adjusted() < -decimals:
        raise ValueError(f"{raw!r} has more than {decimals} decimal places")
    with localcontext() as exact:
        exact.prec = 2 * _MAX_DIGITS  # scaling never rounds ("1.9999999999999999999999999999999" is not 2)
        atomic = value.scaleb(decimals)
    if atomic != atomic.to_integral_value():
        raise ValueError(f"{raw!r} has more than {decimals} decimal places")
    if atomic > MAX_ATOMIC:
        raise ValueError(f"{raw!r} is more than the largest amount kept exactly ({MAX_ATOMIC} atomic units)")
    return int(atomic)


def format_usd(atomic: int, *, decimals: int = USDC_DECIMALS) -> str:
    """100000 -> ``"0.10"``: at least two decimals, no trailing noise, exact."""
    value = Decimal(atomic).scaleb(-decimals)
    text = format(value.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"
