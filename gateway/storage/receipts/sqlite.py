"""The embedded receipt store: one SQLite file, shared by every gateway process on the host.

Exactly-once across processes: every transition is one ``BEGIN IMMEDIATE`` transaction, which takes the
database's write lock *before* reading the row, so two processes (or two store objects in one process) cannot
both read "absent" and both insert. The file is in WAL mode, so readers never wait for the writer. WAL needs
shared memory between the processes: the file must be on a local disk, never on NFS/SMB.

The event loop never blocks on the file: every call runs on one dedicated worker thread that owns the
connection, which also serialises the calls of one store object. A cancelled caller does not cancel the
transaction already handed to that thread; a claim taken that way is simply never used, and its lease lapses.

Durability: ``synchronous=FULL``. In WAL mode ``NORMAL`` survives a crash of the *process* but may lose the
last commits on power loss or an OS crash; a lost ``CONSUMED`` row would make a spent payment spendable once
more after the reboot. FULL costs one fsync per transition, which is cheap next to the settlement it guards.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable

from gateway.errors import PaymentInFlight, PaymentReplayed, StoreUnavailable
from gateway.storage.liveness import ProcessLocks
from gateway.storage.receipts.contract import ClaimRecord, ClaimState, Effect, link_owner
from gateway.storage.sqlite_file import BUSY_TIMEOUT, SQLiteFile

__all__ = ["SQLiteReceiptStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    key         TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    owner       TEXT NOT NULL,
    tx_hash     TEXT,
    lease_until REAL NOT NULL,
    expires_at  REAL,
    updated_at  REAL NOT NULL
) WITHOUT ROWID
"""
_INDEX = "CREATE INDEX IF NOT EXISTS receipts_expires_at ON receipts (expires_at) WHERE expires_at IS NOT NULL"
# Which gateway processes are alive (their claims must not be taken over before their lease lapses).
_INSTANCES = "CREATE TABLE IF NOT EXISTS instances (instance TEXT PRIMARY KEY, alive_until REAL NOT NULL) WITHOUT ROWID"
_FORGET = "DELETE FROM instances WHERE instance = ?"  # a process found dead by its lock files
# The store's identity marker (docs/threat-model.md T30): a wiped or replaced file has none.
_META = "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
# SQL is spelled out in full (no string building): every value goes through a ``?``/``:name`` parameter.
_SELECT = "SELECT key, state, owner, tx_hash, lease_until, expires_at, updated_at FROM receipts WHERE key = ?"
_INSERT = (
    "INSERT INTO receipts (key, state, owner, tx_hash, lease_until, expires_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE = (
    "UPDATE receipts SET state = ?, owner = ?, tx_hash = ?, lease_until = ?, expires_at = ?, updated_at = ?"
    " WHERE key = ?"
)

_Row = tuple[str, str, str, str | None, float, float | None, float]

# A row is expired when its expiry has passed, except that a PENDING/PAID claim never expires under a live
# lease: the record of money that may be moving must not vanish while its owner is still working on it.
# (_expired below is the same rule in Python.)
_GET_LIVE = (
    "SELECT key, state, owner, tx_hash, lease_until, expires_at, updated_at FROM receipts WHERE key = :key"
    " AND (expires_at IS NULL OR expires_at >= :now OR (state IN ('pending', 'paid') AND lease_until > :now))"
)
_PURGE = (
    "DELETE FROM receipts WHERE expires_at IS NOT NULL AND expires_at < :now"
    " AND NOT (state IN ('pending', 'paid') AND lease_until > :now)"
)


def _expired(row: _Row, now: float) -> bool:
    _key, state, _owner, _tx, lease_until, expires_at, _upd = row
    if expires_at is None or expires_at >= now:
        return False
    return not (state in (ClaimState.PENDING, ClaimState.PAID) and lease_until > now)


def _record(row: _Row, *, resumed: bool = False) -> ClaimRecord:
    key, state, owner, tx_hash, lease_until, expires_at, updated_at = row
    return ClaimRecord(
        key=key,
        state=ClaimState(state),
        owner=owner,
        tx_hash=tx_hash,
        lease_until=lease_until,
        expires_at=expires_at,
        updated_at=updated_at,
        resumed=resumed,
    )


def _later(a: float | None, b: float | None) -> float | None:
    """The later of two expiries; None (for ever) is later than any time."""
    if a is None or b is None:
        return None
    return max(a, b)


class SQLiteReceiptStore:
    """:class:`gateway.storage.receipts.ReceiptStore` on one SQLite file (see the module docstring)."""

    may_forget = False  # an open file keeps its rows (see ReceiptStore)

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self._db = SQLiteFile(
            path,
            schema=(_SCHEMA, _INDEX, _INSTANCES, _META),
            busy_timeout=busy_timeout,
            what="receipt store",
            thread="x402-sqlite-store",
        )
        self._processes = ProcessLocks(path)  # who is alive, whatever the clocks did (gateway/storage/liveness.py)

    def __repr__(self) -> str:
        return f"SQLiteReceiptStore(path={self._db.path!r})"

    # -- worker-thread side ---------------------------------------------------------------------------------

    @staticmethod
    def _select(conn: sqlite3.Connection, key: str) -> _Row | None:
        row: _Row | None = conn.execute(_SELECT, (key,)).fetchone()
        return row

    @staticmethod
    def _update(conn: sqlite3.Connection, row: _Row) -> None:
        conn.execute(_UPDATE, (*row[1:], row[0]))

    def _claim(
        self, key: str, owner: str, now: float, lease: float, expires_at: float | None, take_over_from: str | None
    ) -> ClaimRecord:
        def body(conn: sqlite3.Connection) -> ClaimRecord:
            row = self._select(conn, key)
            if row is not None and _expired(row, now):
                conn.execute("DELETE FROM receipts WHERE key = ?", (key,))
                row = None
            if row is None:
                new: _Row = (key, ClaimState.PENDING.value, owner, None, now + lease, expires_at, now)
                conn.execute(_INSERT, new)
                return _record(new)
            _key, state, old_owner, tx_hash, lease_until, old_expires, _upd = row
            if state == ClaimState.CONSUMED:
                raise PaymentReplayed("this payment was already used")
            if state == ClaimState.UNSERVED:
                state = ClaimState.PAID.value  # the money is on chain: resume without paying again
            elif lease_until > now and old_owner != take_over_from:
                raise PaymentInFlight("this payment is being used by another request", holder=old_owner)
            # Taking over keeps the record's own expiry unless the caller's is later: never shorten protection.
            taken: _Row = (key, state, owner, tx_hash, now + lease, _later(old_expires, expires_at), now)
            self._update(conn, taken)
            return _record(taken, resumed=True)

        return self._db.transaction(body)

    def _record_tx(self, key: str, owner: str, tx_hash: str, now: float, lease: float) -> None:
        def body(conn: sqlite3.Connection) -> None:
            row = self._select(conn, key)
            if row is None or _expired(row, now) or row[1] != ClaimState.PENDING or row[2] != owner:
                raise PaymentInFlight("the claim on this payment was lost")
            self._update(conn, (key, row[1], owner, tx_hash, now + lease, row[5], now))

        self._db.transaction(body)

    def _mark_paid(
        self, key: str, owner: str, tx_hash: str | None, now: float, lease: float, effects: tuple[Effect, ...]
    ) -> bool:
        """True when PAID; False when an effect was already spent (this claim is then CONSUMED, no effect taken)."""

        def body(conn: sqlite3.Connection) -> bool:
            row = self._select(conn, key)
            # PAID(owner) again is accepted (idempotent), so a retried call cannot turn a success into an error.
            if (
                row is None
                or _expired(row, now)
                or row[1] not in (ClaimState.PENDING, ClaimState.PAID)
                or row[2] != owner
            ):
                raise PaymentInFlight("the claim on this payment was lost")
            new_tx = tx_hash if tx_hash is not None else row[3]
            link = link_owner(key, owner)
            free: dict[str, Effect] = {}
            for effect in effects:
                held = self._select(conn, effect.key)
                if held is not None and _expired(held, now):
                    conn.execute("DELETE FROM receipts WHERE key = ?", (effect.key,))
                    held = None
                if held is not None and held[2] != link:
                    self._update(conn, (key, ClaimState.CONSUMED.value, owner, new_tx, row[4], row[5], now))
                    return False
                if held is None:
                    free[effect.key] = effect
            for effect in free.values():
                conn.execute(
                    _INSERT, (effect.key, ClaimState.CONSUMED.value, link, new_tx, 0.0, effect.expires_at, now)
                )
            self._update(conn, (key, ClaimState.PAID.value, owner, new_tx, now + lease, row[5], now))
            return True

        return self._db.transaction(body)

    def _finish(self, key: str, owner: str, served: bool, now: float, expires_at: float | None) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            row = self._select(conn, key)
            if row is None or _expired(row, now) or row[1] != ClaimState.PAID or row[2] != owner:
                return False  # lost the claim: nothing left to undo (but nothing to serve either)
            state = ClaimState.CONSUMED if served else ClaimState.UNSERVED
            self._update(conn, (key, state.value, owner, row[3], row[4], expires_at, now))
            return True

        return self._db.transaction(body)

    def _release(self, key: str, owner: str) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM receipts WHERE key = ? AND state = 'pending' AND owner = ?", (key, owner))

        self._db.transaction(body)

    def _get(self, key: str, now: float) -> ClaimRecord | None:
        conn = self._db.connection()
        row: _Row | None = conn.execute(_GET_LIVE, {"key": key, "now": now}).fetchone()
        return None if row is None else _record(row)

    def _purge(self, now: float) -> int:
        def body(conn: sqlite3.Connection) -> int:
            cur = conn.execute(_PURGE, {"now": now})
            return cur.rowcount

        return self._db.transaction(body)

    def _ping(self) -> None:
        self._db.connection().execute("SELECT 1 FROM receipts LIMIT 1").fetchall()

    # -- event-loop side ------------------------------------------------------------------------------------

    async def claim(
        self,
        key: str,
        owner: str,
        *,
        now: float,
        lease: float,
        expires_at: float | None,
        take_over_from: str | None = None,
    ) -> ClaimRecord:
        return await self._db.run(self._claim, key, owner, now, lease, expires_at, take_over_from)

    def _lapse(self, key: str, owner: str, now: float) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE receipts SET lease_until = 0 WHERE key = ? AND owner = ? AND state IN ('pending', 'paid')",
                (key, owner),
            )

        self._db.transaction(body)

    async def lapse(self, key: str, owner: str, *, now: float) -> None:
        await self._db.run(self._lapse, key, owner, now)

    def _identity(self) -> str | None:
        row = self._db.connection().execute("SELECT value FROM meta WHERE name = 'identity'").fetchone()
        return None if row is None else str(row[0])

    def _set_identity(self, value: str, only_if_absent: bool) -> str:
        def body(conn: sqlite3.Connection) -> str:
            if only_if_absent:
                conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('identity', ?)", (value,))
            else:
                conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('identity', ?)", (value,))
            row = conn.execute("SELECT value FROM meta WHERE name = 'identity'").fetchone()
            return str(row[0])

        return self._db.transaction(body)

    async def identity(self) -> str | None:
        return await self._db.run(self._identity)

    async def add_relayers(self, addresses: Iterable[str]) -> None:
        rows = [(f"relayer:{address.lower()}",) for address in addresses]
        await self._db.run(
            self._db.transaction,
            lambda conn: conn.executemany("INSERT OR IGNORE INTO meta (name, value) VALUES (?, '1')", rows),
        )

    async def relayers(self) -> frozenset[str]:
        rows = await self._db.read(
            lambda conn: conn.execute("SELECT name FROM meta WHERE name LIKE 'relayer:%'").fetchall()
        )
        return frozenset(str(name).removeprefix("relayer:") for (name,) in rows)

    async def set_identity(self, value: str, *, only_if_absent: bool) -> str:
        return await self._db.run(self._set_identity, value, only_if_absent)

    def _heartbeat(self, instance: str, now: float, ttl: float) -> None:
        dead = self._processes.hold(instance)  # the first time: processes found gone by their lock files

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO instances (instance, alive_until) VALUES (?, ?)"
                " ON CONFLICT (instance) DO UPDATE SET alive_until = excluded.alive_until",
                (instance, now + ttl),
            )
            conn.execute("DELETE FROM instances WHERE alive_until < ?", (now - 3600.0,))
            conn.executemany(_FORGET, [(name,) for name in dead])

        self._db.transaction(body)

    def _alive(self, instance: str, now: float) -> bool:
        if self._processes.gone(instance):  # its process died: no clock can make it look alive
            # Its lock files are removed: its heartbeat goes too, or the next question (its next claim) would be
            # answered by that heartbeat's time alone (gateway/storage/liveness.py).
            with contextlib.suppress(StoreUnavailable, sqlite3.Error):
                self._db.transaction(lambda conn: conn.execute(_FORGET, (instance,)))
            return False
        conn = self._db.connection()
        row = conn.execute("SELECT alive_until FROM instances WHERE instance = ?", (instance,)).fetchone()
        return row is not None and float(row[0]) > now

    async def heartbeat(self, instance: str, *, now: float, ttl: float) -> None:
        await self._db.run(self._heartbeat, instance, now, ttl)

    async def alive(self, instance: str, *, now: float) -> bool:
        return await self._db.run(self._alive, instance, now)

    async def record_tx(self, key: str, owner: str, tx_hash: str, *, now: float, lease: float) -> None:
        await self._db.run(self._record_tx, key, owner, tx_hash, now, lease)

    async def mark_paid(
        self,
        key: str,
        owner: str,
        tx_hash: str | None,
        *,
        now: float,
        lease: float,
        effects: tuple[Effect, ...] = (),
    ) -> None:
        if not await self._db.run(self._mark_paid, key, owner, tx_hash, now, lease, effects):
            raise PaymentReplayed("this payment's transfer was already used")

    async def finish(
        self, key: str, owner: str, *, served: bool, now: float, expires_at: float | None, delivered: bool = False
    ) -> bool:
        # One local transaction: a failed call wrote nothing, so ``delivered`` has nothing to decide here.
        return await self._db.run(self._finish, key, owner, served, now, expires_at)

    async def release(self, key: str, owner: str) -> None:
        await self._db.run(self._release, key, owner)

    async def get(self, key: str, *, now: float) -> ClaimRecord | None:
        return await self._db.run(self._get, key, now)

    async def purge_expired(self, now: float) -> int:
        """Delete every expired record (as ``claim`` does lazily for one key); return how many went."""
        return await self._db.run(self._purge, now)

    async def ping(self) -> None:
        await self._db.run(self._ping)

    async def aclose(self) -> None:
        await self._db.aclose()
        self._processes.close()
