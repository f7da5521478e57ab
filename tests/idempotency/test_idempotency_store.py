"""The idempotency record store, against both backends: atomic begin, fingerprint binding, leases, TTL, owners."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.storage.idempotency import (
    IdempotencyStore,
    RedisIdempotencyStore,
    SQLiteIdempotencyStore,
    StoredResponse,
    open_idempotency_store,
)

NOW = time.time()  # real time: Redis garbage-collects by its own clock (logical expiry + slack)
LEASE = 600.0
TTL = 86_400.0
ANSWER = StoredResponse(
    200,
    [(b"content-type", b"application/octet-stream"), (b"x-latin1", bytes(range(0xA0, 0x100)))],
    bytes(range(256)) * 9,
)


@pytest.fixture(params=["sqlite", "redis", "cluster"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], IdempotencyStore]]:
    """A factory of store objects (own connection/thread) on one shared storage: a SQLite file, one Redis server or
    a 3-master Redis Cluster."""
    opened: list[IdempotencyStore] = []
    if request.param == "sqlite":
        path = str(tmp_path / "idem.db")

        def factory() -> IdempotencyStore:
            opened.append(SQLiteIdempotencyStore(path))
            return opened[-1]
    else:
        url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")

        def factory() -> IdempotencyStore:
            opened.append(RedisIdempotencyStore(url))
            return opened[-1]

    try:
        yield factory
    finally:
        for store in opened:
            await store.aclose()


async def test_begin_then_duplicate_is_in_flight_and_another_fingerprint_is_a_mismatch(
    make: Callable[[], IdempotencyStore],
) -> None:
    store = make()
    assert (await store.begin("k", "fp", "a", now=NOW, lease=LEASE)).outcome == "began"
    assert (await store.begin("k", "fp", "b", now=NOW + 1, lease=LEASE)).outcome == "in_flight"
    assert (await store.begin("k", "other", "b", now=NOW + 1, lease=LEASE)).outcome == "mismatch"
    # the owner repeating its own begin (a retried Redis call) keeps it
    assert (await store.begin("k", "fp", "a", now=NOW + 1, lease=LEASE)).outcome == "began"


async def test_completed_record_replays_the_exact_bytes_until_its_ttl(make: Callable[[], IdempotencyStore]) -> None:
    store = make()
    await store.begin("k", "fp", "a", now=NOW, lease=LEASE)
    assert await store.complete("k", "a", ANSWER, now=NOW + 5, ttl=TTL)
    found = await make().begin("k", "fp", "b", now=NOW + TTL, lease=LEASE)
    assert found.outcome == "done"
    assert found.response == ANSWER
    assert (await store.begin("k", "other", "b", now=NOW + TTL, lease=LEASE)).outcome == "mismatch"
    assert (await store.begin("k", "other", "b", now=NOW + 5 + TTL + 1, lease=LEASE)).outcome == "began"


async def test_abandoned_record_is_gone_and_the_retry_begins_afresh(make: Callable[[], IdempotencyStore]) -> None:
    store = make()
    await store.begin("k", "fp", "a", now=NOW, lease=LEASE)
    await store.abandon("k", "b")  # not the owner: no-op
    assert (await store.begin("k", "fp", "b", now=NOW, lease=LEASE)).outcome == "in_flight"
    await store.abandon("k", "a")
    begun = await store.begin("k", "other-fp", "b", now=NOW, lease=LEASE)
    assert begun.outcome == "began"
    assert not begun.taken_over


async def test_lapsed_lease_is_taken_over_and_the_old_owner_can_no_longer_write(
    make: Callable[[], IdempotencyStore],
) -> None:
    store = make()
    await store.begin("k", "fp", "crashed", now=NOW, lease=LEASE)
    taken = await store.begin("k", "fp", "new", now=NOW + LEASE + 1, lease=LEASE)
    assert taken.outcome == "began"
    assert taken.taken_over
    assert not await store.complete("k", "crashed", ANSWER, now=NOW + LEASE + 2, ttl=TTL)
    await store.abandon("k", "crashed")
    assert (await store.begin("k", "fp", "third", now=NOW + LEASE + 2, lease=LEASE)).outcome == "in_flight"
    assert await store.complete("k", "new", ANSWER, now=NOW + LEASE + 3, ttl=TTL)
    assert (await store.begin("k", "fp", "third", now=NOW + LEASE + 4, lease=LEASE)).outcome == "done"


async def test_completed_record_cannot_be_abandoned_or_completed_again(make: Callable[[], IdempotencyStore]) -> None:
    store = make()
    await store.begin("k", "fp", "a", now=NOW, lease=LEASE)
    assert await store.complete("k", "a", ANSWER, now=NOW, ttl=TTL)
    await store.abandon("k", "a")
    assert not await store.complete("k", "a", StoredResponse(201, [], b"x"), now=NOW, ttl=TTL)
    found = await store.begin("k", "fp", "b", now=NOW, lease=LEASE)
    assert found.response == ANSWER


async def test_fifty_concurrent_begins_on_separate_store_objects_make_one_owner(
    make: Callable[[], IdempotencyStore],
) -> None:
    stores = [make() for _ in range(10)]
    results = await asyncio.gather(
        *(stores[i % 10].begin("race", "fp", f"o{i}", now=NOW, lease=LEASE) for i in range(50))
    )
    assert sorted(r.outcome for r in results).count("began") == 1
    assert {r.outcome for r in results} == {"began", "in_flight"}


def test_open_idempotency_store_accepts_the_receipt_store_url_forms(tmp_path: Path) -> None:
    assert isinstance(open_idempotency_store(f"sqlite:///{tmp_path}/x.db"), SQLiteIdempotencyStore)
    assert isinstance(open_idempotency_store("redis://127.0.0.1:1/0"), RedisIdempotencyStore)
    for bad in ("sqlite:///:memory:", "sqlite://x.db", "memcached://h", "redis://:1/0", "redis://h:notaport/0"):
        with pytest.raises(ConfigError) as info:
            open_idempotency_store(bad)
        assert info.value.key == "idempotency.store_url"
    with pytest.raises(ConfigError) as info:
        open_idempotency_store("redis://user:hunter2@:1/0")
    assert "hunter2" not in str(info.value)
