"""Tx-hash proofs: the payer sent USDC on chain first and presents the transaction hash (seed 004's flow).

Known implementations of this mode check only the hash's format. Here a proof pays only if (x402-notes §5,
THREATS 1-7):

* the receipt exists on the named network (whose RPC serves that chain id) with ``status == 1``;
* it holds a ``Transfer`` log **emitted by that network's USDC contract** (3 topics, decoded from the log, never
  from calldata: a fake token emits identical events) to ``payTo`` with ``value >= price``;
* the block has enough confirmations and is not older than the route's window;
* the transfer's sender signed the binding message below (EIP-191), so a hash read off a block explorer cannot
  be spent by anyone else (THREATS 3);
* it is consumed exactly once, for ever: the store key is ``tx:<chain>:<hash>:<log index>`` of the *first*
  qualifying log, so a transaction carrying several Transfer logs still pays once, on one route.

The binding message (``X-PAYMENT-BINDING: 0x<signature>``, ``personal_sign`` of these lines)::

    x402 tx-hash payment
    tx: 0x<64 hex, lowercase>
    network: <network name as sent in X-PAYMENT-NETWORK>
    method: <HTTP method>
    resource: <the resource URL exactly as the 402 advertised it>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from eth_account.messages import encode_defunct
from eth_utils.crypto import keccak

from gateway.chain import abi
from gateway.errors import BadRequest, PaymentRequired
from gateway.schemes.exact.check import recover_signer
from gateway.x402.challenge import Requirement

TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
_HEX = re.compile(r"^0x(?:[0-9a-fA-F]{2})+\Z")
BINDING_HEADER = "X-PAYMENT-BINDING"
NETWORK_HEADER = "X-PAYMENT-NETWORK"

TX_NOT_FOUND = "transaction_not_found"
TX_REVERTED = "transaction_reverted"
TX_NOT_FINAL = "transaction_not_final"
TX_TOO_OLD = "transaction_too_old"
TX_IN_FUTURE = "transaction_in_future"
TRANSFER_NOT_FOUND = "transfer_not_found"
AMOUNT_TOO_LOW = "transfer_amount_too_low"
BINDING_REQUIRED = "payment_binding_required"
BINDING_MISMATCH = "payment_binding_mismatch"
NETWORK_REQUIRED = "payment_network_required"


@dataclass(frozen=True, slots=True)
class TxProof:
    tx_hash: str  # lowercase
    network: str  # as the client named it
    binding: bytes  # signature over binding_message(...)


def looks_like_tx_hash(value: bytes) -> bool:
    return len(value) == 66 and TX_HASH.match(value.decode("latin-1")) is not None


def parse_tx_proof(tx_hash: bytes, network: bytes | None, binding: bytes | None) -> TxProof:
    text = tx_hash.decode("latin-1").strip()
    if not TX_HASH.match(text):
        raise BadRequest("X-PAYMENT must be a 0x-prefixed 32-byte transaction hash", reason="invalid_payment_header")
    if network is None or not network.strip():
        raise PaymentRequired(f"a tx-hash payment needs the {NETWORK_HEADER} header", reason=NETWORK_REQUIRED)
    if binding is None:
        raise PaymentRequired(
            f"a tx-hash payment needs {BINDING_HEADER}: the transfer sender's signature of the binding message",
            reason=BINDING_REQUIRED,
        )
    sig = binding.decode("latin-1").strip()
    if not _HEX.match(sig) or len(sig) > 2 + 2 * 4096:
        raise BadRequest(f"{BINDING_HEADER} must be a 0x-prefixed hex signature", reason="invalid_payment_header")
    return TxProof(tx_hash=text.lower(), network=network.decode("latin-1").strip()[:64], binding=bytes.fromhex(sig[2:]))


def binding_message(tx_hash: str, network: str, method: str, resource: str) -> str:
    return f"x402 tx-hash payment\ntx: {tx_hash.lower()}\nnetwork: {network}\nmethod: {method}\nresource: {resource}"


def binding_digest(message: str) -> bytes:
    signable = encode_defunct(text=message)
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def binding_signer(proof: TxProof, method: str, resource: str) -> str | None:
    """The EOA that signed the binding (lowercase), or None (maybe a contract wallet: ask ERC-1271)."""
    return recover_signer(
        binding_digest(binding_message(proof.tx_hash, proof.network, method, resource)), proof.binding
    )


@dataclass(frozen=True, slots=True)
class FoundTransfer:
    log_index: int
    payer: str  # lowercase
    value: int
    block_number: int


def find_transfer(receipt: dict[str, Any], req: Requirement) -> FoundTransfer:
    """The first Transfer to ``payTo`` emitted by the route's USDC contract; raises PaymentRequired otherwise."""
    if int(str(receipt.get("status", "0x0")), 16) != 1:
        raise PaymentRequired("the transaction reverted", reason=TX_REVERTED)
    pay_to = bytes(12) + bytes.fromhex(req.pay_to[2:].lower())
    best_short: int | None = None
    for entry in receipt.get("logs") or ():
        if str(entry.get("address", "")).lower() != req.asset.lower():
            continue  # any other contract's Transfer event is worthless, however identical it looks
        topics = [str(t) for t in entry.get("topics") or ()]
        if len(topics) != 3 or bytes.fromhex(topics[0][2:]) != abi.TRANSFER_TOPIC:
            continue
        if bytes.fromhex(topics[2][2:]) != pay_to:
            continue
        value = int(str(entry.get("data", "0x0"))[2:66] or "0", 16)
        if value < req.amount:
            best_short = value if best_short is None else max(best_short, value)
            continue
        return FoundTransfer(
            log_index=int(str(entry["logIndex"]), 16),
            payer="0x" + topics[1][-40:].lower(),
            value=value,
            block_number=int(str(receipt["blockNumber"]), 16),
        )
    if best_short is not None:
        raise PaymentRequired(
            f"the transfer moved {best_short} units; this route costs {req.amount}", reason=AMOUNT_TOO_LOW
        )
    raise PaymentRequired("no USDC transfer to this gateway's recipient in that transaction", reason=TRANSFER_NOT_FOUND)


def tx_payment_key(chain_id: int, tx_hash: str, log_index: int) -> str:
    return f"tx:{chain_id}:{tx_hash.lower()}:{log_index}"


def tx_option(req: Requirement, resource: str, method: str) -> dict[str, Any]:
    """The 402's description of paying by on-chain transfer on one network (seed 004's ``payment[]``)."""
    from gateway.money import format_usd

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
        "binding": {
            "scheme": "eip191",
            "signer": "the transfer's sender",
            "message": binding_message("<tx hash>", req.network, method, resource),
        },
    }
