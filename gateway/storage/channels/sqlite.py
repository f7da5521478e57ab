"""The embedded channel store: table ``channels`` in the receipt store's SQLite file.

One worker thread owns the connection and every change is one ``BEGIN IMMEDIATE`` transaction, which takes the
write lock before the row is read: two processes beginning a request on one channel cannot both lock it, and a
fold commits a lapsed holder's charge exactly once (see :mod:`gateway.storage.sqlite_file`). The transitions are
the pure functions below, applied to the row read inside that transaction.

Every transaction is committed with fsync except :meth:`SQLiteChannelStore.begin` when it takes a free lock (no
fold): that one writes no charge, and what an OS crash could cost it is only the lock, and only together with every
later write that was not synced either (docs/sessions.md, "Durability").

``unclaimed_since`` (when the channel last went from fully claimed to not; NULL while nothing is owed) orders
and indexes :meth:`SQLiteChannelStore.unclaimed`; every write recomputes it from the row it writes.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import replace

from gateway.storage.channels.contract import Channel, ChannelBusy, ChannelMismatch, OnChainState, check_amount
from gateway.storage.sqlite_file import BUSY_TIMEOUT, SQLiteFile

__all__ = ["SQLiteChannelStore"]


class _FoldFirst(Exception):
    """``begin`` without fsync met a lapsed holder to fold: a fold commits a charge, so the call is made again with."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    channel_id            TEXT PRIMARY KEY,
    chain_id              INTEGER NOT NULL,
    payer                 TEXT NOT NULL,
    payer_authorizer      TEXT NOT NULL,
    receiver              TEXT NOT NULL,
    receiver_authorizer   TEXT NOT NULL,
    token                 TEXT NOT NULL,
    withdraw_delay        INTEGER NOT NULL,
    salt                  TEXT NOT NULL,
    balance               INTEGER NOT NULL,
    total_claimed         INTEGER NOT NULL,
    withdraw_requested_at INTEGER NOT NULL,
    refund_nonce          INTEGER NOT NULL,
    synced_at             REAL NOT NULL,
    charged               INTEGER NOT NULL,
    signed_max            INTEGER NOT NULL,
    signature             TEXT NOT NULL,
    updated_at            REAL NOT NULL,
    holder                TEXT,
    held_until            REAL NOT NULL,
    pending_max           INTEGER NOT NULL,
    pending_signature     TEXT NOT NULL,
    pending_charge        INTEGER,
    unclaimed_since       REAL
) WITHOUT ROWID
"""
_INDEX = (
    "CREATE INDEX IF NOT EXISTS channels_unclaimed ON channels (chain_id, unclaimed_since)"
    " WHERE unclaimed_since IS NOT NULL"
)
# SQL is spelled out in full (no string building): every value goes through a ``?``/``:name`` parameter.
_SELECT = (
    "SELECT channel_id, chain_id, payer, payer_authorizer, receiver, receiver_authorizer, token, withdraw_delay,"
    " salt, balance, total_claimed, withdraw_requested_at, refund_nonce, synced_at, charged, signed_max, signature,"
    " updated_at, holder, held_until, pending_max, pending_signature, pending_charge, unclaimed_since"
    " FROM channels WHERE channel_id = ?"
)
_INSERT = (
    "INSERT INTO channels (channel_id, chain_id, payer, payer_authorizer, receiver, receiver_authorizer, token,"
    " withdraw_delay, salt, balance, total_claimed, withdraw_requested_at, refund_nonce, synced_at, charged,"
    " signed_max, signature, updated_at, holder, held_until, pending_max, pending_signature, pending_charge,"
    " unclaimed_since) VALUES (:channel_id, :chain_id, :payer, :payer_authorizer, :receiver, :receiver_authorizer,"
    " :token, :withdraw_delay, :salt, :balance, :total_claimed, :withdraw_requested_at, :refund_nonce, :synced_at,"
    " :charged, :signed_max, :signature, :updated_at, :holder, :held_until, :pending_max, :pending_signature,"
    " :pending_charge, :unclaimed_since)"
)
# What a transition changes (the configuration never changes once opened).
_UPDATE = (
    "UPDATE channels SET balance = :balance, total_claimed = :total_claimed,"
    " withdraw_requested_at = :withdraw_requested_at, refund_nonce = :refund_nonce, synced_at = :synced_at,"
    " charged = :charged, signed_max = :signed_max, signature = :signature, updated_at = :updated_at,"
    " holder = :holder, held_until = :held_until, pending_max = :pending_max,"
    " pending_signature = :pending_signature, pending_charge = :pending_charge, unclaimed_since = :unclaimed_since"
    " WHERE channel_id = :channel_id"
)
# The same without ``unclaimed_since``, for a write that leaves it as it is (most of them: a lock, a charge on a
# channel that already owes): SQLite rewrites an index whose column an UPDATE sets, even to its own value, so
# naming it would cost one more page in the WAL, and in the fsync, per request.
_UPDATE_KEEP_SINCE = (
    "UPDATE channels SET balance = :balance, total_claimed = :total_claimed,"
    " withdraw_requested_at = :withdraw_requested_at, refund_nonce = :refund_nonce, synced_at = :synced_at,"
    " charged = :charged, signed_max = :signed_max, signature = :signature, updated_at = :updated_at,"
    " holder = :holder, held_until = :held_until, pending_max = :pending_max,"
    " pending_signature = :pending_signature, pending_charge = :pending_charge"
    " WHERE channel_id = :channel_id"
)
_UNCLAIMED = (
    "SELECT channel_id, chain_id, payer, payer_authorizer, receiver, receiver_authorizer, token, withdraw_delay,"
    " salt, balance, total_claimed, withdraw_requested_at, refund_nonce, synced_at, charged, signed_max, signature,"
    " updated_at, holder, held_until, pending_max, pending_signature, pending_charge, unclaimed_since"
    " FROM channels WHERE chain_id = :chain_id AND unclaimed_since IS NOT NULL"
    " AND (charged > total_claimed OR (holder IS NOT NULL AND held_until <= :now AND pending_charge > 0))"
    " ORDER BY unclaimed_since, channel_id LIMIT :limit"
)

# -- the transitions (pure: the same rules as the Lua scripts in redis.py) ------------------------------------


def _owes(ch: Channel) -> bool:
    """Is anything unclaimed, now or once a served holder is folded?"""
    return ch.charged > ch.total_claimed or (ch.pending_charge or 0) > 0


def _unlocked(ch: Channel, now: float) -> Channel:
    return replace(
        ch, holder=None, held_until=0.0, pending_max=0, pending_signature="", pending_charge=None, updated_at=now
    )


def _fold(ch: Channel, now: float) -> Channel:
    """Drop the holder; commit its served charge first, never beyond what its voucher covers."""
    if ch.pending_charge is not None and ch.pending_max >= ch.charged:
        charge = min(ch.pending_charge, ch.pending_max - ch.charged)
        ch = replace(ch, charged=ch.charged + charge, signed_max=ch.pending_max, signature=ch.pending_signature)
    return _unlocked(ch, now)


def _lapsed(ch: Channel, now: float) -> bool:
    return ch.holder is not None and ch.held_until <= now


def _covers(ch: Channel, charge: int) -> None:
    if charge > ch.pending_max - ch.charged:
        raise ValueError(
            f"channel store: a charge of {charge} is not covered by the pending voucher"
            f" ({ch.pending_max} - charged {ch.charged})"
        )


# -- rows -----------------------------------------------------------------------------------------------------

_Row = tuple[
    str, int, str, str, str, str, str, int, str, int, int, int, int, float, int, int, str, float,
    str | None, float, int, str, int | None, float | None,
]  # fmt: skip


def _channel(row: _Row) -> Channel:
    return Channel(*row[:-1])


def _owing(row: _Row) -> Channel:
    """A row of :meth:`SQLiteChannelStore.unclaimed`: with the moment it started owing."""
    return Channel(*row[:-1], owing_since=row[-1])


def _params(ch: Channel, since: float | None) -> dict[str, object]:
    return {
        "channel_id": ch.channel_id,
        "chain_id": ch.chain_id,
        "payer": ch.payer,
        "payer_authorizer": ch.payer_authorizer,
        "receiver": ch.receiver,
        "receiver_authorizer": ch.receiver_authorizer,
        "token": ch.token,
        "withdraw_delay": ch.withdraw_delay,
        "salt": ch.salt,
        "balance": ch.balance,
        "total_claimed": ch.total_claimed,
        "withdraw_requested_at": ch.withdraw_requested_at,
        "refund_nonce": ch.refund_nonce,
        "synced_at": ch.synced_at,
        "charged": ch.charged,
        "signed_max": ch.signed_max,
        "signature": ch.signature,
        "updated_at": ch.updated_at,
        "holder": ch.holder,
        "held_until": ch.held_until,
        "pending_max": ch.pending_max,
        "pending_signature": ch.pending_signature,
        "pending_charge": ch.pending_charge,
        "unclaimed_since": since,
    }


def _load(conn: sqlite3.Connection, channel_id: str) -> tuple[Channel, float | None] | None:
    row: _Row | None = conn.execute(_SELECT, (channel_id,)).fetchone()
    return None if row is None else (_channel(row), row[-1])


class _Since(enum.Enum):
    STORED = "stored"  # _save's ``was`` when ``since`` is the row's stored value


def _save(
    conn: sqlite3.Connection, ch: Channel, since: float | None, now: float, was: float | _Since | None = _Since.STORED
) -> None:
    """Write ``ch`` with ``unclaimed_since`` kept (still owing, or still not), set (starts owing) or cleared. ``was``:
    the row's stored value, when ``since`` is another one (by default it is the stored one)."""
    stored = since if was is _Since.STORED else was
    if not _owes(ch):
        since = None
    elif since is None:
        since = now
    conn.execute(_UPDATE_KEEP_SINCE if since == stored else _UPDATE, _params(ch, since))


def _after_claims(old: Channel, new: Channel, since: float | None) -> float | None:
    """``unclaimed_since`` once the chain's claimed total went from ``old``'s to ``new``'s: a claim took what was owed
    since then, so what is left owes from now (None: ``_save`` sets it), the age ``claim_after`` bounds; a claim a
    reorganisation undid owes since before it: due at once (0)."""
    if new.total_claimed > old.total_claimed:
        return None
    return 0.0 if new.total_claimed < old.total_claimed else since


def _check_channel(ch: Channel) -> None:
    for name in ("chain_id", "withdraw_delay", "balance", "total_claimed", "withdraw_requested_at", "refund_nonce"):
        check_amount(name, getattr(ch, name))
    check_amount("charged", ch.charged)
    check_amount("signed_max", ch.signed_max)


def _check_state(state: OnChainState) -> None:
    for name in ("balance", "total_claimed", "withdraw_requested_at", "refund_nonce"):
        check_amount(name, getattr(state, name))


class SQLiteChannelStore:
    """:class:`gateway.storage.channels.ChannelStore` on one SQLite file (see the module docstring)."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self._db = SQLiteFile(
            path,
            schema=(_SCHEMA, _INDEX),
            busy_timeout=busy_timeout,
            what="channel store",
            thread="x402-channels-sqlite",
        )

    def __repr__(self) -> str:
        return f"SQLiteChannelStore(path={self._db.path!r})"

    # -- worker-thread side ---------------------------------------------------------------------------------

    def _open(self, channel: Channel, now: float) -> Channel:
        def body(conn: sqlite3.Connection) -> Channel:
            found = _load(conn, channel.channel_id)
            if found is not None:
                return found[0]
            ch = _unlocked(replace(channel, charged=max(channel.charged, channel.total_claimed)), now)
            conn.execute(_INSERT, _params(ch, now if _owes(ch) else None))
            return ch

        return self._db.transaction(body)

    def _sync(self, channel_id: str, state: OnChainState, now: float) -> Channel | None:
        def body(conn: sqlite3.Connection) -> Channel | None:
            found = _load(conn, channel_id)
            if found is None:
                return None
            ch = replace(found[0].with_onchain(state, now=now), updated_at=now)
            _save(conn, ch, _after_claims(found[0], ch, found[1]), now, was=found[1])
            return ch

        return self._db.transaction(body)

    def _begin(
        self,
        channel_id: str,
        holder: str,
        expected: int,
        voucher_max: int,
        signature: str,
        now: float,
        lease: float,
        take_over_from: str | None,
        durable: bool,
    ) -> tuple[str, Channel]:
        def body(conn: sqlite3.Connection) -> tuple[str, Channel]:
            found = _load(conn, channel_id)
            if found is None:
                raise KeyError(channel_id)
            ch, since = found
            folded = ch.holder is not None and (_lapsed(ch, now) or ch.holder == take_over_from)
            if folded:
                if not durable:
                    raise _FoldFirst  # rolled back: nothing of this call was written
                ch = _fold(ch, now)
            if ch.holder is not None:
                return "busy", ch
            if ch.charged != expected:
                if folded:
                    _save(conn, ch, since, now)  # the fold stands, whatever this request's fate
                return "mismatch", ch
            ch = replace(
                ch,
                holder=holder,
                held_until=now + lease,
                pending_max=voucher_max,
                pending_signature=signature,
                pending_charge=None,
                updated_at=now,
            )
            _save(conn, ch, since, now)
            return "ok", ch

        return self._db.transaction(body)

    def _served(self, channel_id: str, holder: str, charge: int, now: float) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            found = _load(conn, channel_id)
            if found is None or found[0].holder != holder:
                return False
            ch, since = found
            _covers(ch, charge)
            _save(conn, replace(ch, pending_charge=charge, updated_at=now), since, now)
            return True

        return self._db.transaction(body)

    def _commit(self, channel_id: str, holder: str, charge: int, now: float) -> Channel | None:
        def body(conn: sqlite3.Connection) -> Channel | None:
            found = _load(conn, channel_id)
            if found is None or found[0].holder != holder:
                return None
            ch, since = found
            _covers(ch, charge)
            ch = _unlocked(
                replace(ch, charged=ch.charged + charge, signed_max=ch.pending_max, signature=ch.pending_signature),
                now,
            )
            _save(conn, ch, since, now)
            return ch

        return self._db.transaction(body)

    def _release(self, channel_id: str, holder: str) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            found = _load(conn, channel_id)
            if found is None or found[0].holder != holder:
                return False
            ch, since = found
            # The protocol gives release no ``now``: updated_at keeps the time the lock was taken.
            _save(conn, _unlocked(ch, ch.updated_at), since, ch.updated_at)
            return True

        return self._db.transaction(body)

    def _fold_lapsed(self, channel_id: str, now: float) -> Channel | None:
        def body(conn: sqlite3.Connection) -> Channel | None:
            found = _load(conn, channel_id)
            if found is None:
                return None
            ch, since = found
            if _lapsed(ch, now):
                ch = _fold(ch, now)
                _save(conn, ch, since, now)
            return ch

        return self._db.transaction(body)

    def _record_claimed(self, channel_id: str, total_claimed: int, now: float) -> Channel | None:
        def body(conn: sqlite3.Connection) -> Channel | None:
            found = _load(conn, channel_id)
            if found is None:
                return None
            ch, since = found
            claimed = max(ch.total_claimed, total_claimed)
            new = replace(ch, total_claimed=claimed, charged=max(ch.charged, claimed), updated_at=now)
            _save(conn, new, _after_claims(ch, new, since), now, was=since)
            ch = new
            return ch

        return self._db.transaction(body)

    def _unclaimed(self, chain_id: int, now: float, limit: int) -> list[Channel]:
        rows: list[_Row] = (
            self._db.connection().execute(_UNCLAIMED, {"chain_id": chain_id, "now": now, "limit": limit}).fetchall()
        )
        return [_owing(row) for row in rows]

    def _ping(self) -> None:
        self._db.connection().execute("SELECT 1 FROM channels LIMIT 1").fetchall()

    # -- event-loop side ------------------------------------------------------------------------------------

    async def get(self, channel_id: str) -> Channel | None:
        found = await self._db.read(lambda conn: _load(conn, channel_id))
        return None if found is None else found[0]

    async def open(self, channel: Channel, *, now: float) -> Channel:
        _check_channel(channel)
        return await self._db.run(self._open, channel, now)

    async def sync(self, channel_id: str, state: OnChainState, *, now: float) -> Channel | None:
        _check_state(state)
        return await self._db.run(self._sync, channel_id, state, now)

    async def begin(
        self,
        channel_id: str,
        holder: str,
        *,
        expected_charged: int,
        voucher_max: int,
        signature: str,
        now: float,
        lease: float,
        take_over_from: str | None = None,
    ) -> Channel:
        if not holder:
            raise ValueError("channel store: a holder must name its request")
        check_amount("expected_charged", expected_charged)
        check_amount("voucher_max", voucher_max)
        args = (channel_id, holder, expected_charged, voucher_max, signature, now, lease, take_over_from)
        try:
            # Taking a free lock writes no charge: committed without fsync (docs/sessions.md, "Durability").
            outcome, ch = await self._db.run(self._begin, *args, False, durable=False)
        except _FoldFirst:
            outcome, ch = await self._db.run(self._begin, *args, True)
        if outcome == "busy":
            raise ChannelBusy("another request on this channel is in flight", holder=ch.holder)
        if outcome == "mismatch":
            raise ChannelMismatch(f"the voucher's base is {expected_charged}, the channel's charged {ch.charged}", ch)
        return ch

    async def served(self, channel_id: str, holder: str, charge: int, *, now: float) -> bool:
        check_amount("charge", charge)
        return await self._db.run(self._served, channel_id, holder, charge, now)

    async def commit(self, channel_id: str, holder: str, charge: int, *, now: float) -> Channel | None:
        check_amount("charge", charge)
        return await self._db.run(self._commit, channel_id, holder, charge, now)

    async def release(self, channel_id: str, holder: str) -> bool:
        return await self._db.run(self._release, channel_id, holder)

    async def fold(self, channel_id: str, *, now: float) -> Channel | None:
        return await self._db.run(self._fold_lapsed, channel_id, now)

    async def unclaimed(self, chain_id: int, *, now: float, limit: int) -> list[Channel]:
        if limit <= 0:
            return []  # SQLite reads a negative LIMIT as none at all
        return await self._db.run(self._unclaimed, chain_id, now, limit)

    async def record_claimed(self, channel_id: str, total_claimed: int, *, now: float) -> Channel | None:
        check_amount("total_claimed", total_claimed)
        return await self._db.run(self._record_claimed, channel_id, total_claimed, now)

    async def ping(self) -> None:
        await self._db.run(self._ping)

    async def aclose(self) -> None:
        await self._db.aclose()
