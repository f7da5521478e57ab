"""Store data loss fails safe: a receipt store that lost its records (Redis flushed or restarted without
persistence, SQLite file replaced) takes no payment until an operator acknowledges it, and even then the payments
our own relayer settled stay spent (docs/threat-model.md T30)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from gateway.dev.chain import DevChain
from gateway.engine.identity import acknowledge
from gateway.storage import open_store
from gateway.x402 import reasons
from tests.e2e.helpers import Balances, assert_402, assert_error
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url

PRICE = 100_000


def pay(gw: GatewayUnderTest, payer: object) -> dict[str, str]:
    name, value = gw.sign(payer, httpx.post(gw.url + "/paid"))
    return {name: value}


def ack(store_url: str) -> None:
    async def run() -> None:
        store = open_store(store_url)
        try:
            await acknowledge(store)
        finally:
            await store.aclose()

    asyncio.run(run())


def store_check(gw: GatewayUnderTest) -> str:
    return str(httpx.get(gw.url + "/readyz").json()["checks"]["store"])


def until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_flushed_redis_takes_no_payment_until_acknowledged(base_chain: DevChain, redis_url: str) -> None:
    payer = base_chain.new_payer(2_000_000)
    with running_gateway(base_chain, store_url=redis_url, store={"heartbeat_seconds": 1.0}) as gw:
        balances = Balances(gw, payer.address)
        spent = pay(gw, payer)
        assert httpx.post(gw.url + "/paid", headers=spent, timeout=30).status_code == 200
        client = redis.Redis.from_url(redis_url)
        client.flushall()  # every consumed payment forgotten
        client.close()
        assert until(lambda: store_check(gw) == "identity_lost")  # noticed with the next heartbeat
        fresh = pay(gw, payer)
        assert_error(httpx.post(gw.url + "/paid", headers=fresh, timeout=30), 503, reasons.STORE_IDENTITY_LOST)
        assert_error(httpx.post(gw.url + "/paid", headers=spent, timeout=30), 503, reasons.STORE_IDENTITY_LOST)
        assert httpx.post(gw.url + "/free", timeout=30).status_code == 200  # free routes are not affected
        assert len([r for r in gw.upstream.requests if r.path == "/paid"]) == 1

        ack(redis_url)
        assert until(lambda: store_check(gw) == "ok")
        # The record of the first payment is gone, but the chain shows our relayer settled it: still spent.
        assert_402(httpx.post(gw.url + "/paid", headers=spent, timeout=30), reasons.PAYMENT_ALREADY_USED)
        assert httpx.post(gw.url + "/paid", headers=fresh, timeout=30).status_code == 200
        assert len([r for r in gw.upstream.requests if r.path == "/paid"]) == 2
        balances.assert_charged_once(2 * PRICE)


def test_a_sqlite_file_replaced_while_the_gateway_was_down_is_noticed_at_start(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(2_000_000)
    store_url = sqlite_url(tmp_path)
    with running_gateway(base_chain, store_url=store_url) as gw:
        assert httpx.post(gw.url + "/paid", headers=pay(gw, payer), timeout=30).status_code == 200
    for name in ("receipts.db", "receipts.db-wal", "receipts.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)  # restored from an old backup, or simply deleted
    assert (tmp_path / "receipts.db.identity").exists()
    with running_gateway(base_chain, store_url=store_url) as gw:
        assert_error(httpx.post(gw.url + "/paid", headers=pay(gw, payer), timeout=30), 503, reasons.STORE_IDENTITY_LOST)
        assert httpx.get(gw.url + "/readyz").status_code == 503
        ack(store_url)
    with running_gateway(base_chain, store_url=store_url) as gw:
        assert httpx.post(gw.url + "/paid", headers=pay(gw, payer), timeout=30).status_code == 200
