"""``python -m bench.ledger [--quick]``: what the ledger costs.

1. The store alone: ``LedgerStore.record`` one at a time (latency) and 64 at a time (entries per second), on a
   SQLite file (synchronous = FULL, group commit) and on a Redis server (as the main benchmark starts it).
2. The hot path: paid requests (tx-hash proofs by default, ``--kind exact`` for settlements) through
   ``x402-gateway serve`` on anvil (automine), the same load with ``[ledger] enabled = false`` and ``true``, on a
   SQLite store and a Redis store, in the order off, on, on, off, each on a fresh chain. The gateway is measured
   as :mod:`bench.run` measures it (requests per second, latency percentiles, the gateway's CPU per 1,000
   requests).

Prints one table; nothing is written.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from gateway.dev.chain import RedisServer, start_dev_chain
from gateway.storage.ledger import LedgerEntry, LedgerStore, open_ledger_store

from . import payers
from .load import warm
from .procs import Server, cpu_seconds
from .run import PAID, PRICE, Row, _chain_pid, _redis_pid, _run, measure, running_gateway


def _entry(i: int) -> LedgerEntry:
    return LedgerEntry(
        key=f"exact:8453:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:0x{i:040x}:0x{i:064x}",
        at=time.time(),
        route="POST /paid",
        method="POST",
        resource="http://127.0.0.1:8080/paid",
        amount=PRICE,
        network="base",
        asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        payer=f"0x{i:040x}",
        pay_to="0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
        kind="exact",
        tx_hash=f"0x{i:064x}",
        block=i,
        request_id=f"{i:032x}",
    )


async def _store_rates(store: LedgerStore, sequential: int, concurrent: int) -> dict[str, float]:
    """One record at a time (p50, p99 ms), then 64 in flight (entries per second); and the CPU this process spent
    per record (event loop and the SQLite worker thread alike): what a paid request pays for its entry."""
    await store.ping()
    times = []
    cpu0 = time.process_time()
    for i in range(sequential):
        t0 = time.perf_counter()
        await store.record(_entry(i))
        times.append(time.perf_counter() - t0)
    cpu1 = time.process_time()
    times.sort()
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            await store.record(_entry(i))

    t0 = time.perf_counter()
    cpu2 = time.process_time()
    await asyncio.gather(*(one(sequential + i) for i in range(concurrent)))
    rate = concurrent / (time.perf_counter() - t0)
    cpu3 = time.process_time()
    await store.aclose()
    return {
        "p50": statistics.median(times) * 1000,
        "p99": times[int(len(times) * 0.99)] * 1000,
        "rate": rate,
        "cpu_one": (cpu1 - cpu0) / sequential * 1e6,
        "cpu_many": (cpu3 - cpu2) / concurrent * 1e6,
    }


def stores(quick: bool, tmp: Path) -> list[str]:
    sequential, concurrent = (300, 2_000) if quick else (2_000, 10_000)
    lines = []
    redis = RedisServer().start()
    try:
        for name, url in (("sqlite", f"sqlite:///{tmp / 'ledger.db'}"), ("redis", redis.url)):
            before = cpu_seconds(_redis_pid(redis))
            r = asyncio.run(_store_rates(open_ledger_store(url), sequential, concurrent))
            server = (cpu_seconds(_redis_pid(redis)) - before) / (sequential + concurrent) * 1e6
            lines.append(
                f"  ledger record  {name:<7} one at a time p50 {r['p50']:5.2f} ms  p99 {r['p99']:6.2f} ms, "
                f"{r['cpu_one']:4.0f} us CPU each | 64 in flight: {r['rate']:6.0f} entries/s, "
                f"{r['cpu_many']:4.0f} us CPU each"
                + (f" | redis-server {server:4.0f} us CPU each" if name == "redis" else "")
            )
    finally:
        redis.cleanup()
    return lines


def hot_path(quick: bool, tmp: Path, kind: str, progress: bool = True) -> list[Row]:
    """``kind``: "exact" (a settlement per request: realistic, but anvil's cost dominates and grows with its state)
    or "txhash" (proofs of transfers sent before the clock starts: the gateway's own work stands out)."""
    levels = ((1, 100), (20, 400)) if quick else ((1, 300), (20, 1_500))
    rows: list[Row] = []
    n_payers = 16
    with Server("upstream", {}) as upstream:
        for store_kind in ("sqlite", "redis"):
            # Off, on, on, off, each on a fresh chain (and Redis): anvil slows down as its state grows, and the
            # machine's load drifts; each setting gets an early and a late run under the same conditions.
            for enabled in (False, True, True, False):
                chain = start_dev_chain(8453)
                redis = RedisServer().start() if store_kind == "redis" else None
                try:
                    store = redis.url if redis else f"sqlite:///{tmp / f'{store_kind}-{time.time_ns()}.db'}"
                    total = n_payers + sum(n for _, n in levels)
                    wallets = payers.new_payers(chain, n_payers, PRICE * (total // n_payers + 10))
                    with running_gateway(
                        chain, upstream.url, store, log_level="warning", ledger={"enabled": enabled}
                    ) as (gw, pay_to):
                        if kind == "txhash":
                            calls = payers.txhash_calls(chain, gw.url, PAID, "base", pay_to, PRICE, n_payers, total)
                            warmups, calls = calls[:n_payers], calls[n_payers:]
                        else:
                            warmups = payers.exact_calls(gw.url, PAID, wallets, n_payers)
                        _run(warm(gw.url, warmups, concurrency=8))
                        for c, n in levels:
                            if kind == "txhash":
                                timed, calls = calls[:n], calls[n:]
                            else:
                                timed = payers.exact_calls(gw.url, PAID, wallets, n)
                            others = {"upstream": upstream.pid, "anvil": _chain_pid(chain)}
                            if redis is not None:
                                others["redis"] = _redis_pid(redis)
                            row, _ = measure(
                                f"{kind} {store_kind} ledger {'on' if enabled else 'off'}",
                                "automine",
                                gw.url,
                                timed,
                                c,
                                servers={"gateway": gw.pid},
                                others=others,
                            )
                            rows.append(row)
                            if progress:
                                print(_line(row), flush=True)
                finally:
                    chain.stop()
                    if redis is not None:
                        redis.cleanup()
    return rows


def _line(row: Row) -> str:
    return (
        f"  {row.scenario:<24} c={row.concurrency:<3} {row.rps:8.1f} req/s  p50 {row.p50_ms:7.2f} ms  "
        f"p99 {row.p99_ms:8.2f} ms  {row.server_cpu_per_1k:6.2f} CPU s/1k  ok {row.ok}/{row.requests}"
    )


def summary(rows: list[Row]) -> list[str]:
    """Per store and concurrency: the two runs of each setting averaged, and on minus off."""
    out = []
    keys = sorted({(r.scenario.rsplit(" ledger ", 1)[0], r.concurrency) for r in rows})
    for name, c in keys:
        pick = {
            s: [r for r in rows if r.scenario == f"{name} ledger {s}" and r.concurrency == c] for s in ("off", "on")
        }
        avg = {
            s: (
                statistics.mean(r.rps for r in rs),
                statistics.mean(r.p50_ms for r in rs),
                statistics.mean(r.server_cpu_per_1k for r in rs),
            )
            for s, rs in pick.items()
        }
        (rps0, p500, cpu0), (rps1, p501, cpu1) = avg["off"], avg["on"]
        out.append(
            f"  {name:<14} c={c:<3} off {rps0:7.1f} req/s p50 {p500:6.2f} ms {cpu0:5.2f} CPU s/1k | "
            f"on {rps1:7.1f} req/s p50 {p501:6.2f} ms {cpu1:5.2f} CPU s/1k | "
            f"p50 {p501 - p500:+.2f} ms, CPU {cpu1 - cpu0:+.2f} s/1k"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--only", choices=["store", "hot-path"], default=None)
    parser.add_argument("--kind", choices=["txhash", "exact"], default="txhash", help="the paid requests (hot path)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="x402-bench-ledger-"))
    if args.only in (None, "store"):
        print("the ledger store alone:", flush=True)
        for line in stores(args.quick, tmp):
            print(line, flush=True)
    if args.only in (None, "hot-path"):
        print(f"paid {args.kind} requests through the gateway, [ledger] off and on:", flush=True)
        rows = hot_path(args.quick, tmp, args.kind)
        print("summary (two runs of each setting):")
        for line in summary(rows):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
