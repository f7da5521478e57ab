"""The shared idempotency store: one Redis hash per record under ``x402:idem:``, every transition one Lua script
(atomic across gateway instances).

The logical expiry is the hash's ``exp`` field against the caller's clock; the Redis TTL is only garbage
collection, set relative to the caller's ``now`` (``PEXPIRE`` by ``exp - now`` plus
:data:`gateway.storage.redis_client.GC_SLACK`, :data:`gateway.storage.redis_client.GC_EXPIRE`), so Redis, counting
it down by its own clock, deletes a record GC_SLACK seconds after ``exp`` by the gateway's clock whatever the two
clocks say (never an absolute ``PEXPIREAT``, which Redis would read by its own clock).
"""

from __future__ import annotations

from typing import Any, ClassVar

from redis.commands.core import AsyncScript

from gateway.errors import StoreUnavailable
from gateway.storage.idempotency.contract import Begun, StoredResponse, decode_headers, encode_headers
from gateway.storage.redis_client import GC_EXPIRE, GC_SLACK, RedisStore, script_number

__all__ = ["PREFIX", "RedisIdempotencyStore"]

PREFIX = "x402:idem:"

# One hash per record: state, owner, fp, exp (+ status, headers, body once DONE). Redis TTL = exp - now + slack.
# KEYS: key. ARGV: fingerprint, owner, now, lease_until, slack.
# -> {'began', taken_over '0'|'1'} | {'in_flight'} | {'mismatch'} | {'done', status, headers, body}
_BEGIN = (
    GC_EXPIRE
    + """
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
gc_expire(key, tonumber(lease_until), now, tonumber(slack))
return {'began', taken}
"""
)

# KEYS: key. ARGV: owner, expires_at, status, headers, body, slack, now. -> 1 | 0
_COMPLETE = (
    GC_EXPIRE
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] ~= 'in_flight' or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'exp', ARGV[2], 'status', ARGV[3], 'headers', ARGV[4], 'body', ARGV[5])
gc_expire(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[7]), tonumber(ARGV[6]))
return 1
"""
)

# KEYS: key. ARGV: owner. -> 1 | 0
_ABANDON = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] == 'in_flight' and h[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


class RedisIdempotencyStore(RedisStore):
    """:class:`gateway.storage.idempotency.IdempotencyStore` on Redis (see the module docstring)."""

    WHAT = "idempotency store"
    PREFIX = PREFIX
    # Bodies are bytes; redis-py's default pool, as this store has always used.
    CLIENT_OPTIONS: ClassVar[dict[str, bool]] = {"decode_responses": False, "blocking_pool": False}

    def _register(self) -> None:
        self._begin = self._client.register_script(_BEGIN)
        self._complete = self._client.register_script(_COMPLETE)
        self._abandon = self._client.register_script(_ABANDON)

    async def _script(self, script: AsyncScript, key: str, *args: str | bytes) -> Any:
        return await self._client.run_script(script, [self._prefix + key], args)

    async def begin(self, key: str, fingerprint: str, owner: str, *, now: float, lease: float) -> Begun:
        res = await self._script(
            self._begin,
            key,
            fingerprint,
            owner,
            script_number(now),
            script_number(now + lease),
            script_number(GC_SLACK),
        )
        if not isinstance(res, list) or not res:
            raise StoreUnavailable("redis idempotency store: unexpected script reply")
        outcome = _text(res[0])
        if outcome == "began":
            return Begun("began", taken_over=_text(res[1]) == "1")
        if outcome == "done":
            status, headers, body = res[1:4]
            return Begun("done", StoredResponse(int(_text(status)), decode_headers(headers), bytes(body)))
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
            script_number(now + ttl),
            str(response.status),
            encode_headers(response.headers),
            response.body,
            script_number(GC_SLACK),
            script_number(now),
        )
        return bool(res == 1)

    async def abandon(self, key: str, owner: str) -> None:
        await self._script(self._abandon, key, owner)
