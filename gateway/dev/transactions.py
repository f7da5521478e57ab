"""Signed transactions and calls against the dev chain, the way a wallet would send them (EIP-1559, own nonce).

Test-side only: the gateway's relayer has its own pipeline; this is how tests and the demo mint, deploy and
craft on-chain state around it.
"""

from __future__ import annotations

import time
from typing import Any

from eth_account import Account
from eth_utils.address import to_checksum_address

from gateway.dev.anvil import Anvil

__all__ = ["TransactionReverted", "call", "send_transaction", "wait_for_receipt"]


class TransactionReverted(RuntimeError):
    def __init__(self, receipt: dict[str, Any]) -> None:
        super().__init__(f"transaction {receipt.get('transactionHash')} reverted")
        self.receipt = receipt


def call(anvil: Anvil, to: str, data: bytes | str, *, block: str = "latest") -> bytes:
    """eth_call; raises RpcError (with the revert reason in its message) when the call reverts."""
    payload = data if isinstance(data, str) else "0x" + data.hex()
    result: str = anvil.rpc("eth_call", [{"to": to, "data": payload}, block])
    return bytes.fromhex(result.removeprefix("0x"))


def send_transaction(
    anvil: Anvil,
    key: str,
    to: str | None,
    data: bytes | str = b"",
    value: int = 0,
    *,
    gas: int | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Sign with ``key``, send, wait for the receipt and return it.

    Without ``gas`` the node estimates it, so a transaction that would revert fails early with an RpcError carrying
    the revert reason; pass ``gas`` to get it mined anyway. ``check`` raises TransactionReverted on status 0.
    """
    acct = Account.from_key(key)
    payload = data if isinstance(data, bytes) else bytes.fromhex(data.removeprefix("0x"))
    tx: dict[str, Any] = {"from": acct.address, "value": hex(value), "data": "0x" + payload.hex()}
    if to is not None:
        tx["to"] = to_checksum_address(to)
    if gas is None:
        # 20 % headroom: estimates are exact for these contracts, but a state change between estimate and
        # inclusion (interval mining) must not turn into an out-of-gas revert.
        gas = int(int(anvil.rpc("eth_estimateGas", [tx]), 16) * 1.2) + 10_000
    nonce = int(anvil.rpc("eth_getTransactionCount", [acct.address, "pending"]), 16)
    base_fee = int(anvil.rpc("eth_getBlockByNumber", ["latest", False])["baseFeePerGas"], 16)
    unsigned: dict[str, Any] = {
        "chainId": anvil.chain_id,
        "nonce": nonce,
        "gas": gas,
        "maxFeePerGas": 2 * base_fee + 10**9,
        "maxPriorityFeePerGas": 10**9,
        "value": value,
        "data": payload,
        "type": 2,
    }
    if to is not None:
        unsigned["to"] = to_checksum_address(to)
    signed = acct.sign_transaction(unsigned)
    tx_hash: str = anvil.rpc("eth_sendRawTransaction", [signed.raw_transaction.to_0x_hex()])
    receipt = wait_for_receipt(anvil, tx_hash, timeout=timeout)
    if check and int(receipt["status"], 16) != 1:
        raise TransactionReverted(receipt)
    return receipt


def wait_for_receipt(anvil: Anvil, tx_hash: str, *, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        receipt: dict[str, Any] | None = anvil.rpc("eth_getTransactionReceipt", [tx_hash])
        if receipt is not None:
            return receipt
        if time.monotonic() > deadline:
            raise TimeoutError(f"no receipt for {tx_hash} after {timeout:.0f} s")
        time.sleep(0.02)  # automine answers on the first poll; this only spins under --block-time
