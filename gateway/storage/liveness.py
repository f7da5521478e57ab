"""Which gateway processes on this host are alive, without any clock: one locked file per process.

A SQLite store is shared only by processes of one host (one kernel). Each process that heartbeats on it also
holds an exclusive ``flock`` on ``<database>.instances/<instance>.lock`` for as long as it runs; the kernel drops
that lock the moment the process dies, however it dies (``kill -9`` included). Another process that can take the
lock knows for certain that the holder is gone, whatever the host's clock did in between (docs/threat-model.md
T31). A lock that is still held proves nothing more than that the process exists (it may hang): the heartbeat's
time still decides then. Where the lock file cannot be written (a read-only directory, a filesystem without
``flock``), the heartbeat alone decides, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from pathlib import Path

_INSTANCE = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # our own uuid-based names; anything else is never a path
_SUFFIX = ".lock"


def _lock_file(directory: Path, path: Path) -> int | None:
    """Create and lock ``path``; None if it cannot be. A sweeper that removed the file between our open and our
    lock (it took the lock first) leaves us holding a nameless file: then open it again."""
    for _ in range(3):
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except OSError:
            pass  # held by someone else, or removed under us
        os.close(fd)
    return None


class ProcessLocks:
    """The lock files of one database's processes (see the module docstring). Thread-safe."""

    def __init__(self, database: str) -> None:
        self._dir = Path(database + ".instances")
        self._held: dict[str, int] = {}  # instance -> the open, locked descriptor of this process
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProcessLocks(dir={str(self._dir)!r}, held={len(self._held)})"

    def _file(self, instance: str) -> Path | None:
        return self._dir / (instance + _SUFFIX) if _INSTANCE.fullmatch(instance) and ".." not in instance else None

    def hold(self, instance: str) -> None:
        """Lock ``instance``'s file for the life of this process (idempotent); a failure leaves the heartbeat alone
        in charge, and the first time it also clears the files of processes that are gone."""
        path = self._file(instance)
        with self._lock:
            if path is None or instance in self._held:
                return
            fd = _lock_file(self._dir, path)
            if fd is None:
                return
            self._held[instance] = fd
        self.sweep()

    def gone(self, instance: str) -> bool:
        """True only if ``instance`` held a lock file here and no process holds it any more (it died)."""
        path = self._file(instance)
        if path is None or instance in self._held:
            return False
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False  # never held here (or cannot be read): the heartbeat decides
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # still held: the process exists
        else:
            with contextlib.suppress(OSError):
                path.unlink()  # ours now, and its process is gone for good
            return True
        finally:
            os.close(fd)  # also lets the lock go

    def sweep(self) -> int:
        """Remove the files of processes that are gone; returns how many."""
        try:
            names = [p.name[: -len(_SUFFIX)] for p in self._dir.iterdir() if p.name.endswith(_SUFFIX)]
        except OSError:
            return 0
        return sum(1 for name in names if self.gone(name))

    def close(self) -> None:
        """Let this process's locks go (a clean shutdown): others find its instances gone at once. The files stay
        for them to find."""
        with self._lock:
            held, self._held = self._held, {}
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
