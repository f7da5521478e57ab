"""The channel-store contract (gateway/storage/channels/contract.py), run against SQLite and a real Redis.

What it protects: one request at a time per channel, across store objects (connections, processes); a charge
whose answer may have left is committed exactly once, even when its request's gateway vanished, and one that
never reached ``served`` is never charged; ``charged`` never decreases and never falls below what the chain says
was claimed; the claimer finds every channel that owes money, oldest debt first; nothing is lost across a
restart of the storage; a storage that cannot answer fails closed.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.errors import StoreUnavailable
from gateway.storage.channels import (
    MAX_AMOUNT,
    Channel,
    ChannelBusy,
    ChannelMismatch,
    ChannelStore,
    OnChainState,
    RedisChannelStore,
    SQLiteChannelStore,
    open_channel_store,
)
from tests.store.conftest import BACKENDS, SERVER_BACKENDS, StoreBackend, store_backend

LEASE = 30.0
CHAIN = 8453
PAYER = "0x" + "11" * 20
RECEIVER = "0x" + "22" * 20
TOKEN = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"


ChannelBackend = StoreBackend[ChannelStore]


@pytest.fixture(params=BACKENDS)
async def channel_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChannelBackend]:
    b = store_backend(request, tmp_path, SQLiteChannelStore, RedisChannelStore)
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture
def store(channel_backend: ChannelBackend) -> ChannelStore:
    return channel_backend.make()


@pytest.fixture
def now() -> float:
    return time.time()


def new_channel(chain_id: int = CHAIN, **mirror: int) -> Channel:
    return Channel(
        channel_id="0x" + uuid.uuid4().hex * 2,
        chain_id=chain_id,
        payer=PAYER,
        payer_authorizer=PAYER,
        receiver=RECEIVER,
        receiver_authorizer=RECEIVER,
        token=TOKEN,
        withdraw_delay=86400,
        salt="0x" + "00" * 32,
        balance=mirror.pop("balance", 1_000_000),
        **mirror,
    )


def sig(n: int) -> str:
    return "0x" + f"{n:x}".rjust(130, "0")


async def charge(store: ChannelStore, channel_id: str, amount: int, now: float, holder: str | None = None) -> Channel:
    """One whole request: begin at the stored base with a voucher of exactly base + amount, then commit."""
    holder = holder or uuid.uuid4().hex
    current = await store.get(channel_id)
    assert current is not None
    base = current.charged
    await store.begin(
        channel_id, holder, expected_charged=base, voucher_max=base + amount, signature=sig(base + amount),
        now=now, lease=LEASE,
    )  # fmt: skip
    done = await store.commit(channel_id, holder, amount, now=now)
    assert done is not None
    return done


async def begin(
    store: ChannelStore, ch: Channel, holder: str, now: float, *, base: int = 0, voucher: int = 100, **kw: str
) -> Channel:
    return await store.begin(
        ch.channel_id, holder, expected_charged=base, voucher_max=voucher, signature=sig(voucher), now=now,
        lease=LEASE, **kw,
    )  # fmt: skip


# -- open, get ---------------------------------------------------------------------------------------------------


async def test_store_satisfies_the_protocol(store: ChannelStore) -> None:
    assert isinstance(store, ChannelStore)
    await store.ping()


async def test_open_creates_once_and_keeps_what_was_charged(store: ChannelStore, now: float) -> None:
    ch = new_channel(total_claimed=0)
    assert await store.get(ch.channel_id) is None
    opened = await store.open(ch, now=now)
    assert opened == replace(ch, updated_at=now)
    assert await store.get(ch.channel_id) == opened
    charged = await charge(store, ch.channel_id, 5, now)
    # Opening again (another instance saw the same deposit, with a fresher read) changes nothing.
    again = await store.open(replace(ch, balance=2_000_000, charged=0, signed_max=0), now=now + 1)
    assert again == charged and again.charged == 5 and again.balance == 1_000_000 and again.signed_max == 5
    assert await store.get(ch.channel_id) == charged


async def test_a_new_record_is_unlocked_and_never_charged_below_what_was_claimed(
    store: ChannelStore, now: float
) -> None:
    ch = new_channel(total_claimed=40)
    opened = await store.open(replace(ch, charged=10, holder="h", held_until=now + LEASE, pending_charge=3), now=now)
    assert opened.charged == 40 and opened.unclaimed == 0
    assert (opened.holder, opened.pending_charge, opened.held_until) == (None, None, 0.0)
    await begin(store, ch, "a", now, base=40)  # not locked by the record it was opened from


# -- the life of a request -----------------------------------------------------------------------------------------


async def test_begin_served_commit_charges_once_and_stores_the_voucher(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    locked = await begin(store, ch, "a", now, voucher=100)
    assert locked.holder == "a" and locked.held_until == now + LEASE
    assert (locked.pending_max, locked.pending_signature, locked.pending_charge) == (100, sig(100), None)
    assert await store.get(ch.channel_id) == locked
    assert await store.served(ch.channel_id, "a", 30, now=now + 1)
    got = await store.get(ch.channel_id)
    assert got is not None and got.pending_charge == 30 and got.charged == 0
    done = await store.commit(ch.channel_id, "a", 30, now=now + 2)
    assert done is not None
    assert (done.charged, done.signed_max, done.signature, done.updated_at) == (30, 100, sig(100), now + 2)
    assert (done.holder, done.pending_max, done.pending_signature, done.pending_charge) == (None, 0, "", None)
    assert await store.get(ch.channel_id) == done
    # A repeated commit (its reply lost) writes nothing: the charge counts once.
    assert await store.commit(ch.channel_id, "a", 30, now=now + 3) is None
    assert await store.get(ch.channel_id) == done


async def test_release_unlocks_without_charging_or_storing_the_voucher(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await charge(store, ch.channel_id, 10, now)
    await begin(store, ch, "a", now, base=10, voucher=50)
    assert await store.served(ch.channel_id, "a", 5, now=now)
    assert await store.release(ch.channel_id, "a")
    after = await store.get(ch.channel_id)
    assert after is not None and after.charged == 10 and after.signed_max == 10 and after.signature == sig(10)
    assert (after.holder, after.pending_charge, after.pending_max) == (None, None, 0)
    assert not await store.release(ch.channel_id, "a")
    assert (await begin(store, ch, "b", now + 1, base=10)).holder == "b"


async def test_a_second_holder_is_busy_and_learns_who_holds_it(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await begin(store, ch, "a", now)
    for holder in ("b", "a"):  # the holder itself too: a holder names one request
        with pytest.raises(ChannelBusy) as busy:
            await begin(store, ch, holder, now + LEASE - 1)
        assert busy.value.holder == "a"
    got = await store.get(ch.channel_id)
    assert got is not None and got.holder == "a" and got.held_until == now + LEASE
    assert await store.release(ch.channel_id, "a")
    assert (await begin(store, ch, "b", now + 1)).holder == "b"


async def test_a_mismatched_base_carries_the_stored_channel_and_locks_nothing(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    stored = await charge(store, ch.channel_id, 25, now)
    for base in (0, 24, 26):
        with pytest.raises(ChannelMismatch) as mismatch:
            await begin(store, ch, "b", now + 1, base=base)
        assert mismatch.value.channel == stored
    assert await store.get(ch.channel_id) == stored
    assert (await begin(store, ch, "b", now + 1, base=25)).holder == "b"


async def test_an_unknown_channel_is_a_key_error_and_nothing_else_writes(store: ChannelStore, now: float) -> None:
    unknown = new_channel()
    with pytest.raises(KeyError):
        await begin(store, unknown, "a", now)
    assert not await store.served(unknown.channel_id, "a", 1, now=now)
    assert await store.commit(unknown.channel_id, "a", 1, now=now) is None
    assert not await store.release(unknown.channel_id, "a")
    assert await store.fold(unknown.channel_id, now=now) is None
    assert await store.sync(unknown.channel_id, OnChainState(balance=5, total_claimed=0), now=now) is None
    assert await store.record_claimed(unknown.channel_id, 5, now=now) is None
    assert await store.get(unknown.channel_id) is None
    assert await store.unclaimed(CHAIN, now=now, limit=10) == []


async def test_a_non_holder_can_neither_serve_commit_nor_release(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    locked = await begin(store, ch, "a", now)
    assert not await store.served(ch.channel_id, "b", 10, now=now + 1)
    assert await store.commit(ch.channel_id, "b", 10, now=now + 1) is None
    assert not await store.release(ch.channel_id, "b")
    assert await store.get(ch.channel_id) == locked
    assert await store.release(ch.channel_id, "a")
    unlocked = await store.get(ch.channel_id)
    assert not await store.served(ch.channel_id, "", 10, now=now + 1)  # no holder is nobody's to serve
    assert await store.commit(ch.channel_id, "", 10, now=now + 1) is None
    assert not await store.release(ch.channel_id, "")
    assert await store.get(ch.channel_id) == unlocked


async def test_a_charge_the_pending_voucher_does_not_cover_is_refused(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await charge(store, ch.channel_id, 10, now)
    locked = await begin(store, ch, "a", now, base=10, voucher=15)
    with pytest.raises(ValueError):
        await store.served(ch.channel_id, "a", 6, now=now)
    with pytest.raises(ValueError):
        await store.commit(ch.channel_id, "a", 6, now=now)
    assert await store.get(ch.channel_id) == locked  # nothing written
    done = await store.commit(ch.channel_id, "a", 5, now=now)
    assert done is not None and done.charged == 15 == done.signed_max


# -- a holder that vanished ----------------------------------------------------------------------------------------


async def test_a_lapsed_served_holder_is_committed_once_by_the_next_begin(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await begin(store, ch, "dead", now, voucher=70)
    assert await store.served(ch.channel_id, "dead", 70, now=now + 1)
    with pytest.raises(ChannelBusy):  # its lease is still live
        await begin(store, ch, "b", now + LEASE - 1, base=0)
    # The client saw its answer, so it builds on 70: the next begin folds the charge first, then locks.
    locked = await begin(store, ch, "b", now + LEASE, base=70, voucher=90)
    assert (locked.charged, locked.signed_max, locked.signature) == (70, 70, sig(70))
    assert locked.holder == "b" and locked.pending_max == 90
    # The vanished request comes back: it no longer holds the channel, and its charge is not counted again.
    assert not await store.served(ch.channel_id, "dead", 70, now=now + LEASE + 1)
    assert await store.commit(ch.channel_id, "dead", 70, now=now + LEASE + 1) is None
    done = await store.commit(ch.channel_id, "b", 20, now=now + LEASE + 2)
    assert done is not None and done.charged == 90


async def test_a_fold_stands_when_the_next_begin_is_a_mismatch(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await begin(store, ch, "dead", now, voucher=70)
    assert await store.served(ch.channel_id, "dead", 40, now=now)
    # A client that never saw the answer still builds on 0: refused, with the folded channel to resync from.
    with pytest.raises(ChannelMismatch) as mismatch:
        await begin(store, ch, "b", now + LEASE + 1, base=0)
    assert mismatch.value.channel.charged == 40 and mismatch.value.channel.holder is None
    assert await store.get(ch.channel_id) == mismatch.value.channel
    assert (await begin(store, ch, "b", now + LEASE + 2, base=40)).charged == 40  # folded once, not again


async def test_fold_commits_a_lapsed_served_charge_exactly_once(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await begin(store, ch, "dead", now, voucher=70)
    assert await store.served(ch.channel_id, "dead", 60, now=now)
    live = await store.fold(ch.channel_id, now=now + 1)
    assert live is not None and live.holder == "dead" and live.charged == 0  # a live holder is left alone
    folded = await store.fold(ch.channel_id, now=now + LEASE)
    assert folded is not None and (folded.charged, folded.signed_max, folded.holder) == (60, 70, None)
    assert await store.fold(ch.channel_id, now=now + LEASE + 1) == folded
    assert await store.commit(ch.channel_id, "dead", 60, now=now + LEASE + 1) is None
    assert await store.get(ch.channel_id) == folded


async def test_a_lapsed_holder_that_never_served_is_dropped_uncharged(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await charge(store, ch.channel_id, 10, now)
    await begin(store, ch, "dead", now, base=10, voucher=99)
    folded = await store.fold(ch.channel_id, now=now + LEASE)
    assert folded is not None and (folded.charged, folded.signed_max, folded.signature) == (10, 10, sig(10))
    assert folded.holder is None and folded.pending_max == 0
    await begin(store, ch, "dead2", now + LEASE, base=10, voucher=99)
    locked = await begin(store, ch, "b", now + 2 * LEASE, base=10, voucher=20)  # dropped by begin, too
    assert (locked.charged, locked.signed_max, locked.holder) == (10, 10, "b")


async def test_take_over_from_folds_only_the_named_holder(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await begin(store, ch, "dead", now, voucher=50)
    assert await store.served(ch.channel_id, "dead", 50, now=now)
    with pytest.raises(ChannelBusy):
        await begin(store, ch, "b", now + 1, base=50, take_over_from="someone-else")
    taken = await begin(store, ch, "b", now + 1, base=50, voucher=60, take_over_from="dead")
    assert (taken.charged, taken.holder, taken.held_until) == (50, "b", now + 1 + LEASE)
    with pytest.raises(ChannelBusy):  # "b" is live, whoever "dead" was
        await begin(store, ch, "c", now + 2, base=50, take_over_from="dead")


async def test_fold_never_charges_beyond_the_pending_voucher(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await begin(store, ch, "dead", now, voucher=50)
    assert await store.served(ch.channel_id, "dead", 40, now=now)
    # The chain says 30 was claimed (a store that lost writes): charged rises under the holder.
    await store.record_claimed(ch.channel_id, 30, now=now + 1)
    folded = await store.fold(ch.channel_id, now=now + LEASE)
    assert folded is not None and folded.charged == 50 and folded.signed_max == 50  # 30 + 20, what 50 covers


# -- the chain's view: sync, record_claimed, unclaimed -------------------------------------------------------------


async def test_sync_mirrors_the_chain_and_raises_charged_to_total_claimed(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await charge(store, ch.channel_id, 50, now)
    synced = await store.sync(
        ch.channel_id, OnChainState(balance=900, total_claimed=20, withdraw_requested_at=7, refund_nonce=2), now=now + 1
    )
    assert synced is not None and synced == await store.get(ch.channel_id)
    assert (synced.balance, synced.total_claimed, synced.withdraw_requested_at, synced.refund_nonce) == (900, 20, 7, 2)
    assert (synced.synced_at, synced.charged, synced.unclaimed) == (now + 1, 50, 30)
    raised = await store.sync(ch.channel_id, OnChainState(balance=900, total_claimed=80), now=now + 2)
    assert raised is not None and raised.charged == 80 and raised.unclaimed == 0
    # A reorganisation undid a claim: the chain's lower total is stored, charged never goes down.
    undone = await store.sync(ch.channel_id, OnChainState(balance=900, total_claimed=60), now=now + 3)
    assert undone is not None and (undone.total_claimed, undone.charged) == (60, 80)
    [owed] = await store.unclaimed(CHAIN, now=now + 3, limit=10)
    assert owed.channel_id == ch.channel_id and owed.owing_since == 0  # owed since before that claim: due at once


async def test_record_claimed_never_lowers_and_settles_the_debt(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await charge(store, ch.channel_id, 100, now)
    assert [c.channel_id for c in await store.unclaimed(CHAIN, now=now, limit=10)] == [ch.channel_id]
    part = await store.record_claimed(ch.channel_id, 40, now=now + 1)
    assert part is not None and (part.total_claimed, part.charged) == (40, 100)
    assert [c.unclaimed for c in await store.unclaimed(CHAIN, now=now + 1, limit=10)] == [60]
    lower = await store.record_claimed(ch.channel_id, 10, now=now + 2)
    assert lower is not None and lower.total_claimed == 40
    full = await store.record_claimed(ch.channel_id, 100, now=now + 3)
    assert full is not None and full.unclaimed == 0
    assert await store.unclaimed(CHAIN, now=now + 3, limit=10) == []
    beyond = await store.record_claimed(ch.channel_id, 120, now=now + 4)  # the chain knows more: charged follows
    assert beyond is not None and beyond.charged == 120 and beyond.unclaimed == 0


async def test_unclaimed_lists_what_is_owed_oldest_first(store: ChannelStore, now: float) -> None:
    channels = [await store.open(new_channel(), now=now) for _ in range(4)]
    other_chain = await store.open(new_channel(chain_id=137), now=now)
    settled = await store.open(new_channel(), now=now)
    for i, ch in enumerate(reversed(channels)):  # the last opened owes longest
        await charge(store, ch.channel_id, 5, now + i)
    await charge(store, other_chain.channel_id, 5, now)
    await charge(store, settled.channel_id, 5, now)
    await store.record_claimed(settled.channel_id, 5, now=now + 1)
    await charge(store, channels[-1].channel_id, 5, now + 10)  # owing more does not make a debt younger
    owed = [c.channel_id for c in await store.unclaimed(CHAIN, now=now + 10, limit=10)]
    assert owed == [c.channel_id for c in reversed(channels)]
    assert [c.channel_id for c in await store.unclaimed(CHAIN, now=now, limit=2)] == owed[:2]
    assert [c.channel_id for c in await store.unclaimed(137, now=now, limit=10)] == [other_chain.channel_id]
    assert await store.unclaimed(CHAIN, now=now, limit=0) == []


async def test_unclaimed_says_since_when_each_channel_owes_and_a_restart_keeps_it(
    channel_backend: ChannelBackend, now: float
) -> None:
    """The age ``claim_after`` bounds is the store's (gateway/engine/claimer.py): more charges keep it, a full claim
    ends it, and a new store object on the same storage (a restarted gateway) reads it."""
    store = channel_backend.make()
    ch = await store.open(new_channel(), now=now)
    await charge(store, ch.channel_id, 5, now + 1)
    await charge(store, ch.channel_id, 5, now + 7)
    restarted = channel_backend.make()
    [owed] = await restarted.unclaimed(CHAIN, now=now + 9, limit=10)
    assert owed.owing_since == pytest.approx(now + 1, abs=0.001)
    await restarted.record_claimed(ch.channel_id, 10, now=now + 10)
    assert await restarted.unclaimed(CHAIN, now=now + 11, limit=10) == []
    await charge(restarted, ch.channel_id, 5, now + 20)
    [again] = await restarted.unclaimed(CHAIN, now=now + 21, limit=10)
    assert again.owing_since == pytest.approx(now + 20, abs=0.001)


async def test_a_claim_that_leaves_a_debt_restarts_its_age(store: ChannelStore, now: float) -> None:
    """What a claim took was owed since then; what it left (charges made meanwhile) owes from the claim on, or a
    busy channel past ``claim_after`` once would be claimed on every pass from then on."""
    ch = await store.open(new_channel(), now=now)
    await charge(store, ch.channel_id, 5, now + 1)
    await charge(store, ch.channel_id, 5, now + 50)
    await store.record_claimed(ch.channel_id, 5, now=now + 60)  # the claim covered the first charge only
    [left] = await store.unclaimed(CHAIN, now=now + 61, limit=10)
    assert left.owing_since == pytest.approx(now + 60, abs=0.001)
    await charge(store, ch.channel_id, 5, now + 70)
    seen = await store.sync(ch.channel_id, OnChainState(balance=1_000, total_claimed=10), now=now + 80)
    assert seen is not None and seen.unclaimed == 5  # another instance's claim, seen on the chain
    [still] = await store.unclaimed(CHAIN, now=now + 81, limit=10)
    assert still.owing_since == pytest.approx(now + 80, abs=0.001)
    await store.sync(ch.channel_id, OnChainState(balance=1_000, total_claimed=10), now=now + 90)
    [same] = await store.unclaimed(CHAIN, now=now + 91, limit=10)
    assert same.owing_since == pytest.approx(now + 80, abs=0.001)  # nothing more claimed: the age goes on


async def test_unclaimed_shows_a_served_holder_only_once_it_lapsed(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await begin(store, ch, "dead", now, voucher=30)
    assert await store.unclaimed(CHAIN, now=now + LEASE, limit=10) == []  # never served: nothing owed
    assert await store.served(ch.channel_id, "dead", 30, now=now)
    assert await store.unclaimed(CHAIN, now=now + 1, limit=10) == []  # live: its own commit will come
    [owed] = await store.unclaimed(CHAIN, now=now + LEASE, limit=10)
    assert owed.channel_id == ch.channel_id and owed.pending_charge == 30 and owed.holder == "dead"
    folded = await store.fold(ch.channel_id, now=now + LEASE)
    assert folded is not None and folded.unclaimed == 30
    assert [c.unclaimed for c in await store.unclaimed(CHAIN, now=now + LEASE, limit=10)] == [30]
    await store.record_claimed(ch.channel_id, 30, now=now + LEASE + 1)
    assert await store.unclaimed(CHAIN, now=now + LEASE + 1, limit=10) == []


# -- amounts -------------------------------------------------------------------------------------------------------


async def test_amounts_up_to_2_pow_53_are_exact_and_larger_ones_refused(store: ChannelStore, now: float) -> None:
    top = MAX_AMOUNT  # 9007199254740991: a double still holds it exactly, 2**53 + 1 it does not
    ch = await store.open(new_channel(balance=top, total_claimed=top - 3), now=now)
    assert ch.charged == top - 3
    locked = await begin(store, ch, "a", now, base=top - 3, voucher=top)
    assert locked.pending_max == top
    assert await store.served(ch.channel_id, "a", 1, now=now)
    done = await store.commit(ch.channel_id, "a", 2, now=now)
    assert done is not None and (done.charged, done.signed_max, done.balance) == (top - 1, top, top)
    await begin(store, ch, "dead", now, base=top - 1, voucher=top)
    assert await store.served(ch.channel_id, "dead", 1, now=now)
    folded = await store.fold(ch.channel_id, now=now + LEASE)
    assert folded is not None and folded.charged == top and folded.unclaimed == 3
    assert await store.get(ch.channel_id) == folded
    for bad in (top + 1, 2**64, -1):
        with pytest.raises(ValueError):
            await begin(store, ch, "b", now + LEASE, base=top, voucher=bad)
        with pytest.raises(ValueError):
            await store.sync(ch.channel_id, OnChainState(balance=bad, total_claimed=0), now=now)
        with pytest.raises(ValueError):
            await store.record_claimed(ch.channel_id, bad, now=now)
        with pytest.raises(ValueError):
            await store.open(new_channel(balance=bad), now=now)
    assert await store.get(ch.channel_id) == folded


# -- concurrency -----------------------------------------------------------------------------------------------------


async def test_fifty_concurrent_begins_have_exactly_one_winner(channel_backend: ChannelBackend, now: float) -> None:
    stores = [channel_backend.make() for _ in range(5)]
    for s in stores:
        await s.ping()  # connections (and worker threads) up before the race
    ch = await stores[0].open(new_channel(), now=now)
    barrier = asyncio.Barrier(50)

    async def attempt(i: int) -> str:
        await barrier.wait()
        try:
            await begin(stores[i % len(stores)], ch, f"h{i}", now)
        except ChannelBusy:
            return "busy"
        return f"h{i}"

    outcomes = await asyncio.gather(*(attempt(i) for i in range(50)))
    winners = [o for o in outcomes if o != "busy"]
    assert len(winners) == 1 and outcomes.count("busy") == 49
    got = await stores[1].get(ch.channel_id)
    assert got is not None and got.holder == winners[0]


async def test_interleaved_requests_from_two_stores_charge_exactly_the_sum(
    channel_backend: ChannelBackend, now: float
) -> None:
    stores = [channel_backend.make(), channel_backend.make()]
    ch = await stores[0].open(new_channel(balance=10**9), now=now)
    rng = random.Random(402)
    committed: list[int] = []

    async def requests(store: ChannelStore, name: str, count: int) -> None:
        base = 0
        done = 0
        while done < count:
            amount = rng.randint(1, 9)
            holder = f"{name}.{done}.{uuid.uuid4().hex}"
            try:
                await begin(store, ch, holder, now, base=base, voucher=base + amount)
            except ChannelMismatch as exc:  # the other store charged meanwhile: resync, as a client does
                base = exc.channel.charged
                continue
            except ChannelBusy:
                await asyncio.sleep(0)
                continue
            if done % 2:
                assert await store.served(ch.channel_id, holder, amount, now=now)
            result = await store.commit(ch.channel_id, holder, amount, now=now)
            assert result is not None
            committed.append(amount)
            base = result.charged
            done += 1

    await asyncio.gather(requests(stores[0], "a", 100), requests(stores[1], "b", 100))
    final = await stores[0].get(ch.channel_id)
    assert len(committed) == 200
    assert final is not None and final.charged == sum(committed) == final.signed_max and final.holder is None


# -- restart and outage ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channel_backend", SERVER_BACKENDS, indirect=True)
async def test_everything_survives_a_restart_of_the_storage(channel_backend: ChannelBackend, now: float) -> None:
    store = channel_backend.make()
    idle = await store.open(new_channel(), now=now)
    idle = await charge(store, idle.channel_id, 12, now)
    held = await store.open(new_channel(), now=now)
    await begin(store, held, "dead", now, voucher=40)
    assert await store.served(held.channel_id, "dead", 40, now=now)
    held = await store.get(held.channel_id) or held
    owed = await store.unclaimed(CHAIN, now=now + LEASE, limit=10)

    await store.aclose()
    channel_backend.restart()
    after = channel_backend.make()

    assert await after.get(idle.channel_id) == idle
    assert await after.get(held.channel_id) == held
    assert await after.unclaimed(CHAIN, now=now + LEASE, limit=10) == owed
    with pytest.raises(ChannelBusy):
        await begin(after, held, "b", now + 1)
    locked = await begin(after, held, "b", now + LEASE, base=40, voucher=50)
    assert locked.charged == 40 and locked.signed_max == 40


@pytest.mark.parametrize("channel_backend", SERVER_BACKENDS, indirect=True)
async def test_a_storage_that_cannot_answer_fails_closed_then_recovers(
    channel_backend: ChannelBackend, now: float
) -> None:
    store = channel_backend.down()
    ch = new_channel()
    try:
        calls = {
            "ping": store.ping,
            "get": lambda: store.get(ch.channel_id),
            "open": lambda: store.open(ch, now=now),
            "sync": lambda: store.sync(ch.channel_id, OnChainState(balance=1, total_claimed=0), now=now),
            "begin": lambda: begin(store, ch, "a", now),
            "served": lambda: store.served(ch.channel_id, "a", 1, now=now),
            "commit": lambda: store.commit(ch.channel_id, "a", 1, now=now),
            "release": lambda: store.release(ch.channel_id, "a"),
            "fold": lambda: store.fold(ch.channel_id, now=now),
            "unclaimed": lambda: store.unclaimed(CHAIN, now=now, limit=10),
            "record_claimed": lambda: store.record_claimed(ch.channel_id, 1, now=now),
        }
        for name, call in calls.items():
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - t0 < 3, name
    finally:
        channel_backend.up()
    # The same object works once the storage is back.
    await store.open(ch, now=now)
    assert (await begin(store, ch, "a", now)).holder == "a"


async def test_a_closed_store_fails_closed(store: ChannelStore, now: float) -> None:
    ch = await store.open(new_channel(), now=now)
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await begin(store, ch, "a", now)
    with pytest.raises(StoreUnavailable):
        await store.get(ch.channel_id)
    await store.aclose()  # idempotent


async def test_open_channel_store_picks_the_backend_from_the_url(tmp_path: Path, redis_url: str) -> None:
    on_file = open_channel_store(f"sqlite:///{tmp_path}/store.db")
    on_redis = open_channel_store(redis_url)
    try:
        assert isinstance(on_file, SQLiteChannelStore) and isinstance(on_redis, RedisChannelStore)
        await on_file.ping()
        await on_redis.ping()
    finally:
        await on_file.aclose()
        await on_redis.aclose()
