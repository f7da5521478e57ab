"""Which gateway processes on this host are alive, without any clock: locked files.

A SQLite store is shared only by processes of one host (one kernel). Each process that heartbeats on it also
holds an exclusive ``flock`` on a file ``<database>.instances/<instance>.<holder>.lock`` for as long as it runs
(``<holder>`` is random, one per store object); the kernel drops that lock the moment the process dies, however it
dies (``kill -9`` included). Another process that can take the lock of every file of an instance knows for certain
that the processes heartbeating that name are gone, whatever the host's clock did in between
(docs/threat-model.md T31). One file per holder, not per instance: processes forked after the app was built share
its instance name, and one of them dying must not make the others look dead. A file takes its ``.lock`` name only
once it is locked (created as ``.new``, locked, renamed), so nobody can take its lock in the instant between its
creation and its holder's lock. A lock that is still held proves nothing more than that the process exists (it may
hang): the heartbeat's time still decides then. Where the lock file cannot be written (a read-only directory, a
filesystem without ``flock``), the heartbeat alone decides, as before.

A file found free is removed, and the store forgets the instance's heartbeat in the same breath
(gateway/storage/receipts/sqlite.py): after that, no heartbeat time, however far ahead of a stepped-back clock, can
make the dead instance look alive to a later question.

Calls here touch the filesystem: they run on the store's worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import uuid
from pathlib import Path

# Our own uuid-based names; anything else is never a path. No dots: a file is ``<instance>.<holder>.lock``.
_INSTANCE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SUFFIX = ".lock"  # a held (or once held) file
_NEW = ".new"  # a file not yet locked: never taken for a holder's
_OPEN = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW


def _instance_of(name: str) -> str:
    return name.partition(".")[0]


def _lock_file(directory: Path, instance: str) -> int | None:
    """A new file for ``instance``, locked before it takes its ``.lock`` name; None if it cannot be. A sweeper that
    took a ``.new`` file's lock first removes it: then start again."""
    for _ in range(3):
        holder = uuid.uuid4().hex
        new, path = directory / f"{instance}.{holder}{_NEW}", directory / f"{instance}.{holder}{_SUFFIX}"
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(new, _OPEN | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(new, path)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except OSError:
            pass  # a sweeper holds it, or removed it under us
        os.close(fd)
        with contextlib.suppress(OSError):
            new.unlink()
    return None


class ProcessLocks:
    """The lock files of one database's processes (see the module docstring). Thread-safe."""

    def __init__(self, database: str) -> None:
        self._dir = Path(database + ".instances")
        self._held: dict[str, int] = {}  # instance -> the open, locked descriptor of this object
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProcessLocks(dir={str(self._dir)!r}, held={len(self._held)})"

    def hold(self, instance: str) -> list[str]:
        """Lock a file of ``instance`` for the life of this process (idempotent); a failure leaves the heartbeat
        alone in charge. The first time, also clears the files of processes that are gone: returns their instances
        (the caller forgets their heartbeats)."""
        if not _INSTANCE.fullmatch(instance):
            return []
        with self._lock:
            if instance in self._held:
                return []
            fd = _lock_file(self._dir, instance)
            if fd is None:
                return []
            self._held[instance] = fd
        return self.sweep()

    def _files(self, instance: str | None = None) -> list[Path]:
        try:
            found = [p for p in self._dir.iterdir() if p.name.endswith(_SUFFIX)]
        except OSError:
            return []
        return found if instance is None else [p for p in found if _instance_of(p.name) == instance]

    def gone(self, instance: str) -> bool:
        """True only if ``instance`` held lock files here and no process holds any of them any more (every process
        of that name died); their files are then removed."""
        if not _INSTANCE.fullmatch(instance) or instance in self._held:
            return False
        files = self._files(instance)
        if not files:
            return False  # never held here (or cleared): the heartbeat decides
        fds: list[int] = []
        try:
            for path in files:
                try:
                    fd = os.open(path, _OPEN)
                except FileNotFoundError:
                    continue  # removed by another process that found its holder gone
                except OSError:
                    return False  # cannot be read: the heartbeat decides
                fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return False  # still held: a process of that name exists
            if {p.name for p in self._files(instance)} - {p.name for p in files}:
                return False  # a process of that name started meanwhile
            for path in files:
                with contextlib.suppress(OSError):
                    path.unlink()  # ours now, and its process is gone for good
            return True
        finally:
            for fd in fds:
                os.close(fd)  # also lets the locks go

    def sweep(self) -> list[str]:
        """Remove the files of processes that are gone; returns their instances. Also removes a ``.new`` file left by
        a process killed while it was making it (one whose lock can be taken)."""
        try:
            new = [p for p in self._dir.iterdir() if p.name.endswith(_NEW)]
        except OSError:
            return []
        for path in new:
            try:
                fd = os.open(path, _OPEN)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
            except OSError:
                pass  # being made right now: its process renames it once locked
            finally:
                os.close(fd)
        names = sorted({_instance_of(p.name) for p in self._files()})
        return [name for name in names if self.gone(name)]

    def close(self) -> None:
        """Let this process's locks go (a clean shutdown): others find its instances gone at once. The files stay
        for them to find."""
        with self._lock:
            held, self._held = self._held, {}
        for fd in held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
