"""The shared ledger: one Redis string (JSON) per entry, indexes and revenue totals kept by the same Lua script.

Keys (all under the hash tag ``{ledger}``, so one Redis Cluster slot holds them and the scripts stay legal)::

    x402:{ledger}:e:<key>        string: the entry as JSON ('' for None, the amount a decimal string), its UTC day
    x402:{ledger}:t              zset key -> at: every entry (time ranges, pages, exports, retention)
    x402:{ledger}:p:<payer>      zset key -> at: one payer's entries
    x402:{ledger}:r:<route>      zset key -> at: one route's entries
    x402:{ledger}:x:<tx hash>    set of keys: the entries one transaction settled (a batch settles several)
    x402:{ledger}:f:<key>        the key of the refund of entry <key>: one refund per payment
    x402:{ledger}:d:<day>        hash: that UTC day's revenue, kept incrementally (below)
    x402:{ledger}:days           zset day -> its first second: the days that have entries
    x402:{ledger}:lost           zset key -> when: payments whose settlement was counted lost (before or after
                                 their entry is recorded); the purge drops the marks older than its cutoff

A day's hash holds, for the day and for each route and network seen that day, the net amount (``a``), the number
of payments (``p``, refunds not counted) and of entries (``e``): fields ``a p e``, ``ra:<route> rp:<route>
re:<route>``, ``na:<network> ...``. ``record`` adds to them and ``purge`` subtracts, in the script that writes or
deletes the entry, so the totals always equal the sum of the entries kept. A revenue query reads one hash per
whole day in its range and adds up the entries of the partial days at its ends.

Amounts are added with ``HINCRBY`` (signed 64-bit integers), never as Lua numbers; the script only ever
negates the decimal string. Entries stay until the retention purge removes them (``[ledger].retention_days``).

An entry is one JSON string, not a hash: a hash with a 66-character value (a tx hash) leaves Redis's compact
encoding and costs about twice the memory. About 2.4 KB of Redis memory per entry, indexes included
(docs/operating.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any, Literal

from gateway.errors import StoreUnavailable
from gateway.storage.ledger.contract import (
    DAY,
    KINDS,
    LedgerEntry,
    LedgerQuery,
    Revenue,
    day_of,
    normalised,
)
from gateway.storage.redis_client import RedisStore, script_number

__all__ = ["PREFIX", "RedisLedgerStore"]

PREFIX = "x402:{ledger}:"  # one hash tag: every key in one Redis Cluster slot, so multi-key scripts stay legal

# KEYS: entry, all, payer zset, route zset, tx set, refund marker, day hash, days.
# ARGV: key, at, day, day start, amount, is payment '1'|'0', route, network, tx hash, refund_of, the entry's JSON.
# -> 1 (new) | 0 (the key exists, or refund_of already has a refund)
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[10] ~= '' and not redis.call('SET', KEYS[6], ARGV[1], 'NX') then return 0 end
redis.call('SET', KEYS[1], ARGV[11])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
if ARGV[9] ~= '' then redis.call('SADD', KEYS[5], ARGV[1]) end
local amount, payment = ARGV[5], ARGV[6]
for _, level in ipairs({{'', ''}, {'r', ':' .. ARGV[7]}, {'n', ':' .. ARGV[8]}}) do
  redis.call('HINCRBY', KEYS[7], level[1] .. 'a' .. level[2], amount)
  redis.call('HINCRBY', KEYS[7], level[1] .. 'p' .. level[2], payment)
  redis.call('HINCRBY', KEYS[7], level[1] .. 'e' .. level[2], 1)
end
redis.call('ZADD', KEYS[8], 'NX', ARGV[4], ARGV[3])
return 1
"""

# KEYS: all, days, lost marks. ARGV: prefix, cutoff (exclusive), batch. -> how many entries were removed
_PURGE = """
local P = ARGV[1]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[2])
local function negated(s)
  if s == '0' then return s end
  if string.sub(s, 1, 1) == '-' then return string.sub(s, 2) end
  return '-' .. s
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local k = P .. 'e:' .. id
  local raw = redis.call('GET', k)
  if raw then
    local h = cjson.decode(raw)
    local payer, route, network, tx, refund_of, day, amount, kind =
      h.payer, h.route, h.network, h.tx_hash, h.refund_of, h.day, h.amount, h.kind
    redis.call('ZREM', P .. 'p:' .. payer, id)
    redis.call('ZREM', P .. 'r:' .. route, id)
    if tx ~= '' then redis.call('SREM', P .. 'x:' .. tx, id) end
    local marker = P .. 'f:' .. refund_of
    if refund_of ~= '' and redis.call('GET', marker) == id then redis.call('DEL', marker) end
    local d = P .. 'd:' .. day
    local payment = kind == 'refund' and '0' or '-1'
    for _, level in ipairs({{'', ''}, {'r', ':' .. route}, {'n', ':' .. network}}) do
      local a, p, e = level[1] .. 'a' .. level[2], level[1] .. 'p' .. level[2], level[1] .. 'e' .. level[2]
      redis.call('HINCRBY', d, a, negated(amount))
      redis.call('HINCRBY', d, p, payment)
      if redis.call('HINCRBY', d, e, -1) <= 0 then redis.call('HDEL', d, a, p, e) end
    end
    if redis.call('EXISTS', d) == 0 then redis.call('ZREM', KEYS[2], day) end
    redis.call('DEL', k)
  end
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""

# KEYS: lost marks. ARGV: when, key. -> 1 (new) | 0 (marked before: its first time is kept)
_MARK_LOST = "return redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2])"

_PURGE_BATCH = 500
_PAGE = 200  # index members read per round trip while filling a page or an export
_FIELDS = (
    "key",
    "at",
    "route",
    "method",
    "resource",
    "amount",
    "network",
    "asset",
    "payer",
    "pay_to",
    "kind",
    "tx_hash",
    "block",
    "request_id",
    "job_id",
    "upstream_status",
    "refund_of",
)


def _json(e: LedgerEntry) -> str:
    """The stored form: every field, '' for None (Lua's cjson reads JSON null as a userdata, not nil), the amount
    as a decimal string (the purge script negates it as text, never as a Lua number), and the UTC day."""
    return json.dumps(
        {
            "key": e.key,
            "at": e.at,
            "route": e.route,
            "method": e.method,
            "resource": e.resource,
            "amount": str(e.amount),
            "network": e.network,
            "asset": e.asset,
            "payer": e.payer,
            "pay_to": e.pay_to,
            "kind": e.kind,
            "tx_hash": e.tx_hash,
            "block": "" if e.block is None else e.block,
            "request_id": e.request_id,
            "job_id": e.job_id or "",
            "upstream_status": e.upstream_status,
            "refund_of": e.refund_of or "",
            "day": day_of(e.at),
        },
        separators=(",", ":"),
    )


def _entry(raw: str) -> LedgerEntry:
    try:
        h = json.loads(raw)
        kind = next(k for k in KINDS if k == h["kind"])
        block = h["block"]
        return LedgerEntry(
            key=str(h["key"]),
            at=float(h["at"]),
            route=str(h["route"]),
            method=str(h["method"]),
            resource=str(h["resource"]),
            amount=int(h["amount"]),
            network=str(h["network"]),
            asset=str(h["asset"]),
            payer=str(h["payer"]),
            pay_to=str(h["pay_to"]),
            kind=kind,
            tx_hash=str(h["tx_hash"]),
            block=None if block == "" else int(block),
            request_id=str(h["request_id"]),
            job_id=str(h["job_id"]) or None,
            upstream_status=int(h["upstream_status"]),
            refund_of=str(h["refund_of"]) or None,
        )
    except (KeyError, ValueError, TypeError, StopIteration) as exc:
        raise StoreUnavailable(f"redis ledger: a malformed entry ({type(exc).__name__})") from None


def _matches(e: LedgerEntry, q: LedgerQuery) -> bool:
    """Every filter of ``q`` except the cursor (the index read already narrowed by one of them)."""
    return (
        (q.payer is None or e.payer == q.payer.lower())
        and (q.route is None or e.route == q.route)
        and (q.tx_hash is None or e.tx_hash == q.tx_hash.lower())
        and (q.since is None or e.at >= q.since)
        and (q.until is None or e.at < q.until)
    )


def _before(e: LedgerEntry, q: LedgerQuery) -> bool:
    if q.before is None:
        return True
    if q.before_key is None:
        return e.at < q.before
    return e.at < q.before or (e.at == q.before and e.key < q.before_key)


def _bound(value: float | None, *, inclusive: bool, infinite: str) -> str:
    if value is None:
        return infinite
    return script_number(value) if inclusive else "(" + script_number(value)


class RedisLedgerStore(RedisStore):
    """:class:`gateway.storage.ledger.LedgerStore` on Redis (see the module docstring)."""

    WHAT = "ledger"
    PREFIX = PREFIX

    def _register(self) -> None:
        self._record = self._client.register_script(_RECORD)
        self._purge = self._client.register_script(_PURGE)
        self._mark_lost = self._client.register_script(_MARK_LOST)

    def _index(self, q: LedgerQuery) -> str:
        """The sorted set to read for ``q``: the narrowest one a filter names."""
        if q.payer is not None:
            return f"{self._prefix}p:{q.payer.lower()}"
        if q.route is not None:
            return f"{self._prefix}r:{q.route}"
        return f"{self._prefix}t"

    async def _load(self, keys: Sequence[str]) -> list[LedgerEntry]:
        """The entries under ``keys`` (one MGET), those purged meanwhile left out."""
        if not keys:
            return []
        with self._client.guard():
            found: Any = await self._client.redis.mget([f"{self._prefix}e:{key}" for key in keys])
        return [_entry(raw) for raw in found if raw is not None]

    # ------------------------------------------------------------------------------------------------ writes

    async def record(self, entry: LedgerEntry) -> bool:
        e = normalised(entry)
        p = self._prefix
        day = day_of(e.at)
        keys = [
            f"{p}e:{e.key}",
            f"{p}t",
            f"{p}p:{e.payer}",
            f"{p}r:{e.route}",
            f"{p}x:{e.tx_hash}",
            f"{p}f:{e.refund_of or ''}",
            f"{p}d:{day}",
            f"{p}days",
        ]
        args = [
            e.key,
            script_number(e.at),
            day,
            str(int(e.at // DAY) * DAY),  # the day's first second (UTC days have no leap seconds here)
            str(e.amount),
            "0" if e.kind == "refund" else "1",
            e.route,
            e.network,
            e.tx_hash,
            e.refund_of or "",
            _json(e),
        ]
        res = await self._client.run_script(self._record, keys, args)
        return bool(res == 1)

    async def purge(self, *, older_than: float) -> int:
        total = 0
        while True:
            n = await self._client.run_script(
                self._purge,
                [f"{self._prefix}t", f"{self._prefix}days", f"{self._prefix}lost"],
                [self._prefix, script_number(older_than), str(_PURGE_BATCH)],
            )
            total += int(n)
            if int(n) < _PURGE_BATCH:
                return total

    async def mark_settlement_lost(self, key: str, *, at: float) -> bool:
        if not key:
            raise ValueError("ledger: a lost mark needs a key")
        # Replicated (when the URL asks for it): a mark a failover lost would let that money be refunded.
        added = await self._client.run_script(
            self._mark_lost, [f"{self._prefix}lost"], [script_number(at), key], replicated=True
        )
        return bool(added == 1)

    # ----------------------------------------------------------------------------------------------- queries

    async def settlement_lost_at(self, key: str) -> float | None:
        with self._client.guard():
            at: Any = await self._client.redis.zscore(f"{self._prefix}lost", key)
        return None if at is None else float(at)

    async def get(self, key: str) -> LedgerEntry | None:
        found = await self._load([key])
        return found[0] if found else None

    async def _members(self, q: LedgerQuery) -> list[str]:
        """A transaction's entries (a handful at most: read whole)."""
        assert q.tx_hash is not None
        with self._client.guard():
            members: Any = await self._client.redis.smembers(f"{self._prefix}x:{q.tx_hash.lower()}")
        return sorted(members)

    async def _range(
        self, index: str, lo: str, hi: str, descending: bool, offset: int, page: int
    ) -> list[tuple[str, float]]:
        with self._client.guard():
            if descending:
                pairs: Any = await self._client.redis.zrevrangebyscore(
                    index, hi, lo, start=offset, num=page, withscores=True
                )
            else:
                pairs = await self._client.redis.zrangebyscore(index, lo, hi, start=offset, num=page, withscores=True)
        return [(str(k), float(score)) for k, score in pairs]

    async def _scan(
        self,
        index: str,
        lo: str,
        hi: str,
        *,
        descending: bool,
        after: tuple[float, str] | None = None,
        page: int = _PAGE,
    ) -> AsyncGenerator[list[str], None]:
        """The members of ``index`` scored within [lo, hi], in (score, key) order (or its reverse), a page at a time,
        strictly beyond ``after``. The cursor is a (score, key) pair, never an offset, so entries recorded or purged
        meanwhile neither repeat nor hide others."""

        def beyond(score: float, key: str, cursor: tuple[float, str]) -> bool:
            return (score, key) < cursor if descending else (score, key) > cursor

        while True:
            if after is not None:
                at = script_number(after[0])
                lo, hi = (lo, at) if descending else (at, hi)
            pairs = await self._range(index, lo, hi, descending, 0, page)
            fresh = [k for k, score in pairs if after is None or beyond(score, k, after)]
            if not fresh and len(pairs) == page:
                # A whole page shares the cursor's score: read the rest of that score by offset, then go past it.
                assert after is not None
                shared, offset = script_number(after[0]), 0
                while True:
                    same = await self._range(index, shared, shared, descending, offset, page)
                    offset += len(same)
                    rest = [k for k, _ in same if beyond(after[0], k, after)]
                    if rest:
                        yield rest
                    if len(same) < page:
                        break
                lo, hi = (lo, "(" + shared) if descending else ("(" + shared, hi)
                after = None
                continue
            if fresh:
                yield fresh
            if len(pairs) < page:
                return
            last_key, last_score = pairs[-1]  # the fresh members are the page's tail
            after = (last_score, last_key)

    async def find(self, query: LedgerQuery) -> list[LedgerEntry]:
        if query.limit <= 0:
            return []
        if query.tx_hash is not None:
            entries = [e for e in await self._load(await self._members(query)) if _matches(e, query)]
            entries = [e for e in entries if _before(e, query)]
            entries.sort(key=lambda e: (e.at, e.key), reverse=True)
            return entries[: query.limit]
        # Newest first: from the tighter of ``until`` (exclusive) and the cursor down to ``since``.
        hi = _bound(query.until, inclusive=False, infinite="+inf")
        after: tuple[float, str] | None = None
        if query.before is not None and (query.until is None or query.before <= query.until):
            if query.before_key is None:
                hi = _bound(query.before, inclusive=False, infinite="+inf")
            else:
                after = (query.before, query.before_key)
        lo = _bound(query.since, inclusive=True, infinite="-inf")
        out: list[LedgerEntry] = []
        # A page's worth of index members at a time (more when other filters drop some), never the whole index.
        page = min(_PAGE, max(16, query.limit))
        pages = self._scan(self._index(query), lo, hi, descending=True, after=after, page=page)
        try:
            async for keys in pages:
                out += [e for e in await self._load(keys) if _matches(e, query)]
                if len(out) >= query.limit:
                    break
        finally:
            await pages.aclose()
        return out[: query.limit]

    async def export(self, query: LedgerQuery) -> AsyncIterator[LedgerEntry]:
        if query.tx_hash is not None:
            entries = [e for e in await self._load(await self._members(query)) if _matches(e, query)]
            for entry in sorted(entries, key=lambda e: (e.at, e.key)):
                yield entry
            return
        lo = _bound(query.since, inclusive=True, infinite="-inf")
        hi = _bound(query.until, inclusive=False, infinite="+inf")
        pages = self._scan(self._index(query), lo, hi, descending=False)
        try:
            async for keys in pages:
                for entry in await self._load(keys):
                    if _matches(entry, query):
                        yield entry
        finally:
            await pages.aclose()

    async def revenue(
        self, by: Literal["route", "network", "day"], *, since: float | None = None, until: float | None = None
    ) -> list[Revenue]:
        if by not in ("route", "network", "day"):
            raise ValueError(f"ledger: revenue by {by!r}: expected route, network or day")
        totals: dict[str, list[int]] = {}

        def add(group: str, amount: int, payments: int) -> None:
            t = totals.setdefault(group, [0, 0])
            t[0] += amount
            t[1] += payments

        # Whole days from their hashes; the partial days at either end from their entries.
        first = None if since is None else math.ceil(since / DAY) * DAY
        last = None if until is None else math.floor(until / DAY) * DAY  # the first second not wholly inside
        if first is not None and last is not None and first >= last:
            spans = [(since, until)]
            whole: Any = []
        else:
            spans = []
            if since is not None and first is not None and since < first:
                spans.append((since, float(first)))
            if until is not None and last is not None and last < until:
                spans.append((float(last), until))
            lo = "-inf" if first is None else str(first)
            hi = "+inf" if last is None else "(" + str(last)
            with self._client.guard():
                whole = await self._client.redis.zrangebyscore(f"{self._prefix}days", lo, hi)
        if whole:
            with self._client.guard():
                async with self._client.redis.pipeline(transaction=False) as pipe:
                    for day in whole:
                        pipe.hgetall(f"{self._prefix}d:{day}")
                    hashes: list[Any] = await pipe.execute()
            for day, h in zip(whole, hashes, strict=True):
                for group, amount, payments in _groups(by, day, h):
                    add(group, amount, payments)
        for span_lo, span_hi in spans:
            async for e in self.export(LedgerQuery(since=span_lo, until=span_hi)):
                group = e.route if by == "route" else e.network if by == "network" else day_of(e.at)
                add(group, e.amount, 0 if e.kind == "refund" else 1)
        return [Revenue(group=g, amount=a, payments=p) for g, (a, p) in sorted(totals.items())]


def _groups(by: str, day: str, h: Mapping[str, str]) -> list[tuple[str, int, int]]:
    """(group, amount, payments) from one day's totals hash."""
    if not h:
        return []
    if by == "day":
        return [(day, int(h.get("a", "0")), int(h.get("p", "0")))]
    tag = "r" if by == "route" else "n"
    out = []
    for field, value in h.items():
        if field.startswith(tag + "a:"):
            name = field[3:]
            out.append((name, int(value), int(h.get(f"{tag}p:{name}", "0"))))
    return out
