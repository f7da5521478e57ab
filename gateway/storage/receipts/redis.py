"""The shared receipt store: one Redis hash per payment, every transition one Lua script.

Exactly-once across gateway instances: Redis runs a script atomically, so each compare-and-set (read the hash,
check state/owner/lease, write) is one indivisible step however many gateways share the server. Scripts are
registered once and called by EVALSHA (redis-py loads them again after a ``NOSCRIPT``, e.g. after a restart).

Time: ``now`` always comes from the caller, so the semantics do not depend on the Redis host's clock. The
hash's Redis TTL is only garbage collection: every transition sets it relative to the caller's ``now``
(``PEXPIRE`` by the logical expiry minus ``now``, plus :data:`gateway.storage.redis_client.GC_SLACK`; see
:data:`gateway.storage.redis_client.GC_EXPIRE`), or ``PERSIST`` for records kept for ever. Redis counts that TTL
down by its own clock, so the hash goes GC_SLACK seconds after the logical expiry by the gateway's clock, however
far the gateway's and the Redis host's clocks disagree: Redis never deletes a record that the gateway still
considers live (never an absolute ``PEXPIREAT``, which Redis would read by its own clock). A PENDING/PAID claim
never expires under a live lease (its TTL covers the later of the expiry and the lease).

Fail closed (a store that cannot answer cannot tell a first presentation from a replay): every Redis error
becomes :class:`StoreUnavailable`, quickly (see :mod:`gateway.storage.redis_client`). Every script is safe to
repeat: a repeated ``claim`` sees its own live claim and answers ``PaymentInFlight`` (fail closed); the other
transitions are idempotent for the owner that holds the claim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from redis.commands.core import AsyncScript

from gateway.errors import PaymentInFlight, PaymentReplayed, StoreUnavailable
from gateway.storage.receipts.contract import ClaimRecord, ClaimState, Effect, link_owner
from gateway.storage.redis_client import GC_EXPIRE, GC_SLACK, RedisStore, script_number

__all__ = ["PREFIX", "RedisReceiptStore"]

PREFIX = "x402:"
# On a Redis Cluster every receipt key carries one hash tag: mark_paid changes a payment's claim and the transfer it
# spent in one script, and the two keys must share a slot. (One server or Sentinel keeps the untagged names of
# earlier versions, so that an upgrade keeps every record.)
CLUSTER_PREFIX = "x402:{rcpt}:"

_FIELDS = ("state", "owner", "tx", "lease", "exp", "upd")

# Shared by every script. Hash fields are strings; '' stands for None (tx hash, expiry). set_expiry's TTL is relative
# to the caller's ``now`` (GC_EXPIRE), never an instant by the gateway's clock.
_PRELUDE = (
    GC_EXPIRE
    + """
local function expired(state, lease, exp, now)
  if exp == '' or tonumber(exp) >= now then return false end
  return not ((state == 'pending' or state == 'paid') and tonumber(lease) > now)
end
local function set_expiry(key, state, lease, exp, now, slack)
  if exp == '' then
    redis.call('PERSIST', key)
    return
  end
  local t = tonumber(exp)
  if (state == 'pending' or state == 'paid') and tonumber(lease) > t then t = tonumber(lease) end
  gc_expire(key, t, now, slack)
end
local function load(key, now)
  local h = redis.call('HMGET', key, 'state', 'owner', 'tx', 'lease', 'exp', 'upd')
  if not h[1] then return nil end
  if expired(h[1], h[4], h[5], now) then
    redis.call('DEL', key)
    return nil
  end
  return h
end
"""
)

# KEYS: key. ARGV: owner, now, lease_until, expires_at|'', slack, take_over_from|''.
# -> {'ok', state, owner, tx, lease_until, expires_at, updated_at, resumed} | {'replayed'} | {'inflight', holder}
_CLAIM = (
    _PRELUDE
    + """
local key, owner, now_s, lease, exp, slack = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local h = load(key, tonumber(now_s))
if h and h[2] == owner and h[6] == now_s then
  -- this very call, sent again (redis-py resends after a dropped connection): its own answer, not "in flight"
  local resumed = '0'
  if h[1] ~= 'pending' or h[3] ~= '' then resumed = '1' end
  return {'ok', h[1], h[2], h[3], h[4], h[5], h[6], resumed}
end
if not h then
  redis.call('HSET', key, 'state', 'pending', 'owner', owner, 'tx', '', 'lease', lease, 'exp', exp, 'upd', now_s)
  set_expiry(key, 'pending', lease, exp, tonumber(now_s), slack)
  return {'ok', 'pending', owner, '', lease, exp, now_s, '0'}
end
local state = h[1]
if state == 'consumed' then return {'replayed'} end
if state == 'unserved' then
  state = 'paid'
elseif tonumber(h[4]) > tonumber(now_s) and (ARGV[6] == '' or h[2] ~= ARGV[6]) then
  return {'inflight', h[2]}
end
-- taking over never shortens the record's protection: keep the later expiry ('' = for ever)
local new_exp = exp
if h[5] == '' or exp == '' then new_exp = '' elseif tonumber(h[5]) > tonumber(exp) then new_exp = h[5] end
redis.call('HSET', key, 'state', state, 'owner', owner, 'lease', lease, 'exp', new_exp, 'upd', now_s)
set_expiry(key, state, lease, new_exp, tonumber(now_s), slack)
return {'ok', state, owner, h[3], lease, new_exp, now_s, '1'}
"""
)

# KEYS: key. ARGV: owner, tx_hash, now, lease_until, slack. -> 'ok' | 'lost'
_RECORD_TX = (
    _PRELUDE
    + """
local key = KEYS[1]
local h = load(key, tonumber(ARGV[3]))
if not h or h[1] ~= 'pending' or h[2] ~= ARGV[1] then return 'lost' end
redis.call('HSET', key, 'tx', ARGV[2], 'lease', ARGV[4], 'upd', ARGV[3])
set_expiry(key, 'pending', ARGV[4], h[5], tonumber(ARGV[3]), tonumber(ARGV[5]))
return 'ok'
"""
)

# KEYS: key, effect keys... ARGV: owner, has_tx '1'|'0', tx_hash, now, lease_until, slack, link, then one expiry|''
# per effect key. -> 'ok' | 'lost' | 'replayed' (an effect key is held by something else: this claim is now CONSUMED
# and no effect key was taken)
_MARK_PAID = (
    _PRELUDE
    + """
local key = KEYS[1]
local now = tonumber(ARGV[4])
local h = load(key, now)
if not h or (h[1] ~= 'pending' and h[1] ~= 'paid') or h[2] ~= ARGV[1] then return 'lost' end
local tx = h[3]
if ARGV[2] == '1' then tx = ARGV[3] end
local free = {}
for i = 2, #KEYS do
  local e = load(KEYS[i], now)
  if e and e[2] ~= ARGV[7] then
    redis.call('HSET', key, 'state', 'consumed', 'tx', tx, 'upd', ARGV[4])
    set_expiry(key, 'consumed', h[4], h[5], now, tonumber(ARGV[6]))
    return 'replayed'
  end
  if not e then free[#free + 1] = i end
end
for _, i in ipairs(free) do
  local exp = ARGV[6 + i]
  redis.call('HSET', KEYS[i], 'state', 'consumed', 'owner', ARGV[7], 'tx', tx, 'lease', '0', 'exp', exp,
    'upd', ARGV[4])
  set_expiry(KEYS[i], 'consumed', '0', exp, now, tonumber(ARGV[6]))
end
redis.call('HSET', key, 'state', 'paid', 'tx', tx, 'lease', ARGV[5], 'upd', ARGV[4])
set_expiry(key, 'paid', ARGV[5], h[5], now, tonumber(ARGV[6]))
return 'ok'
"""
)

# KEYS: key. ARGV: owner, served '1'|'0', now, expires_at|'', slack. -> 'ok' | 'lost'
_FINISH = (
    _PRELUDE
    + """
local key = KEYS[1]
local h = load(key, tonumber(ARGV[3]))
if h and h[2] == ARGV[1] and h[6] == ARGV[3] and (h[1] == 'consumed' or h[1] == 'unserved') then
  return 'ok'  -- this very call, sent again after a dropped connection
end
if not h or h[1] ~= 'paid' or h[2] ~= ARGV[1] then return 'lost' end
local state = 'unserved'
if ARGV[2] == '1' then state = 'consumed' end
redis.call('HSET', key, 'state', state, 'exp', ARGV[4], 'upd', ARGV[3])
set_expiry(key, state, h[4], ARGV[4], tonumber(ARGV[3]), tonumber(ARGV[5]))
return 'ok'
"""
)

# KEYS: key. ARGV: owner, now. -> 1 if the lease ended else 0. Ended outright (0), never "at now": a clock that
# steps back afterwards must not make the lease live again.
_LAPSE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if (h[1] == 'pending' or h[1] == 'paid') and h[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'lease', '0')
  return 1
end
return 0
"""

# A write that failed (no reply, or too few replicas acknowledged it: docs/scaling.md) may still be on the master. The
# request is refused, so what this very write did (same owner, same 'upd' stamp) is undone to say "nothing served".
# KEYS: key. ARGV: owner, the claim's 'upd'. A fresh claim (nothing broadcast) is given back; a resumed paid one is
# paid-but-unserved again; one with a settlement in flight keeps it but ends its lease (the next presentation
# takes it over and reconciles). -> 1 | 0
_UNCLAIM = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner', 'tx', 'upd')
if h[2] ~= ARGV[1] or h[4] ~= ARGV[2] then return 0 end
if h[1] == 'pending' and h[3] == '' then return redis.call('DEL', KEYS[1]) end
if h[1] == 'paid' then
  redis.call('HSET', KEYS[1], 'state', 'unserved')
  return 1
end
if h[1] == 'pending' then
  redis.call('HSET', KEYS[1], 'lease', ARGV[2])
  return 1
end
return 0
"""

# KEYS: key. ARGV: owner, the 'upd' of the consumed write. Our very consumed write becomes paid-but-unserved. -> 1 | 0
_UNCONSUME = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner', 'upd')
if h[1] == 'consumed' and h[2] == ARGV[1] and h[3] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'state', 'unserved')
  return 1
end
return 0
"""

# KEYS: key. ARGV: owner. -> 1 if deleted else 0
_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] == 'pending' and h[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _opt(value: float | None) -> str:
    return "" if value is None else script_number(value)


class RedisReceiptStore(RedisStore):
    """:class:`gateway.storage.receipts.ReceiptStore` on Redis (see the module docstring)."""

    may_forget = True  # restarted empty, or failed over without the last writes (see ReceiptStore)

    WHAT = "receipt store"
    PREFIX = PREFIX
    CLUSTER_PREFIX = CLUSTER_PREFIX

    def _register(self) -> None:
        self._claim = self._client.register_script(_CLAIM)
        self._record_tx = self._client.register_script(_RECORD_TX)
        self._mark_paid = self._client.register_script(_MARK_PAID)
        self._finish = self._client.register_script(_FINISH)
        self._release = self._client.register_script(_RELEASE)
        self._lapse = self._client.register_script(_LAPSE)
        self._unclaim = self._client.register_script(_UNCLAIM)
        self._unconsume = self._client.register_script(_UNCONSUME)

    async def _undo(self, script: AsyncScript, key: str, *args: str) -> None:
        """Best effort, guarded by owner and stamp (a no-op when the write never happened). If the store cannot
        answer this either, a claim's lease ends it (its holder is refused meanwhile: 409, then taken over); a
        consumed record stays, the residual docs/threat-model.md T17 names."""
        with contextlib.suppress(StoreUnavailable):
            await self._script(script, key, *args)

    async def _script(self, script: AsyncScript, key: str, *args: str, replicated: bool = False) -> Any:
        return await self._client.run_script(script, [self._prefix + key], args, replicated=replicated)

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
        try:
            res = await self._claim_script(key, owner, now=now, lease=lease, expires_at=expires_at, take=take_over_from)
        except StoreUnavailable:
            await self._undo(self._unclaim, key, owner, script_number(now))
            raise
        return self._claimed(key, res)

    async def _claim_script(
        self, key: str, owner: str, *, now: float, lease: float, expires_at: float | None, take: str | None
    ) -> Any:
        return await self._script(
            self._claim,
            key,
            owner,
            script_number(now),
            script_number(now + lease),
            _opt(expires_at),
            script_number(GC_SLACK),
            take or "",
            replicated=True,
        )

    @staticmethod
    def _claimed(key: str, res: Any) -> ClaimRecord:
        if not isinstance(res, list) or not res:
            raise StoreUnavailable("redis receipt store: unexpected script reply")
        if res[0] == "replayed":
            raise PaymentReplayed("this payment was already used")
        if res[0] == "inflight":
            holder = str(res[1]) if len(res) > 1 else None
            raise PaymentInFlight("this payment is being used by another request", holder=holder)
        _status, state, rec_owner, tx, lease_until, exp, upd, resumed = res
        return ClaimRecord(
            key=key,
            state=ClaimState(state),
            owner=rec_owner,
            tx_hash=tx or None,
            lease_until=float(lease_until),
            expires_at=float(exp) if exp else None,
            updated_at=float(upd),
            resumed=resumed == "1",
        )

    async def record_tx(self, key: str, owner: str, tx_hash: str, *, now: float, lease: float) -> None:
        res = await self._script(
            self._record_tx,
            key,
            owner,
            tx_hash,
            script_number(now),
            script_number(now + lease),
            script_number(GC_SLACK),
        )
        if res != "ok":
            raise PaymentInFlight("the claim on this payment was lost")

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
        # All keys in one script: the claim and the effects it spends change together or not at all (on a Redis
        # Cluster they all carry the store's one hash tag, CLUSTER_PREFIX).
        keys = [self._prefix + key, *(self._prefix + e.key for e in effects)]
        args = [
            owner,
            "0" if tx_hash is None else "1",
            tx_hash or "",
            script_number(now),
            script_number(now + lease),
            script_number(GC_SLACK),
            link_owner(key, owner),
            *(_opt(e.expires_at) for e in effects),
        ]
        res = await self._client.run_script(self._mark_paid, keys, args, replicated=True)
        if res == "replayed":
            raise PaymentReplayed("this payment's transfer was already used")
        if res != "ok":
            raise PaymentInFlight("the claim on this payment was lost")

    async def finish(
        self, key: str, owner: str, *, served: bool, now: float, expires_at: float | None, delivered: bool = False
    ) -> bool:
        # A lost claim ('lost') is not an error here, but the caller must know before it serves.
        stamp = script_number(now)
        try:
            res = await self._finish_script(key, owner, served=served, stamp=stamp, expires_at=expires_at)
        except StoreUnavailable:
            if served and not delivered:  # refused, so not served: paid-but-unserved, its retry is served
                await self._undo(self._unconsume, key, owner, stamp)
            raise
        return bool(res == "ok")

    async def _finish_script(self, key: str, owner: str, *, served: bool, stamp: str, expires_at: float | None) -> Any:
        return await self._script(
            self._finish,
            key,
            owner,
            "1" if served else "0",
            stamp,
            _opt(expires_at),
            script_number(GC_SLACK),
            replicated=served,
        )

    async def release(self, key: str, owner: str) -> None:
        await self._script(self._release, key, owner)

    async def get(self, key: str, *, now: float) -> ClaimRecord | None:
        with self._client.guard():
            h: list[Any] = await self._client.redis.hmget(self._prefix + key, list(_FIELDS))
        state, owner, tx, lease, exp, upd = h
        if state is None or owner is None or lease is None or upd is None:
            return None
        lease_until = float(lease)
        expires_at = float(exp) if exp else None
        if (
            expires_at is not None
            and expires_at < now
            and not (state in (ClaimState.PENDING, ClaimState.PAID) and lease_until > now)
        ):
            return None
        return ClaimRecord(
            key=key,
            state=ClaimState(state),
            owner=owner,
            tx_hash=tx or None,
            lease_until=lease_until,
            expires_at=expires_at,
            updated_at=float(upd),
        )

    async def lapse(self, key: str, owner: str, *, now: float) -> None:
        await self._script(self._lapse, key, owner, script_number(now))

    async def identity(self) -> str | None:
        with self._client.guard():
            value = await self._client.redis.get(f"{self._prefix}meta:identity")
        return None if value is None else str(value)

    async def set_identity(self, value: str, *, only_if_absent: bool) -> str:
        key = f"{self._prefix}meta:identity"
        with self._client.guard():
            await self._client.redis.set(key, value, nx=only_if_absent)
            stored = await self._client.redis.get(key)
        return str(stored) if stored is not None else value

    async def add_relayers(self, addresses: Iterable[str]) -> None:
        members = [address.lower() for address in addresses]
        if members:
            with self._client.guard():
                await self._client.redis.sadd(f"{self._prefix}meta:relayers", *members)

    async def relayers(self) -> frozenset[str]:
        with self._client.guard():
            members = await self._client.redis.smembers(f"{self._prefix}meta:relayers")
        return frozenset(str(m) for m in members)

    async def heartbeat(self, instance: str, *, now: float, ttl: float) -> None:
        # Liveness only: the Redis server's own clock expires it, which is all a heartbeat needs.
        with self._client.guard():
            await self._client.redis.set(f"{self._prefix}alive:{instance}", "1", px=max(1, int(ttl * 1000)))

    async def alive(self, instance: str, *, now: float) -> bool:
        with self._client.guard():
            return bool(await self._client.redis.exists(f"{self._prefix}alive:{instance}"))
