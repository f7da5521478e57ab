"""Sans-IO checks of a tx-hash proof: which Transfer in a receipt pays, who signed the binding, the claim key.

Known implementations of this mode check only the hash's format. Here a proof pays only if
(docs/protocol.md §5, docs/threat-model.md T1-T7):

* the receipt exists on the named network (whose RPC serves that chain id) with ``status == 1``;
* it holds a ``Transfer`` log **emitted by that network's USDC contract** (3 topics, decoded from the log, never
  from calldata: a fake token emits identical events) to ``payTo`` with ``value >= price``;
* the block has enough confirmations and is not older than the route's window (:mod:`.onchain`);
* the transfer's sender signed the binding message (:mod:`gateway.x402.txhash`), so a hash read off a block
  explorer cannot be spent by anyone else (T3), unless the route takes unbound proofs (T43: first presenter wins);
* it is consumed exactly once: the store key is ``tx:<chain>:<hash>:<log position>`` of the *first* qualifying log
  (its position in the transaction's receipt, stable across reorgs), so a transaction carrying several Transfer
  logs still pays once, on one route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.chain import abi
from gateway.errors import PaymentRequired
from gateway.schemes.base import effect_key
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.digests import eip191_digest
from gateway.x402.eip712 import recover_signer
from gateway.x402.txhash import TxProof, binding_message


def binding_digest(proof: TxProof, method: str, resource: str) -> bytes:
    return eip191_digest(binding_message(proof.tx_hash, proof.network, method, resource))


def binding_signer(proof: TxProof, method: str, resource: str) -> str | None:
    """The EOA that signed the binding (lowercase), or None (none sent, or maybe a contract wallet: ask ERC-1271)."""
    if proof.binding is None:
        return None
    return recover_signer(binding_digest(proof, method, resource), proof.binding)


@dataclass(frozen=True, slots=True)
class FoundTransfer:
    log_index: int  # the log's position in its transaction's receipt: unlike the block-wide logIndex, a reorg that
    # includes the same transaction elsewhere does not change it, so the effect key stays the same
    payer: str  # lowercase
    value: int
    block_number: int
    # The EIP-3009 nonce when the transfer executed an authorization (the token logged AuthorizationUsed(payer,
    # nonce) just before it): that money is an ``exact`` payment too, whoever sent the transaction.
    authorization_nonce: bytes | None = None


def find_transfer(receipt: dict[str, Any], req: Requirement) -> FoundTransfer:
    """The first Transfer to ``payTo`` emitted by the route's USDC contract; raises PaymentRequired otherwise."""
    if int(str(receipt.get("status", "0x0")), 16) != 1:
        raise PaymentRequired("the transaction reverted", reason=reasons.TX_REVERTED)
    pay_to = bytes(12) + bytes.fromhex(req.pay_to[2:].lower())
    best_short: int | None = None
    for position, entry in enumerate(receipt.get("logs") or ()):
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
        payer = "0x" + topics[1][-40:].lower()
        return FoundTransfer(
            log_index=position,
            payer=payer,
            value=value,
            block_number=int(str(receipt["blockNumber"]), 16),
            authorization_nonce=_executed_authorization(receipt, position, req.asset, payer),
        )
    if best_short is not None:
        raise PaymentRequired(
            f"the transfer moved {best_short} units; this route costs {req.amount}", reason=reasons.AMOUNT_TOO_LOW
        )
    raise PaymentRequired(
        "no USDC transfer to this gateway's recipient in that transaction", reason=reasons.TRANSFER_NOT_FOUND
    )


def _executed_authorization(receipt: dict[str, Any], position: int, asset: str, payer: str) -> bytes | None:
    """The nonce of the EIP-3009 authorization whose execution made the Transfer at ``position``: the token logs
    ``AuthorizationUsed(payer, nonce)`` and then, as its very next log, the Transfer (no other contract can log in
    between). None for a plain transfer."""
    logs = receipt.get("logs") or ()
    if position == 0:
        return None
    used = logs[position - 1]
    if str(used.get("address", "")).lower() != asset.lower():
        return None
    topics = [str(t).lower() for t in used.get("topics") or ()]
    if len(topics) != 3 or topics[0] != "0x" + abi.AUTHORIZATION_USED_TOPIC.hex():
        return None
    if topics[1][-40:] != payer[2:]:
        return None
    return bytes.fromhex(topics[2][2:])


def tx_payment_key(chain_id: int, tx_hash: str, log_index: int) -> str:
    return effect_key(chain_id, tx_hash, log_index)
