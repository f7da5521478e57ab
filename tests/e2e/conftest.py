"""End-to-end fixtures: ``store_url`` runs a test once per receipt-store backend (SQLite file, real Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.gateway import sqlite_url


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    url: str = request.getfixturevalue("redis_url")  # the session redis-server, flushed for this test
    return url
