"""The benchmark scenarios and the order they run in.

Each scenario starts what it measures in separate processes, prepares its requests (and signs its payments), then
times a fixed number of requests at a fixed concurrency and reads the CPU time every server process spent during
that window. Every paid scenario gets a fresh anvil (anvil slows down as its state grows), on automine and on
2-second blocks (Base's cadence), where a settlement has to wait for a block. Sessions (``batch-settlement``) run
on automine: their requests make no transaction; the deposits, the claim and the sweep do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import uvloop
from eth_account import Account

from gateway.client.jobauth import payer_auth_headers
from gateway.dev.chain import DEV_KEYS, DevChain, RedisServer, start_dev_chain
from gateway.jobs.model import Job, JobStatus, now_ms
from gateway.storage.jobs import open_job_store

from . import payers
from .load import Call, LoadResult, run_lanes, run_load, warm
from .procs import ServedGateway, Server, cpu_seconds
from .store_floor import channel_store_floor
from .wrk import WrkResult, run_wrk, wrk_path

PRICE_USD = "0.001"
PRICE = 1_000  # atomic units of PRICE_USD
PAID = "/paid"
FREE = "/free/hello"
SUBMIT = "POST /agent/prompt"  # [jobs] style "agent": the priced submit; status is GET /agent/job/{id}
FACILITATOR_KEY = DEV_KEYS[3]
SCENARIOS = (
    "direct",
    "free",
    "session",
    "jobs",
    "exact",
    "txhash",
    "official",
)  # neither the gateway's relayer ([0]) nor the minter ([9])


Levels = tuple[tuple[int, int], ...]  # (concurrency, requests) per row


@dataclass(frozen=True)
class Plan:
    """How many requests each scenario sends, at which concurrency."""

    free_n: int = 20_000  # free-route requests per row with the Python load generator (no wrk) ...
    free_seconds: float = 10.0  # ... or seconds per row with wrk
    free_c: int = 20
    latency_n: int = 2_000  # one request at a time: the added latency of a hop, without queueing
    paid_n: int = 1_500  # tx-hash proofs
    paid_c: int = 64
    block_n: int = 1_500  # tx-hash proofs, 2-second blocks
    block_c: int = 512  # a settlement waits for a block: throughput here is about concurrency / 2 s
    # Paid exact, gateway and official stack at the same concurrencies: one agent calling in sequence, a few, many.
    exact_levels: Levels = ((1, 200), (10, 600), (20, 1_000), (200, 2_000))
    exact_block_levels: Levels = ((1, 12), (512, 1_500))  # one at a time: every request waits for a block
    official_levels: Levels = ((1, 60), (10, 150), (20, 200), (200, 300))
    official_block_levels: Levels = ((512, 120),)  # it settles ~40 per block (its worker threads)
    # Sessions: vouchers at concurrency 1 and 10 (10 payers, one channel each: a channel takes one request at a
    # time), each level after the free route on the same gateway at the same concurrency.
    session_levels: Levels = ((1, 2_000), (10, 11_000))  # 13,000+ requests over 12 transactions: >= 1,000 each
    payers: int = 32
    memory_n: int = 100_000  # free-route requests before reading the gateway's RSS ...
    memory_seconds: float = 60.0  # ... or as many as fit in this long
    jobs_n: int = 10_000
    polls_per_job: int = 10  # a client follows its job: one cold poll, then polls the gateway has seen
    warmup: int = 200

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            free_n=5_000,
            free_seconds=4.0,
            latency_n=500,
            paid_n=400,
            block_n=400,
            exact_levels=((1, 60), (10, 200), (20, 300), (200, 600)),
            exact_block_levels=((1, 5), (512, 400)),
            official_levels=((1, 30), (10, 60), (20, 80), (200, 100)),
            official_block_levels=((512, 40),),
            session_levels=((1, 500), (10, 1_500)),
            payers=16,
            memory_n=20_000,
            memory_seconds=10.0,
            jobs_n=2_000,
            warmup=50,
        )


@dataclass
class Row:
    scenario: str
    chain: str  # "-" for the scenarios that never touch the chain
    requests: int
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_per_1k: float  # CPU seconds per 1,000 requests of the measured server process(es)
    total_cpu_per_1k: float  # ... plus upstream, anvil, redis (not the load generator)
    ok: int
    cpu: dict[str, float] = field(default_factory=dict)  # per process, CPU seconds in the timed window
    client_cpu: float = 0.0
    note: str = ""
    load: str = "aiohttp"  # the load generator: "aiohttp" (bench.load) or "wrk"


def _nonce(chain: DevChain, address: str) -> int:
    return int(chain.rpc("eth_getTransactionCount", [address, "latest"]), 16)


def _chain_pid(chain: DevChain) -> int:
    proc = chain.anvil._proc  # the dev kit keeps its child private; we only read its pid
    assert proc is not None
    return proc.pid


def _redis_pid(redis: RedisServer) -> int:
    proc = redis._proc
    assert proc is not None
    return proc.pid


def _run(coro: Any) -> Any:
    return uvloop.run(coro)


def _run_lanes(base_url: str, lanes: list[list[Call]]) -> LoadResult:
    result: LoadResult = _run(run_lanes(base_url, lanes))
    return result


def measure(
    name: str,
    chain_label: str,
    base_url: str,
    calls: list[Call],
    concurrency: int,
    *,
    servers: dict[str, int],
    others: dict[str, int],
    expect: int = 200,
    note: str = "",
) -> tuple[Row, LoadResult]:
    """Time ``calls`` against ``base_url``; CPU of ``servers`` (measured) and ``others`` (upstream, chain...)."""
    return _row(
        name,
        chain_label,
        lambda: _run(run_load(base_url, calls, concurrency=concurrency, expect=expect)),
        concurrency,
        servers=servers,
        others=others,
        expect=expect,
        note=note,
    )


def measure_wrk(
    name: str, url: str, connections: int, seconds: float, *, servers: dict[str, int], others: dict[str, int]
) -> tuple[Row, WrkResult]:
    """``wrk`` on ``url`` for ``seconds``, as :func:`measure` reads CPU."""
    row, result = _row(
        name,
        "-",
        lambda: run_wrk(url, connections=connections, seconds=seconds),
        connections,
        servers=servers,
        others=others,
    )
    row.load = "wrk"
    return row, result


def _row(
    name: str,
    chain_label: str,
    load: Callable[[], Any],
    concurrency: int,
    *,
    servers: dict[str, int],
    others: dict[str, int],
    expect: int = 200,
    note: str = "",
) -> tuple[Row, Any]:
    pids = {**servers, **others}
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    result = load()
    spent = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
    n = result.requests
    server_cpu = sum(spent[k] for k in servers)
    row = Row(
        scenario=name,
        chain=chain_label,
        requests=n,
        concurrency=concurrency,
        rps=result.rps,
        p50_ms=result.percentile(0.5) * 1000,
        p99_ms=result.percentile(0.99) * 1000,
        server_cpu_per_1k=server_cpu * 1000 / n,
        total_cpu_per_1k=sum(spent.values()) * 1000 / n,
        ok=result.ok(expect),
        cpu={k: round(v, 3) for k, v in spent.items()},
        client_cpu=result.client_cpu,
        note=note,
    )
    if row.ok != n:
        bad = f"{n - row.ok} of {n} not HTTP {expect} (first: {result.first_bad})"
        row.note = f"{note}; {bad}" if note else bad
    return row, result


@dataclass(frozen=True)
class _PaidStack:
    """One paid stack under measurement: where to send, its levels, how to sign a level's payments, its pids."""

    name: str
    url: str
    levels: Levels
    sign: Callable[[int], list[Call]]
    servers: dict[str, int]
    others: dict[str, int]


# ----------------------------------------------------------------------------------------------- gateway


def gateway_config(
    chain: DevChain,
    upstream_url: str,
    store_url: str,
    pay_to: str,
    *,
    replace: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The benchmark's gateway: defaults everywhere except what a local chain needs."""
    doc: dict[str, Any] = {
        "upstream": {"url": upstream_url},
        "store": {"url": store_url},
        "payment": {"pay_to": pay_to, "relayer_key_env": "BENCH_RELAYER_KEY"},
        "networks": {"base": {"rpc_urls": [chain.url]}},
        "routes": [{"route": f"POST {PAID}", "price": PRICE_USD, "description": "benchmark route"}],
        # The limiter stays on (its cost is part of every paid request) with a ceiling the load never reaches:
        # all the load comes from one client address, which the default 600/minute per address would cap.
        "rate_limits": {"challenge": "1000000/minute", "paid": "1000000/minute"},
    }
    for section, values in overrides.items():
        doc.setdefault(section, {}).update(values)
    doc.update(replace or {})
    return doc


@contextlib.contextmanager
def running_gateway(
    chain: DevChain,
    upstream_url: str,
    store_url: str,
    *,
    log_level: str,
    pay_to: str | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> Iterator[tuple[ServedGateway, str]]:
    """``x402-gateway serve -c FILE`` with this configuration (see :class:`bench.procs.ServedGateway`); a fresh
    ``pay_to`` unless given; ``env`` adds to the relayer's key (``BENCH_RELAYER_KEY``)."""
    pay_to = pay_to or payers.fresh_address()
    config = gateway_config(chain, upstream_url, store_url, pay_to, **overrides)
    server = ServedGateway(config, env={"BENCH_RELAYER_KEY": chain.relayer_key, **(env or {})}, log_level=log_level)
    with server:
        yield server, pay_to


@dataclass
class Bench:
    plan: Plan
    log_level: str = "info"
    progress: Callable[[str], None] = print
    rows: list[Row] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    sessions: dict[str, Any] = field(default_factory=dict)  # the session scenario's on-chain account
    upstream: Server | None = None
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="x402-bench-")))

    def _others(self, chain: DevChain | None = None, redis: RedisServer | None = None) -> dict[str, int]:
        assert self.upstream is not None
        out = {"upstream": self.upstream.pid}
        if chain is not None:
            out["anvil"] = _chain_pid(chain)
        if redis is not None:
            out["redis"] = _redis_pid(redis)
        return out

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.progress(
            f"  {row.scenario:<22} {row.chain:<10} {row.rps:9.1f} req/s  p50 {row.p50_ms:7.2f} ms  "
            f"p99 {row.p99_ms:8.2f} ms  {row.server_cpu_per_1k:6.2f} CPU s/1k  ok {row.ok}/{row.requests}"
            + (f"  ({row.note})" if row.note else "")
        )
        return row

    # ------------------------------------------------------------------------------------------ scenarios

    def run_all(self, only: set[str] | None = None) -> None:
        def want(name: str) -> bool:
            return only is None or name in only

        with Server("upstream", {}) as upstream:
            self.upstream = upstream
            if want("direct") or want("free"):
                self.free_scenarios(want)
            if want("session"):
                self.session()
            if want("jobs"):
                self.jobs()
            for label, block_time in (("automine", None), ("block 2 s", 2.0)):
                if want("exact") or want("official"):
                    self.paid(label, block_time, exact=want("exact"), official=want("official"))
                if want("txhash"):
                    self.txhash(label, block_time)

    def free_scenarios(self, want: Callable[[str], bool]) -> None:
        """The upstream alone, then through the gateway's free route: at ``free_c`` connections and one at a time.
        With wrk when it is installed (its rows say so), else the Python load generator."""
        p = self.plan
        assert self.upstream is not None
        calls = [Call("GET", FREE)] * p.free_n
        _run(warm(self.upstream.url, calls[: p.warmup]))
        if want("direct"):
            for c, name in ((p.free_c, "direct (upstream)"), (1, "direct, 1 at a time")):
                self.add(self._free_row(name, self.upstream.url, c, servers={"upstream": self.upstream.pid}))
            with Server("floor", {"upstream_url": self.upstream.url}, ready_path=FREE) as floor:
                _run(warm(floor.url, calls[: p.warmup]))
                row = self._free_row(
                    "minimal Python proxy", floor.url, p.free_c, servers={"floor": floor.pid}, others=self._others()
                )
                row.note = "the floor: raw ASGI, one kept-alive hop, nothing else (bench/apps.py floor_app)"
                self.add(row)
        if not want("free"):
            return
        chain = start_dev_chain(8453)
        try:
            store = f"sqlite:///{self.tmp / 'free.db'}"
            with running_gateway(chain, self.upstream.url, store, log_level=self.log_level) as (gw, _):
                _run(warm(gw.url, calls[: p.warmup]))
                rss_start = gw.rss_mb()
                lines = gw.log_lines()
                served = 0
                for c, name in ((p.free_c, "gateway free route"), (1, "free route, 1 at a time")):
                    row = self._free_row(name, gw.url, c, servers={"gateway": gw.pid}, others=self._others())
                    served += row.requests
                    self.add(row)
                if wrk_path() is not None:  # what the job polls (signed, one header per job) are compared with
                    row, _ = measure(
                        "gateway free route",
                        "-",
                        gw.url,
                        calls,
                        p.free_c,
                        servers={"gateway": gw.pid},
                        others=self._others(),
                    )
                    served += row.requests
                    self.add(row)
                self.memory_run(gw, rss_start, served + p.warmup)
                time.sleep(0.2)  # the gateway writes its log lines every few tens of milliseconds
                self.memory["gateway_log_lines_written"] = gw.log_lines() - lines
        finally:
            chain.stop()

    def _free_row(
        self, name: str, url: str, c: int, *, servers: dict[str, int], others: dict[str, int] | None = None
    ) -> Row:
        p = self.plan
        if wrk_path() is not None:
            row, _ = measure_wrk(name, url + FREE, c, p.free_seconds, servers=servers, others=others or {})
            return row
        n = p.free_n if c > 1 else p.latency_n
        row, _ = measure(name, "-", url, [Call("GET", FREE)] * n, c, servers=servers, others=others or {})
        return row

    def session(self) -> None:
        """Sessions (``batch-settlement``), configured as docs/sessions.md shows, on a SQLite store.

        Each of 10 payers opens a channel with the official client (its real deposit: the offer's ``minDeposit``,
        sized so that the whole run needs no second one); every later request carries a voucher signed ahead of
        time for one more price, sent in order on its channel (:func:`bench.load.run_lanes`). At each concurrency
        the free route is measured first on the same gateway with the same load generator: the session row's
        baseline. The run's on-chain cost is the relayer's nonce delta: the deposits while serving, then the claim
        and the sweep, by the gateway restarted on the same store with ``claim_after`` = 1 s (the defaults would
        claim within the hour, or at $5 owed per channel); ``pay_to`` must then hold exactly what was charged.
        """
        p = self.plan
        assert self.upstream is not None
        width = max(c for c, _ in p.session_levels)
        warm_each = max(1, p.warmup // width)
        busiest = 1 + warm_each + sum(n // c for c, n in p.session_levels)  # channel 0 takes a share of every level
        deposit = PRICE * busiest
        sessions = {
            "authorizer_key_env": "BENCH_AUTHORIZER_KEY",  # the receiver authorizer: never the relayer's key
            "withdraw_delay": 900,
            "min_deposit": str(Decimal(deposit) / 10**6),
        }
        env = {"BENCH_AUTHORIZER_KEY": "0x" + os.urandom(32).hex()}
        routes = [{"route": f"POST {PAID}", "price": PRICE_USD, "schemes": ["exact", "batch-settlement"]}]
        name = "gateway session sqlite"
        chain = start_dev_chain(8453)
        try:
            wallets = payers.new_payers(chain, width, deposit)
            relayer = Account.from_key(chain.relayer_key).address
            nonce_start = _nonce(chain, relayer)
            store = f"sqlite:///{self.tmp / f'session-{time.time_ns()}.db'}"
            served = 0
            with running_gateway(
                chain,
                self.upstream.url,
                store,
                log_level=self.log_level,
                env=env,
                sessions=sessions,
                replace={"routes": routes},
            ) as (gw, pay_to):
                channels = payers.open_session_channels(chain, gw.url, PAID, wallets)
                served += len(channels)
                _run(warm(gw.url, [Call("GET", FREE)] * p.warmup))
                warm_up = _run(run_lanes(gw.url, [ch.vouchers(PAID, warm_each) for ch in channels]))
                if warm_up.ok(200) != warm_up.requests:
                    raise RuntimeError(f"session warm-up: {warm_up.first_bad}")
                served += warm_up.requests
                for c, n in p.session_levels:
                    row, _ = measure(
                        "free route, session gw",
                        "-",
                        gw.url,
                        [Call("GET", FREE)] * n,
                        c,
                        servers={"gateway": gw.pid},
                        others=self._others(),
                        note="the session rows' baseline: same gateway, same load generator, same concurrency",
                    )
                    self.add(row)
                    lanes = [ch.vouchers(PAID, n // c) for ch in channels[:c]]
                    row, result = _row(
                        name,
                        "automine",
                        functools.partial(_run_lanes, gw.url, lanes),
                        c,
                        servers={"gateway": gw.pid},
                        others=self._others(chain),
                        note=f"{c} channel{'s' if c > 1 else ''}, one voucher per request, no transaction",
                    )
                    self.add(row)
                    served += result.ok(200)
            deposits = _nonce(chain, relayer) - nonce_start
            claiming = {**sessions, "claim_interval": 0.2, "claim_after": 1.0, "settle_interval": 0.2}
            started = time.monotonic()
            with running_gateway(
                chain,
                self.upstream.url,
                store,
                log_level=self.log_level,
                pay_to=pay_to,
                env=env,
                sessions=claiming,
                replace={"routes": routes},
            ):
                deadline = time.monotonic() + 60
                while chain.balance(pay_to) < served * PRICE and time.monotonic() < deadline:
                    time.sleep(0.1)
            claimed_in = time.monotonic() - started
            txs = _nonce(chain, relayer) - nonce_start
            gained = chain.balance(pay_to)
        finally:
            chain.stop()
        self.sessions = {
            "store": "sqlite",
            "channels": width,
            "deposit_each_atomic": deposit,
            "paid_requests": served,
            "deposit_transactions": deposits,
            "claim_and_sweep_transactions": txs - deposits,
            "transactions": txs,
            "requests_per_transaction": round(served / txs, 1) if txs else None,
            "requests_per_deposit": round(served / deposits, 1) if deposits else None,
            "pay_to_gained_atomic": gained,
            "charged_atomic": served * PRICE,
            "restart_claim_sweep_seconds": round(claimed_in, 1),
            **channel_store_floor(self.tmp),  # what the store alone costs a voucher (bench/store_floor.py)
        }
        self.progress(
            f"  sessions: {served} paid requests, {txs} transactions ({deposits} deposits, {txs - deposits} claim + "
            f"sweep): {served / max(txs, 1):.0f} requests per transaction; pay_to gained {gained} of "
            f"{served * PRICE} charged"
        )

    def jobs(self) -> None:
        """``[jobs] mode = "front"``: status polls signed by the paying wallet (``X-Payer-Auth``) with
        ``jobs_n`` job records held.

        "job status poll" is a client following its jobs: ``polls_per_job`` polls of each job, the wallet's signed
        header reused while it is valid (what a client that signs once per job, or presents the job token, sends),
        so a job's first poll pays for the signature recovery and the store read, and the rest do not. "job status
        poll, all cold" is the worst case, on jobs nobody polled before: a new job and a new signature every time.
        """
        p = self.plan
        assert self.upstream is not None
        chain = start_dev_chain(8453)
        try:
            store = f"sqlite:///{self.tmp / f'jobs-{time.time_ns()}.db'}"
            wallets = [Account.create() for _ in range(8)]
            _run(_fill_jobs(store, wallets, p.jobs_n))
            jobs_cfg = {"mode": "front", "style": "agent", "max_jobs": p.jobs_n + 1_000}
            routes = [
                {"route": f"POST {PAID}", "price": PRICE_USD},
                {"route": "POST /agent/prompt", "price": PRICE_USD},
            ]
            with running_gateway(
                chain,
                self.upstream.url,
                store,
                log_level=self.log_level,
                jobs=jobs_cfg,
                replace={"routes": routes},
            ) as (gw, _):
                rss_start = gw.rss_mb()
                self._check_job_flow(chain, gw)

                def poll(i: int) -> Call:
                    path = f"/agent/job/bench-{i}"
                    return Call("GET", path, payer_auth_headers(wallets[i % len(wallets)], "GET", path))

                followed = max(1, min(p.jobs_n // 2, p.free_n // p.polls_per_job))
                rounds = [poll(i) for i in range(followed)]  # job i's polls, one per round
                calls = (rounds * p.polls_per_job)[: p.free_n]
                cold = [poll(i) for i in range(followed, min(p.jobs_n, followed + p.free_n))]
                warm_up = [poll(i) for i in range(p.jobs_n, p.jobs_n + p.warmup)]  # unknown jobs: 404s
                _run(warm(gw.url, warm_up))
                for name, batch, note in (
                    ("job status poll", calls, f"{followed} jobs, {p.polls_per_job} polls each"),
                    ("job status poll, all cold", cold, "every poll a job and a signature not seen before"),
                ):
                    row, _ = measure(
                        name,
                        "-",
                        gw.url,
                        batch,
                        p.free_c,
                        servers={"gateway": gw.pid},
                        others=self._others(),
                        note=note,
                    )
                    self.add(row)
                self.memory["jobs_held"] = p.jobs_n
                self.memory["gateway_rss_mb_jobs_start"] = round(rss_start, 1)
                self.memory["gateway_rss_mb_jobs_after_polls"] = round(gw.rss_mb(), 1)
                self.progress(
                    f"  memory: RSS {rss_start:.1f} MB holding {p.jobs_n} job records, "
                    f"{gw.rss_mb():.1f} MB after {len(calls) + len(cold)} polls"
                )
        finally:
            chain.stop()

    def _check_job_flow(self, chain: DevChain, gw: Server) -> None:
        """One real paid submit and a poll with its token: the scenario measures a working jobs API."""
        payer = chain.new_payer(PRICE * 10)
        (call,) = payers.exact_calls(gw.url, "/agent/prompt", [payer], 1)
        submit = Request(gw.url + call.path, data=call.body, headers=call.headers, method="POST")
        with urlopen(submit, timeout=60) as resp:
            token = resp.headers["x-job-token"]
            job_id = json.loads(resp.read())["jobId"]
        poll = Request(f"{gw.url}/agent/job/{job_id}", headers={"Authorization": f"Bearer {token}"})
        with urlopen(poll, timeout=30) as resp:
            if resp.status != 200:
                raise RuntimeError(f"job poll answered HTTP {resp.status}")

    def memory_run(self, gw: Server, rss_start: float, done: int) -> None:
        """Keep hammering the free route until ``memory_n`` requests in total (or ``memory_seconds``); RSS after."""
        p = self.plan
        batch = [Call("GET", FREE)] * 5_000
        deadline = time.monotonic() + p.memory_seconds
        while done < p.memory_n and time.monotonic() < deadline:
            _run(run_load(gw.url, batch[: min(len(batch), p.memory_n - done)], concurrency=p.free_c))
            done += min(len(batch), p.memory_n - done)
        self.memory["gateway_rss_mb_after_start"] = round(rss_start, 1)
        self.memory["gateway_rss_mb_after_free_requests"] = round(gw.rss_mb(), 1)
        self.memory["free_requests_served"] = done
        self.progress(f"  memory: RSS {rss_start:.1f} MB after start-up, {gw.rss_mb():.1f} MB after {done} requests")

    def paid(self, label: str, block_time: float | None, *, exact: bool, official: bool) -> None:
        """Paid ``exact``: the gateway on a SQLite store, on a Redis store, and the official stack, each on a fresh
        chain of its own, all started first; then each concurrency level runs on each of them in turn, so the rows
        a ratio compares are measured minutes apart at most (on a shared machine the load moves in between)."""
        with contextlib.ExitStack() as stack:
            stacks: list[_PaidStack] = []
            if exact:
                stacks += [self._gateway_stack(stack, label, block_time, kind) for kind in ("sqlite", "redis")]
            if official:
                stacks.append(self._official_stack(stack, block_time))
            for c in sorted({c for s in stacks for c, _ in s.levels}):
                for s in stacks:
                    n = dict(s.levels).get(c)
                    if n is not None:
                        row, _ = measure(s.name, label, s.url, s.sign(n), c, servers=s.servers, others=s.others)
                        self.add(row)

    def _gateway_stack(
        self, stack: contextlib.ExitStack, label: str, block_time: float | None, store_kind: str
    ) -> _PaidStack:
        p = self.plan
        assert self.upstream is not None
        levels = p.exact_levels if block_time is None else p.exact_block_levels
        chain = start_dev_chain(8453, block_time=block_time)
        stack.callback(chain.stop)
        redis: RedisServer | None = None
        if store_kind == "redis":
            redis = RedisServer().start()
            stack.callback(redis.cleanup)
            store = redis.url
        else:
            store = f"sqlite:///{self.tmp / f'exact-{label[:4]}-{time.time_ns()}.db'}"
        total = sum(n for _, n in levels) + p.payers
        wallets = payers.new_payers(chain, p.payers, PRICE * (total // p.payers + 10))
        gw, _ = stack.enter_context(running_gateway(chain, self.upstream.url, store, log_level=self.log_level))
        _run(warm(gw.url, payers.exact_calls(gw.url, PAID, wallets, p.payers), concurrency=min(8, p.payers)))
        return _PaidStack(
            f"gateway exact {store_kind}",
            gw.url,
            levels,
            lambda n: payers.exact_calls(gw.url, PAID, wallets, n),  # signed when its level runs
            {"gateway": gw.pid},
            self._others(chain, redis),
        )

    def _official_stack(self, stack: contextlib.ExitStack, block_time: float | None) -> _PaidStack:
        p = self.plan
        assert self.upstream is not None
        levels = p.official_levels if block_time is None else p.official_block_levels
        chain = start_dev_chain(8453, block_time=block_time)
        stack.callback(chain.stop)
        warmups = min(4, p.payers)
        total = sum(n for _, n in levels) + warmups
        wallets = payers.new_payers(chain, p.payers, PRICE * (total // p.payers + 10))
        fac_spec = {"key": FACILITATOR_KEY, "rpc_url": chain.url, "network": chain.network}
        fac = stack.enter_context(Server("facilitator", fac_spec, ready_path="/supported"))
        spec = {
            "upstream_url": self.upstream.url,
            "facilitator_url": fac.url,
            "network": chain.network,
            "pay_to": payers.fresh_address(),
            "price": f"${PRICE_USD}",
            "routes": [f"POST {PAID}"],
        }
        app = stack.enter_context(Server("official", spec, ready_path=FREE))
        _run(warm(app.url, payers.official_calls(app.url, PAID, wallets, warmups), concurrency=warmups))
        return _PaidStack(
            "official x402 (FastAPI)",
            app.url,
            levels,
            lambda n: payers.official_calls(app.url, PAID, wallets, n),
            {"official": app.pid, "facilitator": fac.pid},
            self._others(chain),
        )

    def txhash(self, label: str, block_time: float | None) -> None:
        p = self.plan
        n, c = (p.paid_n, p.paid_c) if block_time is None else (p.block_n, p.block_c)
        assert self.upstream is not None
        chain = start_dev_chain(8453, block_time=block_time)
        try:
            store = f"sqlite:///{self.tmp / f'tx-{time.time_ns()}.db'}"
            with running_gateway(chain, self.upstream.url, store, log_level=self.log_level) as (gw, pay_to):
                calls = payers.txhash_calls(chain, gw.url, PAID, "base", pay_to, PRICE, p.payers, n + p.payers)
                warmups, timed = calls[: p.payers], calls[p.payers :]
                _run(warm(gw.url, warmups, concurrency=min(8, p.payers)))
                row, _ = measure(
                    "gateway tx-hash", label, gw.url, timed, c, servers={"gateway": gw.pid}, others=self._others(chain)
                )
                self.add(row)
        finally:
            chain.stop()


async def _fill_jobs(store_url: str, wallets: list[Any], n: int) -> None:
    """``n`` job bindings (front mode) spread over ``wallets``, written before the gateway starts."""
    store = open_job_store(store_url)
    now = now_ms()
    try:
        for i in range(n):
            job = Job(
                job_id=f"bench-{i}",
                payer=wallets[i % len(wallets)].address.lower(),
                status=JobStatus.PENDING,
                created_at=now,
                network="base",
                purge_at=now + 3_600_000,
            )
            await store.create(job, max_jobs=n + 1_000)
    finally:
        await store.aclose()


def main_run(plan: Plan, only: set[str] | None, log_level: str) -> Bench:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    bench = Bench(plan, log_level=log_level)
    bench.run_all(only)
    return bench
