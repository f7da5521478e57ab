"""Self-settlement: the relayer that submits ``transferWithAuthorization`` and the watcher that awaits receipts.

* One nonce sequence per signer, assigned locally under a lock, so many settlements can be in flight at once
  without asking the node for a nonce each time (THREATS 12).
* The transaction hash is handed to ``before_broadcast`` (which records it in the store) *before* the raw
  transaction leaves, so a crash or a timeout is always reconciled by hash and never broadcast twice.
* Receipts of all in-flight settlements are fetched together, one batched JSON-RPC round trip per poll.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from coincurve import PrivateKey
from eth_account import Account
from eth_utils.crypto import keccak

from gateway.chain import abi
from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.config import Secret
from gateway.errors import ChainUnavailable, ServiceUnavailable, SettlementFailed
from gateway.x402 import reasons

log = logging.getLogger("gateway.settle")


def _rlp_length(length: int, offset: int) -> bytes:
    if length < 56:
        return bytes([offset + length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([offset + 55 + len(encoded)]) + encoded


def _rlp(item: int | bytes | list[Any]) -> bytes:
    """Recursive Length Prefix encoding of the few shapes a transaction needs (ints, bytes, lists)."""
    if isinstance(item, list):
        body = b"".join(_rlp(x) for x in item)
        return _rlp_length(len(body), 0xC0) + body
    if isinstance(item, int):
        item = item.to_bytes((item.bit_length() + 7) // 8, "big")  # 0 -> b"" (RLP's canonical zero)
    if len(item) == 1 and item[0] < 0x80:
        return item
    return _rlp_length(len(item), 0x80) + item


def sign_eip1559(
    key: PrivateKey, chain_id: int, nonce: int, to: str, data: bytes, gas: int, max_fee: int, priority: int
) -> tuple[str, str]:
    """(tx hash, raw transaction), both 0x-hex, of a type-2 transaction with value 0 and no access list.

    Byte-identical to ``eth_account``'s ``sign_transaction`` (both RFC 6979 over libsecp256k1; a test pins it),
    at a tenth of the cost: that one validates and normalises a dict on every call, which is most of the time a
    settlement spent holding the nonce sequence."""
    fields: list[Any] = [chain_id, nonce, priority, max_fee, gas, bytes.fromhex(to[2:]), 0, data, []]
    signature = key.sign_recoverable(keccak(b"\x02" + _rlp(fields)), hasher=None)
    fields += [signature[64], int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")]
    raw = b"\x02" + _rlp(fields)
    return "0x" + keccak(raw).hex(), "0x" + raw.hex()


async def _answer_of(call: Awaitable[Any]) -> Any:
    """The result of an RPC call, or the RpcError it raised (as :meth:`ChainRpc.batch` reports errors)."""
    try:
        return await call
    except RpcError as exc:
        return exc


class _Slot:
    """One nonce of the relayer's sequence, from signing to broadcast."""

    __slots__ = ("done", "filler", "nonce", "raw", "ready", "tx_hash")

    def __init__(self, nonce: int, tx_hash: str, raw: str, *, filler: bool = False) -> None:
        self.nonce = nonce
        self.tx_hash = tx_hash
        self.raw = raw
        self.filler = filler  # a no-op that only fills the nonce (its settlement was abandoned or refused)
        self.ready = filler  # recorded by before_broadcast: may leave
        # "sent" | "retry" (never sent: sign again) | "unknown" (sent, no answer) | "refused: <node's text>"
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def resolve(self, outcome: str) -> None:
        if not self.done.done():
            self.done.set_result(outcome)


class Relayer:
    """Signs and broadcasts settlement transactions for one network with one key, many in flight at once.

    A settlement takes the next local nonce and signs (no I/O), has its hash recorded (``before_broadcast``,
    concurrently with every other settlement), and joins the broadcast queue. One sender task sends the recorded
    head of the queue in nonce order (``max_batch`` transactions per request, one request at a time), so the node
    never sees a nonce before its predecessor was accepted, and nothing waits for a lock while another settlement
    records, broadcasts or waits for its receipt.

    A nonce that will not carry its settlement (recording failed, the request was cancelled, the node refused
    it while later nonces were already out) is filled with a zero-value transfer to ourselves, so the ones after
    it do not wait for ever. When the sequence may be wrong ("nonce too low": someone else used the key; a batch
    without an answer) the queue is handed back to be signed again and the next nonce is read from the node.
    """

    # Raw transactions per HTTP request, sent one request at a time in nonce order. On a slow link this is what
    # bounds settlements per second per relayer (max_batch / round trip: one at a time to a hosted RPC 50 ms away
    # would be 20/s). A node may handle the items of one batch concurrently, so nonce n+1 can reach its pool before
    # n: geth-family nodes (Base's op-geth, reth) queue it and promote it when n arrives; anvil in automine mode
    # does not always (measured: foundry anvil, 30 per batch under concurrent eth_calls, about one run in six parks
    # the rest of the sequence as "queued" for ever). So against an automining anvil, one per request.
    max_batch = 50

    def __init__(self, rpc: ChainRpc, key: Secret, *, fee_ttl: float = 2.0) -> None:
        self._rpc = rpc
        self._key = PrivateKey(bytes.fromhex(key.reveal().removeprefix("0x")))
        self.address: str = Account.from_key(key.reveal()).address
        self._lock = asyncio.Lock()  # one reader of the node's nonce at a time
        self._nonce: int | None = None  # None: ask the node (at start, and after an uncertain broadcast)
        self._fees: tuple[float, int, int] | None = None
        self._fees_task: asyncio.Task[tuple[float, int, int]] | None = None
        self._fee_ttl = fee_ttl
        self._queue: collections.deque[_Slot] = collections.deque()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._max_batch: int | None = None  # max_batch, or 1 against an automining anvil (see max_batch)
        self._probes = 0

    def __repr__(self) -> str:
        return f"Relayer(network={self._rpc.name!r}, address={self.address})"

    async def _fees_now(self) -> tuple[int, int]:
        now = time.monotonic()
        if self._fees is None or now - self._fees[0] > self._fee_ttl:
            # One read for everybody who finds the price stale at the same moment.
            if self._fees_task is None or self._fees_task.done():
                self._fees_task = asyncio.ensure_future(self._read_fees(now))
            self._fees = await asyncio.shield(self._fees_task)
        return self._fees[1], self._fees[2]

    async def _read_fees(self, now: float) -> tuple[float, int, int]:
        gas_price, tip = await self._rpc.batch([("eth_gasPrice", []), ("eth_maxPriorityFeePerGas", [])])
        if isinstance(gas_price, RpcError):
            raise ChainUnavailable(f"network {self._rpc.name}: eth_gasPrice failed")
        price = hex_int(gas_price)
        priority = price if isinstance(tip, RpcError) else min(hex_int(tip), price)
        # Twice the current price absorbs a base-fee rise over a few blocks; unused fee is refunded.
        return (now, price * 2 + priority, priority)

    async def _next_nonce(self) -> int:
        while self._nonce is None:
            async with self._lock:
                if self._nonce is None:
                    count = hex_int(await self._rpc.request("eth_getTransactionCount", [self.address, "pending"]))
                    if self._nonce is None:
                        self._nonce = count
        nonce = self._nonce
        self._nonce = nonce + 1
        return nonce

    def _enqueue(self, slot: _Slot) -> None:
        """Slots are signed in nonce order, but a re-read nonce may be lower than queued ones: keep the order."""
        queue = self._queue
        if not queue or queue[-1].nonce < slot.nonce:
            queue.append(slot)
        else:
            index = next(i for i, s in enumerate(queue) if s.nonce > slot.nonce)
            queue.insert(index, slot)

    def _kick(self) -> None:
        self._wake.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_loop(), name=f"relayer-{self._rpc.name}")

    def _filler(self, nonce: int, max_fee: int, priority: int) -> _Slot:
        tx_hash, raw = sign_eip1559(self._key, self._rpc.chain_id, nonce, self.address, b"", 21_000, max_fee, priority)
        return _Slot(nonce, tx_hash, raw, filler=True)

    async def submit(self, to: str, data: bytes, gas: int, before_broadcast: Callable[[str], Awaitable[None]]) -> str:
        """Sign, record (``before_broadcast``), broadcast; return the tx hash.

        Raises ``ServiceUnavailable`` (``relayer_refused``) when the node refuses the transaction (nothing was
        sent) and ``SettlementFailed(unknown=True)`` when the broadcast's fate is unknown (reconcile by hash).
        """
        max_fee, priority = await self._fees_now()
        for _attempt in range(2):
            nonce = await self._next_nonce()
            tx_hash, raw = sign_eip1559(self._key, self._rpc.chain_id, nonce, to, data, gas, max_fee, priority)
            slot = _Slot(nonce, tx_hash, raw)
            self._enqueue(slot)
            try:
                await before_broadcast(tx_hash)
            except BaseException:
                # Not recorded, so it must never leave; its nonce still has to, or every later one waits.
                if slot in self._queue:  # (a resync may have handed the queue back meanwhile)
                    self._queue[self._queue.index(slot)] = self._filler(nonce, max_fee, priority)
                    self._kick()
                slot.resolve("retry")
                raise
            slot.ready = True
            self._kick()
            # Shielded: a cancelled request must not cancel the outcome of a transaction that is leaving anyway.
            outcome = await asyncio.shield(slot.done)
            if outcome == "sent":
                return tx_hash
            if outcome == "retry":
                continue  # never sent: sign again with a fresh nonce (the store takes the new hash)
            if outcome == "unknown":
                raise SettlementFailed(
                    "settlement broadcast got no answer; it is reconciled by transaction hash",
                    reason=reasons.SETTLEMENT_PENDING,
                    unknown=True,
                )
            # Refused outright (e.g. the relayer has no gas money): nothing was broadcast, and it is our fault,
            # not the payer's, so a 503 and not a 402.
            raise ServiceUnavailable("the network refused the settlement transaction", reason="relayer_refused")
        # Both attempts were handed back unsent (the key's nonce moved under us twice): our fault, nothing left.
        raise ServiceUnavailable("could not obtain a relayer nonce", reason="relayer_refused")

    async def _batch_size(self) -> int:
        if self._max_batch is None:
            try:
                automine = await self._rpc.request("anvil_getAutomine", [])
            except RpcError:
                automine = False  # not an anvil: no such method
            except ChainUnavailable:
                self._probes += 1  # no answer (or an endpoint that refuses unknown methods with an HTTP error)
                if self._probes < 3:
                    return 1
                automine = False
            self._max_batch = 1 if automine is True else self.max_batch
        return self._max_batch

    async def _send_loop(self) -> None:
        queue = self._queue
        while queue:
            size = await self._batch_size()
            batch: list[_Slot] = []
            for slot in queue:
                if not slot.ready or len(batch) == size:
                    break
                batch.append(slot)
            if not batch:
                # The head is still being recorded; it sets the event when it is (or is replaced by a filler).
                self._wake.clear()
                await self._wake.wait()
                continue
            for _ in batch:
                queue.popleft()
            try:
                if len(batch) == 1:
                    results = [await _answer_of(self._rpc.request("eth_sendRawTransaction", [batch[0].raw]))]
                else:
                    results = await self._rpc.batch([("eth_sendRawTransaction", [s.raw]) for s in batch], alone=True)
            except ChainUnavailable:
                results = None
            except Exception:  # a bug must not strand the waiters: treat as no answer
                log.exception("relayer sender failed")
                results = None
            if results is None:
                # The node may or may not have them: reconcile those by hash, re-read the nonce, re-sign the rest.
                for s in batch:
                    s.resolve("unknown")
                self._resync()
                continue
            self._settle_batch(batch, results)

    def _settle_batch(self, batch: list[_Slot], results: list[Any]) -> None:
        refused: list[_Slot] = []
        resync = False
        for slot, result in zip(batch, results, strict=True):
            if not isinstance(result, RpcError):
                slot.resolve("sent")
                continue
            text = result.message.lower()
            if "already known" in text:
                slot.resolve("sent")
            elif "nonce too low" in text:
                resync = True  # someone else used this key: the sequence is behind the node's
                slot.resolve("retry")
            else:
                log.error("settlement broadcast refused", extra={"network": self._rpc.name, "code": result.code})
                if slot.filler:
                    resync = True  # not even a no-op goes through: start again from the node's count
                refused.append(slot)
                slot.resolve("refused")
        if resync:
            self._resync()
            return
        # Refused nonces, highest first: give the top of the sequence back, fill the gaps below anything sent.
        for slot in reversed(refused):
            if self._nonce == slot.nonce + 1:  # nothing was signed after it
                self._nonce = slot.nonce
                continue
            fees = self._fees
            assert fees is not None
            self._queue.appendleft(self._filler(slot.nonce, fees[1], fees[2]))

    def _resync(self) -> None:
        """Forget the local sequence; what is queued was never sent and is signed again by its submitter."""
        self._nonce = None
        while self._queue:
            slot = self._queue.popleft()
            slot.resolve("retry")

    async def aclose(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sender
        while self._queue:  # recorded but maybe never sent: their claims are reconciled by hash
            self._queue.popleft().resolve("unknown")


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
    ``max_items``). Per settlement nothing changes for its caller: its recorder receives the transaction's hash
    before the broadcast (all of a batch's recorders run concurrently; if any fails, the batch is not sent as
    signed, its nonce is filled, the failed settlements get their error and the rest go again in the next batch,
    recording the new hash), and the hash it gets back is the one to watch. Its outcome is read from the receipt
    by its own ``AuthorizationUsed`` log (see ``transfer_in_receipt``): one call of a batch reverting does not
    revert the others, and it leaves no log of its own. A batch of one is sent as a plain transaction.
    """

    # A settlement's own limit (what it would get alone) holds 21,000 of intrinsic gas and a 25 % margin over the
    # node's estimate. In a batch the intrinsic gas is paid once, so four fifths of each limit still leaves ~35 %
    # over what a call measured inside a batch (67,800 gas against a standalone estimate of 85,500): a batch does
    # not claim more of a block's gas limit than it can use, and more settlements fit in each block.
    BASE_GAS = 30_000

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
        while queue:
            batch = [queue.popleft() for _ in range(min(self._max, len(queue)))]
            try:
                if len(batch) == 1:
                    one = batch[0]
                    tx_hash = await self._relayer.submit(one.to, one.data, one.gas, one.record)
                else:
                    tx_hash = await self._send(batch)
            except _RecordFailed:
                continue  # the failed ones have their error; the others are queued again (see _send)
            except asyncio.CancelledError:
                # Shutting down mid-batch: it may have been recorded and sent. Reconciled by hash, never re-sent.
                _resolve(batch, _unknown_outcome())
                raise
            except BaseException as exc:  # every waiter gets the outcome, whatever it is
                _resolve(batch, exc)
                continue
            _resolve(batch, tx_hash)

    async def _send(self, batch: list[_Settlement]) -> str:
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
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        while self._queue:
            item = self._queue.popleft()
            if not item.done.done():
                item.done.set_exception(ServiceUnavailable("the gateway is shutting down", reason="shutting_down"))


class GasBook:
    """The settlement gas a network's ``transferWithAuthorization`` needs, learned from the node's estimates.

    Settling an EOA-signed authorization of one token costs nearly the same gas every time (the storage slots it
    writes differ only in warm/cold and zero/non-zero), so after one ``eth_estimateGas`` a plain ``eth_call`` is
    enough to simulate the next ones (see ``preflight_exact``); the relayer's limit keeps its margin over the
    highest estimate seen. Every ``refresh_every``-th preflight estimates again, and a settlement of ours that
    reverts clears what was learned, so a token upgrade that costs more is picked up at once.
    """

    __slots__ = ("_calls", "_known", "refresh_every")

    def __init__(self, refresh_every: int = 64) -> None:
        self.refresh_every = refresh_every
        self._known: int | None = None
        self._calls = 0

    def hint(self) -> int | None:
        """The gas to assume for the next simulation, or None: estimate it."""
        self._calls += 1
        if self._known is None or self._calls % self.refresh_every == 0:
            return None
        return self._known

    def learn(self, estimate: int) -> None:
        if estimate > 0:
            self._known = max(self._known or 0, estimate)

    def forget(self) -> None:
        self._known = None


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
