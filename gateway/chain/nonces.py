"""The relayer's nonces after broadcast: its slots, and the keeper that repairs them (docs/threat-model.md T29).

Split from :mod:`gateway.chain.relayer` (which signs, records and broadcasts) so the repair rules read in one place.
:class:`NonceKeeper` is a base class of :class:`~gateway.chain.relayer.Relayer`, not a component: it works on the
relayer's own sequence (the queue, the nonces sent, the local next nonce) and signs with its key, so splitting the
state would mean sharing it anyway. It runs while transactions are outstanding or recently sent. Every
``check_interval`` it reads the key's mined and pending counts: when the node's pending count stays below the local
sequence (a hole: a transaction was dropped from the mempool or reorganised away), each missing nonce is sent again
as it was signed (if it would still succeed; else a no-op fills it), or filled with a no-op when we do not know what
was there; when the lowest unmined transaction is passed over for ``stuck_blocks`` blocks, or was evicted for a fee
below the base fee, it is replaced at the same nonce with higher fees (its new hash recorded through the same
``before_broadcast`` first; if that cannot be recorded, a no-op replaces it and its settlement is reconciled by hash
as never sent).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable

from coincurve import PrivateKey

from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.chain.transactions import sign_eip1559
from gateway.errors import ChainUnavailable

log = logging.getLogger("gateway.settle")

Recorder = Callable[[str], Awaitable[None]]


class Slot:
    """One nonce of the relayer's sequence, from signing to broadcast, kept after it left (see ``Relayer._sent``)."""

    __slots__ = (
        "before_broadcast",
        "data",
        "done",
        "filler",
        "first_max_fee",
        "gas",
        "max_fee",
        "nonce",
        "priority",
        "raw",
        "ready",
        "repair",
        "seen_head",
        "sent_at",
        "to",
        "tx_hash",
    )

    def __init__(
        self,
        nonce: int,
        tx_hash: str,
        raw: str,
        *,
        to: str,
        data: bytes,
        gas: int,
        max_fee: int,
        priority: int,
        filler: bool = False,
        repair: bool = False,
        before_broadcast: Recorder | None = None,
        first_max_fee: int | None = None,
    ) -> None:
        self.nonce = nonce
        self.tx_hash = tx_hash
        self.raw = raw
        self.to = to
        self.data = data
        self.gas = gas
        self.max_fee = max_fee
        self.priority = priority
        self.filler = filler  # a no-op that only fills the nonce (its settlement was abandoned or refused)
        self.repair = repair  # sent by the nonce keeper for a nonce already ours: its outcome never moves the sequence
        self.before_broadcast = before_broadcast  # records a replacement's hash, as it recorded this one's
        self.first_max_fee = first_max_fee or max_fee  # the nonce's first price: replacements stay within a factor
        self.ready = filler or repair  # recorded by before_broadcast: may leave
        self.sent_at = 0.0
        self.seen_head: int | None = None  # the head when the nonce keeper first saw it unmined
        # "sent" | "retry" (never sent: sign again) | "reprice" (refused for its fees: same nonce, fresh fees)
        # | "unknown" (sent, no answer) | "refused"
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def resolve(self, outcome: str) -> None:
        if not self.done.done():
            self.done.set_result(outcome)

    def resend(self) -> Slot:
        """The same signed transaction (same hash: whatever recorded it still finds it), sent again."""
        return Slot(
            self.nonce,
            self.tx_hash,
            self.raw,
            to=self.to,
            data=self.data,
            gas=self.gas,
            max_fee=self.max_fee,
            priority=self.priority,
            filler=self.filler,
            repair=True,
            before_broadcast=self.before_broadcast,
            first_max_fee=self.first_max_fee,
        )


class NonceKeeper:
    """The nonce keeper of a :class:`~gateway.chain.relayer.Relayer` (see the module docstring)."""

    # The nonce keeper. A hole must be seen on two checks in a row (a lagging endpoint, a broadcast in flight).
    check_interval = 1.0  # seconds between checks while transactions are outstanding
    retain = 900.0  # seconds a mined transaction is kept, to be sent again as it was if a reorg drops it
    retain_max = 2048  # at most this many kept (the oldest mined ones go first)
    max_refill = 64  # nonces re-sent or filled per check
    stuck_blocks = 3  # blocks our lowest unmined transaction may be passed over before it is re-priced
    fee_bump = 1.25  # per replacement (nodes want at least +10 % on both fee caps to replace)
    max_fee_factor = 10  # a nonce never costs more than this times its first price

    # The relayer's state and operations the keeper works on (set and defined by Relayer).
    _rpc: ChainRpc
    _key: PrivateKey
    address: str
    _nonce: int | None
    _queue: collections.deque[Slot]
    _sending: bool
    _sent: dict[int, Slot]
    _hole: int | None
    _bumps: dict[int, int]
    repairs: int

    async def _fees_now(self) -> tuple[int, int]:
        raise NotImplementedError

    def _enqueue(self, slot: Slot) -> None:
        raise NotImplementedError

    def _kick(self) -> None:
        raise NotImplementedError

    def _filler(self, nonce: int, max_fee: int, priority: int, *, repair: bool = False) -> Slot:
        raise NotImplementedError

    async def rebroadcast(self, tx_hash: str) -> bool:
        """Send ``tx_hash`` again exactly as it was signed, if this relayer sent it and it would still succeed.

        For the finality tracker (docs/threat-model.md T28): a settlement a reorg dropped goes back under the same
        hash and nonce, so the local sequence stays whole and every record of that hash stays true. False when this
        relayer does not know the hash (a restart, or it was replaced), when the call would revert now (the
        authorization expired or was used), or when the node refuses it (its nonce was used meanwhile)."""
        slot = next((s for s in self._sent.values() if s.tx_hash == tx_hash), None)
        if slot is None or not await self._simulates(slot):
            return False
        again = slot.resend()
        self._enqueue(again)
        self._kick()
        return await asyncio.shield(again.done) == "sent"

    async def _simulates(self, slot: Slot) -> bool:
        """Would this transaction succeed in the next block? A no-op always would. Simulated on "pending": its
        timestamp is the next block's, so an authorization that expires before it can be mined reverts here."""
        if slot.filler:
            return True
        call = {"from": self.address, "to": slot.to, "data": "0x" + slot.data.hex(), "gas": hex(slot.gas)}
        for block in ("pending", "latest"):
            try:
                await self._rpc.request("eth_call", [call, block])
            except RpcError as exc:
                if exc.code == 3 or "revert" in exc.message.lower():
                    return False
                continue  # a node that does not simulate on "pending": the latest block it is
            return True
        return False

    async def _keep(self) -> None:
        """While anything is outstanding or recently sent, check the key's sequence on the node (see the class)."""
        while self._sent or self._queue or self._sending:
            await asyncio.sleep(self.check_interval)
            try:
                await self._check()
            except ChainUnavailable:
                continue  # no answer: the next check tries again
            except Exception:
                log.exception("relayer nonce check failed")

    async def _check(self) -> None:
        latest_count, pending_count, block = await self._rpc.batch(
            [
                ("eth_getTransactionCount", [self.address, "latest"]),
                ("eth_getTransactionCount", [self.address, "pending"]),
                ("eth_getBlockByNumber", ["latest", False]),
            ]
        )
        if not isinstance(block, dict) or isinstance(latest_count, RpcError) or isinstance(pending_count, RpcError):
            return
        latest, pending = hex_int(latest_count), hex_int(pending_count)
        head = hex_int(block.get("number"))
        base_fee = hex_int(block.get("baseFeePerGas") or "0x0")
        self._prune(latest)
        for n, slot in self._sent.items():
            if slot.seen_head is None:
                slot.seen_head = head
            if n < latest:
                slot.before_broadcast = None  # mined: its claim is settled; do not keep the request alive
        local = self._nonce
        if local is None or self._sending:
            self._hole = None
            return
        # Nonces below this one that are ours: signed, and either sent or handed to nobody (never queued again).
        end = min(local, self._queue[0].nonce) if self._queue else local
        if pending < end:
            if self._hole != pending:
                self._hole = pending  # seen once: act if the next check sees the same
                return
            self._hole = None
            await self._refill(list(range(pending, min(end, pending + self.max_refill))), base_fee)
            return
        self._hole = None
        if self._queue and self._queue[0].nonce <= latest:
            return  # a replacement (or a re-send) of the lowest nonce is on its way already
        lowest = self._sent.get(latest)
        if (
            lowest is not None
            and latest < local
            and lowest.seen_head is not None
            and head - lowest.seen_head >= self.stuck_blocks
        ):
            await self._replace(lowest, base_fee)

    def _prune(self, latest: int) -> None:
        """Forget mined transactions older than ``retain`` (and the oldest beyond ``retain_max``)."""
        mined = sorted(n for n in self._sent if n < latest)
        if not mined:
            return
        cutoff = time.monotonic() - self.retain
        excess = len(self._sent) - self.retain_max
        for n in mined:
            if excess > 0 or self._sent[n].sent_at < cutoff:
                del self._sent[n]
                self._bumps.pop(n, None)
                excess -= 1

    async def _refill(self, nonces: list[int], base_fee: int) -> None:
        """Send again, or fill, every nonce of ours the node has neither mined nor pending."""
        known = [n for n in nonces if n in self._sent]
        answers = await self._rpc.batch([("eth_getTransactionByHash", [self._sent[n].tx_hash]) for n in known])
        present = {n for n, answer in zip(known, answers, strict=True) if isinstance(answer, dict)}
        repaired: list[int] = []
        for n in nonces:
            slot = self._sent.get(n)
            if n in present:
                continue  # the node has it (counted once it is promoted)
            works = slot is not None and await self._simulates(slot)
            if slot is not None and works and slot.max_fee < base_fee:
                await self._replace(slot, base_fee)  # evicted for its fee: only a dearer copy can go
                continue
            if slot is not None and works:
                self._enqueue(slot.resend())
            else:
                # Unknown to us (a restart, another process with this key) or it would revert now (an expired
                # authorization): a no-op fills the nonce, and nobody pays gas for a failing settlement.
                max_fee, priority = await self._fees_now()
                self._enqueue(self._filler(n, max(max_fee, base_fee * 2), priority, repair=True))
            repaired.append(n)
        if repaired:
            self.repairs += len(repaired)
            log.warning("relayer nonce gap repaired", extra={"network": self._rpc.name, "nonces": repaired})
            self._kick()

    async def _replace(self, slot: Slot, base_fee: int) -> bool:
        """Replace the transaction at ``slot.nonce`` with the same call at higher fees: the current price (what a
        new transaction would pay), or each time ``fee_bump`` more than the last, up to ``max_fee_factor`` times the
        nonce's first price (the current price is always paid: a nonce stuck for good would stall every later one).
        """
        n = slot.nonce
        bumps = self._bumps.get(n, 0) + 1
        fresh_max, fresh_priority = await self._fees_now()
        factor = self.fee_bump**bumps
        cap = slot.first_max_fee * self.max_fee_factor
        priority = max(fresh_priority, min(math.ceil(slot.priority * factor), cap))
        max_fee = max(fresh_max, min(math.ceil(slot.max_fee * factor), cap), base_fee * 2 + priority)
        if max_fee * 10 < slot.max_fee * 11 or priority * 10 < slot.priority * 11:
            # Not 10 % above what is already out (nodes refuse such a replacement): wait for the price to move.
            return False
        self._bumps[n] = bumps
        replacement: Slot | None = None
        if not slot.filler and slot.before_broadcast is not None:
            tx_hash, raw = sign_eip1559(
                self._key, self._rpc.chain_id, n, slot.to, slot.data, slot.gas, max_fee, priority
            )
            try:
                # The replacement's hash is recorded like the first one's: a crash is reconciled by the hash that
                # may be mined. A claim that can no longer record it gets a no-op instead (see the class).
                await slot.before_broadcast(tx_hash)
            except Exception:
                log.warning("relayer replacement not recorded: a no-op takes the nonce", extra={"nonce": n})
            else:
                replacement = Slot(
                    n,
                    tx_hash,
                    raw,
                    to=slot.to,
                    data=slot.data,
                    gas=slot.gas,
                    max_fee=max_fee,
                    priority=priority,
                    repair=True,
                    before_broadcast=slot.before_broadcast,
                    first_max_fee=slot.first_max_fee,
                )
        if replacement is None:
            replacement = self._filler(n, max_fee, priority, repair=True)
            replacement.first_max_fee = slot.first_max_fee
        self.repairs += 1
        log.warning(
            "relayer transaction re-priced",
            extra={"network": self._rpc.name, "nonce": n, "tx_hash": replacement.tx_hash, "replaces": slot.tx_hash},
        )
        self._enqueue(replacement)
        self._kick()
        return True


__all__ = ["NonceKeeper", "Recorder", "Slot"]
