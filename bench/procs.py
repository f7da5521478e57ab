"""Server processes under measurement: the gateway as users run it, the other servers through ``python -m
bench.serve``; and their CPU and memory.

Every server the benchmark measures runs in a process of its own (uvicorn, uvloop + httptools), so the load
generator's CPU never mixes with the server's.

* The gateway (:class:`ServedGateway`) is ``x402-gateway serve -c FILE``, exactly as the README and the container
  run it: its configuration written to a TOML file, its own listening socket (``server.listen``), its default
  logging (JSON lines at info) on stdout and stderr. Those go into a pipe that a separate process (``cat``) drains
  into a file, as a container runtime's log collector reads a container's output.
* The upstream, the official stack and its facilitator: the parent binds the listening socket and hands its file
  descriptor to the child (``uvicorn --fd``): the port is known before the child starts and nothing races for it.

CPU is read from ``/proc/<pid>/stat`` (user + system time of all the process's threads), memory from
``/proc/<pid>/status`` (VmRSS): no psutil needed, Linux only, like the rest of the dev kit.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from . import toml_file

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_REPO = Path(__file__).resolve().parent.parent
_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_live() -> None:
    for proc in list(_LIVE):
        _stop(proc)


atexit.register(_kill_live)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _LIVE.discard(proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15 of stat(5))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: S110 - best effort; atexit covers a normal exit
        pass


class Server:
    """One ``python -m bench.serve KIND`` child process listening on a loopback port chosen by the parent."""

    def __init__(
        self, kind: str, spec: dict[str, Any], *, env: dict[str, str] | None = None, ready_path: str = "/"
    ) -> None:
        self.kind = kind
        self.spec = spec
        self.env = env or {}
        self.ready_path = ready_path
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(2048)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix=f"x402-bench-{kind}-"))
        self.log_path = self._dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> Self:
        spec_path = self._dir / "spec.json"
        spec_path.write_text(json.dumps(self.spec))
        fd = self._sock.fileno()
        argv = [sys.executable, "-m", "bench.serve", self.kind, str(spec_path), "--fd", str(fd)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built here
                argv,
                cwd=_REPO,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(fd,),
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        _LIVE.add(self.proc)
        return self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> Self:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as resp:
                    resp.read()
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer means the app is serving
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
        self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _console_script(name: str) -> list[str]:
    """The installed console script (``.venv/bin/x402-gateway``), else the module it runs."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


class ServedGateway(Server):
    """``x402-gateway serve -c FILE --log-level LEVEL``, its output through a pipe (see the module docstring)."""

    def __init__(
        self, config: dict[str, Any], *, env: dict[str, str], log_level: str = "info", ready_path: str = "/healthz"
    ) -> None:
        super().__init__("gateway", {}, env=env, ready_path=ready_path)
        self._sock.close()  # the gateway binds server.listen itself (the port was free a moment ago)
        self.config = {**config, "server": {**config.get("server", {}), "listen": f"127.0.0.1:{self.port}"}}
        self.log_level = log_level
        self.config_path = self._dir / "gateway.toml"
        self._drain: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Self:
        self.config_path.write_text(toml_file.dumps(self.config))
        argv = [*_console_script("x402-gateway"), "serve", "-c", str(self.config_path), "--log-level", self.log_level]
        with self.log_path.open("wb") as log:
            self._drain = subprocess.Popen(
                ["cat"],  # noqa: S607 - coreutils
                stdin=subprocess.PIPE,
                stdout=log,
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        assert self._drain.stdin is not None
        _LIVE.add(self._drain)
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built here
                argv,
                cwd=self._dir,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=self._drain.stdin,
                stderr=self._drain.stdin,
                preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        finally:
            self._drain.stdin.close()  # the gateway holds the pipe's write end; cat ends when it exits
        _LIVE.add(self.proc)
        return self._wait_ready(timeout)

    def stop(self) -> None:
        super().stop()
        if self._drain is not None:
            try:
                self._drain.wait(10)
            except subprocess.TimeoutExpired:
                _stop(self._drain)
            _LIVE.discard(self._drain)
            self._drain = None

    def log_lines(self) -> int:
        try:
            with self.log_path.open("rb") as fh:
                return sum(1 for _ in fh)
        except OSError:
            return 0
