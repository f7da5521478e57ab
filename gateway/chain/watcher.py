"""The receipt watcher: a paid request waits for its settlement's receipt as long as the chain needs, no longer.

* A hash is looked up the moment it is handed in (on an automining node, or one that answers with a receipt as soon
  as the transaction is included, it is there at once), then again on every new head: the pause between polls
  starts short after each new head or new hash and doubles up to the configured interval
  (``networks.*.receipt_poll_interval``), so a block is noticed within that interval at worst while an idle wait
  costs one call per interval.
* All waiting hashes of a network share one batched JSON-RPC call per poll (the head and the receipts of hashes
  never asked about; the others only when the head moved).
* A receipt the relayer already holds (``eth_sendRawTransactionSync`` answers with it, see
  :mod:`gateway.chain.relayer`) reaches the watcher through :meth:`ChainRpc.saw_receipt` and ends the wait without
  a poll; it is kept a few seconds for the settlements of the same batch that start waiting just after.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.errors import ChainUnavailable
from gateway.tasks import stop


class ReceiptWatcher:
    """Waits for receipts; all waiting hashes of a network share one batched poll."""

    # The first pause after a new head or a new hash (then doubled up to ``interval``). Also the closest two polls
    # ever follow each other: under load a new hash arrives every millisecond, and each would otherwise start a
    # round trip of its own.
    fastest = 0.005
    # A receipt can only appear with a new block, so hashes already asked about are asked again only when the head
    # moved (or every ``refresh`` seconds, in case an endpoint's head lags its receipts). On 2-second blocks that is
    # one receipt lookup per hash per block instead of one per poll.
    refresh = 1.0
    # Receipts handed in by the relayer, kept for waiters that arrive just after (a batch's other settlements).
    keep_seen = 10.0
    max_seen = 512

    def __init__(self, rpc: ChainRpc, *, interval: float = 0.1) -> None:
        self._rpc = rpc
        self._interval = max(interval, self.fastest)
        self._waiting: dict[str, list[tuple[asyncio.Future[dict[str, Any]], int]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._new = asyncio.Event()  # a hash nobody asked about yet: poll now
        self._seen: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()
        rpc.on_receipt(self.deliver)

    async def wait(self, tx_hash: str, *, timeout: float, confirmations: int = 1) -> dict[str, Any]:
        """The receipt once it has ``confirmations`` blocks (1 = mined). Raises ``TimeoutError``."""
        needed = max(confirmations, 1)
        if needed == 1:
            known = self._seen_receipt(tx_hash)
            if known is not None:
                return known
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (fut, needed)
        self._waiting.setdefault(tx_hash, []).append(entry)
        self._new.set()
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

    def deliver(self, tx_hash: str, receipt: dict[str, Any]) -> None:
        """A receipt obtained elsewhere (the relayer's synchronous broadcast): ends the waits that need one block."""
        now = time.monotonic()
        seen = self._seen
        seen[tx_hash] = (now, receipt)
        seen.move_to_end(tx_hash)
        while seen and (len(seen) > self.max_seen or now - next(iter(seen.values()))[0] > self.keep_seen):
            seen.popitem(last=False)
        for fut, needed in self._waiting.get(tx_hash, ()):
            if needed == 1 and not fut.done():
                fut.set_result(receipt)

    def _seen_receipt(self, tx_hash: str) -> dict[str, Any] | None:
        entry = self._seen.get(tx_hash)
        if entry is None or time.monotonic() - entry[0] > self.keep_seen:
            return None
        return entry[1]

    async def _poll(self) -> None:
        failures = 0
        seen_head: int | None = None
        asked: set[str] = set()  # hashes whose receipt was asked for since the head was last seen to move
        last_full = 0.0
        pause = self.fastest
        while True:
            hashes = self._pending()
            if not hashes:
                return
            self._new.clear()
            started = time.monotonic()
            new = [h for h in hashes if h not in asked]
            calls: list[tuple[str, list[Any]]] = [("eth_blockNumber", [])]
            calls += [("eth_getTransactionReceipt", [h]) for h in new]
            try:
                results = await self._rpc.batch(calls)
                head = hex_int(results[0]) if not isinstance(results[0], RpcError) else None
                receipts = dict(zip(new, results[1:], strict=True))
                now = time.monotonic()
                moved = head is None or head != seen_head
                if moved or now - last_full >= self.refresh:
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
            # Short again after anything new (a head, a hash), doubling while nothing happens.
            pause = self.fastest if moved or new else min(pause * 2, self._interval)
            asked.intersection_update(self._waiting)
            if self._pending():
                await self._pause(started, pause)

    def _pending(self) -> list[str]:
        """The hashes someone still waits for (an answered waiter leaves ``_waiting`` only when it next runs)."""
        return [h for h, waiters in self._waiting.items() if any(not fut.done() for fut, _ in waiters)]

    async def _pause(self, started: float, pause: float) -> None:
        """Until ``pause`` after the last poll started, or earlier when a new hash arrives (but never sooner than
        ``fastest`` after it: under load the next poll takes every hash that arrived meanwhile)."""
        if not self._new.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), max(0.0, started + pause - time.monotonic()))
        rest = started + self.fastest - time.monotonic()
        if rest > 0:
            await asyncio.sleep(rest)

    async def aclose(self) -> None:
        await stop(self._task)
