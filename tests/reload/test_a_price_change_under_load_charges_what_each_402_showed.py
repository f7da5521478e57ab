"""A price changed while paid requests run (docs/operating.md, "Prices and routes at run time"): every payment
is charged exactly the price of the 402 it answered, none is refused or answered 5xx, 402s answered before the
change and paid after it are served at the old price, and every 402 issued after the change shows the new one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from tests.reload.helpers import REPORT, ROUTES, ReloadableGateway, offered, reloadable_gateway

WORKERS = 6
OLD, NEW = 10_000, 25_000  # $0.01 -> $0.025


class Load:
    """Payers running 402 -> pay cycles until told to stop; every outcome kept."""

    def __init__(self, gw: ReloadableGateway, payers: list[LocalAccount]) -> None:
        self.gw = gw
        self.payers = payers
        self.stop = asyncio.Event()
        self.paid: list[tuple[str, int, int]] = []  # (payer, price offered by the 402 it answered, status)
        self.challenges: list[tuple[float, float, int]] = []  # (asked at, answered at, price offered)

    async def run(self, payer: LocalAccount) -> None:
        async with httpx.AsyncClient(base_url=self.gw.url, timeout=60) as client:
            while not self.stop.is_set():
                asked = time.monotonic()
                challenge = await client.get("/report")
                price = offered(challenge)
                self.challenges.append((asked, time.monotonic(), price))
                name, value = self.gw.sign(payer, challenge)
                answer = await client.get("/report", headers={name: value})
                self.paid.append((payer.address, price, answer.status_code))

    async def until(self, count: int) -> None:
        while len(self.paid) < count:
            await asyncio.sleep(0.02)


async def test_a_price_change_under_load_charges_each_payment_the_price_of_its_402(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payers = [base_chain.new_payer(5_000_000) for _ in range(WORKERS)]
    stale_payer = base_chain.new_payer(1_000_000)
    async with reloadable_gateway(base_chain, tmp_path) as gw:
        start = {p.address: gw.balance(p.address) for p in [*payers, stale_payer]}
        pay_to_start = gw.balance(gw.pay_to)
        load = Load(gw, payers)
        workers = [asyncio.create_task(load.run(p)) for p in payers]
        await load.until(12)

        # 402s answered at the old price, to be paid only after the change
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            stale = [await client.get("/report") for _ in range(3)]
        assert [offered(r) for r in stale] == [OLD] * 3

        gw.write(routes=[{**ROUTES[0], "price": "0.025"}, ROUTES[1]])
        changing = time.monotonic()
        result = await gw.gateway.reloader.reload()
        changed = time.monotonic()
        assert result.ok, result.message
        assert result.changed == (f"{REPORT}: price $0.01 -> $0.025",)

        before = len(load.paid)
        await load.until(before + 18)
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            for r in stale:  # paid within their validity, after the change: served at the old price
                name, value = gw.sign(stale_payer, r)
                answer = await client.get("/report", headers={name: value})
                assert answer.status_code == 200, answer.text
                load.paid.append((stale_payer.address, OLD, answer.status_code))
        load.stop.set()
        await asyncio.gather(*workers)

    statuses = {status for _, _, status in load.paid}
    assert statuses == {200}, [p for p in load.paid if p[2] != 200]
    # Each payer was charged exactly the prices of the 402s it answered, no more and no less.
    for payer in [*payers, stale_payer]:
        due = sum(price for address, price, _ in load.paid if address == payer.address)
        assert start[payer.address] - gw.balance(payer.address) == due, payer.address
    assert gw.balance(gw.pay_to) - pay_to_start == sum(price for _, price, _ in load.paid)
    assert len(gw.upstream.requests) == len(load.paid)
    # Both prices were paid under load; 402s asked for after the reload returned show only the new price, those
    # answered before it began only the old one.
    assert {price for _, price, _ in load.paid} == {OLD, NEW}
    assert {price for asked, _, price in load.challenges if asked > changed} == {NEW}
    assert {price for _, answered, price in load.challenges if answered < changing} == {OLD}
