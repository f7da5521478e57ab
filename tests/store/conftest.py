"""The ``store`` fixture: every contract test runs against each backend (SQLite file, real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.storage import RedisReceiptStore, SQLiteReceiptStore
from gateway.storage.receipts import ReceiptStore


@dataclass
class Backend:
    """Makes store objects on one shared storage, and restarts that storage."""

    name: str
    _make: Callable[[], ReceiptStore]
    _restart: Callable[[], None]
    opened: list[ReceiptStore] = field(default_factory=list)

    def make(self) -> ReceiptStore:
        """A new store object (own connection/thread) on the same storage."""
        store = self._make()
        self.opened.append(store)
        return store

    def restart(self) -> None:
        """Restart the storage itself (Redis: stop/start the server; SQLite: nothing, the file stays)."""
        self._restart()


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = str(tmp_path / "receipts.db")
        b = Backend("sqlite", lambda: SQLiteReceiptStore(path), lambda: None)
    else:
        url: str = request.getfixturevalue("redis_url")
        server = request.getfixturevalue("redis_server")

        def restart() -> None:
            server.stop()
            server.start()

        b = Backend("redis", lambda: RedisReceiptStore(url), restart)
    try:
        yield b
    finally:
        for store in b.opened:
            await store.aclose()


@pytest.fixture
def store(backend: Backend) -> ReceiptStore:
    return backend.make()
