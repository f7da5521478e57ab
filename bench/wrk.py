"""The free-route rows' load generator when ``wrk`` is installed (``apt-get install wrk``): C, one thread, kept-alive
connections, a fixed duration. The Python generator (:mod:`bench.load`) costs about as much CPU per request as the
upstream it measures, so on a 2-core machine it, not the server, sets the direct upstream's ceiling; wrk does not.
The same GET on every request (the free route needs nothing else)."""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
from dataclasses import dataclass, field

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_DURATION = re.compile(r"^\s*([0-9.]+)\s*(us|ms|s|m)\s*$")


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _seconds(text: str) -> float:
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(slots=True)
class WrkResult:
    requests: int
    concurrency: int
    seconds: float
    rps: float
    quantiles: dict[float, float]  # 0.5, 0.75, 0.9, 0.99 -> seconds
    bad: int  # non-2xx/3xx answers and socket errors
    client_cpu: float  # CPU seconds wrk used
    first_bad: str = ""
    latencies: list[float] = field(default_factory=list)  # (wrk reports quantiles only)

    def percentile(self, q: float) -> float:
        known = sorted(self.quantiles)
        return self.quantiles[min(known, key=lambda k: abs(k - q))]

    def ok(self, expect: int) -> int:
        return self.requests - self.bad


def parse(output: str, connections: int) -> WrkResult:
    quantiles: dict[float, float] = {}
    requests, seconds, rps, bad = 0, 0.0, 0.0, 0
    first_bad = ""
    for line in output.splitlines():
        text = line.strip()
        if m := re.match(r"^(50|75|90|99)%\s+(\S+)$", text):
            quantiles[int(m.group(1)) / 100] = _seconds(m.group(2))
        elif m := re.match(r"^(\d+) requests in ([0-9.]+\w+),", text):
            requests, seconds = int(m.group(1)), _seconds(m.group(2))
        elif text.startswith("Requests/sec:"):
            rps = float(text.split()[1])
        elif text.startswith("Non-2xx or 3xx responses:"):
            bad += int(text.split()[-1])
            first_bad = first_bad or text
        elif text.startswith("Socket errors:"):
            bad += sum(int(n) for n in re.findall(r"\d+", text))
            first_bad = first_bad or text
    if not requests or not quantiles:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    return WrkResult(requests, connections, seconds, rps, quantiles, min(bad, requests), 0.0, first_bad)


def run_wrk(url: str, *, connections: int, seconds: float, threads: int = 1) -> WrkResult:
    """``wrk -t THREADS -c CONNECTIONS -d SECONDS --latency URL``; wrk's own CPU time in ``client_cpu``."""
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(  # noqa: S603 - argv built here
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse(done.stdout, connections)
    result.client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result
