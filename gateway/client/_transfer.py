"""Sending the USDC ``transfer`` of a tx-hash payment (AsyncWeb3) and waiting until it is final enough.

Safety rules: the RPC's chain id must be the one the 402 names (a misconfigured URL must not send the money on
another chain); the token is the 402's ``asset`` and the spend controls have already accepted it; nonces are
assigned under one lock per chain, so concurrent payments from one wallet do not collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from gateway.client._config import TxHashPayments
from gateway.client._errors import PaymentFailed, PaymentRefused, error_summary
from gateway.client._logs import hide_urls
from gateway.client._spend import chain_id_of
from gateway.x402 import reasons

if TYPE_CHECKING:  # web3 costs ~0.5 s to import: only clients that pay by transfer load it
    from web3 import AsyncWeb3

__all__ = ["TransferSender", "TxOption"]

_TRANSFER = keccak(text="transfer(address,uint256)")[:4]
_REVERT_REASON_MAX = 200


# What an RPC failure may say. web3 passes its HTTP session's errors through (``aiohttp.ClientResponseError: 429,
# message='Too Many Requests', url='https://rpc.example/v2/<key>'``) and the URL's path or query is often the RPC's
# API key: messages name the error's type and status only, and are raised ``from None`` so that no traceback shows
# the original. A contract's revert reason comes from the chain, not from the URL, and is kept.


def _rpc_failed(network: str, what: str, exc: BaseException) -> PaymentRefused:
    return PaymentRefused(f"the RPC for {network} failed {what} ({_rpc_error(exc)})", reason="rpc_unavailable")


def _rpc_error(exc: BaseException) -> str:
    """``error_summary``, plus the JSON-RPC error code of an error the node answered with."""
    from web3.exceptions import Web3RPCError

    if isinstance(exc, Web3RPCError) and isinstance(exc.rpc_response, dict):
        error = exc.rpc_response.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        if isinstance(code, int) and not isinstance(code, bool):
            return f"{type(exc).__name__}, JSON-RPC error {code}"
    return error_summary(exc)


def _following_failed(option: TxOption, tx_hash: str, exc: BaseException) -> PaymentFailed:
    return PaymentFailed(
        f"the RPC for {option.network} failed while following the transfer {tx_hash} ({_rpc_error(exc)}); "
        "it may still become final",
        reason="rpc_unavailable",
        tx_hash=tx_hash,
    )


def _revert_reason(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    if not isinstance(message, str) or not message.strip():
        return "execution reverted"
    message = " ".join(message.split())
    return message if len(message) <= _REVERT_REASON_MAX else message[: _REVERT_REASON_MAX - 1] + "…"


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
            hide_urls([url])  # web3 logs its provider's URL (INFO on disconnect): the path is often an API key
            provider = AsyncHTTPProvider(url, request_kwargs={"timeout": 30})
            w3 = AsyncWeb3(provider)
            try:
                served = await w3.eth.chain_id
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await provider.disconnect()  # its HTTP session: this provider is not kept
                raise _rpc_failed(option.network, "to give its chain id", exc) from None
            if served != option.chain_id:
                with contextlib.suppress(Exception):
                    await provider.disconnect()
                # Sending to the wrong chain would move real money where the gateway never looks.
                raise PaymentRefused(
                    f"the RPC configured for {option.network} serves another chain id", reason="rpc_chain_mismatch"
                )
            self._w3[option.chain_id] = w3
        return w3

    async def send(self, option: TxOption, *, broadcasting: Callable[[], None] | None = None) -> str:
        """Broadcast ``asset.transfer(recipient, amount)``; the transaction hash (lowercase 0x hex).

        ``broadcasting`` is called just before the signed transaction leaves: from then on the money may move
        whatever this call raises, except :class:`PaymentRefused`. A failed broadcast (no answer, or a refusal) is
        followed by two questions to the node: when it knows no transaction with this hash and no transaction of
        this wallet has used its nonce, nothing left (:class:`PaymentRefused`, ``transfer_rejected`` when the node
        refused it, else ``transfer_not_sent``); otherwise :class:`PaymentFailed` (``transfer_broadcast_failed``,
        with the hash): it may be mined."""
        from web3.exceptions import ContractLogicError, RequestTimedOut, Web3RPCError

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
            except ContractLogicError as exc:
                raise PaymentRefused(
                    f"the transfer would fail: {_revert_reason(exc)}", reason="transfer_would_revert"
                ) from None
            except Web3RPCError as exc:  # the node refused the estimate: e.g. too little ETH for the gas
                raise PaymentRefused(
                    f"the transfer would fail: the RPC for {option.network} refused it ({_rpc_error(exc)})",
                    reason="transfer_would_revert",
                ) from None
            except Exception as exc:
                raise _rpc_failed(option.network, "to estimate the transfer", exc) from None
            try:
                pending = await w3.eth.get_transaction_count(self.account.address, "pending")
                block = await w3.eth.get_block("latest")
                tip = int(await w3.eth.max_priority_fee)
            except Exception as exc:
                raise _rpc_failed(option.network, "to give the nonce and fees", exc) from None
            nonce = max(pending, self._next_nonce.get(option.chain_id, 0))
            base_fee = int(block.get("baseFeePerGas", 0) or 0)
            tx.update(
                nonce=nonce,
                gas=int(gas * 1.2) + 10_000,
                maxFeePerGas=2 * base_fee + tip,
                maxPriorityFeePerGas=tip,
                type=2,
            )
            del tx["from"]
            signed = self.account.sign_transaction(tx)
            if broadcasting is not None:
                broadcasting()
            try:
                tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
            except Exception as exc:
                self._next_nonce.pop(option.chain_id, None)
                sent = "0x" + bytes(signed.hash).hex()
                refused = isinstance(exc, Web3RPCError) and not isinstance(exc, RequestTimedOut)
                # No answer, or a timeout: the transaction may have reached the network all the same. Asked even
                # when the node answered with a refusal: web3 resends a broadcast that got no answer, and the resend
                # of a transaction the node did take is refused ("already known", "nonce too low").
                if not await self._may_have_left(w3, sent, nonce):
                    if refused:  # the node did not take it (nonce, funds, fees)
                        raise PaymentRefused(
                            f"the RPC for {option.network} rejected the transfer ({_rpc_error(exc)})",
                            reason="transfer_rejected",
                        ) from None
                    raise PaymentRefused(
                        f"broadcasting the transfer failed ({_rpc_error(exc)}); the node does not know it and its "
                        "nonce is unused: nothing was sent",
                        reason="transfer_not_sent",
                    ) from None
                raise PaymentFailed(
                    f"broadcasting the transfer {sent} failed ({_rpc_error(exc)}); it may still be mined",
                    reason="transfer_broadcast_failed",
                    tx_hash=sent,
                ) from None
            self._next_nonce[option.chain_id] = nonce + 1
        return "0x" + bytes(tx_hash).hex()

    async def _may_have_left(self, w3: AsyncWeb3[Any], tx_hash: str, nonce: int) -> bool:
        """After a broadcast with no answer: False only when the node, asked now, knows no transaction with this
        hash and counts no transaction of this wallet at this nonce, not even a pending one (asked in that order, so
        a transaction the node takes between the two questions is seen by the second). Any doubt (an RPC that does
        not answer, the nonce used by a transaction we do not know) is True: the money may be on its way."""
        from web3.exceptions import TransactionNotFound

        try:
            try:
                await w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
                return True
            except TransactionNotFound:
                pass
            used = await w3.eth.get_transaction_count(self.account.address, "pending")
        except Exception:
            return True
        return int(used) > nonce

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
            except Exception as exc:
                raise _following_failed(option, tx_hash, exc) from None
            if receipt is not None:
                if int(receipt["status"]) != 1:
                    raise PaymentFailed("the transfer reverted", reason=reasons.TX_REVERTED, tx_hash=tx_hash)
                try:
                    head = int(await w3.eth.block_number)
                except Exception as exc:
                    raise _following_failed(option, tx_hash, exc) from None
                depth = head - int(receipt["blockNumber"]) + 1
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
