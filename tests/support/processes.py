"""``x402-gateway serve`` as real processes: what the scale-out and crash tests run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


@contextlib.contextmanager
def serve_processes(config: Path, logs: Path, keys: list[str]) -> Iterator[list[ServeProcess]]:
    """One ``serve`` process per relayer key, each on its own port, all ready (``/readyz`` 200) when yielded;
    stopped with SIGTERM (then SIGKILL) afterwards. Logs go to ``logs/gateway-<i>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[ServeProcess] = []
    try:
        for i, key in enumerate(keys):
            env = dict(os.environ, TEST_RELAYER_KEY=key, PYTHONPATH=str(ROOT))
            port = free_port()
            log = logs / f"gateway-{i}.log"
            cmd = [sys.executable, "-m", "gateway.cli", "serve", "-c", str(config), "--port", str(port)]
            with log.open("wb") as fh:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            procs.append(ServeProcess(proc, f"http://127.0.0.1:{port}", log))
        deadline = time.monotonic() + 40
        for p in procs:
            while True:
                if p.proc.poll() is not None:
                    raise AssertionError(f"gateway exited with {p.proc.returncode}:\n{p.log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(p.url + "/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"gateway never became ready:\n{p.log.read_text()[-3000:]}")
                time.sleep(0.1)
        yield procs
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.proc.wait(10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(5)
