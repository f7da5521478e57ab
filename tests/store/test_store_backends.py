"""Backend-specific properties: processes sharing a SQLite file, Redis outages, URL handling, redaction."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.errors import ConfigError, PaymentInFlight, PaymentReplayed, StoreUnavailable
from gateway.storage import ClaimState, RedisReceiptStore, SQLiteReceiptStore, open_store, redact_url
from gateway.storage.redis_client import GC_SLACK

LEASE = 30.0
TX = "0x" + "ab" * 32
SECRET = "s3cr3t-pa55"


def new_key() -> str:
    return f"tx:137:0x{uuid.uuid4().hex * 2}:{uuid.uuid4().int % 100}"


# -- SQLite -------------------------------------------------------------------------------------------------


def _claim_in_process(path: str, key: str, attempts: int, barrier: Any, results: Any) -> None:
    """Child process: open its own store on ``path``, wait for the others, then race ``attempts`` claims."""

    async def main() -> int:
        store = SQLiteReceiptStore(path)
        await store.ping()
        barrier.wait()
        now = time.time()

        async def one(i: int) -> int:
            try:
                await store.claim(key, f"{os.getpid()}-{i}", now=now, lease=60.0, expires_at=None)
            except PaymentInFlight:
                return 0
            return 1

        try:
            return sum(await asyncio.gather(*(one(i) for i in range(attempts))))
        finally:
            await store.aclose()

    try:
        results.put(asyncio.run(main()))
    except Exception as exc:
        results.put(repr(exc))


def test_two_processes_on_one_sqlite_file_have_one_winner(tmp_path: Path) -> None:
    path, key, procs, attempts = str(tmp_path / "shared.db"), new_key(), 4, 25
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=_claim_in_process, args=(path, key, attempts, barrier, results)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=10)
    assert all(isinstance(o, int) for o in outcomes), outcomes
    assert sum(outcomes) == 1, outcomes


async def test_locked_sqlite_file_fails_closed_without_blocking_the_event_loop(tmp_path: Path) -> None:
    path = str(tmp_path / "locked.db")
    store = SQLiteReceiptStore(path, busy_timeout=0.5)
    await store.ping()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.claim(new_key(), "a", now=time.time(), lease=LEASE, expires_at=None)
        assert time.monotonic() - t0 < 3
        assert ticks >= 20  # the loop kept running while the worker thread waited on the lock
    finally:
        tick_task.cancel()
        locker.execute("ROLLBACK")
        locker.close()
    rec = await store.claim(new_key(), "a", now=time.time(), lease=LEASE, expires_at=None)
    assert rec.state is ClaimState.PENDING
    await store.aclose()


async def test_concurrent_sqlite_calls_share_commits_and_keep_one_winner_per_key(tmp_path: Path) -> None:
    # Group commit: claims queued together run in one transaction, each in its own savepoint; a losing claim's
    # refusal must not undo the winners committed beside it, and every key still has exactly one owner.
    store = SQLiteReceiptStore(str(tmp_path / "group.db"))
    await store.ping()
    keys = [new_key() for _ in range(20)]
    now = time.time()

    async def one(key: str, owner: str) -> str:
        try:
            await store.claim(key, owner, now=now, lease=LEASE, expires_at=None)
        except PaymentInFlight:
            return "refused"
        return owner

    try:
        outcomes = await asyncio.gather(*(one(k, f"{k}-{i}") for i in range(3) for k in keys))
        assert store._db.groups > 0  # the calls were grouped, not one transaction each
        for key in keys:
            won = [o for o in outcomes if o.startswith(key)]
            assert len(won) == 1
            record = await store.get(key, now=now)
            assert record is not None and record.owner == won[0]
        assert outcomes.count("refused") == 40
    finally:
        await store.aclose()


async def test_a_failed_commit_fails_every_call_of_its_group_and_none_takes_effect(tmp_path: Path) -> None:
    store = SQLiteReceiptStore(str(tmp_path / "fail.db"))
    await store.ping()
    keys = [new_key() for _ in range(8)]
    db = store._db
    real_drain = db._drain

    def drain_then_break() -> None:  # the group's COMMIT meets a database another connection holds locked
        conn = db.connection()
        original = conn.execute

        class Breaking:
            def __getattr__(self, name: str) -> Any:
                return getattr(conn, name)

            def execute(self, sql: str, *args: Any) -> Any:
                if sql == "COMMIT":
                    raise sqlite3.OperationalError("disk I/O error")
                return original(sql, *args)

        db._conn = Breaking()  # type: ignore[assignment]
        try:
            real_drain()
        finally:
            if db._conn is not None and not isinstance(db._conn, sqlite3.Connection):
                db._conn = conn

    db._drain = drain_then_break  # type: ignore[method-assign]
    now = time.time()
    results = await asyncio.gather(
        *(store.claim(k, "a", now=now, lease=LEASE, expires_at=None) for k in keys), return_exceptions=True
    )
    db._drain = real_drain  # type: ignore[method-assign]
    assert all(isinstance(r, StoreUnavailable) for r in results)
    for key in keys:
        assert await store.get(key, now=now) is None  # rolled back: nothing was acknowledged, nothing kept
    await store.aclose()


async def test_unopenable_sqlite_file_fails_closed_then_recovers(tmp_path: Path) -> None:
    directory = tmp_path / "not-yet"
    store = SQLiteReceiptStore(str(directory / "receipts.db"))
    with pytest.raises(StoreUnavailable):
        await store.ping()
    with pytest.raises(StoreUnavailable):
        await store.claim(new_key(), "a", now=time.time(), lease=LEASE, expires_at=None)
    directory.mkdir()
    await store.ping()
    assert (await store.claim(new_key(), "a", now=time.time(), lease=LEASE, expires_at=None)).owner == "a"
    await store.aclose()


async def test_purge_expired_deletes_only_expired_records(tmp_path: Path) -> None:
    store = SQLiteReceiptStore(str(tmp_path / "purge.db"))
    now = time.time()
    keep_forever, gone, live_claim, dead_claim = new_key(), new_key(), new_key(), new_key()
    for key, exp in ((keep_forever, None), (gone, now + 10)):
        await store.claim(key, "a", now=now, lease=LEASE, expires_at=exp)
        await store.mark_paid(key, "a", TX, now=now, lease=LEASE)
        await store.finish(key, "a", served=True, now=now, expires_at=exp)
    await store.claim(live_claim, "a", now=now + 15, lease=LEASE, expires_at=now + 10)
    await store.claim(dead_claim, "a", now=now, lease=1.0, expires_at=now + 10)
    assert await store.purge_expired(now + 20) == 2  # `gone` and the lapsed `dead_claim`
    assert await store.purge_expired(now + 20) == 0
    assert await store.get(keep_forever, now=now + 20) is not None
    assert await store.get(live_claim, now=now + 20) is not None
    await store.aclose()


# -- Redis --------------------------------------------------------------------------------------------------


async def test_redis_outage_fails_closed_then_recovers(redis_server: Any, redis_url: str) -> None:
    store = RedisReceiptStore(redis_url)
    now = time.time()
    held = new_key()
    await store.claim(held, "a", now=now, lease=LEASE, expires_at=None)
    key = new_key()
    redis_server.stop()
    try:
        calls = {
            "claim": lambda: store.claim(key, "b", now=now, lease=LEASE, expires_at=None),
            "record_tx": lambda: store.record_tx(held, "a", TX, now=now, lease=LEASE),
            "mark_paid": lambda: store.mark_paid(held, "a", TX, now=now, lease=LEASE),
            "finish": lambda: store.finish(held, "a", served=True, now=now, expires_at=None),
            "release": lambda: store.release(held, "a"),
            "get": lambda: store.get(held, now=now),
            "ping": store.ping,
        }
        for name, call in calls.items():
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - t0 < 3, name
    finally:
        redis_server.start()
    # The same object works again, and the payment tried during the outage claims exactly once.
    rec = await store.claim(key, "b", now=now + 1, lease=LEASE, expires_at=None)
    assert rec.state is ClaimState.PENDING and not rec.resumed
    with pytest.raises(PaymentInFlight):
        await store.claim(key, "c", now=now + 1, lease=LEASE, expires_at=None)
    await store.mark_paid(key, "b", TX, now=now + 1, lease=LEASE)
    await store.finish(key, "b", served=True, now=now + 1, expires_at=None)
    with pytest.raises(PaymentReplayed):
        await store.claim(key, "c", now=now + 2, lease=LEASE, expires_at=None)
    with pytest.raises(PaymentInFlight):  # the claim held before the outage is intact
        await store.claim(held, "c", now=now + 2, lease=LEASE, expires_at=None)
    await store.aclose()


async def test_redis_that_never_answers_fails_closed_within_the_timeout() -> None:
    hung: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)  # accept, read nothing, answer nothing

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisReceiptStore(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5, connect_timeout=0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.claim(new_key(), "a", now=time.time(), lease=LEASE, expires_at=None)
        assert time.monotonic() - t0 < 2
    finally:
        await store.aclose()
        for w in hung:
            w.close()
        server.close()
        await server.wait_closed()


async def test_redis_script_error_fails_closed(redis_url: str) -> None:
    store = RedisReceiptStore(redis_url)
    key = new_key()
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.set("x402:" + key, "not a hash")  # WRONGTYPE inside the script
    with pytest.raises(StoreUnavailable):
        await store.claim(key, "a", now=time.time(), lease=LEASE, expires_at=None)
    with pytest.raises(StoreUnavailable):
        await store.get(key, now=time.time())
    await client.aclose()
    await store.aclose()


async def test_redis_scripts_are_reloaded_after_a_script_flush(redis_url: str) -> None:
    store = RedisReceiptStore(redis_url)
    await store.claim(new_key(), "a", now=time.time(), lease=LEASE, expires_at=None)
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.script_flush()
    await client.aclose()
    rec = await store.claim(new_key(), "a", now=time.time(), lease=LEASE, expires_at=None)
    assert rec.state is ClaimState.PENDING
    await store.aclose()


async def test_redis_ttl_follows_expiry_and_keeps_records_without_one(redis_url: str) -> None:
    store = RedisReceiptStore(redis_url, prefix="t:")
    client = redis.asyncio.Redis.from_url(redis_url)
    now = time.time()
    key = new_key()
    await store.claim(key, "a", now=now, lease=LEASE, expires_at=now + 100)
    ttl_ms = await client.pttl("t:" + key)
    assert (100 + GC_SLACK - 5) * 1000 < ttl_ms <= (100 + GC_SLACK + 1) * 1000
    await store.mark_paid(key, "a", TX, now=now, lease=LEASE)
    await store.finish(key, "a", served=True, now=now, expires_at=None)
    assert await client.pttl("t:" + key) == -1  # kept for ever
    await client.aclose()
    await store.aclose()


async def test_redis_url_password_is_redacted() -> None:
    assert redact_url(f"redis://user:{SECRET}@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url(f"rediss://:{SECRET}@host:6380") == "rediss://:***@host:6380"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("redis://user@host/0") == "redis://user@host/0"
    unix = redact_url(f"unix:///run/redis.sock?db=1&password={SECRET}")
    assert SECRET not in unix and unix.startswith("unix:///run/redis.sock?")
    # Neither the repr nor the error of a store whose URL carries a password may show it.
    store = RedisReceiptStore(f"redis://user:{SECRET}@127.0.0.1:1/0", connect_timeout=0.5)
    assert SECRET not in repr(store) and "user:***@127.0.0.1:1" in repr(store)
    with pytest.raises(StoreUnavailable) as err:
        await store.ping()
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    await store.aclose()


# -- open_store ---------------------------------------------------------------------------------------------


async def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    rel = open_store("sqlite:///data/receipts.db")
    assert isinstance(rel, SQLiteReceiptStore) and "'data/receipts.db'" in repr(rel)
    absolute = open_store(f"sqlite:///{tmp_path}/receipts.db")
    assert isinstance(absolute, SQLiteReceiptStore) and f"'{tmp_path}/receipts.db'" in repr(absolute)
    await absolute.ping()
    assert (tmp_path / "receipts.db").exists()
    for url in ("redis://127.0.0.1:6379/0", "rediss://u:p@example.com:6380/1", "unix:///run/redis.sock?db=0"):
        store = open_store(url)
        assert isinstance(store, RedisReceiptStore)
        await store.aclose()
    await rel.aclose()
    await absolute.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "receipts.db",
        "memcached://127.0.0.1:11211",
        f"postgres://user:{SECRET}@db/receipts",
        "sqlite://host/receipts.db",
        "sqlite:///",
        "sqlite:///:memory:",
        "redis://:notaport/0",
        "http://127.0.0.1:6379",
    ],
)
def test_open_store_rejects_unknown_scheme(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        open_store(url)
    assert err.value.key == "store.url"
    assert SECRET not in str(err.value)
