"""The receipt watcher: every pending settlement's receipt fetched in one batched JSON-RPC call per new head."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.errors import ChainUnavailable


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

    # A receipt can only appear with a new block, so each poll asks for the head and for the receipts of hashes
    # it never asked about; all the others are asked again only when the head moved (or every ``refresh`` seconds,
    # in case an endpoint's head lags its receipts). On 2-second blocks that is one receipt lookup per hash per
    # block instead of one per poll (20 with the default 0.1 s interval).
    refresh = 1.0

    async def _poll(self) -> None:
        failures = 0
        seen_head: int | None = None
        asked: set[str] = set()  # hashes whose receipt was asked for since the head was last seen to move
        last_full = 0.0
        while self._waiting:
            hashes = list(self._waiting)
            new = [h for h in hashes if h not in asked]
            calls: list[tuple[str, list[Any]]] = [("eth_blockNumber", [])]
            calls += [("eth_getTransactionReceipt", [h]) for h in new]
            try:
                results = await self._rpc.batch(calls)
                head = hex_int(results[0]) if not isinstance(results[0], RpcError) else None
                receipts = dict(zip(new, results[1:], strict=True))
                now = time.monotonic()
                if head is None or head != seen_head or now - last_full >= self.refresh:
                    rest = [h for h in hashes if h not in receipts]
                    if rest:
                        more = await self._rpc.batch([("eth_getTransactionReceipt", [h]) for h in rest])
                        receipts.update(zip(rest, more, strict=True))
                    seen_head, asked, last_full = head, set(hashes), now
                else:
                    asked.update(new)
                failures = 0
            except ChainUnavailable:
                failures += 1
                await asyncio.sleep(min(self._interval * 2**failures, 2.0))
                continue
            for tx_hash, receipt in receipts.items():
                if not isinstance(receipt, dict):
                    continue
                mined_at = hex_int(receipt.get("blockNumber"))
                for fut, needed in list(self._waiting.get(tx_hash, ())):
                    depth = (head - mined_at + 1) if head is not None else 1
                    if depth >= needed and not fut.done():
                        fut.set_result(receipt)
            asked.intersection_update(self._waiting)
            if self._waiting:
                await asyncio.sleep(self._interval)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
