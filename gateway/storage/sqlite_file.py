"""The worker-thread SQLite plumbing shared by the SQLite receipt, job and idempotency stores.

Why each rule exists:

* One dedicated worker thread owns the connection: the event loop never blocks on the file, and the calls of one
  store object are serialised. A cancelled caller does not cancel the transaction already handed to that thread.
* The connection is opened lazily (on the first call, on the worker thread) with ``isolation_level=None``: no
  implicit transactions; each transition issues its own ``BEGIN IMMEDIATE``.
* ``busy_timeout``: a writer waits that long for another process's write lock, then fails closed.
* WAL mode: readers never wait for the writer. WAL needs shared memory between the processes: the file must be on
  a local disk, never on NFS/SMB.
* ``synchronous=FULL`` (per store, FULL everywhere today): in WAL mode ``NORMAL`` survives a crash of the
  *process* but may lose the last commits on power loss or an OS crash; a lost ``CONSUMED`` row would make a spent
  payment spendable once more after the reboot (a payment pays for one request, across restarts too). FULL costs
  one fsync per transition, which is cheap next to the settlement it guards.
* Every write is one ``BEGIN IMMEDIATE`` transaction, which takes the write lock *before* the row is read, so two
  processes (or two store objects in one process) cannot interleave a compare-and-set.
* On ``sqlite3.Error`` the connection may be left mid-transaction or broken (disk full, I/O error): it is dropped
  and the next call starts afresh, so the store recovers once the file is usable again.
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
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar
from urllib.request import pathname2url

from gateway.errors import StoreUnavailable

__all__ = ["BUSY_TIMEOUT", "SQLiteFile"]

BUSY_TIMEOUT = 5.0  # seconds a write waits for another process's write lock before failing closed


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
    name; ``synchronous`` is the store's durability pragma (every store uses FULL today).
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
        # (fn, args, loop, future) handed from the event loop to the worker; deque appends/pops are atomic
        self._pending: collections.deque[tuple[Callable[..., Any], tuple[object, ...], Any, Any]] = collections.deque()
        self._grouped = False  # worker thread: inside a group transaction (transaction() uses savepoints)
        self.groups = 0  # group transactions committed with more than one call (for tests and benchmarks)

    # -- worker-thread side ---------------------------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        """The connection, opened (with pragmas and schema) if there is none. Worker thread only."""
        if self._conn is None:
            # isolation_level=None: no implicit transactions; each transition issues its own BEGIN IMMEDIATE.
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                self._wal(conn)
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                for statement in self._schema:
                    conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

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
        raises. Worker thread only."""
        conn = self.connection()
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
        try:
            conn.execute("BEGIN IMMEDIATE")
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
            fn, args, loop, fut = items[0]
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:  # handed to the caller
                outcome = (False, exc)
            _deliver(loop, fut, outcome)
            return
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn = self.connection()
            conn.execute("BEGIN IMMEDIATE")
            self._grouped = True
            try:
                for fn, args, _, _ in items:
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
            self.groups += 1
        except sqlite3.Error as exc:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            self.drop_connection()
            outcomes = [(False, exc)] * len(items)  # nothing of the group took effect
        for (_, _, loop, fut), outcome in zip(items, outcomes, strict=True):
            _deliver(loop, fut, outcome)

    # -- event-loop side ------------------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the worker thread (grouped with whatever else is queued, see the module docstring);
        any ``sqlite3.Error`` becomes ``StoreUnavailable``. A cancelled caller does not cancel the call."""
        if self._closed:
            raise StoreUnavailable(f"the {self._what} is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        item = (fn, args, loop, fut)
        self._pending.append(item)
        try:
            self._executor.submit(self._drain)
        except RuntimeError as exc:  # the executor was shut down under us
            with contextlib.suppress(ValueError):
                self._pending.remove(item)  # never to run: its caller hears "closed"
            raise StoreUnavailable(f"the {self._what} is closed") from exc
        try:
            return await asyncio.shield(fut)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {self._what}: {type(exc).__name__}: {exc}") from exc

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
        loop = asyncio.get_running_loop()
        try:
            # Behind every call already queued (one worker, first in first out): those finish, then the close.
            await loop.run_in_executor(self._executor, self.drop_connection)
        finally:
            self._executor.shutdown(wait=False)
