"""Tx-hash proofs on the wire: the payer sent USDC on chain first and presents the transaction hash.

This module is what a client and the server must agree on (docs/protocol.md §5): the three request headers, the
binding message the transfer's sender signs, and how the 402 describes this way of paying. What makes a proof pay
is decided in :mod:`gateway.schemes.txhash`.

The binding message (``X-PAYMENT-BINDING: 0x<signature>``, ``personal_sign`` of these lines)::

    x402 tx-hash payment
    tx: 0x<64 hex, lowercase>
    network: <network name as sent in X-PAYMENT-NETWORK>
    method: <HTTP method>
    resource: <the resource URL exactly as the 402 advertised it>

A route may make the binding optional (``tx_hash_binding = "optional"``, docs/threat-model.md T43): a proof without
it then pays for whoever presents the hash first, and the 402 says so (``binding: "optional"`` and
:data:`UNBOUND_NOTE`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.errors import BadRequest, PaymentRequired
from gateway.money import format_usd
from gateway.x402.challenge import Requirement
from gateway.x402.reasons import (
    AMOUNT_TOO_LOW,
    BINDING_MISMATCH,
    BINDING_REQUIRED,
    INVALID_PAYMENT_HEADER,
    NETWORK_REQUIRED,
    TRANSFER_NOT_FOUND,
    TX_IN_FUTURE,
    TX_NOT_FINAL,
    TX_NOT_FOUND,
    TX_REVERTED,
    TX_TOO_OLD,
)

TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
_HEX = re.compile(r"^0x(?:[0-9a-fA-F]{2})+\Z")
BINDING_HEADER = "X-PAYMENT-BINDING"
NETWORK_HEADER = "X-PAYMENT-NETWORK"


@dataclass(frozen=True, slots=True)
class TxProof:
    tx_hash: str  # lowercase
    network: str  # as the client named it
    binding: bytes | None  # signature over binding_message(...); None: unbound (only where the route allows it)


def looks_like_tx_hash(value: bytes) -> bool:
    return len(value) == 66 and TX_HASH.match(value.decode("latin-1")) is not None


def parse_tx_proof(
    tx_hash: bytes, network: bytes | None, binding: bytes | None, *, binding_required: bool = True
) -> TxProof:
    text = tx_hash.decode("latin-1").strip()
    if not TX_HASH.match(text):
        raise BadRequest("X-PAYMENT must be a 0x-prefixed 32-byte transaction hash", reason=INVALID_PAYMENT_HEADER)
    if network is None or not network.strip():
        raise PaymentRequired(f"a tx-hash payment needs the {NETWORK_HEADER} header", reason=NETWORK_REQUIRED)
    name = network.decode("latin-1").strip()[:64]
    if binding is None:
        if binding_required:
            raise PaymentRequired(
                f"a tx-hash payment needs {BINDING_HEADER}: the transfer sender's signature of the binding message",
                reason=BINDING_REQUIRED,
            )
        return TxProof(tx_hash=text.lower(), network=name, binding=None)
    # A binding that is sent is checked, also where it is optional: a bad one is never read as "no binding".
    sig = binding.decode("latin-1").strip()
    if not _HEX.match(sig) or len(sig) > 2 + 2 * 4096:
        raise BadRequest(f"{BINDING_HEADER} must be a 0x-prefixed hex signature", reason=INVALID_PAYMENT_HEADER)
    return TxProof(tx_hash=text.lower(), network=name, binding=bytes.fromhex(sig[2:]))


def binding_message(tx_hash: str, network: str, method: str, resource: str) -> str:
    return f"x402 tx-hash payment\ntx: {tx_hash.lower()}\nnetwork: {network}\nmethod: {method}\nresource: {resource}"


UNBOUND_NOTE = (
    f"{BINDING_HEADER} is optional on this route: without it, the first request that presents the transaction hash "
    "is served. Anyone who sees the hash first (on chain or in the mempool) can use your payment; sign the binding "
    "to keep it yours."
)


def tx_option(req: Requirement, resource: str, method: str, *, binding_required: bool = True) -> dict[str, Any]:
    """The 402's description of paying by on-chain transfer on one network (seed 004's ``payment[]``)."""
    binding: dict[str, Any] = {
        "scheme": "eip191",
        "signer": "the transfer's sender",
        "message": binding_message("<tx hash>", req.network, method, resource),
        "required": binding_required,
    }
    if not binding_required:
        binding["note"] = UNBOUND_NOTE  # v1 agents read payment[0]: the risk is stated where they look
    return {
        "scheme": "txhash",
        "network": req.network,
        "chainId": req.chain_id,
        "caip2": req.caip2,
        "recipient": req.pay_to,
        "asset": req.asset,
        "amount": str(req.amount),
        "amountUsd": format_usd(req.amount),
        "decimals": 6,
        "headers": {"X-PAYMENT": "<tx hash>", NETWORK_HEADER: req.network, BINDING_HEADER: "<signature>"},
        "binding": binding,
    }


def tx_extension(options: list[dict[str, Any]], *, binding_required: bool) -> dict[str, Any]:
    """The v2 ``extensions.txhash`` of a route: its options, whether the binding is required, and if not, the risk."""
    if binding_required:
        return {"options": options, "binding": "required"}
    return {"options": options, "binding": "optional", "note": UNBOUND_NOTE}


__all__ = [
    "AMOUNT_TOO_LOW",
    "BINDING_HEADER",
    "BINDING_MISMATCH",
    "BINDING_REQUIRED",
    "NETWORK_HEADER",
    "NETWORK_REQUIRED",
    "TRANSFER_NOT_FOUND",
    "TX_HASH",
    "TX_IN_FUTURE",
    "TX_NOT_FINAL",
    "TX_NOT_FOUND",
    "TX_REVERTED",
    "TX_TOO_OLD",
    "UNBOUND_NOTE",
    "TxProof",
    "binding_message",
    "looks_like_tx_hash",
    "parse_tx_proof",
    "tx_extension",
    "tx_option",
]
