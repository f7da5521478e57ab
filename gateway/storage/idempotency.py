"""Idempotency records: where a paid answer is kept for the retry whose response was lost (THREATS 13).

One record per ``record_key`` (a digest of the ``Idempotency-Key`` and the payment headers, see
:mod:`gateway.idempotency`); the store never sees a raw key or a raw payment header. Life of a record::

    (absent) --begin--> IN_FLIGHT(owner, fingerprint, lease) --complete--> DONE(response, ttl)
                            '--abandon--> (absent)        (failure: the retry proceeds normally)

* ``begin`` is one atomic step (SQLite ``BEGIN IMMEDIATE``, one Redis Lua script): of N concurrent requests with
  the same record key exactly one gets ``began``; the others see ``in_flight`` (or ``mismatch`` when their request
  fingerprint differs, or ``done`` with the stored response once it is stored).
* An IN_FLIGHT record's expiry is its lease: a gateway that died mid-request leaves a record that a retry takes
  over once the lease has passed (``began`` with ``taken_over=True``). A DONE record lives ``ttl`` seconds.
* ``complete``/``abandon`` are compare-and-set on ``owner``: a request whose lease lapsed and was taken over
  cannot overwrite or delete the new owner's record.

``open_idempotency_store(url)`` takes the receipt store's URL forms (``sqlite:///path``, ``redis://...``); the
SQLite table ``idempotency`` and the Redis prefix ``x402:idem:`` can share the receipt store's file or server.

Fail closed (THREATS 17): every backend failure raises :class:`gateway.errors.StoreUnavailable`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from redis.commands.core import AsyncScript

from gateway.errors import ConfigError, StoreUnavailable
from gateway.storage.receipts_redis import GC_SLACK, redact_url
from gateway.storage.redis_client import RedisClient
from gateway.storage.sqlite_file import SQLiteFile

__all__ = [
    "Begun",
    "IdempotencyStore",
    "RedisIdempotencyStore",
    "SQLiteIdempotencyStore",
    "StoredResponse",
    "open_idempotency_store",
]

Outcome = Literal["began", "in_flight", "mismatch", "done"]


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Begun:
    """What ``begin`` found: ``began`` (the caller owns a fresh IN_FLIGHT record), ``in_flight`` (someone else's
    live lease, same fingerprint), ``mismatch`` (a live record with another fingerprint) or ``done`` (the stored
    ``response``, same fingerprint)."""

    outcome: Outcome
    response: StoredResponse | None = None
    taken_over: bool = False  # ``began`` over an IN_FLIGHT record whose lease had lapsed


@runtime_checkable
class IdempotencyStore(Protocol):
    """Every method raises ``StoreUnavailable`` when the backend cannot answer. ``now`` is epoch seconds."""

    async def begin(self, key: str, fingerprint: str, owner: str, *, now: float, lease: float) -> Begun: ...

    async def complete(self, key: str, owner: str, response: StoredResponse, *, now: float, ttl: float) -> bool:
        """IN_FLIGHT(owner) -> DONE(response) for ``ttl`` seconds; False if ``owner`` no longer holds it."""
        ...

    async def abandon(self, key: str, owner: str) -> None:
        """Delete ``owner``'s IN_FLIGHT record; a no-op if it lost it."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


def _encode_headers(headers: list[tuple[bytes, bytes]]) -> str:
    return json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers], separators=(",", ":"))


def _decode_headers(text: str | bytes) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(text)]


# ------------------------------------------------------------------------------------------------------- SQLite

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
    """:class:`IdempotencyStore` on one SQLite file: one worker thread owns the connection, every transition is
    one ``BEGIN IMMEDIATE`` transaction (the same discipline as :mod:`gateway.store.sqlite`)."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
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
                        return Begun("done", StoredResponse(int(status), _decode_headers(headers), bytes(stored)))
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
                (now + ttl, response.status, _encode_headers(response.headers), response.body, now, key, owner),
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


# -------------------------------------------------------------------------------------------------------- Redis

# One hash per record: state, owner, fp, exp (+ status, headers, body once DONE). Redis TTL = exp + slack (GC only;
# the logical expiry is ``exp`` against the caller's clock, as in gateway.store.redis).
# KEYS: key. ARGV: fingerprint, owner, now, lease_until, slack.
# -> {'began', taken_over '0'|'1'} | {'in_flight'} | {'mismatch'} | {'done', status, headers, body}
_BEGIN = """
local key, fp, owner, now, lease_until, slack = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local h = redis.call('HMGET', key, 'state', 'owner', 'fp', 'exp')
local taken = '0'
if h[1] then
  if tonumber(h[4]) >= now then
    if h[3] ~= fp then return {'mismatch'} end
    if h[1] == 'done' then
      local r = redis.call('HMGET', key, 'status', 'headers', 'body')
      return {'done', r[1], r[2], r[3]}
    end
    if h[2] ~= owner then return {'in_flight'} end
  end
  if h[1] == 'in_flight' and h[2] ~= owner then taken = '1' end
  redis.call('DEL', key)
end
redis.call('HSET', key, 'state', 'in_flight', 'owner', owner, 'fp', fp, 'exp', lease_until)
redis.call('PEXPIREAT', key, string.format('%.0f', math.ceil((tonumber(lease_until) + tonumber(slack)) * 1000)))
return {'began', taken}
"""

# KEYS: key. ARGV: owner, expires_at, status, headers, body, slack. -> 1 | 0
_COMPLETE_LUA = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] ~= 'in_flight' or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'exp', ARGV[2], 'status', ARGV[3], 'headers', ARGV[4], 'body', ARGV[5])
redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', math.ceil((tonumber(ARGV[2]) + tonumber(ARGV[6])) * 1000)))
return 1
"""

# KEYS: key. ARGV: owner. -> 1 | 0
_ABANDON_LUA = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] == 'in_flight' and h[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


class RedisIdempotencyStore:
    """:class:`IdempotencyStore` on Redis: every transition one Lua script (atomic across gateway instances)."""

    def __init__(
        self, url: str, *, prefix: str = "x402:idem:", socket_timeout: float = 2.0, connect_timeout: float = 2.0
    ) -> None:
        self._prefix = prefix
        self._client = RedisClient(
            url,
            what="idempotency store",
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            decode_responses=False,  # bodies are bytes
            blocking_pool=False,  # redis-py's default pool, as this store has always used
        )
        self._begin = self._client.register_script(_BEGIN)
        self._complete = self._client.register_script(_COMPLETE_LUA)
        self._abandon = self._client.register_script(_ABANDON_LUA)

    def __repr__(self) -> str:
        return f"RedisIdempotencyStore(url={self._client.redacted!r}, prefix={self._prefix!r})"

    async def _script(self, script: AsyncScript, key: str, *args: str | bytes) -> Any:
        return await self._client.run_script(script, [self._prefix + key], args)

    async def begin(self, key: str, fingerprint: str, owner: str, *, now: float, lease: float) -> Begun:
        res = await self._script(
            self._begin, key, fingerprint, owner, repr(float(now)), repr(float(now + lease)), repr(GC_SLACK)
        )
        if not isinstance(res, list) or not res:
            raise StoreUnavailable("redis idempotency store: unexpected script reply")
        outcome = _text(res[0])
        if outcome == "began":
            return Begun("began", taken_over=_text(res[1]) == "1")
        if outcome == "done":
            status, headers, body = res[1:4]
            return Begun("done", StoredResponse(int(_text(status)), _decode_headers(headers), bytes(body)))
        if outcome == "in_flight":
            return Begun("in_flight")
        if outcome == "mismatch":
            return Begun("mismatch")
        raise StoreUnavailable("redis idempotency store: unexpected script reply")

    async def complete(self, key: str, owner: str, response: StoredResponse, *, now: float, ttl: float) -> bool:
        res = await self._script(
            self._complete,
            key,
            owner,
            repr(float(now + ttl)),
            str(response.status),
            _encode_headers(response.headers),
            response.body,
            repr(GC_SLACK),
        )
        return bool(res == 1)

    async def abandon(self, key: str, owner: str) -> None:
        await self._script(self._abandon, key, owner)

    async def ping(self) -> None:
        await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()


# --------------------------------------------------------------------------------------------------------- open

_SQLITE_PREFIX = "sqlite:///"
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def open_idempotency_store(url: str, *, config_key: str = "idempotency.store_url") -> IdempotencyStore:
    """The store named by ``url`` (the receipt store's forms); ``ConfigError(config_key, ...)`` otherwise.
    Nothing is connected here: ``await store.ping()`` at start-up to fail fast."""
    shown = redact_url(url)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        path = url[len(_SQLITE_PREFIX) :] if url.startswith(_SQLITE_PREFIX) else ""
        if not path or path.endswith("/") or path == ":memory:" or "?" in path:
            raise ConfigError(
                config_key, f"expected sqlite:///relative/path.db or sqlite:////abs/path.db, got {shown!r}"
            )
        return SQLiteIdempotencyStore(path)
    if scheme in _REDIS_SCHEMES:
        try:
            parts = urlsplit(url)
            _ = parts.port
        except ValueError as exc:
            raise ConfigError(config_key, f"malformed redis url {shown!r}") from exc
        if scheme != "unix" and not parts.hostname:
            raise ConfigError(config_key, f"redis url without a host: {shown!r}")
        try:
            return RedisIdempotencyStore(url)
        except Exception as exc:
            raise ConfigError(config_key, f"invalid redis url {shown!r}") from exc
    raise ConfigError(config_key, f"unsupported store scheme {scheme!r}: use sqlite:/// or redis://")
