"""Chain-fault fixtures: ``store_url`` runs a test once per store backend (SQLite file, real Redis), and
``journal`` gives a settlement journal on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.storage.settlements import SettlementJournal, open_settlement_journal
from tests.support.gateway import sqlite_url


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    url: str = request.getfixturevalue("redis_url")  # the session redis-server, flushed for this test
    return url


@pytest.fixture
async def journal(store_url: str) -> AsyncIterator[SettlementJournal]:
    j = open_settlement_journal(store_url)
    try:
        yield j
    finally:
        await j.aclose()
