"""The shared job store: one Redis hash per job, every change one Lua script (atomic across gateway instances).

Keys (all under the hash tag ``{jobs}``, so one Redis Cluster slot holds them and multi-key scripts stay legal)::

    x402:{jobs}:job:<id>        hash, one field per Job field (gateway.jobs.model.encode_field)
    x402:{jobs}:upd:<id>        list of status updates (JSON), appended while the job is live
    x402:{jobs}:all             zset id -> created_at: ZCARD is the total against max_jobs
    x402:{jobs}:st:<status>     zset id -> created_at: counts by status, the live jobs to sweep
    x402:{jobs}:payer:<address> zset id -> created_at: a payer's jobs, newest first
    x402:{jobs}:evictable       zset id -> created_at: records with a purge_at, oldest dropped first
    x402:{jobs}:purge           zset id -> purge_at: what the sweeper deletes
    x402:{jobs}:stats           hash: completed_ms (sum of processing_ms over stored completed jobs)
    x402:{jobs}:alive:<runner>  a runner instance's heartbeat: expired by the Redis server's clock, never a gateway's

Scripts read and write every index of a record in one step, so an index never disagrees with the records.
Errors become :class:`StoreUnavailable` as in every Redis store (see :mod:`gateway.storage.redis_client`: short
timeouts, one retry on a dropped connection).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from redis.commands.core import AsyncScript

from gateway.jobs.model import Job, JobExists, JobStatus, JobStoreFull, StatusUpdate, decode_field, encode_field
from gateway.storage.jobs.contract import JobStats
from gateway.storage.redis_client import RedisStore

__all__ = ["PREFIX", "RedisJobStore"]

PREFIX = "x402:{jobs}:"  # one hash tag: every key in one Redis Cluster slot, so multi-key scripts stay legal

_PURGE_BATCH = 500

_PRELUDE = """
local P = ARGV[1]
local function snapshot(id)
  return {redis.call('HGETALL', P .. 'job:' .. id), redis.call('LRANGE', P .. 'upd:' .. id, 0, -1)}
end
local function drop(id)
  local key = P .. 'job:' .. id
  local h = redis.call('HMGET', key, 'payer', 'status', 'processing_ms')
  if h[2] then
    redis.call('ZREM', P .. 'payer:' .. h[1], id)
    redis.call('ZREM', P .. 'st:' .. h[2], id)
    if h[2] == 'completed' and h[3] and h[3] ~= '' then
      redis.call('HINCRBY', P .. 'stats', 'completed_ms', -tonumber(h[3]))
    end
  end
  redis.call('ZREM', P .. 'all', id)
  redis.call('ZREM', P .. 'evictable', id)
  redis.call('ZREM', P .. 'purge', id)
  redis.call('DEL', key, P .. 'upd:' .. id)
end
-- bring every index in line with the record; old_status is false for a new record
local function reindex(id, old_status)
  local key = P .. 'job:' .. id
  local h = redis.call('HMGET', key, 'payer', 'status', 'created_at', 'purge_at', 'completed_at', 'processing_ms')
  local status, created, purge = h[2], h[3], h[4]
  if not old_status then
    redis.call('ZADD', P .. 'all', created, id)
    redis.call('ZADD', P .. 'payer:' .. h[1], created, id)
  end
  if status ~= old_status then
    if old_status then redis.call('ZREM', P .. 'st:' .. old_status, id) end
    redis.call('ZADD', P .. 'st:' .. status, created, id)
    if old_status == 'completed' and h[6] and h[6] ~= '' then
      redis.call('HINCRBY', P .. 'stats', 'completed_ms', -tonumber(h[6]))
      redis.call('HDEL', key, 'processing_ms')
    end
    if status == 'completed' and h[5] and h[5] ~= '' then
      local ms = math.max(0, tonumber(h[5]) - tonumber(created))
      redis.call('HSET', key, 'processing_ms', ms)
      redis.call('HINCRBY', P .. 'stats', 'completed_ms', ms)
    end
  end
  if purge and purge ~= '' then
    redis.call('ZADD', P .. 'evictable', created, id)
    redis.call('ZADD', P .. 'purge', purge, id)
  else
    redis.call('ZREM', P .. 'evictable', id)
    redis.call('ZREM', P .. 'purge', id)
  end
end
local function fields_from(first)
  local out = {}
  for i = first, #ARGV do out[#out + 1] = ARGV[i] end
  return out
end
"""

# ARGV: prefix, id, max_jobs, field, value, ... -> 'ok' | 'exists' | 'full'
_CREATE = (
    _PRELUDE
    + """
local id, max = ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', P .. 'job:' .. id) == 1 then return 'exists' end
local need = redis.call('ZCARD', P .. 'all') - max + 1
if need > 0 then
  local victims = redis.call('ZRANGE', P .. 'evictable', 0, need - 1)
  if #victims < need then return 'full' end
  for _, v in ipairs(victims) do drop(v) end
end
redis.call('HSET', P .. 'job:' .. id, unpack(fields_from(4)))
reindex(id, false)
return 'ok'
"""
)

# ARGV: prefix, id, when (comma-separated statuses), to ('' keeps the status), field, value, ...
# -> {'absent'} | {'no', snapshot} | {'ok', snapshot}
_TRANSITION = (
    _PRELUDE
    + """
local id = ARGV[2]
local key = P .. 'job:' .. id
local status = redis.call('HGET', key, 'status')
if not status then return {'absent'} end
local allowed = false
for s in string.gmatch(ARGV[3], '[^,]+') do
  if s == status then allowed = true end
end
if not allowed then return {'no', snapshot(id)} end
local fields = fields_from(5)
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'status'
  fields[#fields + 1] = ARGV[4]
end
if #fields > 0 then redis.call('HSET', key, unpack(fields)) end
reindex(id, status)
return {'ok', snapshot(id)}
"""
)

# ARGV: prefix, id, limit, update JSON -> 1 appended | 0 not
_APPEND = (
    _PRELUDE
    + """
local id = ARGV[2]
local status = redis.call('HGET', P .. 'job:' .. id, 'status')
if status ~= 'pending' and status ~= 'processing' then return 0 end
if redis.call('LLEN', P .. 'upd:' .. id) >= tonumber(ARGV[3]) then return 0 end
redis.call('RPUSH', P .. 'upd:' .. id, ARGV[4])
return 1
"""
)

# ARGV: prefix, id -> snapshot (an empty hash when absent)
_GET = _PRELUDE + "\nreturn snapshot(ARGV[2])\n"

# ARGV: prefix, payer, statuses ('' = any), limit -> {total, {snapshot, ...}}
_LIST = (
    _PRELUDE
    + """
local ids = redis.call('ZREVRANGE', P .. 'payer:' .. ARGV[2], 0, -1)
local want, any, limit = {}, ARGV[3] == '', tonumber(ARGV[4])
for s in string.gmatch(ARGV[3], '[^,]+') do want[s] = true end
local out = {}
for _, id in ipairs(ids) do
  if #out >= limit then break end
  if any or want[redis.call('HGET', P .. 'job:' .. id, 'status') or ''] then out[#out + 1] = snapshot(id) end
end
return {#ids, out}
"""
)

# ARGV: prefix, now, grace, limit -> {snapshot, ...}
_STALE = (
    _PRELUDE
    + """
local now, grace, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for _, st in ipairs({'pending', 'processing'}) do
  for _, id in ipairs(redis.call('ZRANGE', P .. 'st:' .. st, 0, -1)) do
    if #out >= limit then return out end
    local h = redis.call('HMGET', P .. 'job:' .. id, 'runner_lease_until', 'expires_at')
    if h[1] and h[1] ~= '' then
      local late = tonumber(h[1]) < now
      if not late and h[2] and h[2] ~= '' then late = tonumber(h[2]) + grace < now end
      if late then out[#out + 1] = snapshot(id) end
    end
  end
end
return out
"""
)

# ARGV: prefix, now, batch -> how many records went
_PURGE = (
    _PRELUDE
    + """
local ids = redis.call('ZRANGEBYSCORE', P .. 'purge', '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do drop(id) end
return #ids
"""
)

_ENCODED_FIELDS = tuple(name for name in Job.__dataclass_fields__ if name != "status_updates")


def _encode(values: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in values.items():
        if name == "status_updates":
            raise ValueError("status updates are appended with append_update, never set")
        out += [name, encode_field(name, value)]
    return out


def _decode(snapshot: Any) -> Job | None:
    flat, updates = snapshot
    if not flat:
        return None
    raw = dict(zip(flat[::2], flat[1::2], strict=True))
    doc: dict[str, Any] = {name: decode_field(name, raw[name]) for name in _ENCODED_FIELDS if name in raw}
    doc["status_updates"] = [json.loads(u) for u in updates]
    return Job.from_doc(doc)


class RedisJobStore(RedisStore):
    """:class:`gateway.storage.jobs.JobStore` on Redis (see the module docstring)."""

    WHAT = "job store"
    PREFIX = PREFIX

    def _register(self) -> None:
        self._create = self._client.register_script(_CREATE)
        self._transition = self._client.register_script(_TRANSITION)
        self._append = self._client.register_script(_APPEND)
        self._get = self._client.register_script(_GET)
        self._list = self._client.register_script(_LIST)
        self._stale = self._client.register_script(_STALE)
        self._purge = self._client.register_script(_PURGE)

    async def _call(self, script: AsyncScript, *args: Any) -> Any:
        # One key of the {jobs} hash tag rides along as KEYS[1]: a cluster client routes the script by it.
        return await self._client.run_script(script, [self._prefix + "all"], [self._prefix, *args])

    async def create(self, job: Job, *, max_jobs: int) -> None:
        values = {name: getattr(job, name) for name in _ENCODED_FIELDS}
        res = await self._call(self._create, job.job_id, max_jobs, *_encode(values))
        if res == "exists":
            raise JobExists("the upstream returned a job id that is already recorded")
        if res == "full":
            raise JobStoreFull("the job store holds max_jobs live jobs; try again later")
        for update in job.status_updates:  # a record created with history (imports, tests)
            await self.append_update(job.job_id, update, limit=len(job.status_updates))

    async def get(self, job_id: str) -> Job | None:
        return _decode(await self._call(self._get, job_id))

    async def transition(
        self, job_id: str, *, when: frozenset[JobStatus], to: JobStatus | None, changes: Mapping[str, Any]
    ) -> tuple[bool, Job | None]:
        when_csv = ",".join(sorted(s.value for s in when))
        res = await self._call(self._transition, job_id, when_csv, "" if to is None else to.value, *_encode(changes))
        if res[0] == "absent":
            return False, None
        return res[0] == "ok", _decode(res[1])

    async def append_update(self, job_id: str, update: StatusUpdate, *, limit: int) -> bool:
        item = json.dumps({"message": update.message, "timestamp": update.timestamp}, ensure_ascii=False)
        return bool(await self._call(self._append, job_id, limit, item))

    async def list_for_payer(
        self, payer: str, *, statuses: frozenset[JobStatus] | None, limit: int
    ) -> tuple[list[Job], int]:
        wanted = "" if statuses is None else ",".join(sorted(s.value for s in statuses)) or "-"
        total, snapshots = await self._call(self._list, payer, wanted, limit)
        jobs = [job for job in (_decode(s) for s in snapshots) if job is not None]
        return jobs, int(total)

    async def stale(self, now: int, *, grace_ms: int, limit: int) -> list[Job]:
        snapshots = await self._call(self._stale, now, grace_ms, limit)
        return [job for job in (_decode(s) for s in snapshots) if job is not None]

    async def purge(self, now: int) -> int:
        total = 0
        while True:
            n = int(await self._call(self._purge, now, _PURGE_BATCH))
            total += n
            if n < _PURGE_BATCH:
                return total

    async def heartbeat(self, instance: str, *, ttl: float) -> None:
        with self._client.guard():
            await self._client.redis.set(f"{self._prefix}alive:{instance}", "1", px=max(1, int(ttl * 1000)))

    async def alive(self, instance: str) -> bool:
        with self._client.guard():
            return bool(await self._client.redis.exists(f"{self._prefix}alive:{instance}"))

    async def stats(self) -> JobStats:
        with self._client.guard():
            async with self._client.redis.pipeline(transaction=True) as pipe:
                for status in JobStatus:
                    pipe.zcard(f"{self._prefix}st:{status.value}")
                pipe.hget(f"{self._prefix}stats", "completed_ms")
                res = await pipe.execute()
        counts = {status: int(n) for status, n in zip(JobStatus, res[:-1], strict=True) if int(n)}
        return JobStats(counts=counts, completed_ms_total=int(res[-1] or 0))
