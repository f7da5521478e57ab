"""The settlement journal (gateway/storage/settlements/) on each backend: a served settlement is kept until the
tracker that holds it removes it, durably, and two gateway instances never watch (or settle again) one entry at
once (docs/threat-model.md T28)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import redis

from gateway.storage.settlements import SettlementJournal, SQLiteSettlementJournal, open_settlement_journal

# Times near the real clock: a Redis entry's garbage-collection TTL is set from them.
T = time.time()
CALL = bytes.fromhex("e3ee160e") + bytes(range(32)) * 9


async def add(journal: SettlementJournal, key: str, *, owner: str = "a", now: float = 0.0, net: str = "base") -> None:
    await journal.add(key, net, "0x" + "11" * 32, "0x" + "22" * 20, CALL, 5000, owner=owner, now=now or T, lease=60)


async def test_an_entry_keeps_what_is_needed_to_settle_it_again(journal: SettlementJournal) -> None:
    await add(journal, "exact:8453:0xa:0xb:0x01")
    (entry,) = await journal.take("base", "a", now=T + 1, lease=60, limit=10)
    assert entry.key == "exact:8453:0xa:0xb:0x01"
    assert entry.network == "base"
    assert entry.tx_hash == "0x" + "11" * 32
    assert entry.asset == "0x" + "22" * 20
    assert entry.calldata == CALL
    assert entry.valid_before == 5000
    assert entry.block_number is None and entry.block_hash is None
    assert await journal.update(
        entry.key, "a", tx_hash="0x" + "33" * 32, block_number=77, block_hash="0x" + "44" * 32, now=T + 2
    )
    (entry,) = await journal.take("base", "a", now=T + 3, lease=60, limit=10)
    assert (entry.tx_hash, entry.block_number, entry.block_hash) == ("0x" + "33" * 32, 77, "0x" + "44" * 32)


async def test_an_entry_is_watched_by_one_instance_until_its_lease_lapses(journal: SettlementJournal) -> None:
    await add(journal, "k1", owner="a", now=T)
    assert await journal.take("base", "b", now=T + 30, lease=60, limit=10) == []  # a's lease is live
    assert [e.key for e in await journal.take("base", "a", now=T + 30, lease=60, limit=10)] == ["k1"]  # renewed
    assert await journal.take("base", "b", now=T + 89, lease=60, limit=10) == []
    taken = await journal.take("base", "b", now=T + 91, lease=60, limit=10)  # a died: b takes over
    assert [(e.key, e.owner) for e in taken] == [("k1", "b")]
    # The old holder can neither move nor remove it any more.
    assert not await journal.update("k1", "a", tx_hash="0x00", block_number=None, block_hash=None, now=T + 92)
    assert not await journal.remove("k1", "a")
    assert await journal.remove("k1", "b")
    assert await journal.take("base", "b", now=T + 1000, lease=60, limit=10) == []


async def test_a_released_entry_is_taken_over_at_once_and_only_its_owners_are_released(
    journal: SettlementJournal,
) -> None:
    await add(journal, "k1", owner="a", now=T)
    await add(journal, "k2", owner="c", now=T)
    await add(journal, "k3", owner="a", now=T, net="polygon")
    assert await journal.release("base", "a") == 1  # a shuts down
    taken = await journal.take("base", "b", now=T + 1, lease=60, limit=10)
    assert [(e.key, e.owner) for e in taken] == [("k1", "b")]  # c's lease is still live; polygon untouched
    assert await journal.take("polygon", "b", now=T + 1, lease=60, limit=10) == []


async def test_take_is_per_network_bounded_and_oldest_or_newest_first(journal: SettlementJournal) -> None:
    for i in range(5):
        await add(journal, f"k{i}", now=T + i)
    await add(journal, "other", now=T - 1, net="polygon")
    assert [e.key for e in await journal.take("base", "a", now=T + 10, lease=60, limit=3)] == ["k0", "k1", "k2"]
    assert [e.key for e in await journal.take("base", "a", now=T + 10, lease=60, limit=10)] == [
        f"k{i}" for i in range(5)
    ]
    assert [e.key for e in await journal.take("base", "a", now=T + 10, lease=60, limit=2, newest=True)] == ["k4", "k3"]
    assert [e.key for e in await journal.take("polygon", "a", now=T + 10, lease=60, limit=10)] == ["other"]


async def test_the_same_payment_settled_again_replaces_its_entry(journal: SettlementJournal) -> None:
    await add(journal, "k", now=T)
    await journal.update("k", "a", tx_hash="0x01", block_number=5, block_hash="0x05", now=T + 1)
    await add(journal, "k", owner="c", now=T + 2)
    (entry,) = await journal.take("base", "c", now=T + 3, lease=60, limit=10)
    assert entry.block_number is None and entry.owner == "c"


async def test_entries_outlive_the_journal_object(store_url: str) -> None:
    first = open_settlement_journal(store_url)
    try:
        await add(first, "kept")
    finally:
        await first.aclose()
    second = open_settlement_journal(store_url)  # a restarted gateway
    try:
        # Its owner is new: it finds the entry once the dead instance's lease has lapsed.
        assert [e.key for e in await second.take("base", "new", now=T + 61, lease=60, limit=10)] == ["kept"]
    finally:
        await second.aclose()


async def test_an_entry_keeps_its_kind(journal: SettlementJournal) -> None:
    """A watched transaction (a tx-hash transfer, a session deposit) is never settled again as an exact call: its
    kind is what tells the tracker so, on every read."""
    await add(journal, "exact-one")
    await journal.add(
        "tx:8453:0xaa:0",
        "base",
        "0x" + "aa" * 32,
        "0x" + "22" * 20,
        b"{}",
        7000,
        owner="a",
        now=T,
        lease=60,
        kind="transfer",
    )
    taken = await journal.take("base", "a", now=T + 1, lease=60, limit=10)
    assert sorted((e.key, e.kind) for e in taken) == [("exact-one", "exact"), ("tx:8453:0xaa:0", "transfer")]
    assert sorted(e.kind for e in await journal.pending("base", limit=10)) == ["exact", "transfer"]


# The table as gateways before ``kind`` created it.
OLD_SCHEMA = """
CREATE TABLE settlements (
    key TEXT PRIMARY KEY, network TEXT NOT NULL, tx_hash TEXT NOT NULL, asset TEXT NOT NULL, calldata BLOB NOT NULL,
    valid_before INTEGER NOT NULL, block_number INTEGER, block_hash TEXT, owner TEXT NOT NULL,
    lease_until REAL NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL
)
"""


async def test_entries_written_before_kinds_existed_read_as_exact_sqlite(tmp_path: Path) -> None:
    """An upgrade keeps the settlements an older gateway was watching: its rows read as ``exact``, and the table
    gains the column for new kinds."""
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.execute(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO settlements VALUES (?, 'base', ?, ?, ?, 5000, 9, '0x09', 'old', 0, ?, ?)",
        ("kept", "0x" + "11" * 32, "0x" + "22" * 20, CALL, T, T),
    )
    conn.commit()
    conn.close()
    for _ in range(2):  # and a second object on the migrated file finds the column there
        journal = SQLiteSettlementJournal(path)
        try:
            (entry,) = [e for e in await journal.take("base", "new", now=T + 1, lease=60, limit=10) if e.key == "kept"]
            assert (entry.kind, entry.calldata, entry.block_number) == ("exact", CALL, 9)
            await journal.add(
                "w",
                "base",
                "0x" + "aa" * 32,
                "0x" + "22" * 20,
                b"{}",
                1,
                owner="new",
                now=T + 2,
                lease=60,
                kind="deposit",
            )
            assert sorted(e.kind for e in await journal.pending("base", limit=10)) == ["deposit", "exact"]
        finally:
            await journal.aclose()


async def test_entries_written_before_kinds_existed_read_as_exact_redis(request: pytest.FixtureRequest) -> None:
    url: str = request.getfixturevalue("redis_url")
    raw = redis.Redis.from_url(url, decode_responses=True)
    try:
        raw.hset(
            "x402:{settle}:e:kept",
            mapping={
                "network": "base",
                "tx": "0x" + "11" * 32,
                "asset": "0x" + "22" * 20,
                "data": CALL.hex(),
                "vb": "5000",
                "bn": "9",
                "bh": "0x09",
                "owner": "old",
                "lease": "0",
                "created": str(T),
                "upd": str(T),
            },
        )
        raw.zadd("x402:{settle}:n:base", {"kept": T})
    finally:
        raw.close()
    journal = open_settlement_journal(url)
    try:
        (entry,) = await journal.take("base", "new", now=T + 1, lease=60, limit=10)
        assert (entry.key, entry.kind, entry.calldata, entry.block_number) == ("kept", "exact", CALL, 9)
        assert [e.kind for e in await journal.pending("base", limit=10)] == ["exact"]
    finally:
        await journal.aclose()
