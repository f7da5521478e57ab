"""An admin price change reaches every gateway instance on the shared store (docs/operating.md, "Prices and
routes at run time"): the instance that made it applies it at once, another one within a poll of the store's
version; each still honours the 402s it gave at the old price, and clearing the override restores the file's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from gateway.dev.chain import DevChain
from gateway.engine.reload import POLL_SECONDS
from gateway.errors import BadRequest
from gateway.storage.overrides import open_override_store
from gateway.x402 import reasons
from tests.reload.helpers import REPORT, offered, reloadable_gateway
from tests.support.servers import RecordingUpstream


async def wait_for_price(client: httpx.AsyncClient, price: int, *, within: float) -> float:
    """Seconds until ``/report``'s 402 offers ``price``."""
    start = time.monotonic()
    while offered(await client.get("/report")) != price:
        assert time.monotonic() - start < within, f"still not {price} after {within} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_two_instances_on_one_redis_pick_up_an_admin_price_change(
    base_chain: DevChain, redis_url: str, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    pay_to, upstream = Account.create().address, RecordingUpstream()
    common = {"store_url": redis_url, "pay_to": pay_to, "upstream": upstream}
    async with (
        reloadable_gateway(base_chain, tmp_path, name="one", **common) as one,
        reloadable_gateway(base_chain, tmp_path, name="two", **common) as two,
        httpx.AsyncClient(base_url=one.url) as client_one,
        httpx.AsyncClient(base_url=two.url) as client_two,
    ):
        old_402 = await client_two.get("/report")
        assert offered(old_402) == 10_000

        state = await one.gateway.reloader.set_price(REPORT, 40_000)
        assert (state.price, state.file_price, state.override is not None) == (40_000, 10_000, True)
        assert offered(await client_one.get("/report")) == 40_000  # at once where it was made
        await wait_for_price(client_two, 40_000, within=POLL_SECONDS + 3)
        assert [p.amount for p in two.gateway.reloader.state(REPORT).earlier] == [10_000]

        # The 402 instance two gave before it learned of the change is still honoured there, at its price.
        name, value = two.sign(payer, old_402)
        before = base_chain.balance(payer.address)
        served = await client_two.get("/report", headers={name: value})
        assert served.status_code == 200, served.text
        assert base_chain.balance(payer.address) == before - 10_000

        # A third party sees the override in the store; clearing it brings the file's price back everywhere.
        store = open_override_store(redis_url)
        try:
            overrides = await store.read()
            assert overrides.routes[REPORT].price == 40_000 and overrides.version >= 1
        finally:
            await store.aclose()
        await two.gateway.reloader.set_price(REPORT, None)
        assert offered(await client_two.get("/report")) == 10_000
        await wait_for_price(client_one, 10_000, within=POLL_SECONDS + 3)


async def test_an_admin_change_names_a_configured_route_and_a_positive_price(
    base_chain: DevChain, tmp_path: Path
) -> None:
    async with reloadable_gateway(base_chain, tmp_path) as gw:
        table = gw.gateway.routes
        with pytest.raises(BadRequest) as unknown:
            await gw.gateway.reloader.set_price("GET /nowhere", 5)
        assert unknown.value.reason == reasons.ROUTE_NOT_FOUND
        with pytest.raises(BadRequest) as unknown:
            await gw.gateway.reloader.pause("GET /nowhere", True)
        assert unknown.value.reason == reasons.ROUTE_NOT_FOUND
        for price in (0, -1, True):
            with pytest.raises(BadRequest):
                await gw.gateway.reloader.set_price(REPORT, price)
        assert gw.gateway.routes is table
