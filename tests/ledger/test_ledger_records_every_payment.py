"""The ledger through a real gateway on anvil: every paid-and-served request is one entry, whatever paid for it.

Real gateway (uvicorn), real anvil, the ledger on the receipt store's SQLite file or a real Redis. Exact
authorizations (our signer), tx-hash proofs (the payer's own transfer) and session vouchers (the official ``x402``
client) each pay N requests: exactly N entries of that kind, with the fields the chain and the answers show, and the
ledger's revenue equals what pay-to received on chain. A payment served on its second presentation (paid, then
the upstream failed) is one entry; a job's payment names its job; a ledger store that cannot answer leaves every
answer served and records the entries once it is back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from x402.http.clients import x402HttpxClient

from gateway.dev.chain import DevChain, RedisServer
from gateway.storage.ledger import LedgerEntry, LedgerQuery, Revenue, open_ledger_store
from gateway.x402.codec import decode_header
from tests.jobs.helpers import jobs_gateway
from tests.jobs.helpers import pay as pay_job
from tests.sessions.test_official_client_sessions import FAST_CLAIMS, session_client
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url
from tests.support.jobs_upstreams import SlowAgent
from tests.support.servers import Behaviour, RecordingUpstream
from tests.txhash.helpers import b64json, erc20_transfer, new_tx_payer, proof

N = 3
PAID_PRICE = 100_000  # POST /paid: $0.10
SESSION_PRICE = 1_000  # GET /session: $0.001
ROUTES: list[dict[str, Any]] = [
    {"route": "POST /paid", "price": "0.10", "settlement": "after"},
    {"route": "POST /paid-before", "price": "0.10", "settlement": "before"},
    {"route": "GET /session", "price": "0.001", "schemes": ["exact", "batch-settlement"]},
]


def ledger_entries(url: str, query: LedgerQuery | None = None) -> list[LedgerEntry]:
    """Every entry on the ledger at ``url``, oldest first (read through a store object of our own)."""

    async def read() -> list[LedgerEntry]:
        store = open_ledger_store(url)
        try:
            return [e async for e in store.export(query or LedgerQuery())]
        finally:
            await store.aclose()

    return asyncio.run(read())


def ledger_revenue(url: str, by: str) -> list[Revenue]:
    async def read() -> list[Revenue]:
        store = open_ledger_store(url)
        try:
            return await store.revenue(by)  # type: ignore[arg-type]
        finally:
            await store.aclose()

    return asyncio.run(read())


def wait_for_entries(url: str, n: int, timeout: float = 10.0) -> list[LedgerEntry]:
    """The ledger once it holds ``n`` entries: an entry is durable when its request's handler returns, which may
    be a moment after the client read the whole answer."""
    deadline = time.monotonic() + timeout
    while True:
        entries = ledger_entries(url)
        if len(entries) >= n or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def block_of(chain: DevChain, tx_hash: str) -> int:
    return int(chain.rpc("eth_getTransactionReceipt", [tx_hash])["blockNumber"], 16)


def pay_exact(gw: GatewayUnderTest, chain: DevChain, path: str, request_id: str) -> tuple[httpx.Response, str]:
    payer = chain.new_payer(1_000_000)
    with gw.client() as client:
        first = client.post(path, json={"q": 1})
        assert first.status_code == 402, first.text
        name, value = gw.sign(payer, first)
        r = client.post(path, json={"q": 1}, headers={name: value, "x-request-id": request_id})
    assert r.status_code == 200, r.text
    return r, payer.address.lower()


def pay_txhash(gw: GatewayUnderTest, chain: DevChain, request_id: str) -> tuple[httpx.Response, str, str]:
    payer = new_tx_payer(chain)
    tx = erc20_transfer(chain, payer, gw.config.payment.pay_to, PAID_PRICE)
    with gw.client() as client:
        r = client.post("/paid", json={"q": 1}, headers={**proof(gw, payer, tx), "x-request-id": request_id})
    assert r.status_code == 200, r.text
    return r, payer.address.lower(), tx


async def pay_sessions(gw: GatewayUnderTest, chain: DevChain, n: int) -> tuple[list[httpx.Response], str]:
    payer = chain.new_payer(5_000_000)
    client, _scheme = session_client(payer)
    out = []
    async with x402HttpxClient(client, timeout=30) as http:
        for i in range(n):
            out.append(await http.get(gw.url + "/session", headers={"x-request-id": f"session-{i}"}))
    return out, payer.address.lower()


def test_n_payments_of_each_kind_are_n_entries_and_revenue_is_what_pay_to_received(
    base_chain: DevChain, store_url: str
) -> None:
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES, sessions=FAST_CLAIMS) as gw:
        pay_to = gw.config.payment.pay_to
        before = gw.balance(pay_to)
        exact = [pay_exact(gw, base_chain, "/paid", f"exact-{i}") for i in range(N)]
        txhash = [pay_txhash(gw, base_chain, f"txhash-{i}") for i in range(N)]
        sessions, session_payer = asyncio.run(pay_sessions(gw, base_chain, N))
        assert [r.status_code for r in sessions] == [200] * N, sessions[-1].text
        entries = wait_for_entries(store_url, 3 * N)
        assert len(entries) == 3 * N
        by_kind = {kind: [e for e in entries if e.kind == kind] for kind in ("exact", "txhash", "batch-settlement")}
        assert {kind: len(found) for kind, found in by_kind.items()} == {k: N for k in by_kind}
        asset = base_chain.usdc

        def common(e: LedgerEntry, route: str, path: str, method: str) -> None:
            assert (e.route, e.method, e.resource) == (route, method, gw.url + path)
            assert (e.network, e.asset, e.pay_to, e.upstream_status, e.job_id) == ("base", asset, pay_to, 200, None)
            assert e.refund_of is None and abs(e.at - time.time()) < 120

        for (r, payer), e in zip(exact, by_kind["exact"], strict=True):
            receipt = b64json(r.headers["payment-response"])
            common(e, "POST /paid", "/paid", "POST")
            assert (e.payer, e.amount) == (payer, PAID_PRICE)
            assert e.key.startswith(f"exact:8453:{asset.lower()}:{payer}:0x")
            assert e.tx_hash == receipt["transaction"].lower()
            assert e.block == block_of(base_chain, e.tx_hash)
        assert [e.request_id for e in by_kind["exact"]] == [f"exact-{i}" for i in range(N)]
        for (_r, payer, tx), e in zip(txhash, by_kind["txhash"], strict=True):
            common(e, "POST /paid", "/paid", "POST")
            assert (e.payer, e.amount, e.tx_hash) == (payer, PAID_PRICE, tx)
            assert e.key.startswith(f"tx:8453:{tx}:")  # the transfer's effect key
            assert e.block == block_of(base_chain, tx)
        assert [e.request_id for e in by_kind["txhash"]] == [f"txhash-{i}" for i in range(N)]
        receipts = [decode_header(r.headers["payment-response"]) for r in sessions]
        channel = receipts[0]["extra"]["channelState"]["channelId"]
        for i, e in enumerate(by_kind["batch-settlement"]):
            common(e, "GET /session", "/session", "GET")
            assert (e.payer, e.amount, e.request_id) == (session_payer, SESSION_PRICE, f"session-{i}")
            cumulative = int(receipts[i]["extra"]["channelState"]["chargedCumulativeAmount"])
            assert e.key == f"session:{channel}:{cumulative}"
            assert e.tx_hash == receipts[i]["transaction"].lower()  # the deposit's, on the request that made it
            assert (e.tx_hash != "") == (i == 0)
        assert by_kind["batch-settlement"][0].block is None  # a deposit's block is not recorded
        # Revenue: what the ledger says pay-to earned is what pay-to received (sessions: once claimed and swept).
        total = N * (2 * PAID_PRICE + SESSION_PRICE)
        assert ledger_revenue(store_url, "route") == [
            Revenue("GET /session", N * SESSION_PRICE, N),
            Revenue("POST /paid", 2 * N * PAID_PRICE, 2 * N),
        ]
        assert ledger_revenue(store_url, "network") == [Revenue("base", total, 3 * N)]
        assert sum(r.amount for r in ledger_revenue(store_url, "day")) == total
        wait_for(lambda: gw.balance(pay_to) - before == total)
        ledger = gw.app.payments.ledger
        assert (ledger.stats.written, ledger.stats.failed, ledger.stats.duplicates) == (3 * N, 0, 0)


def test_a_payment_served_on_its_second_presentation_is_one_entry(base_chain: DevChain, store_url: str) -> None:
    upstream = RecordingUpstream()
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES[:2], upstream=upstream) as gw:
        payer = base_chain.new_payer(1_000_000)
        with gw.client() as client:
            first = client.post("/paid-before", json={})
            name, value = gw.sign(payer, first)
            upstream.behaviour = Behaviour(status=500)  # settled before the upstream, which then fails: unserved
            failed = client.post("/paid-before", json={}, headers={name: value})
            assert failed.status_code == 500
            assert ledger_entries(store_url) == []  # paid, not served: nothing recorded (yet)
            upstream.behaviour = Behaviour()
            served = client.post("/paid-before", json={}, headers={name: value, "x-request-id": "retry"})
            again = client.post("/paid-before", json={}, headers={name: value})
        assert served.status_code == 200, served.text
        assert again.status_code == 402  # the payment is spent
        entries = wait_for_entries(store_url, 1)
        assert len(entries) == 1
        e = entries[0]
        assert (e.kind, e.payer, e.amount, e.request_id) == ("exact", payer.address.lower(), PAID_PRICE, "retry")
        assert e.tx_hash == b64json(served.headers["payment-response"])["transaction"].lower()
        assert e.block is None  # the settlement was seen by the first request, not by the one that was served
        assert gw.balance(gw.config.payment.pay_to) == PAID_PRICE == sum(x.amount for x in entries)


def test_a_jobs_payment_names_its_job(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    url = sqlite_url(tmp_path)
    with (
        jobs_gateway(base_chain, store_url=url, upstream=SlowAgent(), mode="runner", style="agent") as gw,
        gw.client() as c,
    ):
        r = pay_job(gw, c, payer, "POST", "/agent/prompt", json={"prompt": "price of ETH?"})
        assert r.status_code == 202, r.text
        entries = wait_for_entries(url, 1)
    assert [(e.job_id, e.route, e.upstream_status) for e in entries] == [(r.json()["jobId"], "POST /agent/prompt", 202)]


def test_a_ledger_that_cannot_answer_leaves_every_answer_served_and_catches_up(
    base_chain: DevChain, tmp_path: Path
) -> None:
    server = RedisServer(persistent=True)
    server.start()
    try:
        with running_gateway(
            base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES[:2], ledger={"store_url": server.url}
        ) as gw:
            ledger = gw.app.payments.ledger
            server.stop()
            responses = [pay_exact(gw, base_chain, "/paid", f"down-{i}")[0] for i in range(2)]
            assert [r.status_code for r in responses] == [200, 200]  # served, receipts and all
            wait_for(lambda: ledger.stats.failed == 2, timeout=10)
            assert ledger.stats.written == 0
            server.start()
            wait_for(lambda: ledger.stats.written == 2, timeout=15)  # the backlog is written once it is back
            entries = ledger_entries(server.url)
        assert sorted(e.request_id for e in entries) == ["down-0", "down-1"]
        assert ledger.stats.dropped == 0
    finally:
        server.cleanup()
