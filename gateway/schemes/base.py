"""The one interface every payment scheme implements, and the vocabulary it shares with the engine.

A scheme turns what a request carried into money that is verifiably ours. The engine
(:mod:`gateway.engine.engine`) drives every scheme through the same steps, in this order::

    accepts(presented)            is this header mine?                           (cheap, no parsing)
    parse(route, presented)       parse + every check that needs no I/O          -> a Payment, or 400/402
    verify(payment)               on-chain facts the claim key depends on       (tx-hash: the Transfer log)
    claim_key(payment)            the store key of the *money* and how long to keep it
    -- the engine claims the key: the one point where concurrent presentations are decided --
    confirm(claim, record)        what the claim's state means: resume, reconcile, recheck the chain, mark paid
    settle(claim)                 make the money move (no-op for money that already moved)
    (the receipt header is built from the payment's requirement, version and payer, the same for every scheme)

and asks each for its part of the 402 (:meth:`Scheme.offer`). Adding a scheme is a module here plus one line in
:func:`gateway.schemes.build_schemes`; the engine and the HTTP layer do not change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from gateway.config import GatewayConfig, RouteConfig
from gateway.schemes.prices import EarlierPrice
from gateway.storage.receipts import ClaimRecord, Effect
from gateway.x402.challenge import Requirement
from gateway.x402.payload import HeaderName


@dataclass(frozen=True, slots=True)
class PricedRoute:
    """A configured route with the requirements it is paid by, one per accepted network (built at start and again
    whenever its prices or routes change: :mod:`gateway.engine.reload`)."""

    config: RouteConfig
    requirements: tuple[Requirement, ...]
    sessions: tuple[Requirement, ...] = ()  # batch-settlement offers (amount = the per-request ceiling)
    earlier: tuple[EarlierPrice, ...] = ()  # prices it had a moment ago, still honoured (gateway/schemes/prices.py)


def requirements_for(config: GatewayConfig, route: RouteConfig) -> tuple[Requirement, ...]:
    out = []
    for name in route.networks:
        n = config.networks[name]
        out.append(
            Requirement(
                network=n.name,
                chain_id=n.chain_id,
                asset=n.usdc,
                amount=route.price,
                pay_to=config.payment.pay_to,
                max_timeout_seconds=route.max_timeout_seconds,
                eip712_name=n.eip712_name,
                eip712_version=n.eip712_version,
            )
        )
    return tuple(out)


# How long a payment record outlives the last moment it can matter (an authorization's validBefore, the age limit of
# a transfer): the margin absorbs clocks of several gateways and of the chain that disagree a little.
RECORD_MARGIN = 3600.0


def authorization_key(chain_id: int, asset: str, payer: str, nonce: bytes) -> str:
    """The store key of one EIP-3009 authorization's money: (chain, asset, payer, nonce). The ``exact`` scheme
    claims it; a tx-hash proof of a transfer that executed an authorization takes it too, so that the one payment
    pays once whichever way it is presented, and whichever transaction executed it (docs/threat-model.md T26)."""
    return f"exact:{chain_id}:{asset.lower()}:{payer.lower()}:0x{nonce.hex()}"


def slot_key(chain_id: int, sender: str, nonce: int) -> str:
    """The store key of one transaction slot: (chain, sender, account nonce). Each is filled once on a chain, so a
    transfer that replaced a reorged one at the same nonce is the money of the first, not new money
    (docs/threat-model.md T28)."""
    return f"slot:{chain_id}:{sender.lower()}:{nonce}"


def effect_key(chain_id: int, tx_hash: str, log_index: int) -> str:
    """The store key of one on-chain effect: the Transfer log that moved the money. Every scheme whose money
    arrives as a transfer ends on this key, so one transfer pays once, whichever way it is presented
    (docs/threat-model.md T26)."""
    return f"tx:{chain_id}:{tx_hash.lower()}:{log_index}"


@dataclass(frozen=True, slots=True)
class Presented:
    """A payment as the request carried it, read from the headers once."""

    header: HeaderName  # "payment-signature" (x402 v2) or "x-payment" (v1, or a tx hash)
    value: bytes
    network: bytes | None  # X-PAYMENT-NETWORK (tx-hash proofs)
    binding: bytes | None  # X-PAYMENT-BINDING (tx-hash proofs)
    method: str
    resource: str  # the resource URL exactly as the 402 advertised it


@dataclass(frozen=True, slots=True)
class Offer:
    """One scheme's part of a 402: entries for ``accepts`` (v1 and v2), v2 ``extensions``, extra v1 body keys."""

    accepts: tuple[Requirement, ...] = ()
    extensions: Mapping[str, Any] = field(default_factory=dict)
    v1_extra: Mapping[str, Any] = field(default_factory=dict)


class Payment(Protocol):
    """What every scheme's parsed payment tells the engine and the receipt."""

    @property
    def requirement(self) -> Requirement: ...

    @property
    def payer(self) -> str: ...

    @property
    def version(self) -> int: ...


P = TypeVar("P", bound=Payment)
P_co = TypeVar("P_co", bound=Payment, covariant=True)


class Claim(Protocol[P_co]):
    """The claim handle a scheme works with after the engine claimed the payment's key
    (:class:`gateway.engine.claim.PaidRequest`). Narrow on purpose: a scheme records what happened to the money,
    the engine owns the store, the lease and the outcomes a store outage defers."""

    @property
    def payment(self) -> P_co: ...

    @property
    def paid(self) -> bool: ...

    @property
    def tx_hash(self) -> str | None: ...

    def mark_resumed(self, tx_hash: str | None) -> None:
        """The money moved during an earlier request that failed: serve this one without charging again."""

    async def mark_paid(self, tx_hash: str, *, effects: tuple[Effect, ...] = ()) -> None:
        """The money is on chain in ``tx_hash`` (PENDING -> PAID); from here the claim is never given back.
        ``effects``: the keys of what the money spent on chain (the transfer's effect key, ...), all taken in the
        same step; raises ``PaymentReplayed`` (and the claim is consumed) when any of them already paid for
        something else."""

    async def record_tx(self, tx_hash: str) -> None:
        """Store the settlement's hash *before* it is broadcast, so a crash is reconciled by hash, never re-sent."""

    def in_flight(self, value: bool) -> None:
        """Whether a transaction for this claim may be on its way (True keeps the claim on failure)."""


class Offering(Protocol):
    """What every scheme does: recognise its payments and offer itself in the 402."""

    name: str  # also the ``kind`` in access logs and metrics

    def accepts(self, presented: Presented) -> bool: ...

    def offer(self, route: PricedRoute, resource: str, method: str) -> Offer | None: ...


class Scheme(Offering, Protocol, Generic[P]):
    """A scheme whose every payment is one claim of money (``exact``, tx-hash proofs); a session scheme is only an
    :class:`Offering` (:mod:`gateway.engine.sessions` drives it)."""

    def parse(self, route: PricedRoute, presented: Presented) -> P: ...

    async def verify(self, payment: P) -> None: ...

    def claim_key(self, payment: P, *, now: float) -> tuple[str, float | None]:
        """``(key, expires_at)``: the store key of the money and the epoch after which no presentation of it can
        succeed any more (None: keep the record for ever)."""
        ...

    async def confirm(self, claim: Claim[P], record: ClaimRecord, *, now: float) -> None: ...

    async def settle(self, claim: Claim[P], *, simulate_again: bool) -> str: ...


__all__ = [
    "Claim",
    "Offer",
    "Offering",
    "Payment",
    "Presented",
    "PricedRoute",
    "Scheme",
    "effect_key",
    "requirements_for",
    "slot_key",
]
