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
  payment spendable once more after the reboot (THREATS 1: "across restarts"). FULL costs one fsync per
  transition, which is cheap next to the settlement it guards.
* Every write is one ``BEGIN IMMEDIATE`` transaction, which takes the write lock *before* the row is read, so two
  processes (or two store objects in one process) cannot interleave a compare-and-set.
* On ``sqlite3.Error`` the connection may be left mid-transaction or broken (disk full, I/O error): it is dropped
  and the next call starts afresh, so the store recovers once the file is usable again.
* Fail closed (THREATS 17): every ``sqlite3.Error``, and a call on a closed store, becomes
  :class:`gateway.errors.StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from gateway.errors import StoreUnavailable

__all__ = ["SQLiteFile"]

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
        self._closed = False

    # -- worker-thread side ---------------------------------------------------------------------------------

    def connection(self) -> sqlite3.Connection:
        """The connection, opened (with pragmas and schema) if there is none. Worker thread only."""
        if self._conn is None:
            # isolation_level=None: no implicit transactions; each transition issues its own BEGIN IMMEDIATE.
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                for statement in self._schema:
                    conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def drop_connection(self) -> None:
        """Close the connection (if any); the next call opens a fresh one. Worker thread only."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction; roll back if it raises. Worker thread only."""
        conn = self.connection()
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

    # -- event-loop side ------------------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the worker thread; any ``sqlite3.Error`` becomes ``StoreUnavailable``."""
        if self._closed:
            raise StoreUnavailable(f"the {self._what} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite {self._what}: {type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:  # the executor was shut down under us
            raise StoreUnavailable(f"the {self._what} is closed") from exc

    async def aclose(self) -> None:
        """Close the connection on its thread and stop the thread; later calls raise ``StoreUnavailable``."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.drop_connection)
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)
