"""A throw-away ``redis-server`` for tests and the demo: private port, restartable, optionally persistent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from gateway.dev.processes import free_port, reap, spawn, wait_until

__all__ = ["RedisServer"]


class RedisServer:
    """A private ``redis-server`` on a free port, restartable on the same port (tests simulate outages with it).

    ``persistent=True`` writes an fsync-always append-only file in its own temp dir, so data survives stop/start.
    """

    def __init__(self, *, persistent: bool = False, binary: str | None = None) -> None:
        self.persistent = persistent
        self.binary = binary or os.environ.get("X402_REDIS_BIN") or shutil.which("redis-server") or ""
        if not self.binary:
            raise RuntimeError(
                "redis-server not found: install it (apt-get install redis-server) or set X402_REDIS_BIN"
            )
        # The port is chosen once so clients built from .url keep working across a stop()/start() cycle.
        self.port = free_port()
        self.host = "127.0.0.1"
        self._dir = Path(tempfile.mkdtemp(prefix="x402-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        if self.running:
            return self
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self._dir),
            "--daemonize", "no",  # keep the Popen handle: stop() must be reliable
            "--save", "",  # no RDB snapshots: they would fork and race with stop()
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        log_path = self._dir / "redis.log"
        self._log = log_path.open("ab")
        self._proc = spawn(argv, self._log)
        wait_until(self.ping, self._proc, "redis-server", log_path, timeout)
        return self

    def ping(self) -> bool:
        """True when the server answers PING (speaks raw RESP so no client library is needed)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            # SIGTERM makes redis flush the AOF and exit cleanly; the port is free again once wait() returns.
            reap(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop and delete the data directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()
