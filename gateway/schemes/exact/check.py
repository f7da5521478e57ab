"""Sans-IO checks of an x402 ``exact`` (EIP-3009) payment against the server's own requirement.

Nothing here does I/O: these are the decisions that need no chain (docs/protocol.md §2). The chain checks
(nonce unused, balance, simulation, ERC-1271) live in :mod:`gateway.schemes.exact.onchain`; the digests in
:mod:`gateway.x402.eip712`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from gateway.errors import PaymentRequired
from gateway.schemes.base import authorization_key
from gateway.schemes.prices import EarlierPrice, at_earlier_price
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.eip712 import authorization_digest, recover_signer
from gateway.x402.payload import Authorization, ExactPayment

# ERC-6492: a signature for a wallet that is not deployed yet ends with this magic suffix.
ERC6492_MAGIC = bytes.fromhex("6492649264926492649264926492649264926492649264926492649264926492")


class SignatureKind(enum.Enum):
    EOA = "eoa"  # recovered to ``from``: valid without asking the chain
    CONTRACT = "contract"  # must be checked with ERC-1271 ``isValidSignature`` on ``from``


def select_requirement(
    payment: ExactPayment, requirements: tuple[Requirement, ...], earlier: Sequence[EarlierPrice] = ()
) -> Requirement:
    """The server's requirement for the network the client chose; the client's copy is only compared, never used
    (docs/threat-model.md T4: a payment for a cheap route must not open an expensive one). An authorization for
    exactly an ``earlier`` price of the route that expires within that price's grace pays at that price: it
    answers a 402 from before the price changed (gateway/schemes/prices.py)."""
    for req in requirements:
        if req.matches_network(payment.network):
            break
    else:
        raise PaymentRequired(
            f"network {payment.network[:40]!r} is not accepted on this route", reason=reasons.NETWORK_MISMATCH
        )
    auth = payment.authorization
    if earlier and auth.value != req.amount:
        req = at_earlier_price(req, auth.value, earlier, expires_by=auth.valid_before) or req
    if payment.version == 1 and payment.network != req.network:
        raise PaymentRequired("x402 v1 payments name the network by its v1 name", reason=reasons.NETWORK_MISMATCH)
    echo = payment.accepted
    if echo is not None:
        if str(echo.get("asset", "")).lower() != req.asset.lower():
            raise PaymentRequired("accepted.asset is not this route's asset", reason=reasons.ASSET_MISMATCH)
        if str(echo.get("payTo", "")).lower() != req.pay_to.lower():
            raise PaymentRequired("accepted.payTo is not this route's recipient", reason=reasons.RECIPIENT_MISMATCH)
        if str(echo.get("amount", "")) != str(req.amount):
            raise PaymentRequired("accepted.amount is not this route's price", reason=reasons.VALUE_MISMATCH)
    return req


def check_exact(
    payment: ExactPayment,
    req: Requirement,
) -> SignatureKind:
    """Every check that needs neither chain nor clock. Returns how the signature must be confirmed; raises
    PaymentRequired. The validity window is :func:`check_window`: a payment already paid (settled earlier, its
    request failed) stays usable for its free retry even after its authorization window closed."""
    auth = payment.authorization
    if auth.to != req.pay_to.lower():
        raise PaymentRequired("the authorization pays someone else", reason=reasons.RECIPIENT_MISMATCH)
    if auth.value != req.amount:
        raise PaymentRequired(
            f"the authorization moves {auth.value} units; this route costs exactly {req.amount}",
            reason=reasons.VALUE_MISMATCH,
        )
    if payment.signature.endswith(ERC6492_MAGIC):
        raise PaymentRequired(
            "signatures of undeployed smart wallets (ERC-6492) are not accepted; deploy the wallet first",
            reason=reasons.UNDEPLOYED_SMART_WALLET,
        )
    signer = recover_signer(authorization_digest(req, auth), payment.signature)
    if signer == auth.from_:
        return SignatureKind.EOA
    # Not an EOA signature by ``from``: only a contract wallet at ``from`` can still vouch for it (ERC-1271).
    return SignatureKind.CONTRACT


def check_window(
    payment: ExactPayment, req: Requirement, *, now: int, min_validity_seconds: int, clock_skew_seconds: int
) -> None:
    """validAfter <= now, validBefore >= now + grace and <= now + maxTimeoutSeconds (docs/protocol.md §2,
    docs/threat-model.md T8)."""
    auth = payment.authorization
    if auth.valid_after > now:
        raise PaymentRequired("the authorization is not valid yet", reason=reasons.VALID_AFTER_FUTURE)
    if auth.valid_before < now + min_validity_seconds:
        raise PaymentRequired(
            f"the authorization expires in less than {min_validity_seconds} s", reason=reasons.VALID_BEFORE_EXPIRED
        )
    if auth.valid_before > now + req.max_timeout_seconds + clock_skew_seconds:
        # A far-future authorization would keep our replay record alive for ever and lets the payer sit on a
        # signed payment; the route promises maxTimeoutSeconds, so that is what we accept.
        raise PaymentRequired(
            f"validBefore is more than maxTimeoutSeconds ({req.max_timeout_seconds}) ahead",
            reason=reasons.VALID_BEFORE_TOO_FAR,
        )


def payment_key(req: Requirement, auth: Authorization) -> str:
    """The store key of the money: one EIP-3009 authorization is one (chain, asset, payer, nonce)."""
    return authorization_key(req.chain_id, req.asset, auth.from_, auth.nonce)
