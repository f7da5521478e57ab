"""The embedded deny-list: table ``denylist`` in the receipt store's SQLite file.

``denied`` is a point read by primary key on the event loop's read-only connection (see
:mod:`gateway.storage.sqlite_file`): it runs on every paid request and costs microseconds.
"""

from __future__ import annotations

import sqlite3

from gateway.storage.denylist.contract import DeniedPayer, payer_address
from gateway.storage.sqlite_file import BUSY_TIMEOUT, SQLiteFile

__all__ = ["SQLiteDenyList"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS denylist (
    payer TEXT PRIMARY KEY,
    at    REAL NOT NULL,
    note  TEXT NOT NULL,
    by    TEXT NOT NULL
)
"""
_INSERT = "INSERT OR IGNORE INTO denylist (payer, at, note, by) VALUES (?, ?, ?, ?)"
_DELETE = "DELETE FROM denylist WHERE payer = ?"
_EXISTS = "SELECT 1 FROM denylist WHERE payer = ?"
_ENTRIES = "SELECT payer, at, note, by FROM denylist ORDER BY at DESC, payer LIMIT ?"


class SQLiteDenyList:
    """:class:`gateway.storage.denylist.DenyList` on one SQLite file (see the module docstring)."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self._db = SQLiteFile(
            path, schema=(_SCHEMA,), busy_timeout=busy_timeout, what="deny-list", thread="x402-denylist-sqlite"
        )

    def __repr__(self) -> str:
        return f"SQLiteDenyList(path={self._db.path!r})"

    async def deny(self, entry: DeniedPayer) -> bool:
        row = (payer_address(entry.payer), entry.at, entry.note, entry.by)
        return await self._db.run(lambda: self._db.transaction(lambda c: c.execute(_INSERT, row).rowcount == 1))

    async def allow(self, payer: str) -> bool:
        key = payer_address(payer)
        return await self._db.run(lambda: self._db.transaction(lambda c: c.execute(_DELETE, (key,)).rowcount == 1))

    async def denied(self, payer: str) -> bool:
        key = payer.lower()

        def lookup(conn: sqlite3.Connection) -> bool:
            return conn.execute(_EXISTS, (key,)).fetchone() is not None

        return await self._db.read(lookup)

    async def entries(self, *, limit: int) -> list[DeniedPayer]:
        def body() -> list[DeniedPayer]:
            rows = self._db.connection().execute(_ENTRIES, (limit,)).fetchall()
            return [DeniedPayer(payer=p, at=at, note=note, by=by) for p, at, note, by in rows]

        return await self._db.run(body)

    async def ping(self) -> None:
        await self._db.run(lambda: self._db.connection().execute("SELECT 1 FROM denylist LIMIT 1").fetchall())

    async def aclose(self) -> None:
        await self._db.aclose()
