"""Self-settlement: the relayer that submits ``transferWithAuthorization`` and the watcher that awaits receipts.

* One nonce sequence per signer, assigned locally under a lock, so many settlements can be in flight at once
  without asking the node for a nonce each time (THREATS 12).
* The transaction hash is handed to ``before_broadcast`` (which records it in the store) *before* the raw
  transaction leaves, so a crash or a timeout is always reconciled by hash and never broadcast twice.
* Receipts of all in-flight settlements are fetched together, one batched JSON-RPC round trip per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from eth_account import Account

from .chain import ChainRpc, RpcError, hex_int
from .config import Secret
from .errors import ChainUnavailable, ServiceUnavailable, SettlementFailed
from .protocol import reasons

log = logging.getLogger("gateway.settle")


class Relayer:
    """Signs and broadcasts settlement transactions for one network with one key."""

    def __init__(self, rpc: ChainRpc, key: Secret, *, fee_ttl: float = 2.0) -> None:
        self._rpc = rpc
        self._account = Account.from_key(key.reveal())
        self.address: str = self._account.address
        self._lock = asyncio.Lock()
        self._nonce: int | None = None  # None: ask the node (at start, and after an uncertain broadcast)
        self._fees: tuple[float, int, int] | None = None
        self._fee_ttl = fee_ttl

    def __repr__(self) -> str:
        return f"Relayer(network={self._rpc.name!r}, address={self.address})"

    async def _fees_now(self) -> tuple[int, int]:
        now = time.monotonic()
        if self._fees is None or now - self._fees[0] > self._fee_ttl:
            gas_price, tip = await self._rpc.batch([("eth_gasPrice", []), ("eth_maxPriorityFeePerGas", [])])
            if isinstance(gas_price, RpcError):
                raise ChainUnavailable(f"network {self._rpc.name}: eth_gasPrice failed")
            price = hex_int(gas_price)
            priority = price if isinstance(tip, RpcError) else min(hex_int(tip), price)
            # Twice the current price absorbs a base-fee rise over a few blocks; unused fee is refunded.
            self._fees = (now, price * 2 + priority, priority)
        return self._fees[1], self._fees[2]

    async def submit(self, to: str, data: bytes, gas: int, before_broadcast: Callable[[str], Awaitable[None]]) -> str:
        """Sign, record (``before_broadcast``), broadcast; return the tx hash.

        Raises ``SettlementFailed`` when the node refuses the transaction (nothing was sent) and
        ``SettlementFailed(unknown=True)`` when the broadcast's fate is unknown (reconcile by hash).
        """
        max_fee, priority = await self._fees_now()
        async with self._lock:
            for attempt in range(2):
                if self._nonce is None:
                    self._nonce = hex_int(await self._rpc.request("eth_getTransactionCount", [self.address, "pending"]))
                tx = {
                    "type": 2,
                    "chainId": self._rpc.chain_id,
                    "nonce": self._nonce,
                    "to": to,
                    "data": "0x" + data.hex(),
                    "value": 0,
                    "gas": gas,
                    "maxFeePerGas": max_fee,
                    "maxPriorityFeePerGas": priority,
                }
                signed = self._account.sign_transaction(tx)
                tx_hash = "0x" + bytes(signed.hash).hex()
                await before_broadcast(tx_hash)
                try:
                    await self._rpc.request("eth_sendRawTransaction", ["0x" + bytes(signed.raw_transaction).hex()])
                except RpcError as exc:
                    text = exc.message.lower()
                    if "already known" in text:
                        self._nonce += 1
                        return tx_hash
                    if "nonce too low" in text and attempt == 0:
                        self._nonce = None  # someone else used this key: resynchronise and sign again
                        continue
                    # Refused outright (e.g. the relayer has no gas money): nothing was broadcast, and it is
                    # our fault, not the payer's, so a 503 and not a 402.
                    log.error("settlement broadcast refused", extra={"network": self._rpc.name, "code": exc.code})
                    raise ServiceUnavailable(
                        "the network refused the settlement transaction", reason="relayer_refused"
                    ) from None
                except ChainUnavailable:
                    # The node may or may not have it: re-read the nonce next time, reconcile this one by hash.
                    self._nonce = None
                    raise SettlementFailed(
                        "settlement broadcast got no answer; it is reconciled by transaction hash",
                        reason=reasons.SETTLEMENT_PENDING,
                        unknown=True,
                    ) from None
                self._nonce += 1
                return tx_hash
        raise SettlementFailed("could not obtain a relayer nonce", reason=reasons.TRANSACTION_FAILED)


class ReceiptWatcher:
    """Waits for receipts; all waiting hashes of a network share one batched poll."""

    def __init__(self, rpc: ChainRpc, *, interval: float = 0.1) -> None:
        self._rpc = rpc
        self._interval = interval
        self._waiting: dict[str, list[tuple[asyncio.Future[dict[str, Any]], int]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, tx_hash: str, *, timeout: float, confirmations: int = 1) -> dict[str, Any]:
        """The receipt once it has ``confirmations`` blocks (1 = mined). Raises ``TimeoutError``."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (fut, max(confirmations, 1))
        self._waiting.setdefault(tx_hash, []).append(entry)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name=f"receipts-{self._rpc.name}")
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            waiters = self._waiting.get(tx_hash)
            if waiters and entry in waiters:
                waiters.remove(entry)
                if not waiters:
                    del self._waiting[tx_hash]

    async def _poll(self) -> None:
        failures = 0
        while self._waiting:
            hashes = list(self._waiting)
            calls: list[tuple[str, list[Any]]] = [("eth_getTransactionReceipt", [h]) for h in hashes]
            calls.append(("eth_blockNumber", []))
            try:
                results = await self._rpc.batch(calls)
                failures = 0
            except ChainUnavailable:
                failures += 1
                await asyncio.sleep(min(self._interval * 2**failures, 2.0))
                continue
            head = results[-1]
            head_number = hex_int(head) if not isinstance(head, RpcError) else None
            for tx_hash, receipt in zip(hashes, results[:-1], strict=True):
                if not isinstance(receipt, dict):
                    continue
                mined_at = hex_int(receipt.get("blockNumber"))
                for fut, needed in list(self._waiting.get(tx_hash, ())):
                    depth = (head_number - mined_at + 1) if head_number is not None else 1
                    if depth >= needed and not fut.done():
                        fut.set_result(receipt)
            if self._waiting:
                await asyncio.sleep(self._interval)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
