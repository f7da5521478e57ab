"""Fixtures for the jobs tests: job stores on each backend, and per-backend store URLs for gateways."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.storage.jobs import JobStore, open_job_store
from tests.support.gateway import sqlite_url


@dataclass
class JobBackend:
    """Makes job-store objects on one shared storage (a SQLite file or the session Redis)."""

    name: str
    url: str
    opened: list[JobStore] = field(default_factory=list)

    def make(self) -> JobStore:
        store = open_job_store(self.url)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "redis", "cluster"])
async def job_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobBackend]:
    """The job store's contract on a SQLite file, one Redis server and a 3-master Redis Cluster."""
    fixture = {"redis": "redis_url", "cluster": "cluster_url"}.get(request.param)
    url = sqlite_url(tmp_path) if fixture is None else request.getfixturevalue(fixture)
    backend = JobBackend(request.param, url)
    try:
        yield backend
    finally:
        for store in backend.opened:
            await store.aclose()


@pytest.fixture
def job_store(job_backend: JobBackend) -> JobStore:
    return job_backend.make()
