"""A private anvil node: finding the binary, starting it on a port of its own, and talking JSON-RPC to it.

Synchronous on purpose (urllib, no event loop): pytest session fixtures and the demo command are sync, and nothing
here is on the gateway's request path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from eth_utils.address import to_checksum_address

from gateway.chain.rpc import RpcError
from gateway.dev import paths
from gateway.dev.processes import reap, spawn, wait_until

__all__ = ["Anvil", "find_anvil", "set_eth_balance"]

_ANVIL_NPM_BIN = Path(".tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
_LISTENING = re.compile(rb"Listening on ([0-9.]+):(\d+)")


def find_anvil() -> str:
    """Path of the anvil binary: $X402_ANVIL_BIN, then the repo's .tools/ (scripts/install-tools.sh), then PATH."""
    env = os.environ.get("X402_ANVIL_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise FileNotFoundError(f"X402_ANVIL_BIN={env} is not an executable file")
        return env
    local = paths.REPO_ROOT / _ANVIL_NPM_BIN
    if os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("anvil")
    if found:
        return found
    raise FileNotFoundError(
        "anvil not found: run scripts/install-tools.sh (installs it into .tools/), "
        "put foundry's anvil on PATH, or set X402_ANVIL_BIN"
    )


def _json_rpc(url: str, method: str, params: Sequence[Any], timeout: float = 30.0) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    # S310: the url is always our own local node's http:// address, never user input.
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        answer: dict[str, Any] = json.loads(resp.read())
    if "error" in answer:
        err = answer["error"]
        # The gateway's own RpcError: a node's error answer means the same here as on the hot path; its
        # ``message`` carries anvil's text, e.g. the revert reason of an eth_call.
        error = RpcError(int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
        error.add_note(f"JSON-RPC method: {method}")
        raise error
    return answer.get("result")


class Anvil:
    """A private anvil node on a port of its own, automining unless ``block_time`` is set."""

    def __init__(
        self,
        *,
        chain_id: int = 8453,
        block_time: float | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.block_time = block_time
        self.host = host
        self.binary = binary
        self.port: int | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("anvil is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "anvil.log"

    def start(self, timeout: float = 30.0) -> Self:
        if self.running:
            return self
        binary = self.binary or find_anvil()
        self._dir = Path(tempfile.mkdtemp(prefix="x402-anvil-"))
        log_path = self._dir / "anvil.log"
        argv = [binary, "--host", self.host, "--port", "0", "--chain-id", str(self.chain_id), "--color", "never"]
        if self.block_time is not None:
            argv += ["--block-time", f"{self.block_time:g}"]
        # --port 0 lets anvil bind the port itself (no pick-then-bind race); it prints "Listening on host:port",
        # which we read back from the log file. The log also receives one line per RPC method, so it must not be a
        # pipe nobody drains.
        self._log = log_path.open("wb")
        self._proc = proc = spawn(argv, self._log)

        def listening() -> bool:
            m = _LISTENING.search(log_path.read_bytes())
            if m is None:
                return False
            self.port = int(m.group(2))
            return True

        try:
            wait_until(listening, proc, "anvil", log_path, timeout)
            wait_until(self._answers, proc, "anvil", log_path, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        try:
            return int(_json_rpc(self.url, "eth_chainId", [], timeout=1.0), 16) == self.chain_id
        except (OSError, RpcError, ValueError):
            return False

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        return _json_rpc(self.url, method, params)

    def stop(self) -> None:
        if self._proc is not None:
            reap(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def set_eth_balance(anvil: Anvil, address: str, wei: int) -> None:
    anvil.rpc("anvil_setBalance", [to_checksum_address(address), hex(wei)])
