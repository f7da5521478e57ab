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
the same concurrency on the same chain. The machine is shared: rerun before trusting a small difference."""
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


def ratios(rows: list[Row]) -> dict[int, tuple[float | None, float | None]]:
    """Per row: (throughput / the direct upstream's, at the same concurrency with the same load generator;
    throughput / the official stack's on the same chain at the same concurrency)."""
    out: dict[int, tuple[float | None, float | None]] = {}
    for i, row in enumerate(rows):
        vs_direct = vs_official = None
        if row.chain == "-" and not row.scenario.startswith("direct"):
            direct = _find(rows, "direct", concurrency=row.concurrency, load=row.load)
            vs_direct = _ratio(row.rps, direct.rps if direct else None)
        official = _find(rows, OFFICIAL, row.chain, concurrency=row.concurrency)
        if row.chain != "-" and official is not None and row is not official:
            vs_official = _ratio(row.rps, official.rps)
        out[i] = (vs_direct, vs_official)
    return out


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
        "vs official",
    ]
    body = [head]
    rr = ratios(bench.rows)
    for i, r in enumerate(bench.rows):
        vs_direct, vs_official = rr[i]
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
        "ratios": {bench.rows[i].scenario + " / " + bench.rows[i].chain: v for i, v in ratios(bench.rows).items()},
        "targets": targets(bench),
        "memory": bench.memory,
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
