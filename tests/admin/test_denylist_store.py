"""The deny-list store on both backends: what every gateway instance on the store refuses, and the settlement
journal's read-only view the admin API lists pending settlements from."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.storage.denylist import DeniedPayer, DenyList, open_denylist
from gateway.storage.settlements import open_settlement_journal
from tests.support.gateway import sqlite_url

PAYER = "0x" + "Ab" * 20


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    redis_url: str = request.getfixturevalue("redis_url")
    return redis_url


@pytest.fixture
async def lists(url: str) -> AsyncIterator[tuple[DenyList, DenyList]]:
    """Two deny-list objects on one storage: what two gateway instances see."""
    a, b = open_denylist(url), open_denylist(url)
    yield a, b
    await a.aclose()
    await b.aclose()


async def test_a_payer_denied_on_one_instance_is_denied_on_every_instance(lists: tuple[DenyList, DenyList]) -> None:
    a, b = lists
    assert not await b.denied(PAYER.lower())
    assert await a.deny(DeniedPayer(PAYER, 100.0, "chargeback", "TEST_ADMIN_WRITE"))
    assert await b.denied(PAYER.lower())
    assert await b.denied(PAYER.upper().replace("0X", "0x"))  # any hex case: one address


async def test_the_first_denial_stays_and_allow_removes_it_once(lists: tuple[DenyList, DenyList]) -> None:
    a, b = lists
    assert await a.deny(DeniedPayer(PAYER, 100.0, "first", "A"))
    assert not await b.deny(DeniedPayer(PAYER, 200.0, "second", "B"))
    (entry,) = await b.entries(limit=10)
    assert (entry.payer, entry.at, entry.note, entry.by) == (PAYER.lower(), 100.0, "first", "A")
    assert await b.allow(PAYER)
    assert not await a.allow(PAYER)
    assert not await a.denied(PAYER.lower())
    assert await a.entries(limit=10) == []


async def test_entries_are_newest_first_and_bounded(lists: tuple[DenyList, DenyList]) -> None:
    a, _ = lists
    payers = [f"0x{i:040x}" for i in range(1, 6)]
    for i, payer in enumerate(payers):
        await a.deny(DeniedPayer(payer, float(i), "", "A"))
    assert [e.payer for e in await a.entries(limit=3)] == payers[::-1][:3]


async def test_a_deny_list_refuses_what_is_not_an_address(lists: tuple[DenyList, DenyList]) -> None:
    a, _ = lists
    for bad in ("0x1234", "ab" * 20, "0x" + "g" * 40, ""):
        with pytest.raises(ValueError, match="address"):
            await a.deny(DeniedPayer(bad, 1.0))
    assert await a.entries(limit=10) == []


async def test_pending_settlements_are_read_without_taking_their_lease(url: str) -> None:
    journal = open_settlement_journal(url)
    t = float(int(time.time()))  # the Redis journal expires its entries a week after they were added
    try:
        await journal.add("k1", "base", "0x" + "1" * 64, "0xasset", b"\x01", 500, owner="tracker", now=t, lease=60)
        await journal.add("k2", "base", "0x" + "2" * 64, "0xasset", b"\x02", 600, owner="tracker", now=t + 1, lease=60)
        await journal.add("k3", "polygon", "0x" + "3" * 64, "0xa", b"\x03", 700, owner="tracker", now=t + 2, lease=60)
        seen = await journal.pending("base", limit=10)
        assert [(e.key, e.owner, e.lease_until, e.calldata) for e in seen] == [
            ("k1", "tracker", t + 60, b"\x01"),
            ("k2", "tracker", t + 61, b"\x02"),
        ]
        assert [e.key for e in await journal.pending("base", limit=1)] == ["k1"]
        # Still the tracker's: another owner takes nothing before the lease lapses, the tracker keeps updating it.
        assert await journal.take("base", "someone-else", now=t + 5, lease=60, limit=10) == []
        tx = "0x" + "4" * 64
        assert await journal.update("k1", "tracker", tx_hash=tx, block_number=7, block_hash="0xb", now=t + 6)
    finally:
        await journal.aclose()
