"""The worker-thread SQLite plumbing shared by every SQLite store (receipts, jobs, channels, ledger, ...).

Why each rule exists:

* One dedicated worker thread owns the connection: the event loop never waits on the file (a lock, an fsync, a
  checkpoint; one exception below), and the calls of one store object are serialised. A cancelled caller does not
  cancel the transaction already handed to that thread.
* The connection is opened lazily (on the first call, on the worker thread) with ``isolation_level=None``: no
  implicit transactions; each transition issues its own ``BEGIN IMMEDIATE``.
* ``busy_timeout``: a writer waits that long for another process's write lock, then fails closed.
* WAL mode: readers never wait for the writer. WAL needs shared memory between the processes: the file must be on
  a local disk, never on NFS/SMB.
* ``synchronous=FULL`` (per store, FULL everywhere today): in WAL mode ``NORMAL`` survives a crash of the
  *process* but may lose the last commits on power loss or an OS crash; a lost ``CONSUMED`` row would make a spent
  payment spendable once more after the reboot (a payment pays for one request, across restarts too). FULL costs
  one fsync per transition, which is cheap next to the settlement it guards.
* A call whose writes may be lost to an OS crash without harm can ask for no fsync (``run(..., durable=False)``:
  committed with ``synchronous=NORMAL``; a group is committed with fsync as soon as one of its calls needs it). It
  is never durable on its own, and never lost alone either: the WAL is an append-only log whose frames carry
  cumulative checksums, so recovery after an OS crash keeps the commits up to some point, in order; and the next
  commit with fsync, from any connection to the file, flushes every frame before its own. So a write without fsync
  can be lost only together with every later commit that was not synced either, never from under a durable one
  that followed it. Two such calls today: a session channel's lock (docs/sessions.md, "Durability") and a ledger
  entry in the receipt store's file (docs/operating.md, "Ledger").
* Every write is one ``BEGIN IMMEDIATE`` transaction, which takes the write lock *before* the row is read, so two
  processes (or two store objects in one process) cannot interleave a compare-and-set.
* One write transaction at a time per file in this process: the stores of one gateway share the file, each with a
  connection and worker thread of its own, and their writers first take a lock per file shared by the process
  (:func:`_write_lock`), then SQLite's (which stays the arbiter between processes). Without it they met only on
  SQLite's lock, whose busy handler waits by sleeping 1, 2, 5, 10 ms and more: a channel lock arriving while the
  ledger committed slept a millisecond or more for a lock freed a fraction of one later, and a writer that slept
  kept losing to those that did not (ledger writes waited hundreds of milliseconds under load). A thread waiting on
  the process's lock is woken as soon as it is released. It is held from ``BEGIN IMMEDIATE`` to the end of the
  transaction, and while a new connection is set up (the switch to WAL, the schema); never on the event loop.
* On ``sqlite3.Error`` the connection may be left mid-transaction or broken (disk full, I/O error): it is dropped
  and the next call starts afresh, so the store recovers once the file is usable again.
* A write that needs no fsync (``durable=False``) runs at once on the event loop, over a connection of its own, when
  nothing waits for it: no call of this store is queued or running on the worker, no write of this process holds
  the file, and SQLite's lock is free (asked with a timeout of 0). It commits without fsync, a WAL append of tens of
  microseconds, cheaper than the hop to the worker thread and back (a session voucher's lock, a ledger entry). That
  connection never checkpoints (``wal_autocheckpoint = 0``: the workers' connections do), so the loop never waits
  for a checkpoint's fsync; the exception: when its write is the first after a checkpoint that emptied the WAL, it
  restarts the log, and SQLite syncs the WAL's header then (one fdatasync per WAL cycle, about a thousand pages).
  Anything that would wait, or any SQLite error, sends the call to the worker thread, which gives the answer.
* Point reads by primary key (:meth:`SQLiteFile.read`) run on the event loop over a second, read-only connection:
  a WAL reader never waits for the writer, and a lookup in the page cache costs microseconds, far less than the
  hop to the worker thread and back. Anything that would wait (a busy or locked file, a table not created yet, an
  I/O error) falls back to the worker thread, whose answer (or ``StoreUnavailable``) is the one given.
* Group commit: calls that queue up while the worker is busy run together in one ``BEGIN IMMEDIATE`` transaction,
  each in a savepoint of its own (its compare-and-set sees the earlier calls' writes; its own failure rolls back
  only its own changes), and one ``COMMIT`` (one fsync) makes them all durable. No caller hears its answer before
  that commit; if the commit (or any SQLite call) fails, every call of the group fails and none took effect.
* Fail closed (a store that cannot answer cannot tell a first presentation from a replay): every ``sqlite3.Error``,
  and a call on a closed store, becomes :class:`gateway.errors.StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar, cast
from urllib.request import pathname2url

from gateway.errors import StoreUnavailable

__all__ = ["BUSY_TIMEOUT", "SQLiteFile"]

BUSY_TIMEOUT = 5.0  # seconds a write waits for another process's write lock before failing closed

# Held by the SQLiteFile objects on each file (weakly: a file nobody has open any more leaves no entry behind).
_WRITE_LOCKS: weakref.WeakValueDictionary[str, threading.RLock] = weakref.WeakValueDictionary()
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: str) -> threading.RLock:
    """The lock every :class:`SQLiteFile` of this process on ``path`` writes under (see the module docstring).
    Re-entrant: a transaction begun inside another on one thread fails in SQLite at once, as without it."""
    key = os.path.realpath(path)
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(key)
        if lock is None:
            lock = _WRITE_LOCKS[key] = threading.RLock()
        return lock


def _deliver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    """Worker thread: hand a call's result or exception to its caller's loop."""

    def settle() -> None:
        if fut.done():
            return
        ok, value = outcome
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(settle)


T = TypeVar("T")


class SQLiteFile:
    """One SQLite file used from one worker thread (see the module docstring).

    ``what`` names the store in errors (``"receipt store"`` -> ``"the receipt store is closed"``); ``schema`` is
    run on every new connection (``CREATE ... IF NOT EXISTS`` statements); ``thread`` prefixes the worker thread's
    name; ``synchronous`` is the store's durability pragma (every store uses FULL today), which every call gets
    unless it asks for none (``run(..., durable=False)``).
    """

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float,
        schema: Sequence[str],
        what: str,
        thread: str,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._schema = tuple(schema)
        self._what = what
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread)
        self._conn: sqlite3.Connection | None = None  # created, used and closed on the worker thread only
        self._reader: sqlite3.Connection | None = None  # event-loop thread only: point reads (see read)
        self._closed = False
        # (fn, args, loop, future, durable) handed from the event loop to the worker; deque appends/pops are atomic
        self._pending: collections.deque[tuple[Callable[..., Any], tuple[object, ...], Any, Any, bool]] = (
            collections.deque()
        )
        self._grouped = False  # worker thread: inside a group transaction (transaction() uses savepoints)
        self._durable = True  # worker thread: the call(s) running now commit with fsync
        self._synced: str | None = None  # worker thread: the connection's synchronous pragma, as last set
        self._lock = _write_lock(path)
        self._inline: sqlite3.Connection | None = None  # event-loop thread: writes without fsync (_try_inline)
        self._inline_thread: int | None = None  # the thread in an inline write now (the loop's), else None
        self._queued = 0  # calls handed to the worker and not answered yet (event-loop thread)
        self.groups = 0  # group transactions committed with more than one call (for tests and benchmarks)

    # -- worker-thread side ---------------------------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        """The connection, opened (with pragmas and schema) if there is none. Worker thread only (or inside an
        inline write, which has a connection of its own)."""
        if self._inline_thread is not None and self._inline_thread == threading.get_ident():
            assert self._inline is not None
            return self._inline
        if self._conn is None:
            # isolation_level=None: no implicit transactions; each transition issues its own BEGIN IMMEDIATE.
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                with self._writing():
                    self._wal(conn)
                    conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                    for statement in self._schema:
                        conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn, self._synced = conn, self._synchronous
        return self._conn

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold this process's write lock on the file (module docstring). Worker thread only. Fails as SQLite does
        when it stays taken for ``busy_timeout``."""
        if not self._lock.acquire(timeout=self._busy_timeout):
            raise sqlite3.OperationalError("database is locked (by another store of this process)")
        try:
            yield
        finally:
            self._lock.release()

    def _begin(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, to be committed with or without fsync as the call(s) running now need. Worker thread
        only, under :meth:`_writing`."""
        synchronous = self._synchronous if self._durable else "NORMAL"
        if synchronous != self._synced:
            conn.execute(f"PRAGMA synchronous = {synchronous}")  # SQLite refuses it inside a transaction
            self._synced = synchronous
        conn.execute("BEGIN IMMEDIATE")

    def _wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL. The switch takes the file's exclusive lock and SQLite's busy handler does not
        wait for it: connections opening a new file together get "database is locked" at once. Retry within the
        busy timeout (worker thread: the loop is not blocked); WAL is persistent, so later opens find it set."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def drop_connection(self) -> None:
        """Close the connection (if any); the next call opens a fresh one. Worker thread only."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction (a savepoint inside a group); roll back if it
        raises. Worker thread only (or inside an inline write: the process's write lock is held already)."""
        conn = self.connection()
        if conn is self._inline:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # (a failed COMMIT may have ended the transaction)
                    conn.execute("ROLLBACK")
                raise
            return result
        if self._grouped:
            conn.execute("SAVEPOINT call")
            try:
                result = body(conn)
            except sqlite3.OperationalError:
                raise  # the whole group fails (see _drain)
            except BaseException:
                conn.execute("ROLLBACK TO call")
                conn.execute("RELEASE call")
                raise
            conn.execute("RELEASE call")
            return result
        with self._writing():
            try:
                self._begin(conn)
                try:
                    result = body(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error:
                # The connection may be left mid-transaction or broken (disk full, I/O error): start afresh next time.
                self.drop_connection()
                raise
        return result

    def _drain(self) -> None:
        """Worker thread: run every queued call; several at once share one transaction (group commit)."""
        items = []
        while self._pending:
            items.append(self._pending.popleft())
        if not items:
            return
        if len(items) == 1:
            fn, args, loop, fut, self._durable = items[0]
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:  # handed to the caller
                outcome = (False, exc)
            finally:
                self._durable = True
            _deliver(loop, fut, outcome)
            return
        self._durable = any(durable for *_, durable in items)  # with fsync as soon as one call needs it
        try:
            outcomes = self._group(items)
        except sqlite3.Error as exc:
            outcomes = [(False, exc)] * len(items)  # nothing of the group took effect
        finally:
            self._durable = True
        for (_, _, loop, fut, _), outcome in zip(items, outcomes, strict=True):
            _deliver(loop, fut, outcome)

    def _group(
        self, items: list[tuple[Callable[..., Any], tuple[object, ...], Any, Any, bool]]
    ) -> list[tuple[bool, Any]]:
        """Worker thread: the calls of ``items`` in one transaction, each in a savepoint; their outcomes."""
        outcomes: list[tuple[bool, Any]] = []
        conn = self.connection()
        with self._writing():
            try:
                self._begin(conn)
                self._grouped = True
                try:
                    for fn, args, *_ in items:
                        # Each call in a savepoint of its own: its failure (a domain error, or a statement SQLite
                        # refused) undoes only its changes. Lock, I/O and similar failures end the group (below).
                        conn.execute("SAVEPOINT grouped")
                        try:
                            result = fn(*args)
                        except sqlite3.OperationalError:
                            raise
                        except BaseException as exc:  # that call's own outcome; the rest go on
                            conn.execute("ROLLBACK TO grouped")
                            conn.execute("RELEASE grouped")
                            outcomes.append((False, exc))
                            continue
                        conn.execute("RELEASE grouped")
                        outcomes.append((True, result))
                finally:
                    self._grouped = False
                conn.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                self.drop_connection()
                raise
        self.groups += 1
        return outcomes

    # -- event-loop side ------------------------------------------------------------------------------------

    def _try_inline(self, fn: Callable[..., T], args: tuple[object, ...]) -> tuple[bool, T | None]:
        """(True, ``fn(*args)``) run on the event loop at once, or (False, None): the call must go to the worker
        thread (see the module docstring). A domain error of ``fn`` is raised as the worker would deliver it."""
        if self._queued or not self._lock.acquire(blocking=False):
            return False, None
        try:
            conn = self._inline
            if conn is None:
                conn = self._inline = self._open_inline()
                if conn is None:
                    return False, None
            self._inline_thread = threading.get_ident()
            try:
                return True, fn(*args)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    self._drop_inline()  # not a lock held elsewhere: the connection may be unusable
                return False, None
            except sqlite3.Error:
                self._drop_inline()
                return False, None
            finally:
                self._inline_thread = None
                if self._inline is not None and self._inline.in_transaction:
                    self._drop_inline()  # its ROLLBACK failed: closing it is what gives SQLite's lock back
        finally:
            self._lock.release()

    def _open_inline(self) -> sqlite3.Connection | None:
        """The inline writer's connection, or None when the file is not ready for it (not in WAL mode yet: the
        worker's first connection sets that up, with the schema)."""
        try:
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return None
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                return conn
        except sqlite3.Error:
            pass
        conn.close()
        return None

    def _drop_inline(self) -> None:
        conn, self._inline = self._inline, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def run(self, fn: Callable[..., T], *args: object, durable: bool = True) -> T:
        """``fn(*args)`` on the worker thread (grouped with whatever else is queued, see the module docstring);
        any ``sqlite3.Error`` becomes ``StoreUnavailable``. A cancelled caller does not cancel the call.
        ``durable=False``: its transaction may commit without fsync (module docstring: only for writes whose loss to
        an OS crash, with everything after them that was not synced either, does no harm), and runs on the event
        loop at once when nothing would wait (module docstring)."""
        if self._closed:
            raise StoreUnavailable(f"the {self._what} is closed")
        if not durable:
            inline, result = self._try_inline(fn, args)
            if inline:
                return cast(T, result)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        item = (fn, args, loop, fut, durable)
        self._pending.append(item)
        self._queued += 1
        try:
            self._executor.submit(self._drain)
        except RuntimeError as exc:  # the executor was shut down under us
            self._queued -= 1
            with contextlib.suppress(ValueError):
                self._pending.remove(item)  # never to run: its caller hears "closed"
            raise StoreUnavailable(f"the {self._what} is closed") from exc
        fut.add_done_callback(self._answered)
        try:
            return await asyncio.shield(fut)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {self._what}: {type(exc).__name__}: {exc}") from exc

    def _answered(self, _fut: asyncio.Future[Any]) -> None:
        self._queued -= 1

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)``, a short read-only query (a lookup by key), answered on the event loop when the file
        lets it be at once; otherwise on the worker thread, as :meth:`run` (see the module docstring)."""
        if self._closed:
            raise StoreUnavailable(f"the {self._what} is closed")
        try:
            reader = self._reader
            if reader is None:
                # timeout=0: never wait on the loop; a busy file goes to the worker thread instead.
                uri = "file:" + pathname2url(self.path) + "?mode=ro"
                reader = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)
                reader.execute("PRAGMA query_only = ON")
                self._reader = reader
            return fn(reader)
        except sqlite3.Error:
            self._drop_reader()
        return await self.run(lambda: fn(self.connection()))

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(sqlite3.Error):
                reader.close()

    async def aclose(self) -> None:
        """Close the connection on its thread and stop the thread; later calls raise ``StoreUnavailable``."""
        if self._closed:
            return
        self._closed = True  # first: no call queued from here on can reopen what is being closed
        self._drop_reader()
        self._drop_inline()
        loop = asyncio.get_running_loop()
        try:
            # Behind every call already queued (one worker, first in first out): those finish, then the close.
            await loop.run_in_executor(self._executor, self.drop_connection)
        finally:
            self._executor.shutdown(wait=False)
