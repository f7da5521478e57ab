"""Job stores: where job records live, so that any gateway instance answers a poll and jobs outlive a restart.

    contract.py   the JobStore protocol and JobStats
    sqlite.py     table ``jobs`` in the receipt store's SQLite file
    redis.py      one hash per job under ``x402:{jobs}:``, every change one Lua script

``open_job_store(url)`` takes the receipt store's URL (``[store].url``, see :mod:`gateway.storage.backend`).
"""

from __future__ import annotations

from gateway.storage.backend import Backend, SqliteBackend, open_backend
from gateway.storage.jobs.contract import JobStats, JobStore
from gateway.storage.jobs.redis import RedisJobStore
from gateway.storage.jobs.sqlite import SQLiteJobStore

__all__ = ["JobStats", "JobStore", "RedisJobStore", "SQLiteJobStore", "job_store_on", "open_job_store"]


def job_store_on(backend: Backend) -> JobStore:
    """A job store (its own connection) on ``backend``."""
    if isinstance(backend, SqliteBackend):
        return SQLiteJobStore(backend.path)
    return RedisJobStore(backend.url)


def open_job_store(url: str) -> JobStore:
    """The job store on the storage named by ``url``; ``ConfigError("store.url", ...)`` otherwise. Nothing is
    connected here: ``await store.ping()`` at start-up fails fast."""
    return job_store_on(open_backend(url, config_key="store.url"))
