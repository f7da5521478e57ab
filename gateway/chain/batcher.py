"""Several settlements in one transaction: Multicall3 ``aggregate3`` with ``allowFailure`` per call.

Settlements that queue while the relayer is busy leave together; every one's hash is recorded before the batch is
broadcast (a batch whose hash could not be recorded for all of its settlements never leaves as signed), and each
call may fail alone, so one bad authorization never sinks its neighbours (docs/protocol.md §2).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

from gateway.chain import abi
from gateway.chain.relayer import Relayer
from gateway.errors import ServiceUnavailable, SettlementFailed
from gateway.tasks import stop
from gateway.x402 import reasons


class _Settlement:
    """One settlement waiting for a batch: its call, its gas, its recorder, and where its outcome goes."""

    __slots__ = ("data", "done", "gas", "record", "to")

    def __init__(self, to: str, data: bytes, gas: int, record: Callable[[str], Awaitable[None]]) -> None:
        self.to = to
        self.data = data
        self.gas = gas
        self.record = record
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()


def _unknown_outcome() -> SettlementFailed:
    return SettlementFailed(
        "settlement broadcast got no answer; it is reconciled by transaction hash",
        reason=reasons.SETTLEMENT_PENDING,
        unknown=True,
    )


def _resolve(batch: list[_Settlement], outcome: str | BaseException) -> None:
    """Hand a batch's outcome (its hash, or the error) to every settlement still waiting for one."""
    for item in batch:
        if not item.done.done():
            if isinstance(outcome, BaseException):
                item.done.set_exception(outcome)
            else:
                item.done.set_result(outcome)


class _RecordFailed(Exception):
    """Some settlements of a batch could not record its hash: the batch must not leave as signed."""


class SettlementBatcher:
    """Several settlements in one transaction: ``Multicall3.aggregate3`` with every call allowed to fail alone.

    Settlements queue while the relayer is busy with the previous transaction and leave together (at most
    ``max_items``). Busy means: the previous batch's hash is being recorded, or ``in_flight`` batches are
    recorded and on their way; so the next batch is signed and recorded while the one before it is broadcast (and,
    on a node that answers a broadcast once the transaction is mined, mined), and nonces still leave in order (the
    relayer's sender sees to that). Per settlement nothing changes for its caller: its recorder receives the
    transaction's hash before the broadcast (all of a batch's recorders run concurrently; if any fails, the batch is
    not sent as signed, its nonce is filled, the failed settlements get their error and the rest go again in the
    next batch, recording the new hash), and the hash it gets back is the one to watch. Its outcome is read from
    the receipt by its own ``AuthorizationUsed`` log (see ``transfer_in_receipt``): one call of a batch reverting
    does not revert the others, and it leaves no log of its own. A batch of one is sent as a plain transaction.
    """

    # A settlement's own limit (what it would get alone) holds 21,000 of intrinsic gas and a 25 % margin over the
    # node's estimate. In a batch the intrinsic gas is paid once, so four fifths of each limit still leaves ~35 %
    # over what a call measured inside a batch (67,800 gas against a standalone estimate of 85,500): a batch does
    # not claim more of a block's gas limit than it can use, and more settlements fit in each block.
    BASE_GAS = 30_000
    in_flight = 2  # batches recorded and not yet answered, at most (one more may be recording)

    def __init__(self, relayer: Relayer, multicall: str, *, max_items: int = 50) -> None:
        self._relayer = relayer
        self._multicall = multicall
        self._max = max(1, max_items)
        self._queue: collections.deque[_Settlement] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0  # transactions sent with more than one settlement (for tests and metrics)

    def __repr__(self) -> str:
        return f"SettlementBatcher(relayer={self._relayer!r}, max_items={self._max})"

    async def submit(self, to: str, data: bytes, gas: int, before_broadcast: Callable[[str], Awaitable[None]]) -> str:
        """As :meth:`Relayer.submit`, sharing a transaction with the settlements queued at the same time."""
        item = _Settlement(to, data, gas, before_broadcast)
        self._queue.append(item)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="x402-settlement-batcher")
        try:
            # Shielded: once in a batch, its transaction leaves whether or not this request is still waiting.
            return await asyncio.shield(item.done)
        except asyncio.CancelledError:
            if item in self._queue:  # not taken yet: nothing was signed or recorded for it
                self._queue.remove(item)
                item.done.cancel()
            raise

    async def _flush(self) -> None:
        queue = self._queue
        running: dict[asyncio.Task[None], list[_Settlement]] = {}
        try:
            while queue or running:
                if queue and len(running) < self.in_flight:
                    batch = [queue.popleft() for _ in range(min(self._max, len(queue)))]
                    recorded = asyncio.Event()
                    task = asyncio.create_task(self._run(batch, recorded))
                    running[task] = batch
                    # The next batch forms once this one's hash is recorded (its nonce then leaves in order).
                    waiting = asyncio.ensure_future(recorded.wait())
                    try:
                        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiting.cancel()
                else:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for done in [t for t in running if t.done()]:
                    del running[done]
        except asyncio.CancelledError:
            # Shutting down mid-batch: they may have been recorded and sent. Reconciled by hash, never re-sent.
            for task, batch in running.items():
                task.cancel()
                _resolve(batch, _unknown_outcome())
            raise

    async def _run(self, batch: list[_Settlement], recorded: asyncio.Event) -> None:
        """One batch, from signing to its outcome for every settlement in it."""
        try:
            if len(batch) == 1:
                one = batch[0]

                async def record(tx_hash: str) -> None:
                    await one.record(tx_hash)
                    recorded.set()

                tx_hash = await self._relayer.submit(one.to, one.data, one.gas, record)
            else:
                tx_hash = await self._send(batch, recorded)
        except _RecordFailed:
            return  # the failed ones have their error; the others are queued again (see _send)
        except asyncio.CancelledError:
            _resolve(batch, _unknown_outcome())
            raise
        except BaseException as exc:  # every waiter gets the outcome, whatever it is
            _resolve(batch, exc)
            return
        _resolve(batch, tx_hash)

    async def _send(self, batch: list[_Settlement], recorded: asyncio.Event) -> str:
        data = abi.AGGREGATE3.encode([(item.to, True, item.data) for item in batch])
        gas = self.BASE_GAS + sum(item.gas for item in batch) * 4 // 5
        failed: list[tuple[_Settlement, BaseException]] = []

        async def record_all(tx_hash: str) -> None:
            outcomes = await asyncio.gather(*(item.record(tx_hash) for item in batch), return_exceptions=True)
            failed.extend(
                (item, out) for item, out in zip(batch, outcomes, strict=True) if isinstance(out, BaseException)
            )
            if failed:
                raise _RecordFailed
            recorded.set()

        try:
            tx_hash = await self._relayer.submit(self._multicall, data, gas, record_all)
        except _RecordFailed:
            bad = {id(item) for item, _ in failed}
            for item, exc in failed:
                item.done.set_exception(exc)
            # The others recorded a hash that will never be broadcast (its nonce is filled): they go again first.
            self._queue.extendleft(reversed([item for item in batch if id(item) not in bad]))
            raise
        self.batches += 1
        return tx_hash

    async def aclose(self) -> None:
        """Stop; settlements not yet in a transaction fail as unavailable (nothing was signed for them)."""
        await stop(self._flusher)
        while self._queue:
            item = self._queue.popleft()
            if not item.done.done():
                item.done.set_exception(
                    ServiceUnavailable("the gateway is shutting down", reason=reasons.SHUTTING_DOWN)
                )
