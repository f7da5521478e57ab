"""The load generator: ``concurrency`` asyncio workers on one aiohttp session replay a prepared request list.

Requests are prepared (and payments signed) before :func:`run_load` starts the clock, so only the servers' work
and the loopback hops are timed. Each worker takes the next request, sends it on a kept-alive connection, reads
the whole answer and records the latency; throughput is requests over wall time of the whole batch.
:func:`run_lanes` gives each worker a list of its own, sent in order: a session channel takes one request at a
time, and each voucher builds on the one before.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


@dataclass(slots=True)
class LoadResult:
    requests: int
    concurrency: int
    seconds: float
    latencies: list[float]  # seconds, one per request, in completion order
    statuses: dict[int, int]  # status -> count
    errors: int  # transport errors (no HTTP answer)
    client_cpu: float  # CPU seconds of the load generator (this process) during the run
    first_bad: str = ""  # the first unexpected answer, for the report

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def ok(self, expect: int) -> int:
        return self.statuses.get(expect, 0)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def run_load(
    base_url: str, calls: Sequence[Call], *, concurrency: int, expect: int = 200, timeout: float = 120.0
) -> LoadResult:
    """``concurrency`` workers taking the next of ``calls`` as they come free."""
    shared = iter(calls)
    return await _run(base_url, [shared] * concurrency, len(calls), expect=expect, timeout=timeout)


async def run_lanes(
    base_url: str, lanes: Sequence[Sequence[Call]], *, expect: int = 200, timeout: float = 120.0
) -> LoadResult:
    """One worker per lane, each sending its own lane's calls in order (concurrency = the number of lanes)."""
    total = sum(len(lane) for lane in lanes)
    return await _run(base_url, [iter(lane) for lane in lanes], total, expect=expect, timeout=timeout)


async def _run(base_url: str, sources: list[Iterator[Call]], total: int, *, expect: int, timeout: float) -> LoadResult:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    first_bad = ""
    concurrency = len(sources)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=None)
    session = aiohttp.ClientSession(
        base_url,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
    )

    async def worker(source: Iterator[Call]) -> None:
        nonlocal errors, first_bad
        perf = time.perf_counter
        for call in source:
            t0 = perf()
            try:
                async with session.request(call.method, call.path, headers=call.headers, data=call.body) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors += 1
                first_bad = first_bad or f"{type(exc).__name__}: {exc}"
                continue
            latencies.append(perf() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if status != expect and not first_bad:
                first_bad = f"HTTP {status}: {body[:300]!r}"

    try:
        cpu0, t0 = _cpu(), time.perf_counter()
        await asyncio.gather(*(worker(source) for source in sources))
        seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    finally:
        await session.close()
    return LoadResult(total, concurrency, seconds, latencies, statuses, errors, cpu, first_bad)


async def warm(base_url: str, calls: Sequence[Call], *, concurrency: int = 8) -> None:
    """Open connections and let the servers' lazy paths run once (not timed)."""
    await run_load(base_url, calls, concurrency=concurrency, expect=0)
