"""The dev kit's child processes (anvil, redis-server): started, waited for, and always reaped.

Every child is tracked so that an interpreter exit (normal, or via an uncaught exception in a test session) never
leaves one behind holding a port; on Linux the child also dies with its parent when that is SIGKILLed.
"""

from __future__ import annotations

import atexit
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["free_port", "reap", "spawn", "wait_until"]

# Every child we start is tracked here so that an interpreter exit (normal, or via an uncaught exception in a
# test session) never leaves an anvil or redis-server behind holding a port.
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def _kill_all_children() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
        _LIVE.clear()
    for proc in procs:
        _terminate(proc)


atexit.register(_kill_all_children)


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # atexit does not run when the parent is SIGKILLed (e.g. a CI timeout); PR_SET_PDEATHSIG covers that case on
    # Linux. It fires when the *thread* that forked dies, hence only used when spawning from the main thread.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except Exception:  # noqa: S110 - best effort; atexit still covers the normal exit path
        pass


def spawn(argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    use_pdeathsig = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
    proc = subprocess.Popen(  # noqa: S603 - argv is built by this module, never from user input
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if use_pdeathsig else None,  # noqa: PLW1509 - async-signal-safe enough here
    )
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def reap(proc: subprocess.Popen[bytes]) -> None:
    _terminate(proc)
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; log {log_path}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not become ready within {timeout:.0f} s; log {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.01)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
