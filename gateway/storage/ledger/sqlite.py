"""The embedded ledger: table ``ledger`` in the receipt store's SQLite file.

Writes (record, purge) go through one worker thread, each one ``BEGIN IMMEDIATE`` transaction, concurrent records
grouped into one commit (see :mod:`gateway.storage.sqlite_file`). In the receipt store's own file (the default) an
entry is committed without fsync (``synced_by_payments``): the next payment's own commit, which is synced, makes it
durable, so an OS crash can cost only the entries written since the last payment, as a killed process can
(docs/operating.md, "Ledger"); an fsync per entry held the file's write lock for the next request's payment. In a
file of its own every entry is synced. Queries run on a second connection with a
worker thread of its own: a WAL reader never waits for the writer, and a long query (revenue over a year) never
holds up the record of a request being served.

``key`` is the primary key, so a payment recorded twice is one row (``INSERT OR IGNORE``); a unique partial index
on ``refund_of`` makes a second refund of one payment a no-op in the same statement. The other indexes serve the
queries: (``at``, ``key``) for time ranges, pages and exports, (``payer``, ...) and (``route``, ...) for the two
filters an operator reaches for first, ``tx_hash`` for a transaction (one transaction may settle several
payments). Table ``ledger_lost`` holds the keys of payments whose settlement was counted lost (a row may come before
its payment's entry), with when; the purge deletes the rows older than its cutoff with the entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from gateway.errors import StoreUnavailable
from gateway.storage.ledger.contract import KINDS, LedgerEntry, LedgerQuery, Revenue, normalised
from gateway.storage.sqlite_file import BUSY_TIMEOUT, SQLiteFile

__all__ = ["SQLiteLedgerStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    key             TEXT PRIMARY KEY,
    at              REAL NOT NULL,
    route           TEXT NOT NULL,
    method          TEXT NOT NULL,
    resource        TEXT NOT NULL,
    amount          INTEGER NOT NULL,
    network         TEXT NOT NULL,
    asset           TEXT NOT NULL,
    payer           TEXT NOT NULL,
    pay_to          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    tx_hash         TEXT NOT NULL,
    block           INTEGER,
    request_id      TEXT NOT NULL,
    job_id          TEXT,
    upstream_status INTEGER NOT NULL,
    refund_of       TEXT
)
"""
_LOST_SCHEMA = "CREATE TABLE IF NOT EXISTS ledger_lost (key TEXT PRIMARY KEY, at REAL NOT NULL)"
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS ledger_at ON ledger (at, key)",
    "CREATE INDEX IF NOT EXISTS ledger_payer ON ledger (payer, at, key)",
    "CREATE INDEX IF NOT EXISTS ledger_route ON ledger (route, at, key)",
    "CREATE INDEX IF NOT EXISTS ledger_tx ON ledger (tx_hash)",
    "CREATE UNIQUE INDEX IF NOT EXISTS ledger_refund ON ledger (refund_of) WHERE refund_of IS NOT NULL",
)
_COLUMNS = (
    "key, at, route, method, resource, amount, network, asset, payer, pay_to, kind, tx_hash, block, request_id,"
    " job_id, upstream_status, refund_of"
)
_INSERT = (
    f"INSERT OR IGNORE INTO ledger ({_COLUMNS}) VALUES (:key, :at, :route, :method, :resource, :amount, :network,"  # noqa: S608 - fixed text
    " :asset, :payer, :pay_to, :kind, :tx_hash, :block, :request_id, :job_id, :upstream_status, :refund_of)"
)
_GET = f"SELECT {_COLUMNS} FROM ledger WHERE key = ?"  # noqa: S608 - fixed text
_MARK_LOST = "INSERT OR IGNORE INTO ledger_lost (key, at) VALUES (?, ?)"
_LOST_AT = "SELECT at FROM ledger_lost WHERE key = ?"
_PURGE_LOST = "DELETE FROM ledger_lost WHERE at < ?"
# Deleted a batch at a time: one transaction per batch, so the write lock the receipts share is never held long.
_PURGE = "DELETE FROM ledger WHERE key IN (SELECT key FROM ledger WHERE at < ? ORDER BY at LIMIT ?)"
_PURGE_BATCH = 1000
_EXPORT_PAGE = 500
# The revenue groups, spelled out (never taken from the caller).
_GROUP_SQL = {"route": "route", "network": "network", "day": "strftime('%Y-%m-%d', at, 'unixepoch')"}

_Row = tuple[str, float, str, str, str, int, str, str, str, str, str, str, int | None, str, str | None, int, str | None]


def _entry(row: _Row) -> LedgerEntry:
    key, at, route, method, resource, amount, network, asset, payer, pay_to, kind, tx, block, rid, job, status, of = row
    for known in KINDS:
        if kind == known:
            return LedgerEntry(
                key, at, route, method, resource, amount, network, asset, payer, pay_to, known, tx, block, rid, job,
                status, of,
            )  # fmt: skip
    raise sqlite3.DatabaseError(f"ledger row {key!r} has an unknown kind")


def _where(query: LedgerQuery, *, descending: bool, after: tuple[float, str] | None = None) -> tuple[str, list[Any]]:
    """The WHERE clause of ``query`` and its parameters. The text is assembled from the fixed fragments below only;
    every value is a ``?`` parameter. One statement per combination keeps each filter indexable (an
    ``(? IS NULL OR payer = ?)`` form would stop SQLite from using the payer index)."""
    clauses: list[str] = []
    params: list[Any] = []
    if query.payer is not None:
        clauses.append("payer = ?")
        params.append(query.payer.lower())
    if query.route is not None:
        clauses.append("route = ?")
        params.append(query.route)
    if query.tx_hash is not None:
        clauses.append("tx_hash = ?")
        params.append(query.tx_hash.lower())
    if query.since is not None:
        clauses.append("at >= ?")
        params.append(query.since)
    if query.until is not None:
        clauses.append("at < ?")
        params.append(query.until)
    if descending and query.before is not None:
        if query.before_key is None:
            clauses.append("at < ?")
            params.append(query.before)
        else:
            clauses.append("(at < ? OR (at = ? AND key < ?))")
            params += [query.before, query.before, query.before_key]
    if after is not None:
        clauses.append("(at > ? OR (at = ? AND key > ?))")
        params += [after[0], after[0], after[1]]
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


T = TypeVar("T")


class _Queries:
    """Read-only queries on a connection and thread of their own. Not a :class:`SQLiteFile`: that one groups
    queued calls into a ``BEGIN IMMEDIATE`` transaction, which would take the file's write lock (shared with the
    receipts) for as long as a query runs."""

    def __init__(self, path: str, *, busy_timeout: float, schema: Sequence[str]) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._schema = tuple(schema)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="x402-ledger-queries")
        self._conn: sqlite3.Connection | None = None  # worker thread only
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                for statement in self._schema:  # a query before the first record: the table may be new
                    conn.execute(statement)
                conn.execute("PRAGMA query_only = ON")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _call(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        try:
            return fn(self._connection(), *args)
        except sqlite3.Error:
            self._drop()  # start afresh next time (a broken file, an I/O error)
            raise

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StoreUnavailable("the ledger is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn, args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite ledger: {type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:  # the executor was shut down under us
            raise StoreUnavailable("the ledger is closed") from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._drop)
        finally:
            self._executor.shutdown(wait=False)


class SQLiteLedgerStore:
    """:class:`gateway.storage.ledger.LedgerStore` on one SQLite file (see the module docstring)."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT, synced_by_payments: bool = False) -> None:
        schema = (_SCHEMA, *_INDEXES, _LOST_SCHEMA)
        self.synced_by_payments = synced_by_payments
        self._db = SQLiteFile(
            path, schema=schema, busy_timeout=busy_timeout, what="ledger", thread="x402-ledger-sqlite"
        )
        self._queries = _Queries(path, busy_timeout=busy_timeout, schema=schema)

    def __repr__(self) -> str:
        return f"SQLiteLedgerStore(path={self._db.path!r})"

    # -- worker-thread side ---------------------------------------------------------------------------------

    def _record(self, params: dict[str, Any]) -> bool:
        return self._db.transaction(lambda conn: conn.execute(_INSERT, params).rowcount == 1)

    def _purge(self, older_than: float) -> int:
        def body(conn: sqlite3.Connection) -> int:
            conn.execute(_PURGE_LOST, (older_than,))  # a few rows at most: lost settlements are rare
            return conn.execute(_PURGE, (older_than, _PURGE_BATCH)).rowcount

        return self._db.transaction(body)

    def _mark_lost(self, key: str, at: float) -> bool:
        return self._db.transaction(lambda conn: conn.execute(_MARK_LOST, (key, at)).rowcount == 1)

    def _ping(self) -> None:
        self._db.connection().execute("SELECT 1 FROM ledger LIMIT 1").fetchall()

    # -- query-thread side ----------------------------------------------------------------------------------

    @staticmethod
    def _get(conn: sqlite3.Connection, key: str) -> LedgerEntry | None:
        row: _Row | None = conn.execute(_GET, (key,)).fetchone()
        return None if row is None else _entry(row)

    @staticmethod
    def _lost_at(conn: sqlite3.Connection, key: str) -> float | None:
        row: tuple[float] | None = conn.execute(_LOST_AT, (key,)).fetchone()
        return None if row is None else float(row[0])

    @staticmethod
    def _find(conn: sqlite3.Connection, query: LedgerQuery) -> list[LedgerEntry]:
        where, params = _where(query, descending=True)
        sql = f"SELECT {_COLUMNS} FROM ledger{where} ORDER BY at DESC, key DESC LIMIT ?"  # noqa: S608 - fixed text
        rows: list[_Row] = conn.execute(sql, [*params, max(0, query.limit)]).fetchall()
        return [_entry(row) for row in rows]

    @staticmethod
    def _page(conn: sqlite3.Connection, query: LedgerQuery, after: tuple[float, str] | None) -> list[LedgerEntry]:
        where, params = _where(query, descending=False, after=after)
        sql = f"SELECT {_COLUMNS} FROM ledger{where} ORDER BY at, key LIMIT ?"  # noqa: S608 - fixed text
        rows: list[_Row] = conn.execute(sql, [*params, _EXPORT_PAGE]).fetchall()
        return [_entry(row) for row in rows]

    @staticmethod
    def _revenue(conn: sqlite3.Connection, by: str, since: float | None, until: float | None) -> list[Revenue]:
        group = _GROUP_SQL[by]
        where, params = _where(LedgerQuery(since=since, until=until), descending=True)
        sql = (
            f"SELECT {group} AS g, SUM(amount), SUM(kind != 'refund') FROM ledger{where}"  # noqa: S608 - fixed text
            " GROUP BY g ORDER BY g"
        )
        rows = conn.execute(sql, params).fetchall()
        return [Revenue(group=str(g), amount=int(amount), payments=int(payments)) for g, amount, payments in rows]

    # -- event-loop side ------------------------------------------------------------------------------------

    async def record(self, entry: LedgerEntry) -> bool:
        e = normalised(entry)
        params = {
            "key": e.key,
            "at": e.at,
            "route": e.route,
            "method": e.method,
            "resource": e.resource,
            "amount": e.amount,
            "network": e.network,
            "asset": e.asset,
            "payer": e.payer,
            "pay_to": e.pay_to,
            "kind": e.kind,
            "tx_hash": e.tx_hash,
            "block": e.block,
            "request_id": e.request_id,
            "job_id": e.job_id,
            "upstream_status": e.upstream_status,
            "refund_of": e.refund_of,
        }
        return await self._db.run(self._record, params, durable=not self.synced_by_payments)

    async def get(self, key: str) -> LedgerEntry | None:
        return await self._queries.run(self._get, key)

    async def mark_settlement_lost(self, key: str, *, at: float) -> bool:
        if not key:
            raise ValueError("ledger: a lost mark needs a key")
        return await self._db.run(self._mark_lost, key, at)

    async def settlement_lost_at(self, key: str) -> float | None:
        return await self._queries.run(self._lost_at, key)

    async def find(self, query: LedgerQuery) -> list[LedgerEntry]:
        return await self._queries.run(self._find, query)

    async def revenue(
        self, by: Literal["route", "network", "day"], *, since: float | None = None, until: float | None = None
    ) -> list[Revenue]:
        if by not in _GROUP_SQL:
            raise ValueError(f"ledger: revenue by {by!r}: expected route, network or day")
        return await self._queries.run(self._revenue, by, since, until)

    async def export(self, query: LedgerQuery) -> AsyncIterator[LedgerEntry]:
        after: tuple[float, str] | None = None
        while True:
            page = await self._queries.run(self._page, query, after)
            for entry in page:
                yield entry
            if len(page) < _EXPORT_PAGE:
                return
            after = (page[-1].at, page[-1].key)

    async def purge(self, *, older_than: float) -> int:
        total = 0
        while True:
            n = await self._db.run(self._purge, older_than)
            total += n
            if n < _PURGE_BATCH:
                return total

    async def ping(self) -> None:
        await self._db.run(self._ping)

    async def aclose(self) -> None:
        await self._queries.aclose()
        await self._db.aclose()
