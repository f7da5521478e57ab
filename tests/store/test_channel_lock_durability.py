"""The SQLite channel store's one write without fsync: taking a free lock (docs/sessions.md, "Durability").

What it protects: nothing that carries a charge is committed without fsync (a commit, a served charge, a fold, a
claim, an open or a sync), only the lock of a free channel is; that lock is still exclusive across processes, a
gateway process that dies with it leaves it in the file for the next request to take over (a process crash loses
no WAL write), and the charge committed under it survives a reopen of the file.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.storage.channels import Channel, ChannelBusy, OnChainState, SQLiteChannelStore
from tests.store.test_channel_store_contract import new_channel, sig

LEASE = 30.0


async def lock(
    store: SQLiteChannelStore, channel_id: str, holder: str, now: float, base: int = 0, **kw: Any
) -> Channel:
    return await store.begin(
        channel_id, holder, expected_charged=base, voucher_max=base + 10, signature=sig(base + 10), now=now,
        lease=LEASE, **kw,
    )  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteChannelStore]:
    s = SQLiteChannelStore(str(tmp_path / "channels.db"))
    try:
        yield s
    finally:
        await s.aclose()


def record_durability(store: SQLiteChannelStore) -> list[tuple[str, bool]]:
    """Every call the store hands its SQLite worker, with whether it asked to be committed with fsync."""
    calls: list[tuple[str, bool]] = []
    run: Callable[..., Any] = store._db.run

    async def spy(fn: Callable[..., Any], *args: object, durable: bool = True) -> Any:
        calls.append((fn.__name__.lstrip("_"), durable))
        return await run(fn, *args, durable=durable)

    store._db.run = spy  # type: ignore[method-assign]
    return calls


async def test_taking_a_free_lock_is_the_only_channel_write_committed_without_fsync(
    store: SQLiteChannelStore,
) -> None:
    now = time.time()
    ch = await store.open(new_channel(), now=now)
    calls = record_durability(store)
    await lock(store, ch.channel_id, "a", now)
    assert await store.served(ch.channel_id, "a", 10, now=now)
    assert await store.commit(ch.channel_id, "a", 10, now=now) is not None
    await lock(store, ch.channel_id, "b", now, base=10)
    assert await store.release(ch.channel_id, "b")
    await store.sync(ch.channel_id, OnChainState(balance=2_000_000, total_claimed=0), now=now)
    await store.record_claimed(ch.channel_id, 10, now=now)
    await store.fold(ch.channel_id, now=now)
    await store.open(new_channel(), now=now)
    without_fsync = [name for name, durable in calls if not durable]
    assert without_fsync == ["begin", "begin"]
    assert {name for name, durable in calls if durable} == {
        "served", "commit", "release", "sync", "record_claimed", "fold_lapsed", "open",
    }  # fmt: skip


async def test_a_begin_that_folds_a_lapsed_served_charge_commits_it_with_fsync(store: SQLiteChannelStore) -> None:
    now = time.time()
    ch = await store.open(new_channel(), now=now)
    await lock(store, ch.channel_id, "gone", now)
    assert await store.served(ch.channel_id, "gone", 10, now=now)  # its answer may have left: it owes 10
    calls = record_durability(store)
    locked = await lock(store, ch.channel_id, "next", now + LEASE + 1, base=10)  # the lease lapsed: fold first
    assert (locked.holder, locked.charged, locked.signed_max) == ("next", 10, 10)
    # Asked without fsync first, refused (nothing written), then made with fsync: the fold carries a charge.
    assert calls == [("begin", False), ("begin", True)]


def _race_for_the_lock(path: str, channel_id: str, attempts: int, barrier: Any, results: Any) -> None:
    """Child process: its own store on ``path``; after the barrier, ``attempts`` begins on one channel."""

    async def main() -> int:
        store = SQLiteChannelStore(path)
        await store.ping()
        barrier.wait()
        now = time.time()

        async def one(i: int) -> int:
            try:
                await lock(store, channel_id, f"{os.getpid()}.{i}", now)
            except ChannelBusy:
                return 0
            return 1

        try:
            return sum(await asyncio.gather(*(one(i) for i in range(attempts))))
        finally:
            await store.aclose()

    try:
        results.put(asyncio.run(main()))
    except Exception as exc:
        results.put(repr(exc))


async def test_a_lock_taken_without_fsync_is_exclusive_across_processes(
    store: SQLiteChannelStore, tmp_path: Path
) -> None:
    ch = await store.open(new_channel(), now=time.time())
    ctx = multiprocessing.get_context("spawn")
    procs, attempts = 4, 10
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    path = str(tmp_path / "channels.db")
    workers = [
        ctx.Process(target=_race_for_the_lock, args=(path, ch.channel_id, attempts, barrier, results))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    outcomes = [await asyncio.to_thread(results.get, True, 60) for _ in workers]
    for w in workers:
        await asyncio.to_thread(w.join, 10)
    assert all(isinstance(o, int) for o in outcomes), outcomes
    assert sum(outcomes) == 1, outcomes
    got = await store.get(ch.channel_id)
    assert got is not None and got.holder is not None and got.charged == 0


def _lock_then_die(path: str, channel_id: str, holder: str) -> None:
    """Child process: take the lock, then die at once (SIGKILL: no close, no cleanup, nothing flushed by us)."""

    async def main() -> None:
        store = SQLiteChannelStore(path)
        await lock(store, channel_id, holder, time.time())

    asyncio.run(main())
    os.kill(os.getpid(), signal.SIGKILL)


async def test_a_lock_outlives_the_process_that_died_with_it_and_its_successor_charge_survives_a_reopen(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "channels.db")
    store = SQLiteChannelStore(path)
    ch = await store.open(new_channel(), now=time.time())
    child = multiprocessing.get_context("spawn").Process(target=_lock_then_die, args=(path, ch.channel_id, "dead.1"))
    child.start()
    await asyncio.to_thread(child.join, 60)
    assert child.exitcode == -signal.SIGKILL
    try:
        # A process crash loses no WAL write: the lock is there, and refuses a second request...
        with pytest.raises(ChannelBusy) as busy:
            await lock(store, ch.channel_id, "live.1", time.time())
        assert busy.value.holder == "dead.1"
        # ...until the engine, seeing the holder's process gone, takes it over.
        await lock(store, ch.channel_id, "live.1", time.time(), take_over_from="dead.1")
        assert await store.commit(ch.channel_id, "live.1", 10, now=time.time()) is not None
    finally:
        await store.aclose()
    reopened = SQLiteChannelStore(path)
    try:
        got = await reopened.get(ch.channel_id)
        assert got is not None
        assert (got.charged, got.signed_max, got.signature, got.holder) == (10, 10, sig(10), None)
        await lock(reopened, ch.channel_id, "live.2", time.time(), base=10)  # and the channel goes on from it
    finally:
        await reopened.aclose()


async def test_a_voucher_on_a_channel_that_already_owes_appends_one_page_for_its_lock_and_one_for_its_charge(
    store: SQLiteChannelStore, tmp_path: Path
) -> None:
    """What a voucher costs the disk: every page a transaction changes is appended to the WAL, and the charge's
    fsync flushes them all. The channel's row is one page; its index on when it started owing changes only when that
    does, so a write leaving it as it was must not rewrite it (SQLite rewrites an index whose column an UPDATE names,
    even to its own value)."""
    now = time.time()
    ch = await store.open(new_channel(), now=now)
    await lock(store, ch.channel_id, "a", now)
    assert await store.commit(ch.channel_id, "a", 10, now=now) is not None  # starts owing: the index changes
    wal = tmp_path / "channels.db-wal"
    page = 4096 + 24  # a WAL frame: the page and its header

    async def frames(step: Callable[[], Any]) -> float:
        before = wal.stat().st_size
        await step()
        return (wal.stat().st_size - before) / page

    assert await frames(lambda: lock(store, ch.channel_id, "b", now + 1, base=10)) == 1
    assert await frames(lambda: store.commit(ch.channel_id, "b", 10, now=now + 1)) == 1
