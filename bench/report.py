"""The results: a console table with ratios, the performance targets against what was reached, JSON and Markdown."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .run import Bench, Row

OFFICIAL = "official x402 (FastAPI)"
SESSION = "gateway session"
SESSION_BASELINE = "free route, session gw"
METHOD = """\
The gateway runs exactly as the README tells users to: `x402-gateway serve -c FILE` (the file written from the
benchmark's configuration), its default logging (JSON lines at info) on stdout and stderr, which go into a pipe a
separate `cat` drains into a file, as a container runtime's log collector does. The upstream (a raw-ASGI hello), the
official stack and its facilitator each run in their own uvicorn process (uvloop + httptools, one worker). The
free-route rows ("load" = wrk) use `wrk -t1 --latency` for a fixed time when wrk is installed (`apt-get install
wrk`): the Python load generator costs about as much CPU per request as the upstream and would set the direct row's
ceiling itself. Every other row uses one asyncio aiohttp client in the benchmark's process, replaying requests
prepared and payments signed before the clock starts. CPU is user + system time of the measured process(es) in the
timed window (`/proc/<pid>/stat`): the gateway alone; for the official stack its FastAPI app plus the `x402`
facilitator it needs. The second CPU column adds the upstream, anvil and Redis. The paid stacks (the gateway on a
SQLite store, on a Redis store, and the official stack) each get a fresh anvil (chain id 8453, the test USDC at
Base's address), once automining and once with `--block-time 2`; they run side by side and each concurrency level is
taken on each of them in turn (payments signed just before), so the rows a ratio compares are measured a minute
apart, not ten. "minimal Python proxy" is the floor for the free route: raw ASGI forwarding to the upstream over
kept-alive connections, nothing else (`bench/apps.py`). The gateway runs its defaults (access log at info, rate
limiter on with a ceiling the load never reaches, `receipt_poll_interval` 0.1 s, `settlement = "after"`); the
official stack is `payment_middleware` of `x402.http.middleware.fastapi` in front of a catch-all route forwarding to
the same upstream over aiohttp, with the `x402` package's facilitator (`FacilitatorWeb3Signer`) served over HTTP,
paid with payloads from the official client (`x402Client.create_payment_payload`). "vs official" compares rows at
the same concurrency on the same chain (`exact` and tx-hash rows). Sessions (`batch-settlement`, docs/sessions.md):
a gateway with the route offering `["exact", "batch-settlement"]` and a `[sessions]` section (its own receiver
authorizer key, `withdraw_delay = 900`, `min_deposit` sized so that each channel needs one deposit for the whole
run) on a SQLite store and an automining anvil; 10 payers each open a channel with the official client
(`BatchSettlementEvmScheme`: one real deposit, mined before the gateway serves), then every request carries a
voucher for one more price, signed before the clock starts (the same bytes as the official client's, checked) and
sent in order on its channel, one worker per channel (a channel takes one request at a time). Before each session
row the free route is measured on the same gateway process with the same load generator at the same concurrency:
"vs free" is the session row's throughput over that row's. On chain: the relayer's nonce delta over the scenario,
the deposits while serving, then the claim and the sweep to `pay_to` by the gateway restarted on the same store with
`claim_after = 1` s (with the defaults it would claim within the hour, or once a channel owes $5). `store_floor_*`
(under "Sessions on chain"): the channel store alone, in one process with no HTTP, median microseconds of a
voucher's two store operations (`begin`, then `commit` with its fsync) and of one durable SQLite commit on the same
disk (`bench/store_floor.py`): the part of a session request's time that is its durable bookkeeping. The machine is
shared: rerun before trusting a small difference."""
CHAINS = ("automine", "block 2 s")


def _find(
    rows: list[Row], scenario: str, chain: str = "-", *, concurrency: int | None = None, load: str | None = None
) -> Row | None:
    return next(
        (
            r
            for r in rows
            if r.scenario.startswith(scenario)
            and r.chain == chain
            and (concurrency is None or r.concurrency == concurrency)
            and (load is None or r.load == load)
        ),
        None,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


Ratios = tuple[float | None, float | None, float | None]


def ratios(rows: list[Row]) -> dict[int, Ratios]:
    """Per row: (throughput / the direct upstream's, at the same concurrency with the same load generator;
    a session row's throughput / the free route's on the same gateway at the same concurrency; an ``exact`` or
    tx-hash row's throughput / the official stack's on the same chain at the same concurrency)."""
    out: dict[int, Ratios] = {}
    for i, row in enumerate(rows):
        vs_direct = vs_free = vs_official = None
        if row.chain == "-" and not row.scenario.startswith("direct"):
            direct = _find(rows, "direct", concurrency=row.concurrency, load=row.load)
            vs_direct = _ratio(row.rps, direct.rps if direct else None)
        if row.scenario.startswith(SESSION):
            baseline = _session_baseline(rows, row)
            vs_free = _ratio(row.rps, baseline.rps if baseline else None)
        official = _find(rows, OFFICIAL, row.chain, concurrency=row.concurrency)
        if row.chain != "-" and official is not None and row is not official and not row.scenario.startswith(SESSION):
            vs_official = _ratio(row.rps, official.rps)
        out[i] = (vs_direct, vs_free, vs_official)
    return out


def _session_baseline(rows: list[Row], session: Row) -> Row | None:
    """The free-route row measured just before ``session`` on the same gateway at the same concurrency."""
    before = rows[: next(i for i, r in enumerate(rows) if r is session)]
    return next(
        (r for r in reversed(before) if r.scenario == SESSION_BASELINE and r.concurrency == session.concurrency),
        None,
    )


def _best_exact(rows: list[Row], chain: str, concurrency: int) -> Row | None:
    exact = [r for r in rows if r.scenario.startswith("gateway exact") and r.chain == chain]
    exact = [r for r in exact if r.concurrency == concurrency]
    return max(exact, key=lambda r: r.rps) if exact else None


def targets(bench: Bench) -> list[dict[str, Any]]:
    """The performance targets, each with the measured value (None when its scenarios did not run)."""
    rows = bench.rows
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        shown = "not measured" if value is None else f"{value:.2f}{unit}"
        out.append({"target": name, "goal": goal, "reached": shown, "met": ok, "value": value})

    def vs_official(chain: str, concurrency: int, want: float) -> None:
        best = _best_exact(rows, chain, concurrency)
        official = _find(rows, OFFICIAL, chain, concurrency=concurrency)
        ratio = _ratio(best.rps if best else None, official.rps if official else None)
        name = f"paid exact vs official, {chain}, concurrency {concurrency}"
        add(name, f">= {want:g}x", ratio, None if ratio is None else ratio >= want, "x")

    vs_official("automine", 1, 2.0)
    one = _best_exact(rows, "automine", 1)
    p50 = one.p50_ms if one else None
    add("paid exact p50, automine, concurrency 1", "<= 15 ms", p50, None if p50 is None else p50 <= 15.0, " ms")
    for c in (10, 20, 200):
        vs_official("automine", c, 10.0)
    block = _best_exact(rows, "block 2 s", 1)
    p50 = block.p50_ms if block else None
    add(
        "paid exact p50, 2-s blocks, concurrency 1",
        "<= 2200 ms",
        p50,
        None if p50 is None else p50 <= 2200.0,
        " ms",
    )
    many = max((r.concurrency for r in rows if r.scenario == OFFICIAL and r.chain == "block 2 s"), default=512)
    vs_official("block 2 s", many, 100.0)
    direct1, free1 = _find(rows, "direct, 1 at a time"), _find(rows, "free route, 1 at a time")
    overhead = free1.p50_ms - direct1.p50_ms if free1 and direct1 else None
    add(
        "free route p50 overhead (1 connection)",
        "<= 1 ms",
        overhead,
        None if overhead is None else overhead <= 1.0,
        " ms",
    )
    direct = _find(rows, "direct (upstream)")
    free = _find(rows, "gateway free route", load=direct.load if direct else None)
    share = _ratio(free.rps if free else None, direct.rps if direct else None)
    conns = direct.concurrency if direct else 20
    add(
        f"free route throughput / direct ({conns} connections)",
        ">= 0.60",
        share,
        None if share is None else share >= 0.6,
    )
    if free is not None:
        add("gateway CPU per free request", "(reported)", free.server_cpu_per_1k, None, " ms")
    poll = _find(rows, "job status poll")
    free_same_load = _find(rows, "gateway free route", load=poll.load) if poll else None
    poll_share = _ratio(poll.rps if poll else None, free_same_load.rps if free_same_load else None)
    add("job poll throughput / free route", ">= 0.90", poll_share, None if poll_share is None else poll_share >= 0.9)
    for c in (1, 10):
        session = _find(rows, SESSION, "automine", concurrency=c)
        baseline = _session_baseline(rows, session) if session else None
        share = _ratio(session.rps if session else None, baseline.rps if baseline else None)
        add(
            f"session vouchers / free route, concurrency {c}", ">= 0.50", share, None if share is None else share >= 0.5
        )
        if c == 1:
            extra = session.p50_ms - baseline.p50_ms if session and baseline else None
            add(
                "session voucher p50 over the free route's, concurrency 1",
                "<= 2 ms",
                extra,
                None if extra is None else extra <= 2.0,
                " ms",
            )
    per_tx = bench.sessions.get("requests_per_transaction")
    add(
        "paid session requests per on-chain transaction",
        ">= 1000",
        per_tx,
        None if per_tx is None else per_tx >= 1000,
    )
    rss = [v for k, v in bench.memory.items() if k.startswith("gateway_rss_mb")]
    peak = max(rss) if rss else None
    add("gateway RSS", "< 200 MB", peak, None if peak is None else peak < 200, " MB")
    return out


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(bench: Bench) -> list[list[str]]:
    head = [
        "scenario",
        "chain",
        "requests",
        "conc.",
        "load",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU s/1k (server)",
        "CPU s/1k (+chain, upstream)",
        "ok",
        "vs direct",
        "vs free",
        "vs official",
    ]
    body = [head]
    rr = ratios(bench.rows)
    for i, r in enumerate(bench.rows):
        vs_direct, vs_free, vs_official = rr[i]
        body.append(
            [
                r.scenario,
                r.chain,
                str(r.requests),
                str(r.concurrency),
                r.load,
                f"{r.rps:.1f}",
                f"{r.p50_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.server_cpu_per_1k:.2f}",
                f"{r.total_cpu_per_1k:.2f}",
                f"{r.ok}/{r.requests}",
                _fmt(vs_direct, ".2f", "x"),
                _fmt(vs_free, ".2f", "x"),
                _fmt(vs_official, ".1f", "x"),
            ]
        )
    return body


def console(bench: Bench) -> str:
    rows = table(bench)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    for t in targets(bench):
        mark = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        lines.append(f"  target {t['target']:<58} {t['goal']:<10} reached {t['reached']:<14} {mark}")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("x402-gateway", "x402", "fastapi", "starlette", "uvicorn", "uvloop", "aiohttp", "web3", "redis"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def document(bench: Bench, *, command: str, seconds: float) -> dict[str, Any]:
    return {
        "command": command,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform()},
        "versions": _versions(),
        "plan": dataclasses.asdict(bench.plan),
        "gateway_log_level": bench.log_level,
        "rows": [dataclasses.asdict(r) for r in bench.rows],
        # "scenario / chain / concurrency / load": [vs direct, vs free, vs official] (the table's last columns)
        "ratios": {
            f"{r.scenario} / {r.chain} / {r.concurrency} / {r.load}": list(ratios(bench.rows)[i])
            for i, r in enumerate(bench.rows)
        },
        "targets": targets(bench),
        "memory": bench.memory,
        "sessions": bench.sessions,
    }


def markdown(bench: Bench, doc: dict[str, Any]) -> str:
    rows = table(bench)
    out = [
        "# Benchmark results",
        "",
        f"`{doc['command']}` — finished {doc['finished']} in {doc['seconds']:.0f} s on {doc['machine']['cpus']} CPUs "
        f"({doc['machine']['cpu']}); " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        "",
        "Run it with `make bench` (or `.venv/bin/python -m bench [--quick] [--only SCENARIOS]`); the free-route rows "
        "use wrk when it is installed (`apt-get install wrk`), else the Python load generator (their `load` column).",
        "",
        METHOD,
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    out += ["", "## Targets", "", "| target | goal | reached | |", "|---|---|---|---|"]
    for t in doc["targets"]:
        verdict = {True: "met", False: "not met", None: ""}[t["met"]]
        out.append(f"| {t['target']} | {t['goal']} | {t['reached']} | {verdict} |")
    out += ["", "## Memory", ""]
    out += [f"- `{k}`: {v}" for k, v in doc["memory"].items()]
    if doc["sessions"]:
        out += ["", "## Sessions on chain", ""]
        out += [f"- `{k}`: {v}" for k, v in doc["sessions"].items()]
    notes = [r for r in bench.rows if r.note]
    if notes:
        out += ["", "## Notes", ""]
        out += [f"- {r.scenario} ({r.chain}): {r.note}" for r in notes]
    out += ["", "## Per-process CPU seconds in each timed window", ""]
    out += [
        f"- {r.scenario} ({r.chain}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in r.cpu.items())
        + f", load generator {r.client_cpu:.2f}"
        for r in bench.rows
    ]
    return "\n".join(out) + "\n"


def write(bench: Bench, out_dir: Path, *, command: str, seconds: float) -> tuple[Path, Path, dict[str, Any]]:
    doc = document(bench, command=command, seconds=seconds)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path, md_path = out_dir / f"bench-{stamp}.json", out_dir / f"bench-{stamp}.md"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    md_path.write_text(markdown(bench, doc))
    return json_path, md_path, doc
