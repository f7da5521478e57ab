"""The route override store on both backends (SQLite file, real Redis): every change raises the version every
instance polls, a read returns the overrides with the version they are at, concurrent writers never share a
version, and an outage fails closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.dev.chain import RedisServer
from gateway.errors import StoreUnavailable
from gateway.storage.overrides import OverrideStore, RedisOverrideStore, SQLiteOverrideStore

Opener = Callable[[], OverrideStore]


@pytest.fixture(params=["sqlite", "redis"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    opened: list[OverrideStore] = []
    if request.param == "sqlite":
        path = str(tmp_path / "receipts.db")

        def make() -> OverrideStore:
            opened.append(SQLiteOverrideStore(path))
            return opened[-1]
    else:
        url: str = request.getfixturevalue("redis_url")

        def make() -> OverrideStore:
            opened.append(RedisOverrideStore(url))
            return opened[-1]

    yield make
    for store in opened:
        await store.aclose()


async def test_every_change_raises_the_version_and_a_read_returns_it_with_the_overrides(open_store: Opener) -> None:
    writer, reader = open_store(), open_store()  # two instances on one storage
    assert await reader.version() == 0
    assert (await reader.read()).routes == {}

    assert await writer.set_price("GET /report", 20_000, now=100.0) == 1
    assert await writer.set_paused("GET /report", True, now=101.0) == 2
    assert await writer.set_paused("POST /agent", False, now=102.0) == 3
    assert await reader.version() == 3
    overrides = await reader.read()
    assert overrides.version == 3
    report, agent = overrides.routes["GET /report"], overrides.routes["POST /agent"]
    assert (report.price, report.paused, report.updated_at) == (20_000, True, 101.0)
    assert (agent.price, agent.paused) == (None, False)

    # Clearing a field gives it back to the file; a route with nothing left is no override at all.
    assert await writer.set_price("GET /report", None, now=103.0) == 4
    assert (await reader.read()).routes["GET /report"].price is None
    assert await writer.set_paused("GET /report", None, now=104.0) == 5
    assert set((await reader.read()).routes) == {"POST /agent"}
    # A price as large as a route may hold survives the round trip exactly.
    await writer.set_price("POST /agent", 10**18 + 1, now=105.0)
    assert (await reader.read()).routes["POST /agent"].price == 10**18 + 1


async def test_concurrent_writers_each_get_their_own_version(open_store: Opener) -> None:
    stores = [open_store() for _ in range(8)]
    versions = await asyncio.gather(*(s.set_price(f"GET /r{i}", 1_000 + i, now=1.0) for i, s in enumerate(stores)))
    assert sorted(versions) == list(range(1, 9))
    overrides = await stores[0].read()
    assert overrides.version == 8
    assert {r: o.price for r, o in overrides.routes.items()} == {f"GET /r{i}": 1_000 + i for i in range(8)}


async def test_a_redis_outage_fails_closed(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisOverrideStore(redis_url)
    try:
        await store.set_price("GET /report", 5, now=1.0)
        redis_server.stop()
        for call in (store.version(), store.read(), store.set_paused("GET /report", True, now=2.0)):
            with pytest.raises(StoreUnavailable):
                await call
        redis_server.start()
        assert (await store.read()).routes["GET /report"].price == 5  # persisted, and the same object works again
    finally:
        await store.aclose()
