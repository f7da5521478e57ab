"""Route overrides in the receipt store's SQLite file: table ``route_overrides`` and a one-row version counter."""

from __future__ import annotations

import sqlite3

from gateway.storage.overrides.contract import Overrides, RouteOverride
from gateway.storage.sqlite_file import BUSY_TIMEOUT, SQLiteFile

__all__ = ["SQLiteOverrideStore"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS route_overrides ("
    " route TEXT PRIMARY KEY, price INTEGER, paused INTEGER, updated_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS route_overrides_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER)",
)
_BUMP = (
    "INSERT INTO route_overrides_version (id, version) VALUES (1, 1)"
    " ON CONFLICT (id) DO UPDATE SET version = version + 1 RETURNING version"
)
_SET = (
    "INSERT INTO route_overrides (route, {column}, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (route) DO UPDATE SET {column} = excluded.{column}, updated_at = excluded.updated_at"
)
_SET_PRICE = _SET.format(column="price")
_SET_PAUSED = _SET.format(column="paused")
_DROP_EMPTY = "DELETE FROM route_overrides WHERE price IS NULL AND paused IS NULL"
_VERSION = "SELECT version FROM route_overrides_version WHERE id = 1"
_ALL = "SELECT route, price, paused, updated_at FROM route_overrides"


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute(_VERSION).fetchone()
    return int(row[0]) if row else 0


class SQLiteOverrideStore:
    """:class:`gateway.storage.overrides.OverrideStore` on one SQLite file (every instance of one host)."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self._db = SQLiteFile(
            path, schema=_SCHEMA, busy_timeout=busy_timeout, what="route override store", thread="x402-overrides"
        )

    def __repr__(self) -> str:
        return f"SQLiteOverrideStore(path={self._db.path!r})"

    def _set(self, statement: str, route: str, value: int | None, now: float) -> int:
        def body(conn: sqlite3.Connection) -> int:
            conn.execute(statement, (route, value, now))
            conn.execute(_DROP_EMPTY)
            return int(conn.execute(_BUMP).fetchone()[0])

        return self._db.transaction(body)

    def _read(self) -> Overrides:
        def body(conn: sqlite3.Connection) -> Overrides:  # one transaction: the rows and their version agree
            routes = {
                route: RouteOverride(route, price, None if paused is None else bool(paused), updated_at)
                for route, price, paused, updated_at in conn.execute(_ALL).fetchall()
            }
            return Overrides(_version(conn), routes)

        return self._db.transaction(body)

    async def version(self) -> int:
        return await self._db.read(_version)

    async def read(self) -> Overrides:
        return await self._db.run(self._read)

    async def set_price(self, route: str, price: int | None, *, now: float) -> int:
        return await self._db.run(self._set, _SET_PRICE, route, price, now)

    async def set_paused(self, route: str, paused: bool | None, *, now: float) -> int:
        return await self._db.run(self._set, _SET_PAUSED, route, None if paused is None else int(paused), now)

    async def ping(self) -> None:
        await self._db.run(lambda: self._db.connection().execute(_VERSION).fetchall())

    async def aclose(self) -> None:
        await self._db.aclose()
