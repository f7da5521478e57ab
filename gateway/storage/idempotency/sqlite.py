"""The embedded idempotency store: table ``idempotency`` in one SQLite file (the receipt store's, by default).

One worker thread owns the connection and every transition is one ``BEGIN IMMEDIATE`` transaction, so of two
processes racing on one record key only one can read "absent" (see :mod:`gateway.storage.sqlite_file`).
"""

from __future__ import annotations

import sqlite3

from gateway.storage.idempotency.contract import Begun, StoredResponse, decode_headers, encode_headers
from gateway.storage.sqlite_file import BUSY_TIMEOUT, SQLiteFile

__all__ = ["PURGE_EVERY", "SQLiteIdempotencyStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    owner       TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    expires_at  REAL NOT NULL,
    status      INTEGER,
    headers     TEXT,
    body        BLOB,
    updated_at  REAL NOT NULL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS idempotency_expires_at ON idempotency (expires_at)"
_SELECT = "SELECT state, owner, fingerprint, expires_at, status, headers, body FROM idempotency WHERE key = ?"
_INSERT = (
    "INSERT OR REPLACE INTO idempotency (key, state, owner, fingerprint, expires_at, status, headers, body,"
    " updated_at) VALUES (?, 'in_flight', ?, ?, ?, NULL, NULL, NULL, ?)"
)
_COMPLETE = (
    "UPDATE idempotency SET state = 'done', expires_at = ?, status = ?, headers = ?, body = ?, updated_at = ?"
    " WHERE key = ? AND owner = ? AND state = 'in_flight'"
)
_ABANDON = "DELETE FROM idempotency WHERE key = ? AND owner = ? AND state = 'in_flight'"
# Bounded garbage collection, run by every PURGE_EVERY-th ``begin`` inside its transaction.
_PURGE = "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency WHERE expires_at < ? LIMIT 100)"
PURGE_EVERY = 64


class SQLiteIdempotencyStore:
    """:class:`gateway.storage.idempotency.IdempotencyStore` on one SQLite file (see the module docstring)."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self._db = SQLiteFile(
            path,
            schema=(_SCHEMA, _INDEX),
            busy_timeout=busy_timeout,
            what="idempotency store",
            thread="x402-idempotency-sqlite",
        )
        self._begins = 0

    def __repr__(self) -> str:
        return f"SQLiteIdempotencyStore(path={self._db.path!r})"

    # -- worker-thread side ---------------------------------------------------------------------------------

    def _begin(self, key: str, fingerprint: str, owner: str, now: float, lease: float) -> Begun:
        self._begins += 1
        purge = self._begins % PURGE_EVERY == 0

        def body(conn: sqlite3.Connection) -> Begun:
            if purge:
                conn.execute(_PURGE, (now,))
            row = conn.execute(_SELECT, (key,)).fetchone()
            taken_over = False
            if row is not None:
                state, old_owner, old_fp, expires_at, status, headers, stored = row
                if expires_at >= now:
                    if old_fp != fingerprint:
                        return Begun("mismatch")
                    if state == "done":
                        return Begun("done", StoredResponse(int(status), decode_headers(headers), bytes(stored)))
                    if old_owner != owner:
                        return Begun("in_flight")
                taken_over = state == "in_flight" and old_owner != owner
            conn.execute(_INSERT, (key, owner, fingerprint, now + lease, now))
            return Begun("began", taken_over=taken_over)

        return self._db.transaction(body)

    def _complete(self, key: str, owner: str, response: StoredResponse, now: float, ttl: float) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                _COMPLETE,
                (now + ttl, response.status, encode_headers(response.headers), response.body, now, key, owner),
            )
            return cur.rowcount == 1

        return self._db.transaction(body)

    def _abandon(self, key: str, owner: str) -> None:
        self._db.transaction(lambda conn: conn.execute(_ABANDON, (key, owner)))

    def _ping(self) -> None:
        self._db.connection().execute("SELECT 1 FROM idempotency LIMIT 1").fetchall()

    # -- event-loop side ------------------------------------------------------------------------------------

    async def begin(self, key: str, fingerprint: str, owner: str, *, now: float, lease: float) -> Begun:
        return await self._db.run(self._begin, key, fingerprint, owner, now, lease)

    async def complete(self, key: str, owner: str, response: StoredResponse, *, now: float, ttl: float) -> bool:
        return await self._db.run(self._complete, key, owner, response, now, ttl)

    async def abandon(self, key: str, owner: str) -> None:
        await self._db.run(self._abandon, key, owner)

    async def ping(self) -> None:
        await self._db.run(self._ping)

    async def aclose(self) -> None:
        await self._db.aclose()
