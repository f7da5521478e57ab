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

Two more kinds of transaction paid for something served and are watched the same way, though nobody may send their
call again in a new transaction (:class:`Watched`, handed in by :meth:`FinalityTracker.watch`): a payer's own
transfer presented as a tx-hash proof (``transfer``), and our relayer's execution of a session deposit
(``deposit``). Still canonical: kept until final. Mined again (the same hash) with its ``Transfer``: moved there;
mined again without it: lost. Gone (twice in a row): lost once its sender's account nonce at ``latest`` has passed
the transaction's and the hash has no receipt (another transaction took the nonce: it can never be mined);
otherwise the very same signed transaction is sent again (a deposit by the relayer, if it still has it; a transfer
from its raw bytes, rebuilt from the node's answer when it was served and kept only if they hash to its hash and
are at most ``MAX_RAW`` long; its sender is the address its signature recovers to, never the node's ``from``), or
waited for; one gone with nothing to send again is lost once ``watch_bound`` seconds have passed since it was
served (chain clock, read with it). Only a node's "already known" makes a refused broadcast count as sent. While a
deposit is not on the chain (gone or pending), the channel's mirror is set to the chain's state at each pass, and
once more when it is lost (``on_deposit_gone`` hooks), so no voucher is served on money the chain does not hold.

What a ``transferWithAuthorization`` call and its receipt say is read by :mod:`gateway.chain.authorization`.
This module stays long because the pass, the look-up and the recovery of every kind of entry share one tracker's
journal lease, relayer and counters, and read as one decision from top to bottom; what a watched transaction is
and how its Transfer is recognised live in :mod:`gateway.chain.watched`, its signed bytes are rebuilt by
:func:`gateway.chain.transactions.signed_by` (with the address its signature recovers to).

Nothing here is on the paid request's path: :meth:`FinalityTracker.track` and :meth:`FinalityTracker.watch` only
append to an in-memory inbox that the tracker's own task writes to the journal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from gateway.chain import abi
from gateway.chain.authorization import Authorization, executed_to_us, reverted
from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.chain.transactions import signed_by
from gateway.chain.watched import MAX_RAW, Watched, pays
from gateway.errors import ChainUnavailable, GatewayError, SettlementFailed, StoreUnavailable
from gateway.tasks import stop_all

log = logging.getLogger("gateway.settle")

Finality = Literal["safe", "finalized", "depth"]
Kind = Literal["exact", "transfer", "deposit"]  # what a journal entry watches (gateway/storage/settlements/)


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
    @property
    def kind(self) -> str: ...


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
        kind: str = "exact",
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
    kind: Kind = "exact"
    watched: Watched | None = None  # a watched transaction: encoded into calldata when it is journalled
    read: bool = False  # its sender, nonce and raw bytes were asked for (see FinalityTracker._read_watched)


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
    # A watched transaction (a payer's transfer, a session deposit) that a reorg dropped, whose nonce is still
    # unused and that we cannot send again (no signed bytes, or the relayer forgot it), is counted lost once this
    # long has passed since it was served: its sender's wallet may yet send it again, but not for ever. Entries
    # still canonical leave when final, long before (minutes on the default finality settings).
    watch_bound = 3600

    def __init__(
        self,
        network: str,
        rpc: ChainRpc,
        relayer: Rebroadcaster | None,
        submitter: Callable[[], Submitter],
        journal: Journal,
        *,
        finality: Finality,
        depth: int,
        interval: float,
        on_lost: list[Callable[[str, str], None]] | None = None,
        on_deposit_gone: list[Callable[[str, str], Awaitable[None]]] | None = None,
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
        # Called with (network, claim key) for each entry counted lost (metrics count it, the ledger marks it).
        self.on_lost: list[Callable[[str, str], None]] = on_lost if on_lost is not None else []
        # Called with (network, channel id) while a watched deposit is not on the chain, and when it is lost.
        self.on_deposit_gone: list[Callable[[str, str], Awaitable[None]]] = (
            on_deposit_gone if on_deposit_gone is not None else []
        )
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
        self.sent_again = 0  # watched transactions sent again as they were signed
        self.lost = 0

    def __repr__(self) -> str:
        return f"FinalityTracker(network={self.network!r}, finality={self.finality!r}, depth={self.depth})"

    # -------------------------------------------------------------------------------------------- the inbox

    def track(self, key: str, asset: str, calldata: bytes, valid_before: int, tx_hash: str) -> None:
        """A settlement was confirmed: watch it until final. Never waits (the paid request is not slowed)."""
        self._enqueue(_Settled(key, asset, calldata, valid_before, tx_hash))

    def watch(self, kind: Literal["transfer", "deposit"], key: str, asset: str, tx_hash: str, what: Watched) -> None:
        """A transaction we may not settle again paid for something served (module docstring): watch it until
        final, count it if it is lost. Never waits; its sender, nonce and raw bytes are read before it is written."""
        deadline = int(time.time()) + self.watch_bound
        self._enqueue(_Settled(key, asset, b"", deadline, tx_hash, kind, what))

    def _enqueue(self, item: _Settled) -> None:
        if len(self._inbox) >= self.inbox_max:
            dropped = self._inbox.popleft()
            log.error("settlement journal backlog full: not watched", extra={"claim_key": dropped.key})
        self._inbox.append(item)
        if self._wake is not None:
            self._wake.set()

    async def _flush_inbox(self, *, read: bool = True) -> None:
        if read:  # not at shutdown: the entry matters more than what the chain would add to it
            await self._read_watched()
        while self._inbox:
            item = self._inbox[0]
            await self.journal.add(
                item.key,
                self.network,
                item.tx_hash,
                item.asset,
                item.calldata if item.watched is None else item.watched.encode(),
                item.valid_before,
                owner=self.owner,
                now=time.time(),
                lease=self.lease,
                kind=item.kind,
            )
            self._inbox.popleft()

    async def _read_watched(self) -> None:
        """Read each newly watched transaction's sender (recovered from its signature), nonce and signed bytes, and
        the chain's clock its ``watch_bound`` starts from (one round trip), once: a node that does not answer now, or
        a transaction whose bytes cannot be rebuilt (a blob transaction, a newer type), leaves them unread (that
        entry is then lost only at ``watch_bound``)."""
        unread = [i for i in self._inbox if i.watched is not None and not i.read]
        if not unread:
            return
        calls = [("eth_getTransactionByHash", [i.tx_hash]) for i in unread]
        try:
            *answers, latest = await self._rpc.batch([*calls, ("eth_getBlockByNumber", ["latest", False])])
        except ChainUnavailable:
            answers, latest = [None] * len(unread), None
        served_at = None
        with contextlib.suppress(ValueError, TypeError):
            served_at = hex_int(latest.get("timestamp")) if isinstance(latest, dict) else None
        for item, tx in zip(unread, answers, strict=True):
            item.read = True  # once: a flush is not held up by a node that does not know it
            if served_at:  # watch_bound runs on the chain's clock, as the pass compares it (ours: if it is silent)
                item.valid_before = served_at + self.watch_bound
            if item.watched is None or not isinstance(tx, dict):
                continue
            raw, sender = signed_by(tx, item.tx_hash)
            if raw and sender:  # the nonce and sender only as the signed bytes (hashed to the hash) hold them
                nonce = hex_int(tx.get("nonce"))
                # Kept to be sent again only when it is a transfer of ordinary size (MAX_RAW): a deposit is our
                # relayer's to send again, and a padded transfer would weigh on every pass until final.
                keep = raw if item.kind == "transfer" and len(raw) <= MAX_RAW else b""
                item.watched = replace(item.watched, sender=sender, nonce=nonce, raw=keep)

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
        await stop_all((self._task, *self._busy.values()))
        if self._inbox:
            # Shutting down right after serving: write what is still in memory, once, briefly.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_inbox(read=False), 2.0)
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
            if e.kind != "exact":
                await self._look_up_watched(e, receipts.get(e.tx_hash), known.get(e.tx_hash), head, chain_time)
                continue
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
            if self._dropped(e, head):
                await self._recover(e, auth, head, chain_time, dropped=True)

    def _dropped(self, e: JournalEntry, head: int) -> bool:
        """Its transaction is neither mined nor pending on this pass: gone for ``missing_passes`` passes yet?"""
        if e.block_number is not None and head < e.block_number:
            return False  # this node is behind the block the settlement was seen in: not evidence of a reorg
        passes = self._missing.get(e.key, 0) + 1
        self._missing[e.key] = passes
        if passes < self.missing_passes:
            return False
        self._missing.pop(e.key, None)
        return True

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
        if self._relayer is None:
            await self._lose(e, "this network has no relayer to settle it again")
            return
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

    # ----------------------------------------------------------- watched transactions (not ours to re-sign)

    async def _look_up_watched(self, e: JournalEntry, receipt: Any, known: Any, head: int, chain_time: int) -> None:
        """A watched transaction whose block is gone, or that was never placed (module docstring)."""
        what = Watched.decode(e.calldata)
        if what is None:
            await self._lose(e, "the journal entry is unreadable")
            return
        if isinstance(receipt, dict):
            self._missing.pop(e.key, None)
            if pays(receipt, e.asset, what):
                await self._place(e, e.tx_hash, receipt)
            else:  # mined again, and this time it reverted (or paid someone else): its nonce is spent
                await self._lose(e, "mined again without its transfer to us")
            return
        if e.kind == "deposit" and (e.block_number is None or head >= e.block_number):
            await self._deposit_gone(what.channel)  # no voucher is served on it while the chain does not hold it
        if isinstance(known, dict):
            self._missing.pop(e.key, None)  # pending: it may be mined yet
            return
        if self._dropped(e, head):
            await self._recover_watched(e, what, chain_time)

    async def _recover_watched(self, e: JournalEntry, what: Watched, chain_time: int) -> None:
        """Gone: lost once another transaction took its nonce; else sent again as it was signed, if we can; else
        waited for, until ``watch_bound`` after it was served (``valid_before``, on the chain's clock)."""
        if what.sender and what.nonce is not None:
            count, receipt = await self._rpc.batch(
                [("eth_getTransactionCount", [what.sender, "latest"]), ("eth_getTransactionReceipt", [e.tx_hash])]
            )
            if isinstance(receipt, dict):
                return  # mined meanwhile: the next pass places it
            if isinstance(count, RpcError):
                raise ChainUnavailable(f"network {self.network}: no account nonce for a watched transaction")
            if hex_int(count) > what.nonce:
                await self._lose(e, "its sender's nonce was used by another transaction")
                return
        if await self._send_again(e, what):
            self.sent_again += 1
            log.warning(
                "a served transaction dropped by a reorg: sent again as it was signed",
                extra={"network": self.network, "claim_key": e.key, "tx_hash": e.tx_hash},
            )
            await self.journal.update(
                e.key, self.owner, tx_hash=e.tx_hash, block_number=None, block_hash=None, now=time.time()
            )
            return
        if chain_time >= e.valid_before:
            await self._lose(e, f"gone, nothing to send again, and served over {self.watch_bound} s ago")
        # Otherwise waited for: its sender may send it again (or take its nonce: then it is lost, above).

    async def _send_again(self, e: JournalEntry, what: Watched) -> bool:
        """The very same signed transaction, again: a deposit through the relayer that signed it (if it still has
        it, and it would succeed), a payer's transfer from its checked raw bytes (its own signed intent, its own
        gas: whatever the chain makes of it, the receipt says and the next pass reads)."""
        if e.kind == "deposit":
            return self._relayer is not None and await self._relayer.rebroadcast(e.tx_hash)
        if not what.raw:
            return False
        try:
            await self._rpc.request("eth_sendRawTransaction", ["0x" + what.raw.hex()])
        except RpcError as exc:
            return _already_known(exc.message)  # it is pending again; any other refusal: it is not
        return True

    async def _deposit_gone(self, channel: str) -> None:
        for hook in self.on_deposit_gone:
            try:
                await hook(self.network, channel)
            except Exception:
                log.exception("deposit-gone hook failed")

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
        self._missing.pop(e.key, None)
        self.lost += 1
        log.error(
            _LOST.get(e.kind, _LOST["exact"]),
            extra={"network": self.network, "claim_key": e.key, "tx_hash": e.tx_hash, "why": why},
        )
        for hook in self.on_lost:
            try:
                hook(self.network, e.key)
            except Exception:
                log.exception("settlement-lost hook failed", extra={"network": self.network, "claim_key": e.key})
        if e.kind == "deposit":
            watched = Watched.decode(e.calldata)
            if watched is not None:
                await self._deposit_gone(watched.channel)


_LOST = {
    "exact": "settlement lost: a served request stays unpaid",
    "transfer": "tx-hash transfer lost: a served request stays unpaid",
    "deposit": "session deposit lost: vouchers served on it are not backed",
}


def _already_known(message: str) -> bool:
    """A node's refusal of a broadcast because it holds that very transaction already (geth, reth, erigon: "already
    known"; older geth: "known transaction"; nethermind: "AlreadyKnown"; anvil: "transaction already imported"), not
    just any message containing "known" ("unknown ...")."""
    return _ALREADY_KNOWN.search(message) is not None


_ALREADY_KNOWN = re.compile(r"\balready[ _]?known\b|\bknown transaction\b|\balready imported\b", re.IGNORECASE)


def _call(to: str, data: bytes) -> dict[str, Any]:
    return {"to": to, "data": "0x" + data.hex()}


def _word(result: Any) -> int:
    return int(result[2:66] or "0", 16) if isinstance(result, str) and result.startswith("0x") else 0


__all__ = [
    "Authorization",
    "FinalityTracker",
    "Journal",
    "JournalEntry",
    "Submitter",
    "executed_to_us",
    "reverted",
]
