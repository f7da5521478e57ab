"""The shared settlement journal: one Redis hash per entry, every change one Lua script (atomic across gateways).

Keys (all under the hash tag ``{settle}``, so one Redis Cluster slot holds them and the scripts stay legal)::

    x402:{settle}:e:<claim key>     hash: network, tx, asset, data (hex), vb, bn, bh, owner, lease, created, upd,
                                    kind (absent in entries written before it: ``exact``)
    x402:{settle}:n:<network>       zset claim key -> created_at: a network's entries, oldest first

Every entry's Redis TTL is :data:`GC_SECONDS` plus :data:`gateway.storage.redis_client.GC_SLACK` after it was
added (garbage collection of an entry nobody resolves: a network no longer configured), set relative to the
caller's ``now`` (``PEXPIRE``, :data:`gateway.storage.redis_client.GC_EXPIRE`), never as an absolute instant by
the gateway's clock that Redis would read by its own: a gateway whose clock is behind the Redis host's keeps its
entries as long as one whose clock agrees. ``take`` drops index members whose hash is gone.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import StoreUnavailable
from gateway.storage.redis_client import GC_EXPIRE, GC_SLACK, RedisStore, script_number
from gateway.storage.settlements.contract import GC_SECONDS, JournalEntry

__all__ = ["PREFIX", "RedisSettlementJournal"]

PREFIX = "x402:{settle}:"

# KEYS: entry, index. ARGV: key, network, tx, asset, data, vb, owner, lease_until, now, gc_at (now + GC_SECONDS), slack,
# kind.
_ADD = (
    GC_EXPIRE
    + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'network', ARGV[2], 'tx', ARGV[3], 'asset', ARGV[4], 'data', ARGV[5], 'vb', ARGV[6],
  'bn', '', 'bh', '', 'owner', ARGV[7], 'lease', ARGV[8], 'created', ARGV[9], 'upd', ARGV[9], 'kind', ARGV[12])
gc_expire(KEYS[1], tonumber(ARGV[10]), tonumber(ARGV[9]), tonumber(ARGV[11]))
redis.call('ZADD', KEYS[2], ARGV[9], ARGV[1])
return 1
"""
)

# KEYS: index. ARGV: entry prefix, owner, now, lease_until, limit, newest '1'|'0'.
# -> flat list, 12 fields per entry: key, network, tx, asset, data, vb, bn, bh, created, upd, lease_until, kind
_TAKE = """
local prefix, owner, now, lease, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local range = ARGV[6] == '1' and 'ZREVRANGE' or 'ZRANGE'
local out, taken, start, chunk = {}, 0, 0, 200
while taken < limit do
  local ids = redis.call(range, KEYS[1], start, start + chunk - 1)
  if #ids == 0 then break end
  local gone = 0
  for _, id in ipairs(ids) do
    local k = prefix .. id
    local h = redis.call('HMGET', k, 'network', 'tx', 'asset', 'data', 'vb', 'bn', 'bh', 'owner', 'lease', 'created',
      'upd', 'kind')
    if not h[1] then
      redis.call('ZREM', KEYS[1], id)
      gone = gone + 1
    elseif h[8] == owner or tonumber(h[9]) <= now then
      redis.call('HSET', k, 'owner', owner, 'lease', lease)
      for _, v in ipairs({id, h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[10], h[11], lease, h[12] or 'exact'}) do
        out[#out + 1] = v
      end
      taken = taken + 1
      if taken >= limit then break end
    end
  end
  start = start + #ids - gone
end
return out
"""

# KEYS: entry. ARGV: owner, tx, bn, bh, now. -> 1 | 0
_UPDATE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'tx', ARGV[2], 'bn', ARGV[3], 'bh', ARGV[4], 'upd', ARGV[5])
return 1
"""

# KEYS: entry, index. ARGV: owner, key. -> 1 | 0
_REMOVE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: index. ARGV: entry prefix, owner. -> how many released
_RELEASE = """
local released = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local k = ARGV[1] .. id
  if redis.call('HGET', k, 'owner') == ARGV[2] then
    redis.call('HSET', k, 'lease', '0')
    released = released + 1
  end
end
return released
"""

_FIELDS = 12


def _opt_int(value: str) -> int | None:
    return int(value) if value else None


class RedisSettlementJournal(RedisStore):
    """:class:`gateway.storage.settlements.SettlementJournal` on Redis (see the module docstring)."""

    WHAT = "settlement journal"
    PREFIX = PREFIX

    def _register(self) -> None:
        self._add = self._client.register_script(_ADD)
        self._take = self._client.register_script(_TAKE)
        self._update = self._client.register_script(_UPDATE)
        self._remove = self._client.register_script(_REMOVE)
        self._release = self._client.register_script(_RELEASE)

    def _entry_key(self, key: str) -> str:
        return f"{self._prefix}e:{key}"

    def _index(self, network: str) -> str:
        return f"{self._prefix}n:{network}"

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
        await self._client.run_script(
            self._add,
            [self._entry_key(key), self._index(network)],
            [
                key,
                network,
                tx_hash,
                asset,
                calldata.hex(),
                str(valid_before),
                owner,
                script_number(now + lease),
                script_number(now),
                script_number(now + GC_SECONDS),
                script_number(GC_SLACK),
                kind,
            ],
        )

    async def take(
        self, network: str, owner: str, *, now: float, lease: float, limit: int, newest: bool = False
    ) -> list[JournalEntry]:
        flat: Any = await self._client.run_script(
            self._take,
            [self._index(network)],
            [
                self._prefix + "e:",
                owner,
                script_number(now),
                script_number(now + lease),
                str(limit),
                "1" if newest else "0",
            ],
        )
        if not isinstance(flat, list) or len(flat) % _FIELDS:
            raise StoreUnavailable("redis settlement journal: unexpected script reply")
        entries = []
        for i in range(0, len(flat), _FIELDS):
            key, net, tx, asset, data, vb, bn, bh, created, upd, lease_until, kind = flat[i : i + _FIELDS]
            entries.append(_entry(key, net, owner, tx, asset, data, vb, bn, bh, lease_until, created, upd, kind))
        return entries

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
        res = await self._client.run_script(
            self._update,
            [self._entry_key(key)],
            [owner, tx_hash, "" if block_number is None else str(block_number), block_hash or "", script_number(now)],
        )
        return bool(res == 1)

    async def pending(self, network: str, *, limit: int) -> list[JournalEntry]:
        names = ("tx", "asset", "data", "vb", "bn", "bh", "owner", "lease", "created", "upd", "kind")
        with self._client.guard():
            ids: Any = await self._client.redis.zrange(self._index(network), 0, max(0, limit - 1))
            async with self._client.redis.pipeline(transaction=False) as pipe:
                for key in ids:
                    pipe.hmget(self._entry_key(key), names)
                rows: Any = await pipe.execute()
        entries = []
        for key, row in zip(ids, rows, strict=True):
            tx, asset, data, vb, bn, bh, owner, lease, created, upd, kind = row
            if tx is None:
                continue  # resolved between the two reads
            entries.append(_entry(key, network, owner, tx, asset, data, vb, bn, bh, lease, created, upd, kind))
        return entries

    async def release(self, network: str, owner: str) -> int:
        res: Any = await self._client.run_script(self._release, [self._index(network)], [self._prefix + "e:", owner])
        return int(res)

    async def remove(self, key: str, owner: str) -> bool:
        # The entry's network is only in its hash: read it, then remove both in one script.
        with self._client.guard():
            network: Any = await self._client.redis.hget(self._entry_key(key), "network")
        if not isinstance(network, str):
            return False
        res = await self._client.run_script(self._remove, [self._entry_key(key), self._index(network)], [owner, key])
        return bool(res == 1)


def _entry(
    key: str,
    network: str,
    owner: str,
    tx: str,
    asset: str,
    data: str,
    vb: str,
    bn: str,
    bh: str,
    lease: str,
    created: str,
    updated: str,
    kind: str | None,
) -> JournalEntry:
    """An entry from its hash's fields (as Redis returns them: strings)."""
    return JournalEntry(
        key=key,
        network=network,
        tx_hash=tx,
        asset=asset,
        calldata=bytes.fromhex(data),
        valid_before=int(vb),
        block_number=_opt_int(bn),
        block_hash=bh or None,
        owner=owner,
        lease_until=float(lease),
        created_at=float(created),
        updated_at=float(updated),
        kind=kind or "exact",  # written before kinds existed
    )
