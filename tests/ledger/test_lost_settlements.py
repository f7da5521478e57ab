"""Lost settlements in the ledger: a payment whose settlement the finality tracker counted lost is marked by its key,
on SQLite and a real Redis, so that no instance ever refunds it (docs/operating.md, "Refunds").

What it protects: the mark is in the store (another store object, as another gateway instance, sees it; it survives a
restart of the storage); it may come before the payment's entry (that write can still be on its way); marking twice
keeps the first time; the retention purge takes old marks with the old entries; a mark the store could not take when
the tracker counted the loss is written once the store answers again, never dropped while the process runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.engine import ledger as ledger_module
from gateway.engine.ledger import LostSettlements
from gateway.errors import StoreUnavailable
from gateway.storage.ledger import LedgerEntry, LedgerStore, RedisLedgerStore, SQLiteLedgerStore
from gateway.storage.ledger.contract import REFUND_PREFIX
from tests.store.conftest import BACKENDS, SERVER_BACKENDS, StoreBackend, store_backend

T0 = 1_700_000_000.0
KEY = "exact:8453:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913:0x" + "11" * 20 + ":0x" + "22" * 32

LedgerBackend = StoreBackend[LedgerStore]


@pytest.fixture(params=BACKENDS)
async def ledger_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LedgerBackend]:
    b = store_backend(request, tmp_path, SQLiteLedgerStore, RedisLedgerStore)
    try:
        yield b
    finally:
        await b.aclose()


def payment(key: str = KEY, at: float = T0) -> LedgerEntry:
    return LedgerEntry(
        key=key,
        at=at,
        route="POST /paid",
        method="POST",
        resource="http://gw/paid",
        amount=100_000,
        network="base",
        asset="0x833589fcd6edb6e08f4c7c32d4f71b54bda02913",
        payer="0x" + "11" * 20,
        pay_to="0x" + "33" * 20,
        kind="exact",
        tx_hash="0x" + "44" * 32,
        block=7,
        request_id="r1",
    )


@pytest.mark.parametrize("ledger_backend", SERVER_BACKENDS, indirect=True)
async def test_a_lost_mark_holds_across_instances_and_a_restart_of_the_storage(ledger_backend: LedgerBackend) -> None:
    first = ledger_backend.make()
    assert await first.settlement_lost_at(KEY) is None
    # Marked before its entry is recorded: the ledger write of the served request may still be on its way.
    assert await first.mark_settlement_lost(KEY, at=T0 + 60) is True
    assert await first.mark_settlement_lost(KEY, at=T0 + 120) is False  # another instance's tracker, later
    assert await first.record(payment()) is True
    other = ledger_backend.make()  # another gateway instance on the same storage
    assert await other.settlement_lost_at(KEY) == T0 + 60
    assert await other.settlement_lost_at("exact:8453:another") is None
    await first.aclose()
    await other.aclose()
    ledger_backend.restart()
    again = ledger_backend.make()
    assert await again.settlement_lost_at(KEY) == T0 + 60
    assert await again.get(KEY) == payment()  # the entry itself is unchanged by its mark


async def test_the_retention_purge_takes_old_marks_with_the_old_entries(ledger_backend: LedgerBackend) -> None:
    store = ledger_backend.make()
    old, new = KEY + ":old", KEY + ":new"
    await store.record(payment(old, T0))
    await store.record(payment(new, T0 + 1000))
    await store.mark_settlement_lost(old, at=T0 + 10)
    await store.mark_settlement_lost(new, at=T0 + 1010)
    assert await store.purge(older_than=T0 + 500) == 1
    assert await store.settlement_lost_at(old) is None
    assert await store.settlement_lost_at(new) == T0 + 1010
    assert await store.get(new) is not None


@pytest.mark.parametrize("ledger_backend", SERVER_BACKENDS, indirect=True)
async def test_a_mark_the_store_could_not_take_is_written_once_it_answers(
    ledger_backend: LedgerBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "RETRY_SECONDS", 0.05)
    down = ledger_backend.down()
    lost = LostSettlements(down)
    try:
        lost.lost("base", KEY)  # as the tracker's hook calls it: never waits, never raises
        await asyncio.sleep(0.3)
        assert lost.marked == 0
        with pytest.raises(StoreUnavailable):
            await down.settlement_lost_at(KEY)
        ledger_backend.up()
        for _ in range(100):
            if lost.marked:
                break
            await asyncio.sleep(0.05)
        assert lost.marked == 1
    finally:
        await lost.aclose()
    assert await down.settlement_lost_at(KEY) is not None  # the same object reads it once the storage is back


async def test_a_loss_of_a_payment_refunded_before_it_was_final_is_logged_as_an_error(
    ledger_backend: LedgerBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """Refunds do not wait for finality (docs/operating.md, "Refunds"): when a refunded payment's settlement is lost
    afterwards, the operator is told, with the keys to find both."""
    store = ledger_backend.make()
    await store.record(payment())
    refund = replace(
        payment(REFUND_PREFIX + KEY, T0 + 5), amount=-100_000, kind="refund", refund_of=KEY, tx_hash="0x" + "55" * 32
    )
    await store.record(refund)
    lost = LostSettlements(store)
    lost.lost("base", KEY)
    await lost.aclose()  # waits for the write
    assert lost.marked == 1
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "already refunded" in record.getMessage()
    assert (getattr(record, "key", None), getattr(record, "refund_tx_hash", None)) == (KEY, "0x" + "55" * 32)
