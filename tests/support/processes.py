"""``x402-gateway serve`` as real processes, for tests that depend on the server it runs (uvicorn, its protocol and
limits, several instances on one store, a crash), not only on the ASGI app.

Two launchers over one start / wait / stop: :func:`serve_processes` (the scale-out and crash tests: a config file
of the caller's, one process per relayer key, each ready on ``/readyz``) and :func:`served_gateway` (one process
over a dev chain and an upstream, its config file written here, answering on ``/healthz``). Every process gets
its own port and log file, and is stopped with SIGTERM (then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account

from gateway.dev.chain import DevChain, set_eth_balance
from tests.support.gateway import network_name

ROOT = Path(__file__).resolve().parents[2]


def python_process(code: str, *args: str, ready: str) -> subprocess.Popen[str]:
    """``python -c code args`` from the repository's root, once it has printed the line ``ready`` (its own
    process: a test can kill it with SIGKILL, as a crash would)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == ready
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd_args: list[str], key: str, log: Path) -> subprocess.Popen[bytes]:
    """``python -m gateway.cli serve <cmd_args>`` from the repository, relayer key in ``TEST_RELAYER_KEY``."""
    env = dict(os.environ, TEST_RELAYER_KEY=key, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "gateway.cli", "serve", *cmd_args]
    with log.open("wb") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen[bytes], url: str, log: Path, deadline: float, *, ready: bool) -> None:
    """Until ``url`` answers 200 on ``/readyz`` (``ready``) or ``/healthz``; fails if the process exits first."""
    path, never = ("/readyz", "never became ready") if ready else ("/healthz", "never answered")
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"gateway {never}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every process still running, then wait for each (SIGKILL after 10 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ------------------------------------------------------------------------------------------ several processes


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
            port = free_port()
            log = logs / f"gateway-{i}.log"
            proc = _start(["-c", str(config), "--port", str(port)], key, log)
            procs.append(ServeProcess(proc, f"http://127.0.0.1:{port}", log))
        deadline = time.monotonic() + 40
        for p in procs:
            _wait(p.proc, p.url, p.log, deadline, ready=True)
        yield procs
    finally:
        _stop([p.proc for p in procs])


def paid_route_config(
    *, upstream_url: str, store_url: str, chain: DevChain, pay_to: str, store: dict[str, Any] | None = None
) -> str:
    """The config the scale-out tests give every ``serve`` process: one ``POST /paid`` route at $0.10 on ``chain``,
    receipts and rate limits on ``store_url`` (plus ``store``'s extra ``[store]`` keys), the relayer key in
    ``TEST_RELAYER_KEY``."""
    return config_text(
        {
            "server": {"listen": "127.0.0.1:8402"},
            "upstream": {"url": upstream_url, "read_timeout": 10.0},
            "store": {"url": store_url, **(store or {})},
            "rate_limits": {"storage_url": store_url},
            "payment": {"pay_to": pay_to, "relayer_key_env": "TEST_RELAYER_KEY", "settle_timeout": 20.0},
            "networks.base": {"rpc_urls": [chain.url], "receipt_poll_interval": 0.02},
        },
        [{"route": "POST /paid", "price": "0.10"}],
    )


def funded_relayer_keys(chain: DevChain, count: int) -> list[str]:
    """One relayer key per instance, as the README recommends (each process keeps its own nonce sequence, so
    instances settling at the same moment never race for one nonce), each funded with 10 ETH for gas."""
    relayers = [Account.create() for _ in range(count)]
    for r in relayers:
        set_eth_balance(chain.anvil, r.address, 10**19)
    return [r.key.to_0x_hex() for r in relayers]


async def post_all(targets: list[tuple[str, dict[str, str]]]) -> list[int]:
    """Every request released together (connections opened first, then one gather); their status codes."""
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=len(targets))) as client:
        return [r.status_code for r in await asyncio.gather(*(client.post(u, headers=h) for u, h in targets))]


# ------------------------------------------------------------------------------ one process, config written here


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def config_text(sections: dict[str, dict[str, Any]], routes: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    for route in routes:
        lines.append("[[routes]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in route.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass
class ServedGateway:
    url: str
    port: int
    pid: int
    pay_to: str
    log: Path

    def rss_bytes(self) -> int:
        """The process's resident memory (``VmRSS``)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@contextlib.contextmanager
def served_gateway(
    chain: DevChain,
    tmp_path: Path,
    *,
    upstream_url: str,
    routes: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> Iterator[ServedGateway]:
    """``x402-gateway serve`` over ``chain`` and ``upstream_url``; ``sections`` are merged into the config."""
    port = free_port()
    pay_to = Account.create().address
    doc: dict[str, dict[str, Any]] = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "upstream": {"url": upstream_url, "read_timeout": 10.0},
        "store": {"url": f"sqlite:///{tmp_path / 'receipts.db'}"},
        "payment": {"pay_to": pay_to, "relayer_key_env": "TEST_RELAYER_KEY"},
        "rate_limits": {"enabled": False},
        f"networks.{network_name(chain)}": {"rpc_urls": [chain.url], "receipt_poll_interval": 0.02},
    }
    for name, table in sections.items():
        doc.setdefault(name, {}).update(table)
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(doc, routes or [{"route": "POST /paid", "price": "0.10"}]))
    log = tmp_path / "gateway.log"
    proc = _start(["-c", str(config), "--log-format", "text"], chain.relayer_key, log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(proc, url, log, time.monotonic() + 40, ready=False)
        yield ServedGateway(url=url, port=port, pid=proc.pid, pay_to=pay_to, log=log)
    finally:
        _stop([proc])
