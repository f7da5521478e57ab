"""What the channel store alone costs a voucher: the floor under the session rows, measured in this run.

A voucher request on a known channel makes two channel-store operations (docs/sessions.md): ``begin`` (lock the
channel; committed without fsync) and ``commit`` (the charge; committed with fsync before the answer leaves). Here
both run back to back on a fresh SQLite store in this process, one channel, no HTTP, no signature check: what is
left of a session request's time once everything but its durable bookkeeping is taken away. ``fsync_us`` is one
durable SQLite commit of one row on the same disk, the part of ``commit`` no code can make faster.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import time
from pathlib import Path

import uvloop

from gateway.storage.channels.contract import Channel
from gateway.storage.channels.sqlite import SQLiteChannelStore

__all__ = ["channel_store_floor"]

_CHANNEL = Channel(
    channel_id="0x" + "11" * 32,
    chain_id=8453,
    payer="0x" + "22" * 20,
    payer_authorizer="0x" + "00" * 20,
    receiver="0x" + "33" * 20,
    receiver_authorizer="0x" + "44" * 20,
    token="0x" + "55" * 20,
    withdraw_delay=900,
    salt="0x" + "66" * 32,
    balance=10**12,
)
_PRICE = 1000


async def _cycles(path: Path, n: int) -> tuple[list[float], list[float]]:
    store = SQLiteChannelStore(str(path))
    begins: list[float] = []
    commits: list[float] = []
    try:
        await store.open(_CHANNEL, now=time.time())
        charged = 0
        for i in range(n):
            a = time.perf_counter()
            await store.begin(
                _CHANNEL.channel_id,
                f"bench.{i}",
                expected_charged=charged,
                voucher_max=charged + _PRICE,
                signature="0x" + "ab" * 65,
                now=time.time(),
                lease=60.0,
            )
            b = time.perf_counter()
            await store.commit(_CHANNEL.channel_id, f"bench.{i}", _PRICE, now=time.time())
            c = time.perf_counter()
            charged += _PRICE
            begins.append(b - a)
            commits.append(c - b)
    finally:
        await store.aclose()
    return begins, commits


def _fsync_commit(path: Path, n: int) -> list[float]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER)")
        times = []
        for i in range(n):
            a = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR REPLACE INTO t VALUES (1, ?)", (i,))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - a)
        return times
    finally:
        conn.close()


def channel_store_floor(tmp: Path, n: int = 2000) -> dict[str, float]:
    """Median microseconds of ``begin``, ``commit`` and both, and of one durable SQLite commit (see above)."""
    tag = os.urandom(4).hex()
    begins, commits = uvloop.run(_cycles(tmp / f"floor-{tag}.db", n))
    fsync = _fsync_commit(tmp / f"fsync-{tag}.db", min(n, 500))
    both = [b + c for b, c in zip(begins, commits, strict=True)]

    def us(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1e6, 1)

    return {
        "store_floor_begin_us": us(begins),
        "store_floor_commit_us": us(commits),
        "store_floor_voucher_us": us(both),
        "store_floor_fsync_us": us(fsync),
    }
