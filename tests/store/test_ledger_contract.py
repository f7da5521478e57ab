"""The ledger-store contract (gateway/storage/ledger/contract.py), run against SQLite and a real Redis.

What it protects: a payment recorded twice (a retry, two gateway processes) is one entry; a payment is refunded at
most once, even when two refunds race; every query answers exactly what the entries say (filters, newest first,
pages that neither skip nor repeat an entry, even entries recorded in the same instant); revenue by route, network
and day equals the sum of the entries in the range, net of refunds, whole days and partial ones; the retention
purge deletes exactly the entries older than its cutoff and the revenue totals with them, leaving nothing behind;
an export streams every entry oldest first and its CSV reads back into the same entries (spreadsheet formulas
defused); entries survive a restart of the storage; a storage that cannot answer fails closed.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis as redis_sync

from gateway.errors import StoreUnavailable
from gateway.storage.ledger import (
    LedgerEntry,
    LedgerQuery,
    LedgerStore,
    RedisLedgerStore,
    Revenue,
    SQLiteLedgerStore,
    open_ledger_store,
)
from gateway.storage.ledger.contract import DAY, day_of
from gateway.storage.ledger.export import entry_from_record, jsonl_line, read_csv, to_csv
from tests.store.conftest import BACKENDS, SERVER_BACKENDS, StoreBackend, store_backend

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC: 9 400 s before a day boundary
ROUTES = ("GET /weather", "POST /paid", "GET /files/{name}", "GET /ünïcödé/*")
NETWORKS = ("base", "polygon")
PAYERS = tuple("0x" + f"{i:02x}" * 20 for i in range(1, 6))


LedgerBackend = StoreBackend[LedgerStore]


@pytest.fixture(params=BACKENDS)
async def ledger_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LedgerBackend]:
    b = store_backend(request, tmp_path, SQLiteLedgerStore, RedisLedgerStore)
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture
def store(ledger_backend: LedgerBackend) -> LedgerStore:
    return ledger_backend.make()


def entry(n: int, *, at: float | None = None, **changes: object) -> LedgerEntry:
    """The n-th of a varied set of payments (payer, route, network and kind cycle; payments 3k and 3k + 1 share
    one transaction, a batch settlement; 3k + 2 is a session charge, with none)."""
    kind = ("exact", "txhash", "batch-settlement")[n % 3]
    e = LedgerEntry(
        key=f"{kind}:8453:{n:06d}",
        at=T0 + n * 37.25 if at is None else at,
        route=ROUTES[n % len(ROUTES)],
        method="GET",
        resource=f"https://api.example/r/{n}",
        amount=1_000 * (1 + n % 7),
        network=NETWORKS[n % 2],
        asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        payer=PAYERS[n % len(PAYERS)],
        pay_to="0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
        kind=kind,
        tx_hash="0x" + f"{n // 3:064x}" if kind != "batch-settlement" else "",
        block=100 + n if kind != "batch-settlement" else None,
        request_id=f"req-{n}",
        job_id=f"job_{n}" if n % 5 == 0 else None,
        upstream_status=200,
    )
    return replace(e, **changes)  # type: ignore[arg-type]


def refund_of(e: LedgerEntry, *, at: float, key: str | None = None) -> LedgerEntry:
    return replace(
        e, key=key or f"refund:{e.key}", at=at, kind="refund", amount=-e.amount, refund_of=e.key, request_id="admin"
    )


def model_find(entries: list[LedgerEntry], q: LedgerQuery) -> list[LedgerEntry]:
    out = [
        e
        for e in entries
        if (q.payer is None or e.payer == q.payer.lower())
        and (q.route is None or e.route == q.route)
        and (q.tx_hash is None or e.tx_hash == q.tx_hash.lower())
        and (q.since is None or e.at >= q.since)
        and (q.until is None or e.at < q.until)
        and (
            q.before is None
            or e.at < q.before
            or (q.before_key is not None and e.at == q.before and e.key < q.before_key)
        )
    ]
    return sorted(out, key=lambda e: (e.at, e.key), reverse=True)[: q.limit]


def model_revenue(entries: list[LedgerEntry], by: str, since: float | None, until: float | None) -> list[Revenue]:
    totals: dict[str, list[int]] = {}
    for e in entries:
        if (since is not None and e.at < since) or (until is not None and e.at >= until):
            continue
        group = e.route if by == "route" else e.network if by == "network" else day_of(e.at)
        t = totals.setdefault(group, [0, 0])
        t[0] += e.amount
        t[1] += e.kind != "refund"
    return [Revenue(g, a, p) for g, (a, p) in sorted(totals.items())]


async def record_all(store: LedgerStore, entries: list[LedgerEntry]) -> None:
    assert all(await asyncio.gather(*(store.record(e) for e in entries)))


async def export_all(store: LedgerStore, q: LedgerQuery | None = None) -> list[LedgerEntry]:
    return [e async for e in store.export(q or LedgerQuery())]


# --------------------------------------------------------------------------------------------- recording


async def test_a_payment_recorded_twice_is_one_entry(store: LedgerStore) -> None:
    e = entry(1)
    assert await store.record(e) is True
    assert await store.record(e) is False
    assert await store.record(replace(e, amount=999_999, at=T0 + 5)) is False  # the first write stands
    assert await store.get(e.key) == e
    assert await store.find(LedgerQuery()) == [e]
    assert await store.revenue("route") == [Revenue(e.route, e.amount, 1)]


async def test_two_gateways_recording_one_payment_at_once_make_one_entry(ledger_backend: LedgerBackend) -> None:
    stores = [ledger_backend.make(), ledger_backend.make()]
    e = entry(2)
    results = await asyncio.gather(*(stores[i % 2].record(e) for i in range(16)))
    assert sorted(results) == [False] * 15 + [True]
    assert await stores[0].revenue("network") == [Revenue(e.network, e.amount, 1)]


async def test_addresses_and_hashes_are_kept_lowercase_and_found_in_any_case(store: LedgerStore) -> None:
    e = entry(3, payer="0xAbCdEf" + "0" * 34, tx_hash="0x" + "AB" * 32)
    await store.record(e)
    stored = await store.get(e.key)
    assert stored == replace(e, payer=e.payer.lower(), tx_hash=e.tx_hash.lower())
    assert await store.find(LedgerQuery(payer=e.payer.upper().replace("0X", "0x"))) == [stored]
    assert await store.find(LedgerQuery(tx_hash=e.tx_hash)) == [stored]


async def test_an_entry_no_ledger_should_hold_is_refused(store: LedgerStore) -> None:
    e = entry(4)
    with pytest.raises(ValueError, match="refund"):
        await store.record(replace(e, kind="refund", amount=-e.amount))  # links to nothing
    with pytest.raises(ValueError, match="refund"):
        await store.record(replace(e, refund_of="exact:x"))  # a payment that claims to be a refund
    with pytest.raises(ValueError, match="amount"):
        await store.record(replace(e, amount=2**60))
    assert await store.find(LedgerQuery()) == []


# ----------------------------------------------------------------------------------------------- refunds


async def test_a_payment_is_refunded_at_most_once(store: LedgerStore) -> None:
    paid = entry(5)
    await store.record(paid)
    first = refund_of(paid, at=T0 + 10_000)
    assert await store.record(first) is True
    # Another refund of the same payment, under any key, is refused by the store itself.
    assert await store.record(refund_of(paid, at=T0 + 10_001, key="refund:again")) is False
    assert await store.get("refund:again") is None
    assert await store.get(first.key) == first
    assert await store.revenue("route") == [Revenue(paid.route, 0, 1)]  # net of the refund; one payment


async def test_two_refunds_of_one_payment_racing_make_one(ledger_backend: LedgerBackend) -> None:
    stores = [ledger_backend.make(), ledger_backend.make()]
    paid = entry(6)
    await stores[0].record(paid)
    refunds = [refund_of(paid, at=T0 + 20_000 + i, key=f"refund:{i}") for i in range(12)]
    results = await asyncio.gather(*(stores[i % 2].record(r) for i, r in enumerate(refunds)))
    assert sum(results) == 1
    kept = [r for r, ok in zip(refunds, results, strict=True) if ok]
    assert await stores[1].find(LedgerQuery(since=T0 + 20_000)) == kept
    assert await stores[1].revenue("network") == [Revenue(paid.network, 0, 1)]


# ----------------------------------------------------------------------------------------------- queries


async def test_queries_answer_exactly_what_the_entries_say_newest_first(store: LedgerStore) -> None:
    entries = [entry(n) for n in range(90)]
    await record_all(store, entries)
    queries = [
        LedgerQuery(),
        LedgerQuery(limit=5),
        LedgerQuery(payer=PAYERS[2]),
        LedgerQuery(route=ROUTES[1], limit=7),
        LedgerQuery(payer=PAYERS[0], route=ROUTES[0]),
        LedgerQuery(tx_hash=entries[9].tx_hash),  # one transaction, several payments (a batch)
        LedgerQuery(tx_hash=entries[9].tx_hash, payer=entries[10].payer),
        LedgerQuery(since=T0 + 500, until=T0 + 2000),
        LedgerQuery(route=ROUTES[2], since=T0 + 1000),
        LedgerQuery(payer=PAYERS[1], until=T0 + 1500, limit=3),
        LedgerQuery(before=entries[40].at),
        LedgerQuery(before=entries[40].at, payer=PAYERS[3], since=T0 + 100),
        LedgerQuery(tx_hash="0x" + "ee" * 32),
        LedgerQuery(payer="0x" + "99" * 20),
        LedgerQuery(limit=0),
    ]
    for q in queries:
        assert await store.find(q) == model_find(entries, q), q
    assert len(model_find(entries, queries[5])) == 2


async def test_pages_cover_every_entry_once_even_entries_of_the_same_instant(
    ledger_backend: LedgerBackend, store: LedgerStore
) -> None:
    # 260 entries in 13 instants: 20 share each time, more than a Redis read page of one score would hold at once
    # for the biggest group below (a run of 230 at one instant).
    entries = [entry(n, at=T0 + (n // 20) * 10.0) for n in range(30)]
    entries += [entry(n, at=T0 + 999.0) for n in range(30, 260)]
    await record_all(store, entries)
    for q in (LedgerQuery(limit=7), LedgerQuery(limit=50, route=ROUTES[0]), LedgerQuery(limit=13, since=T0 + 5)):
        seen: list[LedgerEntry] = []
        page = await store.find(q)
        while page:
            seen += page
            page = await store.find(replace(q, before=page[-1].at, before_key=page[-1].key))
        assert seen == model_find(entries, replace(q, limit=10_000)), q
    exported = await export_all(store)
    assert exported == sorted(entries, key=lambda e: (e.at, e.key))


async def test_an_export_streams_every_matching_entry_oldest_first(store: LedgerStore) -> None:
    rng = random.Random(7)
    entries = [entry(n, at=T0 + rng.randrange(0, 40 * DAY)) for n in range(1200)]  # > one page on both stores
    await record_all(store, entries)
    assert await export_all(store) == sorted(entries, key=lambda e: (e.at, e.key))
    q = LedgerQuery(payer=PAYERS[4], since=T0 + 3 * DAY, until=T0 + 30 * DAY, limit=1)  # no limit on exports
    expected = sorted(model_find(entries, replace(q, limit=10_000)), key=lambda e: (e.at, e.key))
    assert await export_all(store, q) == expected
    assert len(expected) > 100


# ----------------------------------------------------------------------------------------------- revenue


async def test_revenue_by_route_network_and_day_is_the_sum_of_the_entries_net_of_refunds(store: LedgerStore) -> None:
    rng = random.Random(11)
    entries = [entry(n, at=T0 + rng.uniform(-DAY, 9 * DAY)) for n in range(400)]
    refunds = [refund_of(e, at=e.at + rng.uniform(0, 2 * DAY)) for e in entries[::9]]
    everything = entries + refunds
    await record_all(store, everything)
    first_day = (T0 // DAY) * DAY
    ranges: list[tuple[float | None, float | None]] = [
        (None, None),
        (first_day, first_day + 3 * DAY),  # whole days only
        (T0, T0 + 4.5 * DAY),  # partial days at both ends
        (T0 + 0.1 * DAY, T0 + 0.2 * DAY),  # inside one day
        (None, T0 + 2.25 * DAY),
        (T0 + 5.5 * DAY, None),
        (T0 + 3 * DAY, T0 + 3 * DAY),  # empty
        (first_day + DAY, first_day + 2 * DAY - 0.001),
    ]
    for by in ("route", "network", "day"):
        for since, until in ranges:
            got = await store.revenue(by, since=since, until=until)  # type: ignore[arg-type]
            assert got == model_revenue(everything, by, since, until), (by, since, until)
    total = await store.revenue("network")
    assert sum(r.amount for r in total) == sum(e.amount for e in everything)
    assert sum(r.payments for r in total) == len(entries)


async def test_revenue_of_an_empty_ledger_is_empty(store: LedgerStore) -> None:
    for by in ("route", "network", "day"):
        assert await store.revenue(by) == []  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.revenue("payer")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- retention


async def test_the_retention_purge_deletes_exactly_the_older_entries_and_their_revenue(
    ledger_backend: LedgerBackend, store: LedgerStore
) -> None:
    rng = random.Random(3)
    entries = [entry(n, at=T0 + rng.uniform(0, 20 * DAY)) for n in range(1800)]  # purged in several batches
    refunds = [refund_of(e, at=e.at + 3600) for e in entries[::11]]
    everything = entries + refunds
    await record_all(store, everything)
    cutoff = T0 + 12.3 * DAY
    older = [e for e in everything if e.at < cutoff]
    kept = [e for e in everything if e.at >= cutoff]
    assert len(older) > 1000
    assert await store.purge(older_than=cutoff) == len(older)
    assert await store.purge(older_than=cutoff) == 0
    assert await export_all(store) == sorted(kept, key=lambda e: (e.at, e.key))
    for by in ("route", "network", "day"):
        assert await store.revenue(by) == model_revenue(kept, by, None, None)  # type: ignore[arg-type]
    for e in older[:20]:
        assert await store.get(e.key) is None
        if e.tx_hash:
            assert await store.find(LedgerQuery(tx_hash=e.tx_hash)) == model_find(kept, LedgerQuery(tx_hash=e.tx_hash))
    assert await store.find(LedgerQuery(payer=PAYERS[1])) == model_find(kept, LedgerQuery(payer=PAYERS[1]))
    # Everything purged: nothing is left behind (no index member, no day total, no refund marker).
    assert await store.purge(older_than=T0 + 30 * DAY) == len(kept)
    assert await export_all(store) == []
    assert await store.revenue("day") == []
    if ledger_backend.name == "redis":
        client = redis_sync.Redis.from_url(ledger_backend.url)
        try:
            assert client.keys("x402:{ledger}:*") == []
        finally:
            client.close()


async def test_a_refunded_payment_purged_keeps_its_refund_counted(store: LedgerStore) -> None:
    paid = entry(8, at=T0)
    refund = refund_of(paid, at=T0 + 3 * DAY)
    await record_all(store, [paid, refund])
    await store.purge(older_than=T0 + DAY)
    assert await store.revenue("day") == [Revenue(day_of(refund.at), -paid.amount, 0)]
    # Its refund is still on record, so the payment cannot be refunded a second time.
    assert await store.record(refund_of(paid, at=T0 + 4 * DAY, key="refund:late")) is False


# ------------------------------------------------------------------------------------------------ exports


async def test_a_csv_export_reads_back_into_the_same_entries(store: LedgerStore) -> None:
    awkward = [
        entry(20, request_id='=HYPERLINK("http://evil")', resource='https://a.example/x?q="1",2'),
        entry(21, request_id="-2+3", job_id="+cmd|' /C calc'!A0", route="GET /ünïcödé"),
        entry(22, request_id="@SUM(A1)", resource="https://a.example/line\r\nbreak\ttab"),
        entry(23, request_id="'already quoted", job_id=""),
        entry(24, block=None, job_id=None, at=T0 + 0.000001),
    ]
    entries = [entry(n) for n in range(12)] + awkward
    paid = entries[0]
    entries.append(refund_of(paid, at=T0 + 50_000))
    await record_all(store, entries)
    exported = await export_all(store)
    text = "".join(to_csv(exported))
    back = list(read_csv(io.StringIO(text, newline="")))
    assert back == exported
    assert await store.get(awkward[3].key) == replace(awkward[3], job_id=None)  # empty is none, in every store
    # A spreadsheet sees text, never a formula: no cell starts one, except a number (a refund's negative amount).
    for row in csv.reader(io.StringIO(text, newline="")):
        for cell in row:
            if cell.startswith(("=", "+", "-", "@", "\t", "\r")):
                float(cell)
    lines = [json.loads(line) for line in "".join(jsonl_line(e) for e in exported).splitlines()]
    assert [entry_from_record(r) for r in lines] == exported


# ------------------------------------------------------------------------------------- durability, outages


@pytest.mark.parametrize("ledger_backend", SERVER_BACKENDS, indirect=True)
async def test_entries_survive_a_restart_of_the_storage(ledger_backend: LedgerBackend) -> None:
    first = ledger_backend.make()
    entries = [entry(n) for n in range(10)]
    await record_all(first, entries)
    await first.aclose()
    ledger_backend.restart()
    again = ledger_backend.make()
    assert await export_all(again) == entries
    assert await again.revenue("route") == model_revenue(entries, "route", None, None)


@pytest.mark.parametrize("ledger_backend", SERVER_BACKENDS, indirect=True)
async def test_a_storage_that_cannot_answer_fails_closed(ledger_backend: LedgerBackend) -> None:
    down = ledger_backend.down()
    try:
        with pytest.raises(StoreUnavailable):
            await down.record(entry(1))
        with pytest.raises(StoreUnavailable):
            await down.find(LedgerQuery())
        with pytest.raises(StoreUnavailable):
            await down.revenue("day")
        with pytest.raises(StoreUnavailable):
            await down.ping()
    finally:
        ledger_backend.up()
    assert await down.record(entry(1)) is True  # the same object works once the storage is back


async def test_open_ledger_store_reads_the_store_url(ledger_backend: LedgerBackend) -> None:
    store = open_ledger_store(ledger_backend.url)
    ledger_backend.opened.append(store)
    expected = SQLiteLedgerStore if ledger_backend.name == "sqlite" else RedisLedgerStore
    assert isinstance(store, expected)
    await store.ping()
