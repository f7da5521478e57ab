"""The ``store`` fixture: every contract test runs against each backend (SQLite file, real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from gateway.storage import RedisReceiptStore, SQLiteReceiptStore
from gateway.storage.receipts import ReceiptStore

S = TypeVar("S")


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


# Every contract suite runs on a SQLite file, one Redis server and a 3-master Redis Cluster. Restarts and outages
# need a server that keeps its data across a restart: the cluster fixture keeps nothing on disk, so the tests of
# those parametrize their backend with SERVER_BACKENDS.
BACKENDS = ["sqlite", "redis", "cluster"]
SERVER_BACKENDS = ["sqlite", "redis"]


def _no_restart() -> None:
    raise AssertionError("the cluster fixture keeps nothing across a restart: parametrize with SERVER_BACKENDS")


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = str(tmp_path / "receipts.db")
        b = Backend("sqlite", lambda: SQLiteReceiptStore(path), lambda: None)
    elif request.param == "cluster":
        cluster: str = request.getfixturevalue("cluster_url")
        b = Backend("cluster", lambda: RedisReceiptStore(cluster), _no_restart)
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


@dataclass
class StoreBackend(Generic[S]):
    """One store kind's objects on one shared storage, over SQLite or a real Redis: made, restarted, taken down and
    brought back (the channel, ledger and other contract suites share it)."""

    name: str
    url: str  # the storage's store URL
    _make: Callable[[], S]
    _restart: Callable[[], None]
    _down: Callable[[], S]
    _up: Callable[[], None]
    opened: list[S] = field(default_factory=list)

    def make(self) -> S:
        """A new store object (own connection/thread) on the same storage."""
        return self._opened(self._make())

    def restart(self) -> None:
        """Restart the storage itself (Redis: stop/start the persistent server; SQLite: nothing, the file stays)."""
        self._restart()

    def down(self) -> S:
        """A store object whose storage cannot answer (Redis: the server stopped; SQLite: no directory for the
        file) until :meth:`up`."""
        return self._opened(self._down())

    def up(self) -> None:
        self._up()

    def _opened(self, store: S) -> S:
        self.opened.append(store)
        return store

    async def aclose(self) -> None:
        for store in self.opened:
            await store.aclose()  # type: ignore[attr-defined]


def store_backend(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite: Callable[[str], S], redis: Callable[[str], S]
) -> StoreBackend[S]:
    """The backend ``request.param`` names ("sqlite", "redis" or "cluster"); stores are made by ``sqlite(path)``
    or ``redis(url)``."""
    if request.param == "sqlite":
        path = str(tmp_path / "store.db")
        missing = tmp_path / "not-yet"
        return StoreBackend(
            "sqlite",
            f"sqlite:///{path}",
            lambda: sqlite(path),
            lambda: None,
            lambda: sqlite(str(missing / "store.db")),
            missing.mkdir,
        )
    if request.param == "cluster":
        cluster: str = request.getfixturevalue("cluster_url")

        def refused() -> S:
            raise AssertionError("the cluster fixture has no outage to offer: parametrize with SERVER_BACKENDS")

        return StoreBackend("cluster", cluster, lambda: redis(cluster), _no_restart, refused, _no_restart)
    url: str = request.getfixturevalue("redis_url")
    server = request.getfixturevalue("redis_server")  # persistent (AOF, fsync always): data survives restart

    def restart() -> None:
        server.stop()
        server.start()

    def down() -> S:
        server.stop()
        return redis(url)

    return StoreBackend("redis", url, lambda: redis(url), restart, down, server.start)
