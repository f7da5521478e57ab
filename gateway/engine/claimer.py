"""The claimer: session charges turned into money on chain, in batches, before any payer can take them back.

Every ``claim_interval`` seconds, per network (docs/sessions.md):

1. read ``WithdrawInitiated`` logs since the last pass (a fresh process: since one withdrawal delay ago), in the
   block ranges the node accepts: such a channel is refreshed from the chain and claimed on this pass, whatever
   its size (the payer can take the unclaimed balance once the delay ends);
2. pick the channels that are due: more than ``max_unclaimed_per_channel`` owed, owed for longer than
   ``claim_after`` (since when, the channel store records: a restart does not start that clock again),
   withdrawing, or all of them when the total owed passes ``max_unclaimed_total``; a channel whose request died
   after its answer left is folded first (its charge committed);
3. claim them with ``claimWithSignature`` (the receiver authorizer signs the batch), as many per transaction as
   fit ``max_claim_gas`` by the measured gas per voucher; a batch whose simulation fails is split and the
   channel that would revert (drained by a withdrawal, say) is dropped, never the whole batch;
4. every ``settle_interval``, sweep what was claimed to ``pay_to`` with ``settle``.

Claims are idempotent on chain (a claim sets a channel's ``totalClaimed``; claiming a total again moves
nothing), so a crash or a second gateway instance claiming the same channel can cost gas, never money.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace

from eth_utils.address import to_checksum_address

from gateway.chain.rpc import RpcError
from gateway.config import SessionsConfig
from gateway.engine.sessions import Sessions
from gateway.errors import GatewayError, SettlementFailed, StoreUnavailable
from gateway.schemes.batch.onchain import SETTLE, ChannelChain, VoucherClaim, claim_calldata
from gateway.storage.channels import Channel
from gateway.tasks import stop
from gateway.x402.sessions import ChannelConfig, claim_batch_digest

log = logging.getLogger("gateway.sessions")

__all__ = ["Claimer", "ClaimerStats"]

_BATCH_OVERHEAD_GAS = 60_000  # the transaction and the batch signature, before any voucher
_SCAN = 1000  # channels read per pass and network
_MAX_ROWS = 200  # claim rows per transaction: ~482 bytes each, well under the 128 KiB nodes accept
# Withdrawal logs are read in block ranges: hosted nodes cap eth_getLogs (10 blocks on some free tiers, 10,000 on
# others), so a range the node refuses is halved until it answers, and the catch-up after a start goes on over the
# next passes (each reads at most _LOG_READS ranges, oldest first: the oldest withdrawal ends first).
_LOG_SPAN = 2_000
_LOG_READS = 50
# Blocks read again on every pass behind where the last pass ended: a reorg can place a withdrawal in a block that was
# already read (deeper than any reorg seen on Base; Polygon's deepest known was ~160 blocks).
_REORG_REREAD = 256
_LOOKBACK_SAMPLE = 1_000  # blocks whose timestamps measure the block time (how far back a withdrawal delay reaches)


@dataclass
class ClaimerStats:
    passes: int = 0
    claim_transactions: int = 0
    vouchers_claimed: int = 0
    value_claimed: int = 0  # atomic units moved from channels to the receiver's claimed balance
    dropped: int = 0  # channels left out of a batch because their claim would revert
    settlements: int = 0
    gas_per_voucher: int = 0  # the last measurement
    last_claim_tx: str = ""
    withdrawals_seen: int = 0
    failures: int = 0
    unclaimed_value: int = 0  # owed to us and not claimed yet, all networks (as of the last pass)
    channels_owing: int = 0
    errors: list[str] = field(default_factory=list)


class Claimer:
    def __init__(self, sessions: Sessions, config: SessionsConfig) -> None:
        self.sessions = sessions
        self.config = config
        self.stats = ClaimerStats()
        self._task: asyncio.Task[None] | None = None
        self._from_block: dict[str, int] = {}
        self._log_span: dict[str, int] = {}  # network -> blocks per eth_getLogs the node accepts
        self._urgent: dict[str, set[str]] = {}  # network -> channel ids with a withdrawal pending
        self._last_settle = 0.0
        self._lock = asyncio.Lock()  # one pass at a time (the loop, or an operator's "claim now")
        self._gas_per_voucher = config.claim_gas_per_voucher
        self._landed: set[str] = set()  # channels whose claim landed during this pass
        self._stuck: dict[str, tuple[int, float]] = {}  # channel -> (claims that would revert, next try at)
        # network -> how many channels of its last scan could not be claimed then (pausing after a claim that would
        # revert, or owing more than is left in them): the next scan reads that many more, so that such channels,
        # the oldest debts and so the first rows, never hold the scan and keep every channel behind them unclaimed.
        self._blocked: dict[str, int] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="x402-session-claimer")

    async def aclose(self) -> None:
        await stop(self._task)
        self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.claim_interval)
            try:
                await self.run_once()
            except Exception:  # never let one failure end the claims: the next pass tries again
                self.stats.failures += 1
                log.warning("a claim pass failed", exc_info=True)

    async def run_once(self, *, everything: bool = False, now: float | None = None) -> ClaimerStats:
        """One pass over every network; ``everything``: claim every channel that owes anything, and sweep."""
        async with self._lock:
            now = time.time() if now is None else now
            owed = owing = 0
            for name, chain in self.sessions.chains.items():
                try:
                    await self._watch_withdrawals(name, chain, now)
                except Exception:  # whatever the watcher met, the claims below still run
                    self.stats.failures += 1
                    log.warning("the withdrawal watcher failed on %s", name, exc_info=True)
                left = await self._claim(name, chain, now, everything=everything)
                owed, owing = owed + sum(ch.unclaimed for ch in left), owing + len(left)
            self.stats.unclaimed_value, self.stats.channels_owing = owed, owing
            if everything or now - self._last_settle >= self.config.settle_interval:
                await self.sweep()
                self._last_settle = now
            self.stats.passes += 1
            return self.stats

    # ------------------------------------------------------------------------------------------- withdrawals

    async def _watch_withdrawals(self, name: str, chain: ChannelChain, now: float) -> None:
        try:
            head = await chain.head()
            start = self._from_block.get(name)
            if start is None:
                start = self._from_block[name] = await self._first_block(chain, head)
            else:
                start = max(0, start - _REORG_REREAD)  # recording a withdrawal twice is harmless
            for _ in range(_LOG_READS):
                if start > head:
                    return
                span = self._log_span.get(name, _LOG_SPAN)
                last = min(head, start + span - 1)
                try:
                    ids = await chain.withdrawals_between(start, last)
                except RpcError:
                    if span == 1:
                        raise
                    self._log_span[name] = span // 2  # the node caps the range: ask for less
                    continue
                await self._record_withdrawals(name, chain, ids, now)
                # Only once every withdrawal read is recorded: one the store (or the chain) failed to take is read
                # again on the next pass; skipped, it would let the payer take back every charge not claimed yet.
                start = self._from_block[name] = last + 1
        except (GatewayError, RpcError):
            log.warning("could not read withdrawal logs on %s; trying again next pass", name)

    async def _first_block(self, chain: ChannelChain, head: int) -> int:
        """Where a process starts reading withdrawals: a withdrawal delay back (one started earlier can already be
        finalized), measured in blocks by the chain's recent block time."""
        sample = min(head, _LOOKBACK_SAMPLE)
        if sample == 0:
            return 0
        elapsed = await chain.block_time(head) - await chain.block_time(head - sample)
        if elapsed <= 0:
            return 0
        return max(0, head - math.ceil(self.config.withdraw_delay * 1.25 * sample / elapsed))

    async def _record_withdrawals(self, name: str, chain: ChannelChain, ids: list[str], now: float) -> None:
        urgent = self._urgent.setdefault(name, set())
        store = self.sessions.store
        for cid in ids:
            # The contract is shared: most withdrawals are other receivers' channels. Only ours are read, and a
            # channel the store cannot take (say an amount beyond what it computes exactly) is marked urgent all
            # the same, never allowed to stop the pass (docs/threat-model.md T46).
            if await store.get(cid) is None:
                continue
            if cid not in urgent:
                self.stats.withdrawals_seen += 1
            urgent.add(cid)
            try:
                await store.sync(cid, await chain.state(cid), now=now)
            except (ValueError, RpcError):
                log.warning("could not refresh a withdrawing channel; claiming it as it is")

    # ------------------------------------------------------------------------------------------------ claims

    def _due(self, ch: Channel, now: float, total: int, urgent: set[str], everything: bool) -> bool:
        cfg = self.config
        return (
            everything
            or ch.channel_id in urgent
            or ch.withdraw_requested_at > 0
            or ch.unclaimed >= cfg.max_unclaimed_per_channel
            or total >= cfg.max_unclaimed_total
            # the store's age (kept across restarts); a channel read without one is here as urgent, due anyway
            or now - (now if ch.owing_since is None else ch.owing_since) >= cfg.claim_after
        )

    async def _claim(self, name: str, chain: ChannelChain, now: float, *, everything: bool) -> list[Channel]:
        """Claim what is due on one network; returns the channels still owing afterwards."""
        store = self.sessions.store
        chain_id = chain.rpc.chain_id
        self._landed.clear()
        owed = await store.unclaimed(chain_id, now=now, limit=_SCAN + self._blocked.get(name, 0))
        folded: list[Channel] = []
        for owing in owed:
            lapsed = owing.holder is not None and owing.held_until <= now
            refolded = await store.fold(owing.channel_id, now=now) if lapsed else None
            folded.append(owing if refolded is None else replace(refolded, owing_since=owing.owing_since))
        total = sum(max(ch.unclaimed, 0) for ch in folded)
        urgent = self._urgent.get(name, set())
        for cid in urgent - {ch.channel_id for ch in folded}:  # withdrawing channels beyond the scan come too
            ch = await store.get(cid)
            if ch is not None and ch.unclaimed > 0:
                folded.append(ch)
        due = [
            ch
            for ch in folded
            if self._claimable(ch) > ch.total_claimed
            and ch.signature
            and self._stuck.get(ch.channel_id, (0, 0.0))[1] <= now
            and self._due(ch, now, total, urgent, everything)
        ]
        due.sort(key=lambda ch: ch.channel_id not in urgent)  # withdrawing channels first
        per_tx = max(1, (self.config.max_claim_gas - _BATCH_OVERHEAD_GAS) // max(self._gas_per_voucher, 1))
        per_tx = min(per_tx, _MAX_ROWS)  # a transaction's size is capped by nodes too (128 KiB on geth)
        for i in range(0, len(due), per_tx):
            await self._send_batch(chain, due[i : i + per_tx])
        self._blocked[name] = sum(
            1
            for ch in folded
            if self._stuck.get(ch.channel_id, (0, 0.0))[1] > now or self._claimable(ch) <= ch.total_claimed
        )
        for ch in due:
            urgent.discard(ch.channel_id)
        return [ch for ch in folded if ch.unclaimed > 0 and ch.channel_id not in self._landed]

    @staticmethod
    def _claimable(ch: Channel) -> int:
        """What a claim can set ``totalClaimed`` to: what we charged, within the voucher and the balance (after a
        withdrawal took part of it, what is left is still claimed)."""
        return max(min(ch.charged, ch.signed_max, ch.balance), ch.total_claimed)

    def _entries(self, channels: list[Channel]) -> list[VoucherClaim]:
        return [
            VoucherClaim(
                _config_of(ch), ch.signed_max, bytes.fromhex(ch.signature.removeprefix("0x")), self._claimable(ch)
            )
            for ch in channels
        ]

    def _calldata(self, chain: ChannelChain, channels: list[Channel]) -> bytes:
        entries = self._entries(channels)
        digest = claim_batch_digest(
            [(ch.channel_id, e.max_claimable, e.total_claimed) for ch, e in zip(channels, entries, strict=True)],
            chain.rpc.chain_id,
        )
        return claim_calldata(entries, self.sessions.sign(digest))

    async def _send_batch(self, chain: ChannelChain, channels: list[Channel]) -> None:
        if not channels:
            return
        data = self._calldata(chain, channels)
        gas = await chain.estimate(data)
        if gas is None:
            if len(channels) == 1:
                # This channel's claim would revert (drained by a finished withdrawal, or claimed meanwhile): its
                # state is read again, and it is left out rather than holding up everyone else's, then tried again
                # after a growing pause so that it cannot hold the scan's front for ever.
                self.stats.dropped += 1
                ch = channels[0]
                failures = self._stuck.get(ch.channel_id, (0, 0.0))[0] + 1
                self._stuck[ch.channel_id] = (
                    failures,
                    time.time() + min(self.config.claim_interval * 2**failures, 86_400),
                )
                log.warning("a channel's claim would revert; refreshing it from the chain")
                with contextlib.suppress(GatewayError, RpcError, ValueError):
                    await self.sessions.store.sync(ch.channel_id, await chain.state(ch.channel_id), now=time.time())
                return
            half = len(channels) // 2
            await self._send_batch(chain, channels[:half])
            await self._send_batch(chain, channels[half:])
            return
        if gas > self.config.max_claim_gas and len(channels) > 1:
            half = len(channels) // 2
            await self._send_batch(chain, channels[:half])
            await self._send_batch(chain, channels[half:])
            return
        # What one more voucher costs, measured on this batch: it sizes the next batches.
        self._gas_per_voucher = max(1, (gas - _BATCH_OVERHEAD_GAS // 2) // len(channels))
        self.stats.gas_per_voucher = self._gas_per_voucher
        try:
            tx_hash, _receipt = await chain.send(data, gas + gas // 5)
        except (SettlementFailed, GatewayError) as exc:
            self.stats.failures += 1
            if len(channels) > 1 and not (isinstance(exc, SettlementFailed) and exc.unknown):
                # Refused by the node (too large, say) or reverted at inclusion: smaller batches, not the same again.
                half = len(channels) // 2
                await self._send_batch(chain, channels[:half])
                await self._send_batch(chain, channels[half:])
                return
            log.warning("a claim transaction failed (%s); the next pass tries again", exc.reason)
            return
        self.stats.claim_transactions += 1
        self.stats.last_claim_tx = tx_hash
        now = time.time()
        for ch in channels:
            try:
                await self.sessions.store.record_claimed(ch.channel_id, self._claimable(ch), now=now)
            except StoreUnavailable:
                log.warning("a landed claim could not be recorded; the chain's totalClaimed is read next time")
            self._landed.add(ch.channel_id)
            self._stuck.pop(ch.channel_id, None)
            self.stats.vouchers_claimed += 1
            self.stats.value_claimed += self._claimable(ch) - ch.total_claimed

    # ---------------------------------------------------------------------------------------------- sweeping

    async def sweep(self) -> None:
        """Move what was claimed for ``pay_to`` from the settlement contract to ``pay_to`` (one call per token)."""
        pay_to = to_checksum_address(self.sessions.config.payment.pay_to)
        for name, chain in self.sessions.chains.items():
            token = to_checksum_address(self.sessions.config.networks[name].usdc)
            try:
                if await chain.unsettled(pay_to, token) <= 0:
                    continue  # nothing to sweep: a settle would cost gas and move nothing
            except GatewayError:
                continue
            data = SETTLE.encode(pay_to, token)
            gas = await chain.estimate(data)
            if gas is None:
                continue
            try:
                await chain.send(data, gas + gas // 5)
            except GatewayError as exc:
                log.warning("sweeping claimed funds failed on %s (%s)", name, exc.reason)
                continue
            self.stats.settlements += 1


def _config_of(ch: Channel) -> ChannelConfig:
    return ChannelConfig(
        payer=ch.payer.lower(),
        payer_authorizer=ch.payer_authorizer.lower(),
        receiver=ch.receiver.lower(),
        receiver_authorizer=ch.receiver_authorizer.lower(),
        token=ch.token.lower(),
        withdraw_delay=ch.withdraw_delay,
        salt=ch.salt,
    )
