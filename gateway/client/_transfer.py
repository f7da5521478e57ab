"""Sending the USDC ``transfer`` of a tx-hash payment (AsyncWeb3) and waiting until it is final enough.

Safety rules: the RPC's chain id must be the one the 402 names (a misconfigured URL must not send the money on
another chain); the token is the 402's ``asset`` and the spend controls have already accepted it; nonces are
assigned under one lock per chain, so concurrent payments from one wallet do not collide.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from gateway.client._config import TxHashPayments
from gateway.client._errors import PaymentFailed, PaymentRefused
from gateway.client._spend import chain_id_of
from gateway.x402 import reasons

if TYPE_CHECKING:  # web3 costs ~0.5 s to import: only clients that pay by transfer load it
    from web3 import AsyncWeb3

__all__ = ["TransferSender", "TxOption"]

_TRANSFER = keccak(text="transfer(address,uint256)")[:4]


@dataclass(frozen=True, slots=True)
class TxOption:
    """One network's "pay by transfer" offer of a 402 (v2 ``extensions.txhash.options`` / v1 ``payment``)."""

    network: str  # the value for X-PAYMENT-NETWORK
    chain_id: int
    recipient: str
    asset: str
    amount: int
    resource: str | None  # the resource URL the binding must name, as the 402 advertised it
    raw: dict[str, Any]

    @classmethod
    def parse(cls, doc: Any) -> TxOption | None:
        if not isinstance(doc, dict) or doc.get("scheme", "txhash") != "txhash":
            return None
        try:
            network = str(doc["network"])
            chain_id = int(doc.get("chainId") or chain_id_of(network) or 0)
            option = cls(
                network=network,
                chain_id=chain_id,
                recipient=to_checksum_address(str(doc["recipient"])),
                asset=to_checksum_address(str(doc["asset"])),
                amount=int(str(doc["amount"])),
                resource=_binding_line(doc, "resource"),
                raw=doc,
            )
        except (KeyError, TypeError, ValueError):
            return None
        return option if option.chain_id > 0 else None


def _binding_line(doc: dict[str, Any], name: str) -> str | None:
    binding = doc.get("binding")
    message = binding.get("message") if isinstance(binding, dict) else None
    if not isinstance(message, str):
        return None
    for line in message.splitlines():
        if line.startswith(name + ": "):
            return line[len(name) + 2 :]
    return None


class TransferSender:
    """Sends USDC transfers from one account on the networks of :class:`TxHashPayments`."""

    def __init__(self, account: LocalAccount, settings: TxHashPayments) -> None:
        self.account = account
        self.settings = settings
        self._w3: dict[int, AsyncWeb3[Any]] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._next_nonce: dict[int, int] = {}

    def rpc_url(self, option: TxOption) -> str | None:
        for network, url in self.settings.rpc_urls.items():
            if network == option.network or chain_id_of(network) == option.chain_id:
                return url
        return None

    async def _web3(self, option: TxOption) -> AsyncWeb3[Any]:
        from web3 import AsyncHTTPProvider, AsyncWeb3

        w3 = self._w3.get(option.chain_id)
        if w3 is None:
            url = self.rpc_url(option)
            if url is None:
                raise PaymentRefused(f"no RPC URL configured for {option.network}", reason="no_rpc_url")
            w3 = AsyncWeb3(AsyncHTTPProvider(url, request_kwargs={"timeout": 30}))
            if await w3.eth.chain_id != option.chain_id:
                # Sending to the wrong chain would move real money where the gateway never looks.
                raise PaymentRefused(
                    f"the RPC configured for {option.network} serves another chain id", reason="rpc_chain_mismatch"
                )
            self._w3[option.chain_id] = w3
        return w3

    async def send(self, option: TxOption) -> str:
        """Broadcast ``asset.transfer(recipient, amount)``; the transaction hash (lowercase 0x hex)."""
        w3 = await self._web3(option)
        data = _TRANSFER + abi_encode(["address", "uint256"], [option.recipient, option.amount])
        lock = self._locks.setdefault(option.chain_id, asyncio.Lock())
        async with lock:
            tx: dict[str, Any] = {
                "from": self.account.address,
                "to": option.asset,
                "data": "0x" + data.hex(),
                "value": 0,
                "chainId": option.chain_id,
            }
            try:
                # estimate_gas fails early (nothing sent) on a revert: too little USDC, a paused token.
                gas = await w3.eth.estimate_gas(tx)  # type: ignore[arg-type]
            except Exception as exc:
                raise PaymentRefused(f"the transfer would fail: {exc}", reason="transfer_would_revert") from None
            pending = await w3.eth.get_transaction_count(self.account.address, "pending")
            nonce = max(pending, self._next_nonce.get(option.chain_id, 0))
            block = await w3.eth.get_block("latest")
            base_fee = int(block.get("baseFeePerGas", 0) or 0)
            tip = int(await w3.eth.max_priority_fee)
            tx.update(
                nonce=nonce,
                gas=int(gas * 1.2) + 10_000,
                maxFeePerGas=2 * base_fee + tip,
                maxPriorityFeePerGas=tip,
                type=2,
            )
            del tx["from"]
            signed = self.account.sign_transaction(tx)
            try:
                tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
            except Exception:
                self._next_nonce.pop(option.chain_id, None)
                raise
            self._next_nonce[option.chain_id] = nonce + 1
        return "0x" + bytes(tx_hash).hex()

    async def wait_final(self, option: TxOption, tx_hash: str, *, deadline: float) -> None:
        """Until the transfer is mined with ``confirmations`` blocks; PaymentFailed if it reverted or time ran out."""
        from web3.exceptions import TransactionNotFound

        w3 = await self._web3(option)
        interval = self.settings.poll_interval
        while True:
            try:
                receipt = await w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                receipt = None
            if receipt is not None:
                if int(receipt["status"]) != 1:
                    raise PaymentFailed("the transfer reverted", reason=reasons.TX_REVERTED, tx_hash=tx_hash)
                depth = int(await w3.eth.block_number) - int(receipt["blockNumber"]) + 1
                if depth >= max(self.settings.confirmations, 1):
                    return
            if time.monotonic() + interval > deadline:
                raise PaymentFailed(
                    f"the transfer {tx_hash} was not final in time; it may still be presented later",
                    reason=reasons.TX_NOT_FINAL,
                    tx_hash=tx_hash,
                )
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        from web3 import AsyncHTTPProvider

        for w3 in self._w3.values():
            provider = w3.provider
            if isinstance(provider, AsyncHTTPProvider):
                await provider.disconnect()
        self._w3.clear()
