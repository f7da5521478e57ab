"""Attacks and faults on how a SQLite store tells a dead gateway process from a live one (gateway/storage/liveness.py,
docs/threat-model.md T31).

Two ways to get it wrong, both with real processes killed with SIGKILL: a dead process taken for alive (its paid
claims answer 409 until its heartbeat's time runs out, however far a clock step put that), and a live process taken
for dead (its paid claims taken over while it still serves them: one payment, two requests served)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from gateway.storage import SQLiteReceiptStore
from gateway.storage.liveness import ProcessLocks
from tests.support.processes import python_process

HOUR = 3600.0

# A gateway process as the store sees it: it heartbeats ``instance`` and lives on until killed. Its heartbeat lasts
# an hour: what a dead process's last heartbeat looks like to a reader whose clock stepped back an hour.
_PROCESS = """
import asyncio, sys, time
from gateway.storage import SQLiteReceiptStore

async def main() -> None:
    where, instance = sys.argv[1:3]
    store = SQLiteReceiptStore(where)
    await store.heartbeat(instance, now=time.time(), ttl=3600.0)
    print("beating", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _process(database: str, instance: str) -> subprocess.Popen[str]:
    return python_process(_PROCESS, database, instance, ready="beating")


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=10)


async def test_every_claim_of_a_killed_process_finds_it_dead_not_only_the_first(tmp_path: Path) -> None:
    """A killed process usually held several paid claims. The first retry found it dead by its free lock file and
    removed the file; every later one then asked the heartbeat alone, whose time (an hour here, the size of the
    clock's step after a step back) kept the dead process "alive": those payers got 409 until then."""
    database = str(tmp_path / "receipts.db")
    store = SQLiteReceiptStore(database)
    proc = _process(database, "crashed")
    try:
        assert await store.alive("crashed", now=time.time())
        _kill(proc)
        assert not await store.alive("crashed", now=time.time())  # the first claim's retry
        assert not await store.alive("crashed", now=time.time()), "the second claim's retry: revived by its heartbeat"
        again = SQLiteReceiptStore(database)  # another process of the same host asks as well
        try:
            assert not await again.alive("crashed", now=time.time())
        finally:
            await again.aclose()
    finally:
        _kill(proc)
        await store.aclose()


async def test_a_process_starting_after_a_crash_does_not_revive_the_dead_one(tmp_path: Path) -> None:
    """The gateway restarted after the kill: its first heartbeat clears the lock files of dead processes. Those
    processes must stay dead, not fall back to a heartbeat whose time says they live for another hour."""
    database = str(tmp_path / "receipts.db")
    proc = _process(database, "crashed")
    _kill(proc)
    restarted = SQLiteReceiptStore(database)
    try:
        await restarted.heartbeat("restarted", now=time.time(), ttl=15.0)  # sweeps the dead one's file away
        assert not await restarted.alive("crashed", now=time.time()), "revived by the sweep of its lock file"
    finally:
        await restarted.aclose()


async def test_a_live_process_sharing_a_dead_ones_instance_name_stays_alive(tmp_path: Path) -> None:
    """Workers forked from one master after the app was built (``gunicorn --preload``) share the engine's instance
    name. Only one of them could lock ``<instance>.lock``; once that one died (a worker recycled, the OOM killer),
    the file was free and every other gateway process took its live siblings for dead too: their paid claims were
    taken over while they were still serving them."""
    database = str(tmp_path / "receipts.db")
    first = _process(database, "shared")
    second = _process(database, "shared")
    other = SQLiteReceiptStore(database)  # a gateway process of its own, with another name
    try:
        await other.heartbeat("other", now=time.time(), ttl=15.0)
        _kill(first)
        assert await other.alive("shared", now=time.time()), "a live worker was taken for dead with its sibling"
        _kill(second)
        assert not await other.alive("shared", now=time.time())  # now every process of that name is gone
    finally:
        _kill(first)
        _kill(second)
        await other.aclose()


def test_a_lock_file_never_appears_unlocked(tmp_path: Path) -> None:
    """A lock file takes its name only once its process holds it: a process that looks at it in the instant
    between its creation and its lock must not find a live process dead. Nothing but ``*.lock`` files held by
    their process are ever found under the directory while processes start."""
    database = str(tmp_path / "store.db")
    locks = [ProcessLocks(database) for _ in range(20)]
    checker = ProcessLocks(database)
    try:
        for i, lock in enumerate(locks):
            lock.hold(f"p{i}")
            assert not checker.gone(f"p{i}")
        names = [p.name for p in (tmp_path / "store.db.instances").iterdir()]
        assert len(names) == 20 and all(n.endswith(".lock") for n in names)
    finally:
        for lock in locks:
            lock.close()
        checker.close()
