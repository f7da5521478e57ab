"""A SQLite store's processes are found dead by their lock files, never by a clock (gateway/storage/liveness.py,
docs/threat-model.md T31)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gateway.storage.liveness import ProcessLocks
from tests.support.processes import python_process

_HOLDER = """
import sys, time
from gateway.storage.liveness import ProcessLocks
ProcessLocks(sys.argv[1]).hold(sys.argv[2])
print("holding", flush=True)
time.sleep(3600)
"""


def _holder(database: str, instance: str) -> subprocess.Popen[str]:
    return python_process(_HOLDER, database, instance, ready="holding")


def test_a_process_is_gone_only_once_it_died(tmp_path: Path) -> None:
    database = str(tmp_path / "store.db")
    proc = _holder(database, "other")
    locks = ProcessLocks(database)
    try:
        assert not locks.gone("other")  # alive: its lock is held
        proc.kill()
        proc.wait(timeout=10)
        assert locks.gone("other")  # the kernel let go of its lock
        assert not list((tmp_path / "store.db.instances").glob("other.*"))  # and its file is cleared
        assert not locks.gone("other")  # after that, the heartbeat alone decides
    finally:
        proc.kill()
        locks.close()


def test_a_process_never_finds_its_own_instances_or_another_store_objects_gone(tmp_path: Path) -> None:
    database = str(tmp_path / "store.db")
    mine, same_process = ProcessLocks(database), ProcessLocks(database)
    try:
        mine.hold("me")
        assert not mine.gone("me")
        assert not same_process.gone("me")  # another store object of this very process on the same file
    finally:
        mine.close()
    assert same_process.gone("me")  # a clean shutdown lets the lock go: found gone at once


def test_an_instance_that_never_held_a_lock_here_is_left_to_the_heartbeat(tmp_path: Path) -> None:
    locks = ProcessLocks(str(tmp_path / "store.db"))
    assert not locks.gone("never-seen")
    for name in ("../escape", "a/b", "", "x" * 200, "..", "bad name"):
        locks.hold(name)  # never a path outside the directory, never a file for a strange name
        assert not locks.gone(name)
    directory = tmp_path / "store.db.instances"
    assert not directory.exists() or not any(directory.iterdir())
    assert not (tmp_path / "escape.lock").exists()


def test_holding_clears_the_files_of_processes_that_are_gone(tmp_path: Path) -> None:
    database = str(tmp_path / "store.db")
    dead = _holder(database, "dead")
    dead.kill()
    dead.wait(timeout=10)
    locks = ProcessLocks(database)
    try:
        assert locks.hold("me") == ["dead"]  # found gone: the store forgets its heartbeat
        names = [p.name for p in (tmp_path / "store.db.instances").iterdir()]
        assert len(names) == 1 and names[0].startswith("me.") and names[0].endswith(".lock")
    finally:
        locks.close()
