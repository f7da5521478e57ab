"""The embedded settlement journal: table ``settlements`` in the receipt store's SQLite file.

One worker thread owns the connection and every change is one ``BEGIN IMMEDIATE`` transaction, so two processes
taking entries at once cannot both lease the same one (see :mod:`gateway.storage.sqlite_file`).
"""

from __future__ import annotations

import sqlite3

from gateway.storage.settlements.contract import GC_SECONDS, JournalEntry
from gateway.storage.sqlite_file import BUSY_TIMEOUT, SQLiteFile

__all__ = ["SQLiteSettlementJournal"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settlements (
    key          TEXT PRIMARY KEY,
    network      TEXT NOT NULL,
    tx_hash      TEXT NOT NULL,
    asset        TEXT NOT NULL,
    calldata     BLOB NOT NULL,
    valid_before INTEGER NOT NULL,
    block_number INTEGER,
    block_hash   TEXT,
    owner        TEXT NOT NULL,
    lease_until  REAL NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS settlements_network ON settlements (network, created_at)"
_ADD = (
    "INSERT OR REPLACE INTO settlements (key, network, tx_hash, asset, calldata, valid_before, block_number,"
    " block_hash, owner, lease_until, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?)"
)
_DUE = (
    "SELECT key, network, tx_hash, asset, calldata, valid_before, block_number, block_hash, owner, lease_until,"
    " created_at, updated_at FROM settlements WHERE network = :network AND (owner = :owner OR lease_until <= :now)"
    " ORDER BY created_at LIMIT :limit"
)
_DUE_NEWEST = _DUE.replace("ORDER BY created_at", "ORDER BY created_at DESC")
_PENDING = (
    "SELECT key, network, tx_hash, asset, calldata, valid_before, block_number, block_hash, owner, lease_until,"
    " created_at, updated_at FROM settlements WHERE network = ? ORDER BY created_at LIMIT ?"
)
_LEASE = "UPDATE settlements SET owner = ?, lease_until = ? WHERE key = ?"
_UPDATE = (
    "UPDATE settlements SET tx_hash = ?, block_number = ?, block_hash = ?, updated_at = ? WHERE key = ? AND owner = ?"
)
_REMOVE = "DELETE FROM settlements WHERE key = ? AND owner = ?"
_RELEASE = "UPDATE settlements SET lease_until = 0 WHERE network = ? AND owner = ?"
_GC = "DELETE FROM settlements WHERE created_at < ?"

_Row = tuple[str, str, str, str, bytes, int, int | None, str | None, str, float, float, float]


def _entry(row: _Row, owner: str, lease_until: float) -> JournalEntry:
    key, network, tx_hash, asset, calldata, valid_before, block_number, block_hash, _o, _l, created, updated = row
    return JournalEntry(
        key=key,
        network=network,
        tx_hash=tx_hash,
        asset=asset,
        calldata=bytes(calldata),
        valid_before=valid_before,
        block_number=block_number,
        block_hash=block_hash,
        owner=owner,
        lease_until=lease_until,
        created_at=created,
        updated_at=updated,
    )


class SQLiteSettlementJournal:
    """:class:`gateway.storage.settlements.SettlementJournal` on one SQLite file (see the module docstring)."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self._db = SQLiteFile(
            path,
            schema=(_SCHEMA, _INDEX),
            busy_timeout=busy_timeout,
            what="settlement journal",
            thread="x402-settlements-sqlite",
        )

    def __repr__(self) -> str:
        return f"SQLiteSettlementJournal(path={self._db.path!r})"

    # -- worker-thread side ---------------------------------------------------------------------------------

    def _add(self, row: tuple[object, ...]) -> None:
        self._db.transaction(lambda conn: conn.execute(_ADD, row))

    def _take(self, network: str, owner: str, now: float, lease: float, limit: int, newest: bool) -> list[JournalEntry]:
        def body(conn: sqlite3.Connection) -> list[JournalEntry]:
            conn.execute(_GC, (now - GC_SECONDS,))
            rows: list[_Row] = conn.execute(
                _DUE_NEWEST if newest else _DUE, {"network": network, "owner": owner, "now": now, "limit": limit}
            ).fetchall()
            conn.executemany(_LEASE, [(owner, now + lease, row[0]) for row in rows])
            return [_entry(row, owner, now + lease) for row in rows]

        return self._db.transaction(body)

    def _update(self, key: str, owner: str, tx_hash: str, number: int | None, block: str | None, now: float) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            return conn.execute(_UPDATE, (tx_hash, number, block, now, key, owner)).rowcount == 1

        return self._db.transaction(body)

    def _remove(self, key: str, owner: str) -> bool:
        return self._db.transaction(lambda conn: conn.execute(_REMOVE, (key, owner)).rowcount == 1)

    def _pending(self, network: str, limit: int) -> list[JournalEntry]:
        rows: list[_Row] = self._db.connection().execute(_PENDING, (network, limit)).fetchall()
        return [_entry(row, row[8], row[9]) for row in rows]

    def _ping(self) -> None:
        self._db.connection().execute("SELECT 1 FROM settlements LIMIT 1").fetchall()

    # -- event-loop side ------------------------------------------------------------------------------------

    async def add(
        self,
        key: str,
        network: str,
        tx_hash: str,
        asset: str,
        calldata: bytes,
        valid_before: int,
        *,
        owner: str,
        now: float,
        lease: float,
    ) -> None:
        row = (key, network, tx_hash, asset, calldata, valid_before, owner, now + lease, now, now)
        await self._db.run(self._add, row)

    async def take(
        self, network: str, owner: str, *, now: float, lease: float, limit: int, newest: bool = False
    ) -> list[JournalEntry]:
        return await self._db.run(self._take, network, owner, now, lease, limit, newest)

    async def release(self, network: str, owner: str) -> int:
        return await self._db.run(
            lambda: self._db.transaction(lambda conn: conn.execute(_RELEASE, (network, owner)).rowcount)
        )

    async def update(
        self,
        key: str,
        owner: str,
        *,
        tx_hash: str,
        block_number: int | None,
        block_hash: str | None,
        now: float,
    ) -> bool:
        return await self._db.run(self._update, key, owner, tx_hash, block_number, block_hash, now)

    async def remove(self, key: str, owner: str) -> bool:
        return await self._db.run(self._remove, key, owner)

    async def pending(self, network: str, *, limit: int) -> list[JournalEntry]:
        return await self._db.run(self._pending, network, limit)

    async def ping(self) -> None:
        await self._db.run(self._ping)

    async def aclose(self) -> None:
        await self._db.aclose()
