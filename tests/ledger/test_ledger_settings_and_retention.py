"""``[ledger]`` and the recorder's background work: a typo or an unusable value fails at start naming its key, the
example configuration documents every key, the ledger lives on the receipt store unless told otherwise, and entries
older than the retention are deleted by the recorder's own periodic purge (nothing else has to run it)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import LedgerConfig, parse_config
from gateway.engine.ledger import Ledger
from gateway.errors import ConfigError
from gateway.storage.ledger import LedgerEntry, LedgerQuery, RedisLedgerStore, SQLiteLedgerStore
from gateway.storage.ledger.contract import DAY

ROOT = Path(__file__).resolve().parents[2]
ENV = {"X402_RELAYER_KEY": "0x" + "ab" * 32}


def doc(**sections: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9000"},
        "payment": {"pay_to": "0x" + "11" * 20},
        "networks": {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}},
        "routes": [{"route": "POST /a", "price": "0.10"}],
    }
    d.update(sections)
    return d


def test_the_ledger_is_on_by_default_on_the_receipt_store(tmp_path: Path) -> None:
    c = parse_config(doc(store={"url": "sqlite:///x.db"}), env=ENV, base_dir=tmp_path)
    assert c.ledger == LedgerConfig()
    assert (c.ledger.enabled, c.ledger.store_url, c.ledger.retention_days) == (True, None, 400)
    ledger = Ledger.from_config(c)
    assert ledger is not None and isinstance(ledger.store, SQLiteLedgerStore)
    assert repr(ledger.store) == f"SQLiteLedgerStore(path={str(tmp_path / 'x.db')!r})"


def _synchronous_after_a_record(store: SQLiteLedgerStore) -> int:
    """SQLite's ``synchronous`` on the store's writer right after an entry's commit: 2 (FULL) is an fsync per
    commit, 1 (NORMAL) none."""

    async def go() -> int:
        try:
            entry = LedgerEntry(
                key="exact:1:a:b:1", at=time.time(), route="POST /a", method="POST", resource="http://x/a",
                amount=1, network="base", asset="0x" + "22" * 20, payer="0x" + "33" * 20, pay_to="0x" + "11" * 20,
                kind="exact", tx_hash="", block=None, request_id="r", job_id="", upstream_status=200,
            )  # fmt: skip
            assert await store.record(entry)
            db = store._db  # the writer's own connection is what commits the entry
            row = await db.run(lambda: db.connection().execute("PRAGMA synchronous").fetchone())
            return int(row[0])
        finally:
            await store.aclose()

    return asyncio.run(go())


def test_ledger_entries_in_the_receipt_stores_file_are_synced_by_payments_and_elsewhere_each_one(
    tmp_path: Path,
) -> None:
    """docs/operating.md ("Ledger"): in the receipt store's file the next payment's synced commit makes an entry
    durable, so the entry's own commit skips the fsync; a ledger file of its own has no such payments and syncs
    every entry."""
    shared = Ledger.from_config(parse_config(doc(store={"url": "sqlite:///x.db"}), env=ENV, base_dir=tmp_path))
    assert shared is not None and isinstance(shared.store, SQLiteLedgerStore)
    assert _synchronous_after_a_record(shared.store) == 1
    own = Ledger.from_config(
        parse_config(
            doc(store={"url": "sqlite:///x.db"}, ledger={"store_url": "sqlite:///ledger.db"}),
            env=ENV,
            base_dir=tmp_path,
        )
    )
    assert own is not None and isinstance(own.store, SQLiteLedgerStore)
    assert _synchronous_after_a_record(own.store) == 2


def test_the_ledger_can_live_elsewhere_and_its_password_is_never_shown(tmp_path: Path) -> None:
    url = "redis://:hunter2hunter2@127.0.0.1:6390/3"
    c = parse_config(doc(ledger={"store_url": url, "retention_days": 0}), env=ENV, base_dir=tmp_path)
    assert c.ledger.store_url is not None and c.ledger.store_url.reveal() == url
    assert "hunter2" not in repr(c.ledger)
    ledger = Ledger.from_config(c)
    assert ledger is not None and isinstance(ledger.store, RedisLedgerStore)
    assert "hunter2" not in repr(ledger)
    assert Ledger.from_config(parse_config(doc(ledger={"enabled": False}), env=ENV)) is None


@pytest.mark.parametrize(
    ("ledger", "key"),
    [
        ({"retention_days": -1}, "ledger.retention_days"),
        ({"retention_days": 1.5}, "ledger.retention_days"),
        ({"purge_interval": 0}, "ledger.purge_interval"),
        ({"enabled": "yes"}, "ledger.enabled"),
        ({"store_url": "postgres://db/x"}, "ledger.store_url"),
        ({"retention": 30}, "ledger.retention"),  # a typo is refused, never silently left at its default
    ],
)
def test_a_bad_ledger_setting_fails_at_start_naming_its_key(ledger: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc(ledger=ledger), env=ENV)
    assert info.value.key == key, info.value.message


def test_the_example_config_documents_every_ledger_key_with_its_default() -> None:
    text = (ROOT / "gateway.example.toml").read_text()
    block = text[text.index("\n[ledger]") : text.index("\n[", text.index("\n[ledger]") + 1)]
    documented = set(re.findall(r"^([a-z_]+) = ", block, re.M))
    assert documented == {f.name for f in dataclasses.fields(LedgerConfig)}
    ledger = tomllib.loads(block)["ledger"]
    parsed = parse_config(doc(ledger=ledger), env=ENV).ledger
    assert parsed == LedgerConfig()  # what the example shows is the default


def entry(key: str, at: float) -> LedgerEntry:
    return LedgerEntry(
        key=key,
        at=at,
        route="POST /a",
        method="POST",
        resource="http://127.0.0.1/a",
        amount=100_000,
        network="base",
        asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        payer="0x" + "22" * 20,
        pay_to="0x" + "11" * 20,
        kind="exact",
        tx_hash="0x" + "33" * 32,
        block=1,
        request_id="r",
    )


async def test_entries_older_than_the_retention_are_purged_by_the_recorder_itself(tmp_path: Path) -> None:
    store = SQLiteLedgerStore(str(tmp_path / "store.db"))
    now = time.time()
    old = [entry(f"exact:old:{i}", now - 10 * DAY - i) for i in range(30)]
    recent = [entry(f"exact:new:{i}", now - 3 * DAY - i) for i in range(5)]
    for e in old + recent:
        assert await store.record(e)
    ledger = Ledger(store, LedgerConfig(retention_days=7))
    await ledger.start()
    try:
        deadline = time.monotonic() + 10
        while ledger.stats.purged < len(old) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert ledger.stats.purged == len(old)
        kept = [e.key async for e in store.export(LedgerQuery())]
        assert kept == [e.key for e in sorted(recent, key=lambda e: e.at)]
    finally:
        await ledger.aclose()


async def test_retention_0_keeps_every_entry(tmp_path: Path) -> None:
    store = SQLiteLedgerStore(str(tmp_path / "store.db"))
    await store.record(entry("exact:ancient", 1.0))
    ledger = Ledger(store, LedgerConfig(retention_days=0))
    await ledger.start()
    try:
        assert await ledger.purge() == 0
        assert await store.get("exact:ancient") is not None
    finally:
        await ledger.aclose()
