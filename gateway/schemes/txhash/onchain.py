"""The chain's side of a tx-hash proof: the receipt, finality and age, each read so that one lying RPC cannot fake
them (docs/threat-model.md T7, T18): with several endpoints the receipt and block must be agreed on, and the head
or finality tag is the *lowest* any of them reports."""

from __future__ import annotations

import time
from typing import Any

from gateway.chain import abi
from gateway.chain.network import Network
from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.config import PaymentConfig
from gateway.errors import ChainUnavailable, PaymentRequired
from gateway.schemes.txhash.check import FoundTransfer
from gateway.x402 import reasons
from gateway.x402.eip712 import erc1271_approves


def receipt_view(receipt: Any) -> Any:
    """What several RPC endpoints must agree on about a receipt."""
    if not isinstance(receipt, dict):
        return receipt
    logs = [
        (str(e.get("address", "")).lower(), [str(t).lower() for t in e.get("topics") or ()], str(e.get("data", "")))
        for e in receipt.get("logs") or ()
    ]
    return (receipt.get("status"), str(receipt.get("blockHash", "")).lower(), logs)


async def agreed_receipt(rpc: ChainRpc, tx_hash: str) -> dict[str, Any]:
    receipt = await rpc.request_agreed("eth_getTransactionReceipt", [tx_hash], project=receipt_view)
    if not isinstance(receipt, dict):
        raise PaymentRequired("no such transaction on this network (yet)", reason=reasons.TX_NOT_FOUND)
    return receipt


def _transaction_view(tx: Any) -> Any:
    """What several RPC endpoints must agree on about a transaction: whose transaction slot it fills."""
    if not isinstance(tx, dict):
        return tx
    return (str(tx.get("hash", "")).lower(), str(tx.get("from", "")).lower(), str(tx.get("nonce", "")))


async def agreed_slot(rpc: ChainRpc, tx_hash: str) -> tuple[str, int]:
    """The (sender, nonce) of the transaction ``tx_hash``: the slot it fills in its sender's account. A sender can
    fill each slot once on a chain; a replacement of a dropped transaction (same nonce, new hash) fills the same one
    (docs/threat-model.md T28)."""
    tx = await rpc.request_agreed("eth_getTransactionByHash", [tx_hash], project=_transaction_view)
    if not isinstance(tx, dict) or str(tx.get("hash", "")).lower() != tx_hash.lower():
        raise PaymentRequired("no such transaction on this network (yet)", reason=reasons.TX_NOT_FOUND)
    try:
        return str(tx["from"]).lower(), hex_int(tx["nonce"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ChainUnavailable("the RPC described the transaction without a sender or nonce") from exc


async def contract_vouches(rpc: ChainRpc, address: str, digest: bytes, signature: bytes) -> bool:
    """ERC-1271: a contract wallet at ``address`` says the signature is its own."""
    try:
        out = await rpc.eth_call(address, abi.IS_VALID_SIGNATURE.encode(digest, signature))
    except RpcError:
        return False
    return erc1271_approves(out)


async def check_final_and_fresh(
    net: Network, receipt: dict[str, Any], found: FoundTransfer, pay: PaymentConfig
) -> None:
    """Confirmations, finality tag, reorg and age of the block holding the transfer."""
    rpc = net.rpc
    block = await rpc.request_agreed(
        "eth_getBlockByNumber",
        [hex(found.block_number), False],
        project=lambda b: (b.get("hash"), b.get("timestamp")) if isinstance(b, dict) else b,
    )
    if not isinstance(block, dict):
        raise PaymentRequired("the transfer's block is not on this chain", reason=reasons.TX_NOT_FINAL)
    if str(block.get("hash", "")).lower() != str(receipt.get("blockHash", "")).lower():
        raise PaymentRequired("the transfer's block was reorganised away", reason=reasons.TX_NOT_FINAL)
    heads = await rpc.request_all("eth_blockNumber", [])
    depth = min(hex_int(h) for h in heads) - found.block_number + 1
    if depth < max(net.config.confirmations, 1):
        raise PaymentRequired(
            f"the transfer has {depth} of {net.config.confirmations} confirmations", reason=reasons.TX_NOT_FINAL
        )
    if net.config.finality != "latest":
        tagged = await rpc.request_all("eth_getBlockByNumber", [net.config.finality, False])
        lowest = min(hex_int(t.get("number")) if isinstance(t, dict) else -1 for t in tagged)
        if lowest < found.block_number:
            raise PaymentRequired(f"the transfer is not {net.config.finality} yet", reason=reasons.TX_NOT_FINAL)
    age = time.time() - hex_int(block.get("timestamp"))
    if age < -pay.clock_skew_seconds:
        raise PaymentRequired("the transfer's block is dated in the future", reason=reasons.TX_IN_FUTURE)
    if age > pay.tx_max_age_seconds:
        raise PaymentRequired(f"the transfer is older than {pay.tx_max_age_seconds} s", reason=reasons.TX_TOO_OLD)
