"""The shared channel store: one Redis hash per channel, every change one Lua script (atomic across gateways).

Keys (all under the hash tag ``{chan}``, so one Redis Cluster slot holds them and the scripts stay legal)::

    x402:{chan}:c:<channel id>   hash: one field per Channel field ('' for None), amounts as decimal strings
    x402:{chan}:u:<chain id>     zset channel id -> when it last went from fully claimed to not: what is owed

A channel is in its chain's ``u:`` set while ``charged > total_claimed`` or a holder was served for a charge
above 0; every script that changes either brings the set in line with the record (``index`` below), so the set
never disagrees with the records. Channels never expire: a record mirrors money.

Amounts: stored as decimal strings, computed with Lua numbers (doubles), which are exact for every integer the
store accepts (at most 2**53 - 1, checked in Python before a script runs: see
:data:`gateway.storage.channels.contract.MAX_AMOUNT`); written back with ``%.0f``, never ``tostring`` (which
rounds to 14 significant digits). A sum a script writes is bounded by a voucher's maximum, so it stays exact too.
Times are ``repr`` floats (:func:`gateway.storage.redis_client.script_number`), exact through ``tonumber``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from gateway.errors import StoreUnavailable
from gateway.storage.channels.contract import Channel, ChannelBusy, ChannelMismatch, OnChainState, check_amount
from gateway.storage.redis_client import RedisStore, script_number

__all__ = ["PREFIX", "RedisChannelStore"]

PREFIX = "x402:{chan}:"  # one hash tag: every key in one Redis Cluster slot, so multi-key scripts stay legal

# Shared by every script. ARGV[1] is always the key prefix; KEYS[1] the channel's hash (the unclaimed set's key
# is derived from the chain id the hash holds, under the same hash tag).
_PRELUDE = """
local P = ARGV[1]
local function load(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end
local function flat(h)
  local out = {}
  for k, v in pairs(h) do
    out[#out + 1] = k
    out[#out + 1] = v
  end
  return out
end
local function save(key, h)
  redis.call('HSET', key, unpack(flat(h)))
end
local function int(n) return string.format('%.0f', n) end
local function owes(h)
  return tonumber(h.charged) > tonumber(h.total_claimed) or (h.pending_charge ~= '' and tonumber(h.pending_charge) > 0)
end
-- keep the chain's unclaimed set in line with the record: added when it starts owing, score kept while it does
local function index(h, now)
  local z = P .. 'u:' .. h.chain_id
  if owes(h) then redis.call('ZADD', z, 'NX', now, h.channel_id) else redis.call('ZREM', z, h.channel_id) end
end
-- a claim took what was owed since the set's score: what is left owes from now (the age claim_after bounds)
local function restart_owing(h)
  redis.call('ZREM', P .. 'u:' .. h.chain_id, h.channel_id)
end
local function lapsed(h, now) return h.holder ~= '' and tonumber(h.held_until) <= tonumber(now) end
local function unlock(h, now)
  h.holder, h.held_until, h.pending_max, h.pending_signature, h.pending_charge = '', '0.0', '0', '', ''
  h.updated_at = now
end
-- drop the holder; commit its served charge first, never beyond what its voucher covers
local function fold(h, now)
  if h.pending_charge ~= '' then
    local charged, pmax = tonumber(h.charged), tonumber(h.pending_max)
    if pmax >= charged then
      h.charged = int(charged + math.min(tonumber(h.pending_charge), pmax - charged))
      h.signed_max, h.signature = h.pending_max, h.pending_signature
    end
  end
  unlock(h, now)
end
local function covers(h, charge)
  return tonumber(charge) <= tonumber(h.pending_max) - tonumber(h.charged)
end
"""

# ARGV: prefix, now, then field/value pairs of the new record. -> flat hash (the stored one if it existed)
_OPEN = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if h then return flat(h) end
h = {}
for i = 3, #ARGV, 2 do h[ARGV[i]] = ARGV[i + 1] end
save(KEYS[1], h)
index(h, ARGV[2])
return flat(h)
"""
)

# ARGV: prefix, now, balance, total_claimed, withdraw_requested_at, refund_nonce. -> flat hash | false
_SYNC = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h then return false end
local undone = tonumber(ARGV[4]) < tonumber(h.total_claimed)  -- a reorganisation undid a claim
if tonumber(ARGV[4]) > tonumber(h.total_claimed) then restart_owing(h) end
h.balance, h.total_claimed, h.withdraw_requested_at, h.refund_nonce = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if tonumber(h.total_claimed) > tonumber(h.charged) then h.charged = h.total_claimed end
h.synced_at, h.updated_at = ARGV[2], ARGV[2]
save(KEYS[1], h)
index(h, ARGV[2])
if undone and owes(h) then redis.call('ZADD', P .. 'u:' .. h.chain_id, 0, h.channel_id) end  -- owed since before
return flat(h)
"""
)

# ARGV: prefix, now, holder, expected_charged, voucher_max, signature, held_until, take_over_from|''.
# -> {'ok', flat} | {'busy', holder} | {'mismatch', flat} | {'unknown'}
_BEGIN = (
    _PRELUDE
    + """
local now = ARGV[2]
local h = load(KEYS[1])
if not h then return {'unknown'} end
local folded = false
if h.holder ~= '' and (lapsed(h, now) or (ARGV[8] ~= '' and h.holder == ARGV[8])) then
  fold(h, now)
  folded = true
end
if h.holder ~= '' then return {'busy', h.holder} end
if tonumber(h.charged) ~= tonumber(ARGV[4]) then
  if folded then  -- the fold stands, whatever this request's fate
    save(KEYS[1], h)
    index(h, now)
  end
  return {'mismatch', flat(h)}
end
h.holder, h.held_until, h.pending_max, h.pending_signature, h.pending_charge = ARGV[3], ARGV[7], ARGV[5], ARGV[6], ''
h.updated_at = now
save(KEYS[1], h)
index(h, now)
return {'ok', flat(h)}
"""
)

# ARGV: prefix, now, holder, charge. -> 'ok' | 'lost' | 'uncovered'
_SERVED = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h or h.holder == '' or h.holder ~= ARGV[3] then return 'lost' end
if not covers(h, ARGV[4]) then return 'uncovered' end
h.pending_charge, h.updated_at = ARGV[4], ARGV[2]
redis.call('HSET', KEYS[1], 'pending_charge', h.pending_charge, 'updated_at', h.updated_at)
index(h, ARGV[2])
return 'ok'
"""
)

# ARGV: prefix, now, holder, charge. -> {'ok', flat} | {'lost'} | {'uncovered'}
_COMMIT = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h or h.holder == '' or h.holder ~= ARGV[3] then return {'lost'} end
if not covers(h, ARGV[4]) then return {'uncovered'} end
h.charged = int(tonumber(h.charged) + tonumber(ARGV[4]))
h.signed_max, h.signature = h.pending_max, h.pending_signature
unlock(h, ARGV[2])
save(KEYS[1], h)
index(h, ARGV[2])
return {'ok', flat(h)}
"""
)

# ARGV: prefix, holder. -> 1 | 0   (no ``now`` in the protocol: updated_at keeps the time the lock was taken)
_RELEASE = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h or h.holder == '' or h.holder ~= ARGV[2] then return 0 end
unlock(h, h.updated_at)
save(KEYS[1], h)
index(h, h.updated_at)
return 1
"""
)

# ARGV: prefix, now. -> flat hash | false
_FOLD = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h then return false end
if lapsed(h, ARGV[2]) then
  fold(h, ARGV[2])
  save(KEYS[1], h)
  index(h, ARGV[2])
end
return flat(h)
"""
)

# ARGV: prefix, now, total_claimed. -> flat hash | false
_RECORD_CLAIMED = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h then return false end
if tonumber(ARGV[3]) > tonumber(h.total_claimed) then
  restart_owing(h)
  h.total_claimed = ARGV[3]
end
if tonumber(h.total_claimed) > tonumber(h.charged) then h.charged = h.total_claimed end
h.updated_at = ARGV[2]
save(KEYS[1], h)
index(h, ARGV[2])
return flat(h)
"""
)

# KEYS: the chain's unclaimed set. ARGV: prefix, now, limit. -> list of flat hashes, longest-unclaimed first
_UNCLAIMED = (
    _PRELUDE
    + """
local now, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local out, start, chunk = {}, 0, 200
while #out < limit do
  local scored = redis.call('ZRANGE', KEYS[1], start, start + chunk - 1, 'WITHSCORES')
  if #scored == 0 then break end
  local ids, since = {}, {}
  for i = 1, #scored, 2 do
    ids[#ids + 1] = scored[i]
    since[scored[i]] = scored[i + 1]
  end
  local gone = 0
  for _, id in ipairs(ids) do
    local h = load(P .. 'c:' .. id)
    if not h then  -- deleted behind the store's back: drop the stale member
      redis.call('ZREM', KEYS[1], id)
      gone = gone + 1
    elseif tonumber(h.charged) > tonumber(h.total_claimed) or (lapsed(h, now) and h.pending_charge ~= ''
        and tonumber(h.pending_charge) > 0) then
      h.owing_since = since[id]
      out[#out + 1] = flat(h)
      if #out >= limit then break end
    end
  end
  start = start + #ids - gone
end
return out
"""
)


def _opt_int(value: str) -> int | None:
    return int(value) if value else None


def _channel(reply: Any) -> Channel:
    """A Channel from a script's flat field/value list."""
    if not isinstance(reply, list) or len(reply) % 2:
        raise StoreUnavailable("redis channel store: unexpected script reply")
    h: dict[str, str] = dict(zip(reply[::2], reply[1::2], strict=True))
    try:
        return Channel(
            channel_id=h["channel_id"],
            chain_id=int(h["chain_id"]),
            payer=h["payer"],
            payer_authorizer=h["payer_authorizer"],
            receiver=h["receiver"],
            receiver_authorizer=h["receiver_authorizer"],
            token=h["token"],
            withdraw_delay=int(h["withdraw_delay"]),
            salt=h["salt"],
            balance=int(h["balance"]),
            total_claimed=int(h["total_claimed"]),
            withdraw_requested_at=int(h["withdraw_requested_at"]),
            refund_nonce=int(h["refund_nonce"]),
            synced_at=float(h["synced_at"]),
            charged=int(h["charged"]),
            signed_max=int(h["signed_max"]),
            signature=h["signature"],
            updated_at=float(h["updated_at"]),
            holder=h["holder"] or None,
            held_until=float(h["held_until"]),
            pending_max=int(h["pending_max"]),
            pending_signature=h["pending_signature"],
            pending_charge=_opt_int(h["pending_charge"]),
            owing_since=float(h["owing_since"]) if "owing_since" in h else None,
        )
    except (KeyError, ValueError) as exc:
        raise StoreUnavailable(f"redis channel store: malformed channel record ({type(exc).__name__})") from exc


def _fields(channel: Channel, now: float) -> list[str]:
    """A new record's field/value pairs (no holder; ``charged`` raised to ``total_claimed``)."""
    pairs: Sequence[tuple[str, str]] = (
        ("channel_id", channel.channel_id),
        ("chain_id", str(check_amount("chain_id", channel.chain_id))),
        ("payer", channel.payer),
        ("payer_authorizer", channel.payer_authorizer),
        ("receiver", channel.receiver),
        ("receiver_authorizer", channel.receiver_authorizer),
        ("token", channel.token),
        ("withdraw_delay", str(check_amount("withdraw_delay", channel.withdraw_delay))),
        ("salt", channel.salt),
        ("balance", str(check_amount("balance", channel.balance))),
        ("total_claimed", str(check_amount("total_claimed", channel.total_claimed))),
        ("withdraw_requested_at", str(check_amount("withdraw_requested_at", channel.withdraw_requested_at))),
        ("refund_nonce", str(check_amount("refund_nonce", channel.refund_nonce))),
        ("synced_at", script_number(channel.synced_at)),
        ("charged", str(max(check_amount("charged", channel.charged), channel.total_claimed))),
        ("signed_max", str(check_amount("signed_max", channel.signed_max))),
        ("signature", channel.signature),
        ("updated_at", script_number(now)),
        ("holder", ""),
        ("held_until", script_number(0.0)),
        ("pending_max", "0"),
        ("pending_signature", ""),
        ("pending_charge", ""),
    )
    return [item for pair in pairs for item in pair]


def _uncovered(charge: int) -> ValueError:
    return ValueError(f"channel store: a charge of {charge} is not covered by the pending voucher")


class RedisChannelStore(RedisStore):
    """:class:`gateway.storage.channels.ChannelStore` on Redis (see the module docstring)."""

    WHAT = "channel store"
    PREFIX = PREFIX

    def _register(self) -> None:
        self._open = self._client.register_script(_OPEN)
        self._sync = self._client.register_script(_SYNC)
        self._begin = self._client.register_script(_BEGIN)
        self._served = self._client.register_script(_SERVED)
        self._commit = self._client.register_script(_COMMIT)
        self._release = self._client.register_script(_RELEASE)
        self._fold = self._client.register_script(_FOLD)
        self._record_claimed = self._client.register_script(_RECORD_CLAIMED)
        self._unclaimed = self._client.register_script(_UNCLAIMED)

    def _key(self, channel_id: str) -> str:
        return f"{self._prefix}c:{channel_id}"

    async def _run(self, script: Any, channel_id: str, *args: str, replicated: bool = False) -> Any:
        keys = [self._key(channel_id)]
        return await self._client.run_script(script, keys, [self._prefix, *args], replicated=replicated)

    async def get(self, channel_id: str) -> Channel | None:
        with self._client.guard():
            h: Any = await self._client.redis.hgetall(self._key(channel_id))
        if not h:
            return None
        return _channel([item for pair in h.items() for item in pair])

    async def open(self, channel: Channel, *, now: float) -> Channel:
        return _channel(await self._run(self._open, channel.channel_id, script_number(now), *_fields(channel, now)))

    async def sync(self, channel_id: str, state: OnChainState, *, now: float) -> Channel | None:
        reply = await self._run(
            self._sync,
            channel_id,
            script_number(now),
            str(check_amount("balance", state.balance)),
            str(check_amount("total_claimed", state.total_claimed)),
            str(check_amount("withdraw_requested_at", state.withdraw_requested_at)),
            str(check_amount("refund_nonce", state.refund_nonce)),
        )
        return None if reply is None else _channel(reply)

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
        try:
            reply: Any = await self._run(
                self._begin,
                channel_id,
                script_number(now),
                holder,
                str(check_amount("expected_charged", expected_charged)),
                str(check_amount("voucher_max", voucher_max)),
                signature,
                script_number(now + lease),
                take_over_from or "",
                replicated=True,
            )
        except StoreUnavailable:
            # The lock may be on the master (no reply, or too few replicas acknowledged it: docs/scaling.md):
            # give it back, nothing is served on it. (Guarded by the holder: a no-op if it never landed.)
            with contextlib.suppress(StoreUnavailable):
                await self.release(channel_id, holder)
            raise
        if not isinstance(reply, list) or not reply:
            raise StoreUnavailable("redis channel store: unexpected script reply")
        if reply[0] == "unknown":
            raise KeyError(channel_id)
        if reply[0] == "busy":
            raise ChannelBusy("another request on this channel is in flight", holder=reply[1])
        ch = _channel(reply[1])
        if reply[0] == "mismatch":
            raise ChannelMismatch(f"the voucher's base is {expected_charged}, the channel's charged {ch.charged}", ch)
        return ch

    async def served(self, channel_id: str, holder: str, charge: int, *, now: float) -> bool:
        reply = await self._run(
            self._served, channel_id, script_number(now), holder, str(check_amount("charge", charge)), replicated=True
        )
        if reply == "uncovered":
            raise _uncovered(charge)
        return bool(reply == "ok")

    async def commit(self, channel_id: str, holder: str, charge: int, *, now: float) -> Channel | None:
        reply: Any = await self._run(
            self._commit, channel_id, script_number(now), holder, str(check_amount("charge", charge)), replicated=True
        )
        if not isinstance(reply, list) or not reply:
            raise StoreUnavailable("redis channel store: unexpected script reply")
        if reply[0] == "uncovered":
            raise _uncovered(charge)
        return _channel(reply[1]) if reply[0] == "ok" else None

    async def release(self, channel_id: str, holder: str) -> bool:
        return bool(await self._run(self._release, channel_id, holder) == 1)

    async def fold(self, channel_id: str, *, now: float) -> Channel | None:
        reply = await self._run(self._fold, channel_id, script_number(now))
        return None if reply is None else _channel(reply)

    async def unclaimed(self, chain_id: int, *, now: float, limit: int) -> list[Channel]:
        if limit <= 0:
            return []
        reply: Any = await self._client.run_script(
            self._unclaimed, [f"{self._prefix}u:{chain_id}"], [self._prefix, script_number(now), str(limit)]
        )
        if not isinstance(reply, list):
            raise StoreUnavailable("redis channel store: unexpected script reply")
        return [_channel(item) for item in reply]

    async def record_claimed(self, channel_id: str, total_claimed: int, *, now: float) -> Channel | None:
        reply = await self._run(
            self._record_claimed, channel_id, script_number(now), str(check_amount("total_claimed", total_claimed))
        )
        return None if reply is None else _channel(reply)
