"""Self-settlement: the relayer that signs and submits settlement transactions with its own key.

* One nonce sequence per signer, assigned locally under a lock, so many settlements can be in flight at once
  without asking the node for a nonce each time (docs/threat-model.md T12).
* The transaction hash is handed to ``before_broadcast`` (which records it in the store) *before* the raw
  transaction leaves, so a crash or a timeout is always reconciled by hash and never broadcast twice.
* A nonce keeper watches the sequence on the node while transactions are outstanding: a transaction that
  disappeared (dropped from the mempool, reorganised away) is sent again, a gap nobody can fill is filled with a
  no-op, and a transaction passed over block after block is replaced with higher fees, so one lost nonce never
  stalls every later settlement (docs/threat-model.md T29); it lives in :mod:`gateway.chain.nonces`.
* Receipts are awaited by :mod:`gateway.chain.watcher`; batches are formed by :mod:`gateway.chain.batcher`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable
from typing import Any

from coincurve import PrivateKey
from eth_account import Account

from gateway.chain.nonces import NonceKeeper, Recorder, Slot
from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.chain.transactions import sign_eip1559
from gateway.config import Secret
from gateway.errors import ChainUnavailable, ServiceUnavailable, SettlementFailed
from gateway.tasks import stop_all
from gateway.x402 import reasons

log = logging.getLogger("gateway.settle")

# What nodes answer when a transaction's fees are below what the next block needs (geth, reth, anvil, erigon).
_FEE_REFUSALS = ("base fee", "basefee", "fee cap", "feecap", "underpriced", "max fee per gas less than")


def _already_known(answer: RpcError) -> bool:
    """The node has this very transaction already (geth: "already known", anvil: "transaction already imported")."""
    text = answer.message.lower()
    return "already known" in text or "known transaction" in text or "already imported" in text


def _sync_timed_out(answer: RpcError) -> bool:
    """A synchronous broadcast's "taken, but not included in time" (EIP-7966 code 4; anvil: -32603 "...timeout")."""
    return answer.code == 4 or "timeout" in answer.message.lower() or "timed out" in answer.message.lower()


async def _answer_of(call: Awaitable[Any]) -> Any:
    """The result of an RPC call, or the RpcError it raised (as :meth:`ChainRpc.batch` reports errors)."""
    try:
        return await call
    except RpcError as exc:
        return exc


class Relayer(NonceKeeper):
    """Signs and broadcasts settlement transactions for one network with one key, many in flight at once.

    A settlement takes the next local nonce and signs (no I/O), has its hash recorded (``before_broadcast``,
    concurrently with every other settlement), and joins the broadcast queue. One sender task sends the recorded
    head of the queue in nonce order (``max_batch`` transactions per request, one request at a time), so the node
    never sees a nonce before its predecessor was accepted, and nothing waits for a lock while another settlement
    records, broadcasts or waits for its receipt.

    A nonce that will not carry its settlement (recording failed, the request was cancelled, the node refused
    it while later nonces were already out) is filled with a zero-value transfer to ourselves, so the ones after
    it do not wait for ever. When the sequence may be wrong ("nonce too low": someone else used the key; a batch
    without an answer) the queue is handed back to be signed again and the next nonce is read from the node. A
    transaction refused for its fees is signed again at the same nonce with the current price.

    The nonce keeper (``_keep``) runs while transactions are outstanding or recently sent. Every
    ``check_interval`` it reads the key's mined and pending counts: when the node's pending count stays below our
    local sequence (a hole: a transaction of ours was dropped from the mempool or reorganised away), each missing
    nonce is sent again as it was signed (if it would still succeed; else a no-op fills it), or filled with a no-op
    when we do not know what was there; when our lowest unmined transaction is passed over for ``stuck_blocks``
    blocks, or was evicted for a fee below the base fee, it is replaced at the same nonce with higher fees (its new
    hash recorded through the same ``before_broadcast`` first; if that cannot be recorded, a no-op replaces it and
    its settlement is reconciled by hash as never sent).
    """

    # Raw transactions per HTTP request, sent one request at a time in nonce order. On a slow link this is what
    # bounds settlements per second per relayer (max_batch / round trip: one at a time to a hosted RPC 50 ms away
    # would be 20/s). A node may handle the items of one batch concurrently, so nonce n+1 can reach its pool before
    # n: geth-family nodes (Base's op-geth, reth) queue it and promote it when n arrives; anvil in automine mode
    # does not always (measured: foundry anvil, 30 per batch under concurrent eth_calls, about one run in six parks
    # the rest of the sequence as "queued" for ever). So against an automining anvil, one per request.
    max_batch = 50
    # A transaction sent while no other is ready to follow it goes out through eth_sendRawTransactionSync where
    # the endpoint offers it (see _send_one); the sender waits this long for its answer (on an automining node,
    # the receipt) before it sends the same transaction plainly to learn that the node holds it.
    sync_send = True
    accept_window = 0.02

    def __init__(self, rpc: ChainRpc, key: Secret, *, fee_ttl: float = 2.0) -> None:
        self._rpc = rpc
        self._key = PrivateKey(bytes.fromhex(key.reveal().removeprefix("0x")))
        self.address: str = Account.from_key(key.reveal()).address
        self._lock = asyncio.Lock()  # one reader of the node's nonce at a time
        self._nonce: int | None = None  # None: ask the node (at start, and after an uncertain broadcast)
        self._fees: tuple[float, int, int] | None = None
        self._fees_task: asyncio.Task[tuple[float, int, int]] | None = None
        self._fee_ttl = fee_ttl
        self._queue: collections.deque[Slot] = collections.deque()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._max_batch: int | None = None  # max_batch, or 1 against an automining anvil (see max_batch)
        self._probes = 0
        self._sending = False  # a broadcast request is out: its nonces are in neither the queue nor _sent
        self._sent: dict[int, Slot] = {}  # the last transaction broadcast at each nonce (see retain)
        self._keeper: asyncio.Task[None] | None = None
        self._hole: int | None = None  # the pending count at which the last check saw a hole
        self._bumps: dict[int, int] = {}  # replacements per nonce
        self.repairs = 0  # transactions the keeper sent again, filled or replaced (for tests and logs)
        self._late: set[asyncio.Future[Any]] = set()  # synchronous broadcasts whose receipt is still on its way

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

    def _enqueue(self, slot: Slot) -> None:
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
        self._keep_watch()

    def _keep_watch(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(), name=f"relayer-nonces-{self._rpc.name}")

    def _filler(self, nonce: int, max_fee: int, priority: int, *, repair: bool = False) -> Slot:
        tx_hash, raw = sign_eip1559(self._key, self._rpc.chain_id, nonce, self.address, b"", 21_000, max_fee, priority)
        return Slot(
            nonce,
            tx_hash,
            raw,
            to=self.address,
            data=b"",
            gas=21_000,
            max_fee=max_fee,
            priority=priority,
            filler=True,
            repair=repair,
        )

    async def submit(self, to: str, data: bytes, gas: int, before_broadcast: Recorder) -> str:
        """Sign, record (``before_broadcast``), broadcast; return the tx hash.

        Raises ``ServiceUnavailable`` (``relayer_refused``) when the node refuses the transaction (nothing was
        sent) and ``SettlementFailed(unknown=True)`` when the broadcast's fate is unknown (reconcile by hash).
        """
        nonce: int | None = None
        for _attempt in range(4):
            max_fee, priority = await self._fees_now()
            if nonce is None:
                nonce = await self._next_nonce()
            tx_hash, raw = sign_eip1559(self._key, self._rpc.chain_id, nonce, to, data, gas, max_fee, priority)
            slot = Slot(
                nonce,
                tx_hash,
                raw,
                to=to,
                data=data,
                gas=gas,
                max_fee=max_fee,
                priority=priority,
                before_broadcast=before_broadcast,
            )
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
                nonce = None
                continue  # never sent: sign again with a fresh nonce (the store takes the new hash)
            if outcome == "reprice":
                continue  # refused for its fees, nothing sent: the same nonce again at the current price
            if outcome == "unknown":
                raise SettlementFailed(
                    "settlement broadcast got no answer; it is reconciled by transaction hash",
                    reason=reasons.SETTLEMENT_PENDING,
                    unknown=True,
                )
            # Refused outright (e.g. the relayer has no gas money): nothing was broadcast, and it is our fault,
            # not the payer's, so a 503 and not a 402.
            raise ServiceUnavailable("the network refused the settlement transaction", reason=reasons.RELAYER_REFUSED)
        if nonce is not None:
            # Handed back for its fees every time: the nonce is ours and must still leave, or every later one waits.
            max_fee, priority = await self._fees_now()
            self._enqueue(self._filler(nonce, max_fee, priority, repair=True))
            self._kick()
        # Every attempt was handed back unsent (the key's nonce moved under us, or the price kept rising).
        raise ServiceUnavailable("could not obtain a relayer nonce", reason=reasons.RELAYER_REFUSED)

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
            batch: list[Slot] = []
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
            self._sending = True
            try:
                if len(batch) == 1:
                    lone = not any(slot.ready for slot in queue)  # nothing behind it: it may wait for its block
                    results = [await self._send_one(batch[0], sync=lone and self.sync_send)]
                else:
                    results = await self._rpc.batch([("eth_sendRawTransaction", [s.raw]) for s in batch], alone=True)
            except ChainUnavailable:
                results = None
            except Exception:  # a bug must not strand the waiters: treat as no answer
                log.exception("relayer sender failed")
                results = None
            finally:
                self._sending = False
            if results is None:
                # The node may or may not have them: reconcile those by hash, re-read the nonce, re-sign the rest.
                for s in batch:
                    self._remember(s)  # if the node has them, the keeper can still send them again after a reorg
                    s.resolve("unknown")
                self._resync()
                continue
            self._settle_batch(batch, results)

    async def _send_one(self, slot: Slot, *, sync: bool) -> Any:
        """One transaction: its hash once the node took it, or the node's refusal (an RpcError).

        ``sync``: through ``eth_sendRawTransactionSync`` where the endpoint offers it, whose answer is the receipt
        (handed to the receipt watcher, so the settlement waits for no poll). The node takes the transaction long
        before it answers (when the transaction is included), and a refusal comes back at once; so the sender
        waits for that answer only ``accept_window`` seconds, then sends the same transaction plainly: the node
        answers that one as soon as it holds the transaction ("already known") or refuses it, and the sender goes
        on to the next nonce while the receipt is still on its way (the node never sees a nonce before it took the
        one below)."""
        if not sync:
            return await self._send_plain(slot)
        call = asyncio.ensure_future(self._rpc.send_raw_sync(slot.raw))
        try:
            done, _ = await asyncio.wait({call}, timeout=self.accept_window)
            if done:
                answer = call.result()  # raises ChainUnavailable when no answer came: as a plain send's
                if answer is None:  # the endpoint does not offer it: nothing was sent
                    return await self._send_plain(slot)
                return await self._checked(slot, self._sync_answer(slot, answer))
            result = await self._send_plain(slot)
        except BaseException:
            call.cancel()
            raise
        if isinstance(result, RpcError):
            call.cancel()  # refused: the synchronous one is refused too (or was never read)
            return result
        self._late.add(call)
        call.add_done_callback(lambda task: self._late_answer(slot, task))
        return result

    async def _send_plain(self, slot: Slot) -> Any:
        result = await _answer_of(self._rpc.request("eth_sendRawTransaction", [slot.raw]))
        return await self._checked(slot, result)

    async def _checked(self, slot: Slot, result: Any) -> Any:
        """A refusal of a transaction the node has all the same (known, or mined meanwhile) is no refusal: it is
        out. Signed again under another nonce it would only revert, and the claim would hold the wrong hash."""
        if not isinstance(result, RpcError):
            return result
        if _already_known(result) or await self._holds(slot.tx_hash):
            return slot.tx_hash
        return result

    def _sync_answer(self, slot: Slot, answer: Any) -> Any:
        if isinstance(answer, dict):
            self._rpc.saw_receipt(slot.tx_hash, answer)
            return slot.tx_hash
        if isinstance(answer, RpcError) and _sync_timed_out(answer):
            return slot.tx_hash  # taken, not included within the node's own wait: the receipt watcher goes on
        return answer

    async def _holds(self, tx_hash: str) -> bool:
        try:
            return await self._rpc.request("eth_getTransactionByHash", [tx_hash]) is not None
        except (RpcError, ChainUnavailable):
            return False  # no telling: wait for the broadcast's own answer

    def _late_answer(self, slot: Slot, task: asyncio.Future[Any]) -> None:
        """The answer of a synchronous broadcast the sender stopped waiting for (the node held the transaction)."""
        self._late.discard(task)
        if task.cancelled() or task.exception() is not None:
            return  # the receipt watcher polls for it as for any other
        answer = self._sync_answer(slot, task.result())
        if isinstance(answer, RpcError) and not _already_known(answer):
            # Held by the node, then refused: the nonce keeper finds the hole and sends it again or fills it.
            log.warning("settlement dropped after broadcast", extra={"network": self._rpc.name, "code": answer.code})
            self._keep_watch()

    def _remember(self, slot: Slot) -> None:
        slot.sent_at = time.monotonic()
        self._sent[slot.nonce] = slot
        self._keep_watch()

    def _settle_batch(self, batch: list[Slot], results: list[Any]) -> None:
        refused: list[Slot] = []
        resync = False
        for slot, result in zip(batch, results, strict=True):
            text = result.message.lower() if isinstance(result, RpcError) else ""
            if not isinstance(result, RpcError) or _already_known(result):
                self._remember(slot)
                slot.resolve("sent")
                continue
            if slot.repair:
                # The keeper's re-send, filler or replacement of a nonce that is ours already: whatever the node
                # says, the sequence stays ("nonce too low": that nonce was mined meanwhile, nothing to repair).
                if "nonce too low" not in text:
                    log.warning("relayer repair refused", extra={"network": self._rpc.name, "code": result.code})
                slot.resolve("refused")
                continue
            if "nonce too low" in text or "replacement" in text:
                # Someone else used this key (mined, or holds the nonce in the pool): our sequence is behind.
                resync = True
                slot.resolve("retry")
            elif any(marker in text for marker in _FEE_REFUSALS):
                # The base fee rose past our cap since the price was read: nothing was sent; the submitter signs
                # the same nonce again at the current price (the nonce stays reserved for it).
                self._fees = None
                slot.resolve("reprice")
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
            if fees is None:
                self._enqueue(self._filler(slot.nonce, slot.max_fee, slot.priority))
            else:
                self._enqueue(self._filler(slot.nonce, fees[1], fees[2]))

    def _resync(self) -> None:
        """Forget the local sequence; what is queued was never sent and is signed again by its submitter."""
        self._nonce = None
        self._hole = None
        while self._queue:
            slot = self._queue.popleft()
            slot.resolve("retry")

    async def aclose(self) -> None:
        for call in list(self._late):
            call.cancel()
        await stop_all((self._keeper, self._sender))
        while self._queue:  # recorded but maybe never sent: their claims are reconciled by hash
            self._queue.popleft().resolve("unknown")
