"""How the stores of one process write to their shared SQLite file (gateway/storage/sqlite_file.py).

What it protects: a call commits without fsync only when it asks to, and a group of calls is committed with fsync
as soon as one of them needs it (a charge must never ride in a group that skipped the fsync); the writers of one
process on one file take turns on a lock of the process, so one never sleep-polls SQLite's lock while another of
the same process holds it, and still fails closed when the file stays taken past its busy timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.errors import StoreUnavailable
from gateway.storage.sqlite_file import SQLiteFile

SCHEMA = ("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID",)
FULL, NORMAL = 2, 1  # what PRAGMA synchronous reads as


def open_file(path: Path | str, *, busy_timeout: float = 5.0) -> SQLiteFile:
    return SQLiteFile(str(path), busy_timeout=busy_timeout, schema=SCHEMA, what="test store", thread="x402-test")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SQLiteFile]:
    file = open_file(tmp_path / "writes.db")
    try:
        yield file
    finally:
        await file.aclose()


def write(db: SQLiteFile, key: str) -> Callable[[], int]:
    """A call that writes ``key`` and answers the synchronous pragma its transaction commits with."""

    def call() -> int:
        def body(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT OR REPLACE INTO t (k, v) VALUES (?, 1)", (key,))
            return int(conn.execute("PRAGMA synchronous").fetchone()[0])

        return db.transaction(body)

    return call


def blocking(db: SQLiteFile, key: str, entered: threading.Event, release: threading.Event) -> Callable[[], int]:
    """A call that writes ``key`` and holds its transaction open until ``release`` is set."""

    def call() -> int:
        def body(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT OR REPLACE INTO t (k, v) VALUES (?, 1)", (key,))
            entered.set()
            assert release.wait(30)
            return 1

        return db.transaction(body)

    return call


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30)


async def test_only_a_call_that_asks_is_committed_without_fsync(db: SQLiteFile) -> None:
    assert await db.run(write(db, "a")) == FULL
    assert await db.run(write(db, "b"), durable=False) == NORMAL
    assert await db.run(write(db, "c")) == FULL  # the next call is durable again
    keys = await db.run(lambda: [k for (k,) in db.connection().execute("SELECT k FROM t ORDER BY k")])
    assert keys == ["a", "b", "c"]


async def test_a_group_is_committed_with_fsync_as_soon_as_one_of_its_calls_needs_it(db: SQLiteFile) -> None:
    entered, release = threading.Event(), threading.Event()
    holder = asyncio.ensure_future(db.run(blocking(db, "hold", entered, release)))
    await wait_for(entered)  # the worker is busy: what is queued now runs as one group
    mixed = [
        asyncio.ensure_future(db.run(write(db, "lock"), durable=False)),
        asyncio.ensure_future(db.run(write(db, "charge"))),
    ]
    await asyncio.sleep(0)
    release.set()
    await holder
    assert await asyncio.gather(*mixed) == [FULL, FULL]
    assert db.groups == 1

    entered.clear()
    release.clear()
    holder = asyncio.ensure_future(db.run(blocking(db, "hold", entered, release)))
    await wait_for(entered)
    light = [asyncio.ensure_future(db.run(write(db, f"lock{i}"), durable=False)) for i in range(3)]
    await asyncio.sleep(0)
    release.set()
    await holder
    assert await asyncio.gather(*light) == [NORMAL] * 3  # nothing in it needed the fsync
    assert db.groups == 2


async def test_a_writer_waits_for_another_of_its_process_before_it_touches_sqlites_lock(tmp_path: Path) -> None:
    # The two objects name one file differently: they still share the process's lock on it.
    first, second = open_file(tmp_path / "shared.db"), open_file(f"{tmp_path}/./shared.db")
    try:
        await second.run(write(second, "warm"))  # its connection is open: its statements can be traced
        statements: list[str] = []
        await second.run(lambda: second.connection().set_trace_callback(statements.append))
        entered, release = threading.Event(), threading.Event()
        holder = asyncio.ensure_future(first.run(blocking(first, "first", entered, release)))
        await wait_for(entered)
        waiting = asyncio.ensure_future(second.run(write(second, "second")))
        await asyncio.sleep(0.3)
        # Without the process's lock it would be in SQLite's busy handler by now, polling in 1-100 ms sleeps.
        assert not waiting.done()
        assert "BEGIN IMMEDIATE" not in statements
        release.set()
        await holder
        assert await waiting == FULL
        assert "BEGIN IMMEDIATE" in statements
        keys = await first.run(lambda: [k for (k,) in first.connection().execute("SELECT k FROM t ORDER BY k")])
        assert keys == ["first", "second", "warm"]
    finally:
        release.set()
        await first.aclose()
        await second.aclose()


async def test_a_writer_fails_closed_when_another_of_its_process_holds_the_file_past_the_busy_timeout(
    tmp_path: Path,
) -> None:
    first, second = open_file(tmp_path / "held.db"), open_file(tmp_path / "held.db", busy_timeout=0.3)
    entered, release = threading.Event(), threading.Event()
    try:
        await second.run(write(second, "warm"))
        holder = asyncio.ensure_future(first.run(blocking(first, "first", entered, release)))
        await wait_for(entered)
        with pytest.raises(StoreUnavailable):
            await second.run(write(second, "second"))
        release.set()
        await holder
        assert await second.run(write(second, "second")) == FULL  # and works again once the file is free
    finally:
        release.set()
        await first.aclose()
        await second.aclose()


def where(db: SQLiteFile, key: str) -> Callable[[], tuple[int, int]]:
    """A call that writes ``key`` and answers (the thread it ran on, its connection's wal_autocheckpoint)."""

    def call() -> tuple[int, int]:
        def body(conn: sqlite3.Connection) -> tuple[int, int]:
            conn.execute("INSERT OR REPLACE INTO t (k, v) VALUES (?, 1)", (key,))
            return threading.get_ident(), int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

        return db.transaction(body)

    return call


async def test_a_write_without_fsync_runs_on_the_event_loop_when_nothing_would_wait_and_never_checkpoints_there(
    db: SQLiteFile,
) -> None:
    loop_thread = threading.get_ident()
    worker, checkpoints = await db.run(where(db, "first"))  # durable: the worker (it also sets the file up)
    assert worker != loop_thread and checkpoints > 0
    assert await db.run(where(db, "lock"), durable=False) == (loop_thread, 0)
    assert (await db.run(where(db, "charge")))[0] == worker
    keys = await db.run(lambda: [k for (k,) in db.connection().execute("SELECT k FROM t ORDER BY k")])
    assert keys == ["charge", "first", "lock"]


async def test_a_write_without_fsync_goes_to_the_worker_when_another_process_holds_the_file(
    db: SQLiteFile, tmp_path: Path
) -> None:
    worker, _ = await db.run(where(db, "first"))
    other = sqlite3.connect(tmp_path / "writes.db", isolation_level=None)  # another process's writer, as SQLite sees it
    try:
        other.execute("BEGIN IMMEDIATE")
        waiting = asyncio.ensure_future(db.run(where(db, "lock"), durable=False))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # on the worker, in SQLite's busy handler: the loop is not held meanwhile
        other.execute("COMMIT")
        assert (await waiting)[0] == worker
    finally:
        other.close()


async def test_a_refusal_inside_a_write_on_the_event_loop_reaches_its_caller_and_writes_nothing(
    db: SQLiteFile,
) -> None:
    await db.run(where(db, "first"))

    def refused() -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO t (k, v) VALUES ('half', 1)")
            raise LookupError("no such channel")

        db.transaction(body)

    with pytest.raises(LookupError):
        await db.run(refused, durable=False)
    keys = await db.run(lambda: [k for (k,) in db.connection().execute("SELECT k FROM t ORDER BY k")])
    assert keys == ["first"]
