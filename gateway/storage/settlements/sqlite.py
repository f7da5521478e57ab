"""The embedded settlement journal: table ``settlements`` in the receipt store's SQLite file.

One worker thread owns the connection and every change is one ``BEGIN IMMEDIATE`` transaction, so two processes
taking entries at once cannot both lease the same one (see :mod:`gateway.storage.sqlite_file`).

Column ``kind`` came later: a table created before it gains it (``ALTER TABLE ... ADD COLUMN``, default
``'exact'``, what every older row is) the first time a journal object uses the file, in one write transaction, so
two processes starting together cannot both add it. Older rows stay readable as they were.
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
    updated_at   REAL NOT NULL,
    kind         TEXT NOT NULL DEFAULT 'exact'
)
"""
_ADD_KIND = "ALTER TABLE settlements ADD COLUMN kind TEXT NOT NULL DEFAULT 'exact'"
_INDEX = "CREATE INDEX IF NOT EXISTS settlements_network ON settlements (network, created_at)"
_ADD = (
    "INSERT OR REPLACE INTO settlements (key, network, tx_hash, asset, calldata, valid_before, block_number,"
    " block_hash, owner, lease_until, created_at, updated_at, kind)"
    " VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, ?)"
)
_DUE = (
    "SELECT key, network, tx_hash, asset, calldata, valid_before, block_number, block_hash, owner, lease_until,"
    " created_at, updated_at, kind FROM settlements"
    " WHERE network = :network AND (owner = :owner OR lease_until <= :now)"
    " ORDER BY created_at LIMIT :limit"
)
_DUE_NEWEST = _DUE.replace("ORDER BY created_at", "ORDER BY created_at DESC")
_PENDING = (
    "SELECT key, network, tx_hash, asset, calldata, valid_before, block_number, block_hash, owner, lease_until,"
    " created_at, updated_at, kind FROM settlements WHERE network = ? ORDER BY created_at LIMIT ?"
)
_LEASE = "UPDATE settlements SET owner = ?, lease_until = ? WHERE key = ?"
_UPDATE = (
    "UPDATE settlements SET tx_hash = ?, block_number = ?, block_hash = ?, updated_at = ? WHERE key = ? AND owner = ?"
)
_REMOVE = "DELETE FROM settlements WHERE key = ? AND owner = ?"
_RELEASE = "UPDATE settlements SET lease_until = 0 WHERE network = ? AND owner = ?"
_GC = "DELETE FROM settlements WHERE created_at < ?"

_Row = tuple[str, str, str, str, bytes, int, int | None, str | None, str, float, float, float, str]


def _entry(row: _Row, owner: str, lease_until: float) -> JournalEntry:
    key, network, tx_hash, asset, calldata, valid_before, block_number, block_hash, _o, _l, created, updated, kind = row
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
        kind=kind,
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
        self._has_kind = False  # worker thread: the table is known to have column ``kind`` (module docstring)

    def __repr__(self) -> str:
        return f"SQLiteSettlementJournal(path={self._db.path!r})"

    # -- worker-thread side ---------------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Add column ``kind`` to a table created before it (module docstring). Known for good only once a call
        finds it there: a group commit that fails rolls an ``ALTER`` back with the rest."""
        if self._has_kind:
            return

        def body(conn: sqlite3.Connection) -> bool:
            if "kind" in {row[1] for row in conn.execute("PRAGMA table_info(settlements)")}:
                return True
            conn.execute(_ADD_KIND)
            return False

        self._has_kind = self._db.transaction(body)

    def _add(self, row: tuple[object, ...]) -> None:
        self._migrate()
        self._db.transaction(lambda conn: conn.execute(_ADD, row))

    def _take(self, network: str, owner: str, now: float, lease: float, limit: int, newest: bool) -> list[JournalEntry]:
        self._migrate()

        def body(conn: sqlite3.Connection) -> list[JournalEntry]:
            conn.execute(_GC, (now - GC_SECONDS,))
            rows: list[_Row] = conn.execute(
                _DUE_NEWEST if newest else _DUE, {"network": network, "owner": owner, "now": now, "limit": limit}
            ).fetchall()
            conn.executemany(_LEASE, [(owner, now + lease, row[0]) for row in rows])
            return [_entry(row, owner, now + lease) for row in rows]

        return self._db.transaction(body)

    def _update(self, key: str, owner: str, tx_hash: str, number: int | None, block: str | None, now: float) -> bool:
        self._migrate()

        def body(conn: sqlite3.Connection) -> bool:
            return conn.execute(_UPDATE, (tx_hash, number, block, now, key, owner)).rowcount == 1

        return self._db.transaction(body)

    def _remove(self, key: str, owner: str) -> bool:
        self._migrate()
        return self._db.transaction(lambda conn: conn.execute(_REMOVE, (key, owner)).rowcount == 1)

    def _release(self, network: str, owner: str) -> int:
        self._migrate()
        return self._db.transaction(lambda conn: conn.execute(_RELEASE, (network, owner)).rowcount)

    def _pending(self, network: str, limit: int) -> list[JournalEntry]:
        self._migrate()
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
        kind: str = "exact",
    ) -> None:
        row = (key, network, tx_hash, asset, calldata, valid_before, owner, now + lease, now, now, kind)
        await self._db.run(self._add, row)

    async def take(
        self, network: str, owner: str, *, now: float, lease: float, limit: int, newest: bool = False
    ) -> list[JournalEntry]:
        return await self._db.run(self._take, network, owner, now, lease, limit, newest)

    async def release(self, network: str, owner: str) -> int:
        return await self._db.run(self._release, network, owner)

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
