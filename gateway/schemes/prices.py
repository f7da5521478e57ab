"""Prices a route had a moment ago: a payment answering a 402 at the old price is honoured (docs/operating.md,
"Prices and routes at run time").

A 402 offers a price; the client may take up to the requirement's ``maxTimeoutSeconds`` to pay it. When the price
changes in between (a reload, an admin change), that payment still pays for the route at the price it was offered:
the engine keeps each earlier price of a route with the last moment a payment answering it may still be valid
(:class:`EarlierPrice`), and the schemes accept a payment that matches one of them exactly. Sans-IO, like the checks
that use it. New 402s show only the current price.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway.x402.challenge import Requirement

__all__ = ["EarlierPrice", "at_earlier_price", "honoured_floor", "honoured_for"]


@dataclass(frozen=True, slots=True)
class EarlierPrice:
    """A price the route had until a change: a payment at ``amount`` is honoured if it is (or, for an
    authorization, expires) no later than ``until``: the last 402 at it was answered before the change, and no
    payment answering that 402 can be valid beyond the change + the requirement's ``maxTimeoutSeconds`` (plus the
    clock skew the window check allows, plus how late another instance may learn of the change)."""

    amount: int  # atomic units
    until: float  # epoch seconds


def at_earlier_price(
    req: Requirement, amount: int, earlier: Sequence[EarlierPrice], *, expires_by: float
) -> Requirement | None:
    """``req`` at ``amount`` when ``amount`` is an earlier price honoured for a payment that is valid no later than
    ``expires_by`` (an EIP-3009 authorization's ``validBefore``); None otherwise."""
    for price in earlier:
        if price.amount == amount and expires_by <= price.until:
            return replace(req, amount=amount)
    return None


def honoured_for(req: Requirement, amount: int, earlier: Sequence[EarlierPrice], *, now: float) -> Requirement:
    """The requirement a payment of ``amount`` presented at ``now`` pays for: the highest of the current price and
    the earlier prices still honoured that ``amount`` covers (a transfer may carry more than it must); ``req``
    itself when none does (the caller's own check then refuses it)."""
    best = req if amount >= req.amount else None
    for price in earlier:
        if now <= price.until and price.amount <= amount and (best is None or price.amount > best.amount):
            best = replace(req, amount=price.amount)
    return best or req


def honoured_floor(req: Requirement, earlier: Sequence[EarlierPrice], *, now: float) -> int:
    """The least amount that pays for ``req``'s route at ``now``: its price, or a lower earlier one still honoured."""
    return min([req.amount, *(p.amount for p in earlier if now <= p.until)])
