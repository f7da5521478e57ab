"""Spend controls: what a 402 may make this client pay, checked before anything is signed or sent.

Amounts are ``int`` atomic USDC units (6 decimals); a ``Decimal`` or a string is read as US dollars
(``Decimal("0.10")``, ``"0.10"``, ``"$0.10"`` -> 100000). Floats are refused, as in the gateway's config.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from gateway.client._errors import PaymentRefused
from gateway.money import format_usd, parse_usd
from gateway.networks import KNOWN_NETWORKS

__all__ = ["SpendControls", "atomic_amount", "chain_id_of"]

Amount = int | Decimal | str

_BY_CHAIN = {n.chain_id: n for n in KNOWN_NETWORKS.values()}


def chain_id_of(network: str) -> int | None:
    """``"base"`` / ``"eip155:8453"`` -> 8453; None for a name this client does not know."""
    if network.startswith("eip155:"):
        tail = network.split(":", 1)[1]
        return int(tail) if tail.isdigit() else None
    known = KNOWN_NETWORKS.get(network)
    return known.chain_id if known else None


def atomic_amount(value: Amount | None, name: str) -> int | None:
    """An int is atomic units; a Decimal or str is dollars (``"0.10"``, ``"$0.10"``); floats are refused."""
    if value is None:
        return None
    if isinstance(value, bool | float):
        raise TypeError(f"{name}: an int of atomic units or a Decimal/str of dollars, not {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must not be negative")
        return value
    return parse_usd(value)


def _usd(atomic: int) -> str:
    return f"${format_usd(atomic)}"


@dataclass(frozen=True, slots=True, init=False)
class SpendControls:
    """Limits a client applies to every 402 before paying.

    * ``max_per_payment``: the most one payment may cost (default $1.00, the official x402 client's cap);
      ``None``: no cap.
    * ``budget``: the most this client pays in total (``None``: unlimited). Tracked per client, concurrency-safe;
      a payment known not to have moved money (refused before it was signed, a transfer never sent) is given
      back; one the server answered with a 402 is not (it holds the signed authorization).
    * ``networks``: allowed networks, by name or CAIP-2 (``{"base", "eip155:137"}``); ``None``: any.
    * ``assets``: allowed token contracts; ``None``: the canonical USDC of the networks this client knows (any
      asset on a network it does not know: pin it here).
    """

    max_per_payment: int | None
    budget: int | None
    networks: frozenset[str] | None
    assets: frozenset[str] | None

    def __init__(
        self,
        *,
        max_per_payment: Amount | None = Decimal("1.00"),
        budget: Amount | None = None,
        networks: Iterable[str] | None = None,
        assets: Iterable[str] | None = None,
    ) -> None:
        object.__setattr__(self, "max_per_payment", atomic_amount(max_per_payment, "max_per_payment"))
        object.__setattr__(self, "budget", atomic_amount(budget, "budget"))
        object.__setattr__(self, "networks", None if networks is None else frozenset(networks))
        object.__setattr__(self, "assets", None if assets is None else frozenset(a.lower() for a in assets))

    def __repr__(self) -> str:
        parts = []
        for name in ("max_per_payment", "budget"):
            value = getattr(self, name)
            parts.append(f"{name}={'None' if value is None else _usd(value)}")
        for name in ("networks", "assets"):
            value = getattr(self, name)
            parts.append(f"{name}={'None' if value is None else sorted(value)}")
        return f"SpendControls({', '.join(parts)})"

    def allows_network(self, network: str) -> bool:
        if self.networks is None:
            return True
        chain = chain_id_of(network)
        return any(
            network == allowed or (chain is not None and chain_id_of(allowed) == chain) for allowed in self.networks
        )

    def allows_asset(self, network: str, asset: str) -> bool:
        if self.assets is not None:
            return asset.lower() in self.assets
        known = _BY_CHAIN.get(chain_id_of(network) or -1)
        return known is None or known.usdc.lower() == asset.lower()

    def refusal(self, *, amount: int, network: str, asset: str) -> PaymentRefused | None:
        """Why this payment must not be made (budget aside), or None."""
        if not self.allows_network(network):
            allowed = ", ".join(sorted(self.networks or ()))
            return PaymentRefused(
                f"network {network} is not allowed (allowed: {allowed})", reason="network_not_allowed"
            )
        if not self.allows_asset(network, asset):
            return PaymentRefused(f"asset {asset} on {network} is not allowed", reason="asset_not_allowed")
        if self.max_per_payment is not None and amount > self.max_per_payment:
            return PaymentRefused(
                f"the server asks {_usd(amount)} ({amount} atomic units); max_per_payment is "
                f"{_usd(self.max_per_payment)}",
                reason="amount_over_limit",
            )
        return None


class Budget:
    """Running total of what a client paid (reserved before paying, given back when nothing moved)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._spent = 0
        self._lock = threading.Lock()  # the sync wrapper and user threads may share one client

    @property
    def spent(self) -> int:
        with self._lock:
            return self._spent

    @property
    def remaining(self) -> int | None:
        with self._lock:
            return None if self.limit is None else self.limit - self._spent

    def reserve(self, amount: int) -> None:
        with self._lock:
            if self.limit is not None and self._spent + amount > self.limit:
                left = self.limit - self._spent
                raise PaymentRefused(
                    f"the server asks {_usd(amount)}; {_usd(left)} of the {_usd(self.limit)} budget is left",
                    status=402,
                    reason="budget_exhausted",
                )
            self._spent += amount

    def refund(self, amount: int) -> None:
        with self._lock:
            self._spent -= amount
