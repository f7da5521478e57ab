"""Settled is not final: the finality tracker keeps a served request paid when the chain changes its mind.

A settlement counts once the watcher saw it mined with ``confirmations`` blocks; the request it paid for is then
served. A reorganisation deeper than that drops the transaction, and the authorization is valid and unused again:
nobody would ever submit it, and the merchant would never be paid for content already served
(docs/threat-model.md T28). So every local settlement, once confirmed, is written to the settlement journal
(:mod:`gateway.storage.settlements`, durable, shared by the gateway instances) and one tracker per network
watches it until it is final (``settlement_finality``: the ``safe`` or ``finalized`` block tag, or
``settlement_depth`` blocks deep), then forgets it.

Each pass (every ``settlement_check_interval`` seconds) takes the journal's entries of this network and asks the
chain, in one batched round trip, for the head, the finality tag and the block hash at every height an entry was
seen at. An entry whose block is still canonical waits (or is final and removed). One whose block was replaced,
or that was never placed, is looked up by its transaction:

* mined again (a node re-included it) with this authorization's ``AuthorizationUsed`` and ``Transfer`` to us: the
  entry moves to that block;
* pending: wait (the relayer's nonce keeper looks after stuck transactions, T29);
* gone (twice in a row, so a lagging endpoint is not taken for a reorg): the authorization's state decides.
  Used, with its execution to us found in the token's logs: that execution is tracked instead (someone else
  settled it to us: fine). Unused, valid for a while yet (the later of the chain's clock and ours), funded, and
  simulating on the ``pending`` block (the next block's timestamp): the relayer sends the very same transaction
  again if it still has it (same hash, same nonce), else the same signed call is settled in a new transaction,
  its hash written to the journal before it leaves. Anything else (expired, balance gone, cancelled, would
  revert) cannot be recovered: the entry is removed, counted (``on_lost`` hooks: the ``settlements_lost_total``
  metric) and logged as an error with the claim key and transaction hash; nothing that would revert is sent.

What a ``transferWithAuthorization`` call and its receipt say is read by :mod:`gateway.chain.authorization`.
This module stays over ~400 lines because the pass, the look-up and the recovery share one tracker's journal
lease, relayer and counters, and read as one decision from top to bottom.

Nothing here is on the paid request's path: :meth:`FinalityTracker.track` only appends to an in-memory inbox that
the tracker's own task writes to the journal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.chain import abi
from gateway.chain.authorization import Authorization, executed_to_us, reverted
from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.errors import ChainUnavailable, GatewayError, SettlementFailed, StoreUnavailable

log = logging.getLogger("gateway.settle")

Finality = Literal["safe", "finalized", "depth"]


class JournalEntry(Protocol):
    """One journal entry as the tracker reads it (``gateway.storage.settlements.JournalEntry``)."""

    @property
    def key(self) -> str: ...
    @property
    def tx_hash(self) -> str: ...
    @property
    def asset(self) -> str: ...
    @property
    def calldata(self) -> bytes: ...
    @property
    def valid_before(self) -> int: ...
    @property
    def block_number(self) -> int | None: ...
    @property
    def block_hash(self) -> str | None: ...


class Journal(Protocol):
    """The settlement journal as the tracker uses it (``gateway.storage.settlements.SettlementJournal``)."""

    async def add(
        self,
        key: str,
        network: str,
        tx_hash: str,
        asset: str,
        calldata: bytes,
        valid_before: int,
        *,
        owner: str,
        now: float,
        lease: float,
    ) -> None: ...

    async def take(
        self, network: str, owner: str, *, now: float, lease: float, limit: int, newest: bool = False
    ) -> Sequence[JournalEntry]: ...

    async def release(self, network: str, owner: str) -> int: ...

    async def update(
        self, key: str, owner: str, *, tx_hash: str, block_number: int | None, block_hash: str | None, now: float
    ) -> bool: ...

    async def remove(self, key: str, owner: str) -> bool: ...

    async def aclose(self) -> None: ...


class Submitter(Protocol):
    """The relayer, or the Multicall3 batcher in front of it."""

    async def submit(
        self, to: str, data: bytes, gas: int, before_broadcast: Callable[[str], Awaitable[None]]
    ) -> str: ...


class Rebroadcaster(Protocol):
    async def rebroadcast(self, tx_hash: str) -> bool: ...

    @property
    def address(self) -> str: ...


@dataclass(slots=True)
class _Settled:
    key: str
    asset: str
    calldata: bytes
    valid_before: int
    tx_hash: str


class FinalityTracker:
    """Watches one network's served settlements until final; re-submits what a reorg dropped (module docstring)."""

    # Entries per pass, oldest first and newest first in turn: the oldest become final (and leave), the newest are
    # the ones a reorg drops. Beyond 2 x limit entries some wait a pass or two longer.
    limit = 1000
    missing_passes = 2  # passes a transaction must be gone before it counts as dropped
    expiry_margin = 10  # seconds of validity a re-submission needs to be worth its gas (a few blocks)
    lookback_blocks = 10_000  # how far back an execution of the authorization by someone else is looked for
    max_resubmissions = 3  # of one settlement; a new transaction that reverts each time is not paid for again
    inbox_max = 100_000  # settlements waiting for the journal (a store outage); beyond, the oldest are dropped

    def __init__(
        self,
        network: str,
        rpc: ChainRpc,
        relayer: Rebroadcaster,
        submitter: Callable[[], Submitter],
        journal: Journal,
        *,
        finality: Finality,
        depth: int,
        interval: float,
        on_lost: list[Callable[[str], None]] | None = None,
    ) -> None:
        self.network = network
        self._rpc = rpc
        self._relayer = relayer
        self._submitter = submitter
        self.journal = journal
        self.finality = finality
        self.depth = max(depth, 1)
        self.interval = interval
        self.lease = max(60.0, interval * 10)  # another instance takes the entries over once this lapses
        self.owner = uuid.uuid4().hex
        self.on_lost: list[Callable[[str], None]] = on_lost if on_lost is not None else []
        self._inbox: collections.deque[_Settled] = collections.deque()
        self._missing: dict[str, int] = {}  # claim key -> passes its transaction was gone
        self._busy: dict[str, asyncio.Task[None]] = {}  # claim key -> its re-submission in progress
        self._attempts: dict[str, int] = {}  # claim key -> re-submissions (a settlement that keeps reverting)
        self._wake: asyncio.Event | None = None
        self._passes = 0
        self._task: asyncio.Task[None] | None = None
        # Counters for logs, tests and readiness.
        self.final = 0
        self.resubmitted = 0
        self.lost = 0

    def __repr__(self) -> str:
        return f"FinalityTracker(network={self.network!r}, finality={self.finality!r}, depth={self.depth})"

    # -------------------------------------------------------------------------------------------- the inbox

    def track(self, key: str, asset: str, calldata: bytes, valid_before: int, tx_hash: str) -> None:
        """A settlement was confirmed: watch it until final. Never waits (the paid request is not slowed)."""
        if len(self._inbox) >= self.inbox_max:
            dropped = self._inbox.popleft()
            log.error("settlement journal backlog full: not watched", extra={"claim_key": dropped.key})
        self._inbox.append(_Settled(key, asset, calldata, valid_before, tx_hash))
        if self._wake is not None:
            self._wake.set()

    async def _flush_inbox(self) -> None:
        while self._inbox:
            item = self._inbox[0]
            await self.journal.add(
                item.key,
                self.network,
                item.tx_hash,
                item.asset,
                item.calldata,
                item.valid_before,
                owner=self.owner,
                now=time.time(),
                lease=self.lease,
            )
            self._inbox.popleft()

    # ------------------------------------------------------------------------------------------- life cycle

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"finality-{self.network}")

    async def _run(self) -> None:
        """A pass every ``interval``; a settlement handed in between is written to the journal at once, and waits
        for the next pass to be checked on chain. Under load a settlement arrives every few milliseconds, and a
        full pass for each (a journal lease on every entry, the chain asked about every height) costs far more
        than the writes it precedes, without making anything final sooner."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        last_pass = float("-inf")  # the first pass runs at once
        while True:
            self._wake.clear()
            try:
                if loop.time() - last_pass >= self.interval:
                    try:
                        await self.check()
                    finally:
                        last_pass = loop.time()  # the next one ``interval`` after this one ended, as always
                else:
                    await self._flush_inbox()
            except (ChainUnavailable, StoreUnavailable) as exc:
                log.warning("finality pass skipped", extra={"network": self.network, "error": str(exc)})
            except Exception:
                log.exception("finality pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, last_pass + self.interval - loop.time()))

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._busy.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._inbox:
            # Shutting down right after serving: write what is still in memory, once, briefly.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_inbox(), 2.0)
            if self._inbox:
                log.error("settlements not written to the journal at shutdown", extra={"count": len(self._inbox)})
        # Another instance (or this gateway restarted) watches them from its next pass, not once the lease lapses:
        # a settlement a reorg drops during a deploy is sent again in seconds (docs/threat-model.md T28).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.journal.release(self.network, self.owner), 2.0)
        with contextlib.suppress(Exception):
            await self.journal.aclose()

    # ------------------------------------------------------------------------------------------------ a pass

    async def check(self) -> None:
        """One pass over this network's journal entries (see the module docstring)."""
        await self._flush_inbox()
        self._passes += 1
        taken = await self.journal.take(
            self.network, self.owner, now=time.time(), lease=self.lease, limit=self.limit, newest=self._passes % 2 == 0
        )
        entries = [e for e in taken if e.key not in self._busy]
        if not entries:
            return
        heights = sorted({e.block_number for e in entries if e.block_number is not None})
        calls: list[tuple[str, list[Any]]] = [("eth_getBlockByNumber", ["latest", False])]
        if self.finality != "depth":
            calls.append(("eth_getBlockByNumber", [self.finality, False]))
        calls += [("eth_getBlockByNumber", [hex(h), False]) for h in heights]
        answers = await self._rpc.batch(calls)
        latest = answers[0]
        if not isinstance(latest, dict):
            raise ChainUnavailable(f"network {self.network}: no latest block")
        head = hex_int(latest.get("number"))
        chain_time = hex_int(latest.get("timestamp"))
        final_at = head - self.depth + 1  # the highest final block
        if self.finality != "depth":
            tagged = answers[1]
            if isinstance(tagged, dict):
                final_at = hex_int(tagged.get("number"))  # else the node does not serve the tag: depth it is
        canonical = {
            h: (answer.get("hash") if isinstance(answer, dict) else None)
            for h, answer in zip(heights, answers[len(calls) - len(heights) :], strict=True)
        }
        unsure: list[JournalEntry] = []
        for e in entries:
            if e.block_number is None or canonical.get(e.block_number) != e.block_hash:
                unsure.append(e)  # never placed, or its block is no longer the chain's at that height
                continue
            self._missing.pop(e.key, None)
            if e.block_number <= final_at:
                await self.journal.remove(e.key, self.owner)
                self._attempts.pop(e.key, None)
                self.final += 1
        if unsure:
            await self._look_up(unsure, head, chain_time)

    async def _look_up(self, entries: list[JournalEntry], head: int, chain_time: int) -> None:
        hashes = sorted({e.tx_hash for e in entries})
        answers = await self._rpc.batch(
            [("eth_getTransactionReceipt", [h]) for h in hashes] + [("eth_getTransactionByHash", [h]) for h in hashes]
        )
        receipts = dict(zip(hashes, answers[: len(hashes)], strict=True))
        known = dict(zip(hashes, answers[len(hashes) :], strict=True))
        for e in entries:
            auth = Authorization.of_calldata(e.calldata)
            if auth is None:
                await self._lose(e, "not a transferWithAuthorization call")
                continue
            receipt = receipts.get(e.tx_hash)
            if isinstance(receipt, dict):
                self._missing.pop(e.key, None)
                if executed_to_us(receipt, e.asset, auth):
                    await self._place(e, e.tx_hash, receipt)
                else:  # it reverted (or executed something else): what state is the authorization in?
                    await self._recover(e, auth, head, chain_time)
                continue
            if isinstance(known.get(e.tx_hash), dict):
                self._missing.pop(e.key, None)  # back in (or still in) the mempool: it may be mined yet
                continue
            if e.block_number is not None and head < e.block_number:
                continue  # this node is behind the block the settlement was seen in: not evidence of a reorg
            passes = self._missing.get(e.key, 0) + 1
            self._missing[e.key] = passes
            if passes < self.missing_passes:
                continue
            self._missing.pop(e.key, None)
            await self._recover(e, auth, head, chain_time, dropped=True)

    async def _place(self, e: JournalEntry, tx_hash: str, receipt: dict[str, Any]) -> None:
        await self.journal.update(
            e.key,
            self.owner,
            tx_hash=tx_hash,
            block_number=hex_int(receipt.get("blockNumber")),
            block_hash=str(receipt.get("blockHash")),
            now=time.time(),
        )

    async def _recover(
        self, e: JournalEntry, auth: Authorization, head: int, chain_time: int, *, dropped: bool = False
    ) -> None:
        """The settlement is not on the chain: settle again, follow someone else's execution, or report it lost.
        ``dropped``: its transaction is gone (not reverted), so the relayer may send that very one again."""
        # Simulated on "pending": the next block's timestamp, so an authorization that expires before it could be
        # mined is not sent (the relayer would pay gas for a revert, and the payer's nonce stays unused).
        simulation = _call(e.asset, e.calldata) | {"from": self._relayer.address}
        state, balance, gas, gas_now, known = await self._rpc.batch(
            [
                ("eth_call", [_call(e.asset, abi.AUTHORIZATION_STATE.encode(auth.payer, auth.nonce)), "latest"]),
                ("eth_call", [_call(e.asset, abi.BALANCE_OF.encode(auth.payer)), "latest"]),
                ("eth_estimateGas", [simulation, "pending"]),
                ("eth_estimateGas", [simulation, "latest"]),
                ("eth_getTransactionByHash", [e.tx_hash]),
            ]
        )
        if isinstance(gas, RpcError) and not reverted(gas):
            gas = gas_now  # a node that does not simulate on "pending": the latest block it is
        if isinstance(state, RpcError) or isinstance(balance, RpcError):
            raise ChainUnavailable(f"network {self.network}: the token did not answer a view call")
        if isinstance(known, dict) and known.get("blockNumber") is None:
            return  # sent again meanwhile (by the relayer's nonce keeper): back in the mempool, the next pass sees it
        if _word(state):
            execution = await self._execution(e.asset, auth, head)
            if execution is not None:
                log.info(
                    "settlement executed in another transaction",
                    extra={"network": self.network, "claim_key": e.key, "tx_hash": execution[0]},
                )
                await self._place(e, execution[0], execution[1])
                return
            await self._lose(e, "the authorization was used without a transfer to us (cancelled)")
            return
        # By the chain's clock only: a gateway clock that runs ahead would write off settlements still valid (the
        # simulation below, on the pending block, refuses what the next block would see expired).
        if chain_time + self.expiry_margin >= auth.valid_before:
            await self._lose(e, "the authorization expired before it could be settled again")
            return
        if _word(balance) < auth.value:
            await self._lose(e, "the payer's balance is gone")
            return
        if isinstance(gas, RpcError):
            await self._lose(e, "settling it again would revert (expired by the next block, or refused)")
            return
        if dropped and await self._relayer.rebroadcast(e.tx_hash):
            log.warning(
                "settlement dropped by a reorg: sent again as it was",
                extra={"network": self.network, "claim_key": e.key, "tx_hash": e.tx_hash},
            )
            await self.journal.update(
                e.key, self.owner, tx_hash=e.tx_hash, block_number=None, block_hash=None, now=time.time()
            )
            return
        attempts = self._attempts.get(e.key, 0) + 1
        if attempts > self.max_resubmissions:
            await self._lose(e, "settled again, and reverted, too many times")
            return
        self._attempts[e.key] = attempts
        self._busy[e.key] = asyncio.create_task(self._resubmit(e, hex_int(gas)), name=f"resubmit-{e.key[-8:]}")

    async def _execution(self, asset: str, auth: Authorization, head: int) -> tuple[str, dict[str, Any]] | None:
        """An execution of this authorization to us in the token's logs (its hash and receipt), if any."""
        logs = await self._rpc.request(
            "eth_getLogs",
            [
                {
                    "address": asset,
                    "fromBlock": hex(max(0, head - self.lookback_blocks)),
                    "toBlock": "latest",
                    "topics": [
                        "0x" + abi.AUTHORIZATION_USED_TOPIC.hex(),
                        "0x" + (bytes(12) + bytes.fromhex(auth.payer[2:])).hex(),
                        "0x" + auth.nonce.hex(),
                    ],
                }
            ],
        )
        for entry in logs or ():
            tx_hash = entry.get("transactionHash") if isinstance(entry, dict) else None
            if not isinstance(tx_hash, str):
                continue
            receipt = await self._rpc.request("eth_getTransactionReceipt", [tx_hash])
            if isinstance(receipt, dict) and executed_to_us(receipt, asset, auth):
                return tx_hash, receipt
        return None

    async def _resubmit(self, e: JournalEntry, gas: int) -> None:
        """The same signed call in a new transaction; its hash is in the journal before it leaves."""
        try:

            async def record(tx_hash: str) -> None:
                if not await self.journal.update(
                    e.key, self.owner, tx_hash=tx_hash, block_number=None, block_hash=None, now=time.time()
                ):
                    raise StoreUnavailable("the settlement journal entry is no longer ours")

            try:
                tx_hash = await self._submitter().submit(e.asset, e.calldata, gas * 5 // 4 + 10_000, record)
            except SettlementFailed as exc:
                if not exc.unknown:
                    raise
                tx_hash = "(unknown: reconciled by hash)"
            self.resubmitted += 1
            log.warning(
                "settlement dropped by a reorg: settled again",
                extra={"network": self.network, "claim_key": e.key, "tx_hash": tx_hash, "replaces": e.tx_hash},
            )
        except (GatewayError, ChainUnavailable) as exc:
            # Refused (no gas money), the store or the chain did not answer: the entry stays, the next pass retries.
            log.warning(
                "settlement could not be settled again yet",
                extra={"network": self.network, "claim_key": e.key, "error": str(exc)},
            )
        except Exception:
            log.exception("settlement re-submission failed")
        finally:
            self._busy.pop(e.key, None)

    async def _lose(self, e: JournalEntry, why: str) -> None:
        # Removed first: a store that does not answer leaves the entry for the next pass, which counts it then
        # (once), and an entry another instance took over is that instance's to report.
        if not await self.journal.remove(e.key, self.owner):
            return
        self._attempts.pop(e.key, None)
        self.lost += 1
        log.error(
            "settlement lost: a served request stays unpaid",
            extra={"network": self.network, "claim_key": e.key, "tx_hash": e.tx_hash, "why": why},
        )
        for hook in self.on_lost:
            try:
                hook(self.network)
            except Exception:
                log.exception("settlement-lost hook failed")


def _call(to: str, data: bytes) -> dict[str, Any]:
    return {"to": to, "data": "0x" + data.hex()}


def _word(result: Any) -> int:
    return int(result[2:66] or "0", 16) if isinstance(result, str) and result.startswith("0x") else 0


__all__ = ["Authorization", "FinalityTracker", "Journal", "JournalEntry", "Submitter", "executed_to_us", "reverted"]
