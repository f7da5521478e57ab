"""The dashboard in a real browser (Debian's headless Chromium over CDP), built from this run's own payments: real
paid requests through a real gateway, recorded by its ledger, a price change and a paused route. The page loads under
its strict CSP (its stylesheet applies, nothing else is fetched), shows the revenue chart, the totals, the routes in
force and the health checks; screenshots land in test-output/ (git-ignored)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from gateway.dev.chain import DevChain
from gateway.http.admin.dashboard import HEADERS, DashboardData, gather_dashboard, render_dashboard
from gateway.http.asgi import Receive, Scope, Send
from gateway.storage.ledger import LedgerQuery, open_ledger_store
from gateway.storage.settlements import open_settlement_journal
from tests.paywall.cdp import Chromium, Page
from tests.paywall.conftest import OUTPUT
from tests.reload.helpers import REPORT, ReloadableGateway, reloadable_gateway
from tests.support.servers import serve_asgi_async


@asynccontextmanager
async def serving(page: bytes) -> AsyncIterator[str]:
    """The rendered page on its own URL, with the headers the admin listener sends it with."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [*HEADERS, (b"content-length", str(len(page)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": page})

    async with serve_asgi_async(app) as url:
        yield url + "/admin/"


async def dashboard(gw: ReloadableGateway, store_url: str) -> DashboardData:
    ledger, journal = open_ledger_store(store_url), open_settlement_journal(store_url)
    try:
        return await gather_dashboard(ledger, gateway=gw.gateway, journal=journal)
    finally:
        await ledger.aclose()
        await journal.aclose()


async def show(browser: Chromium, data: DashboardData, screenshot: Path) -> tuple[Page, str]:
    async with serving(render_dashboard(data)) as url:
        page = await browser.page()
        await page.goto(url)
        # The stylesheet applied: the CSP let exactly it through.
        assert await page.evaluate("getComputedStyle(document.querySelector('.card')).borderTopLeftRadius") == "10px"
        await page.screenshot(screenshot)
        assert [u for u in page.requests if not u.startswith("data:")] == [url]  # nothing else fetched
        return page, url


def text(element_id: str) -> str:
    return f"document.getElementById({json.dumps(element_id)}).textContent"


async def paid(gw: ReloadableGateway, client: httpx.AsyncClient, path: str, payer: object, n: int) -> None:
    for _ in range(n):
        challenge = await client.get(path)
        name, value = gw.sign(payer, challenge)  # type: ignore[arg-type]
        answer = await client.get(path, headers={name: value})
        assert answer.status_code == 200, answer.text


async def test_the_dashboard_shows_this_runs_payments_in_a_browser(
    base_chain: DevChain, tmp_path: Path, browser: Chromium
) -> None:
    payer = base_chain.new_payer(5_000_000)
    store_url = f"sqlite:///{tmp_path / 'receipts.db'}"
    async with (
        reloadable_gateway(base_chain, tmp_path, store_url=store_url) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        pay_to_before = gw.balance(gw.pay_to)
        await paid(gw, client, "/report", payer, 6)
        await asyncio.sleep(1.1)  # a second bucket of the activity chart
        await gw.gateway.reloader.set_price(REPORT, 20_000)
        await paid(gw, client, "/report", payer, 4)
        await paid(gw, client, "/free-soon", payer, 3)
        await gw.gateway.reloader.pause("GET /free-soon", True)
        earned = gw.balance(gw.pay_to) - pay_to_before
        assert earned == 6 * 10_000 + 4 * 20_000 + 3 * 50_000

        ledger = open_ledger_store(store_url)
        try:  # the ledger writes beside the request (and retries a failed write): wait until all 13 are in
            deadline = asyncio.get_running_loop().time() + 20
            while len(recorded := await ledger.find(LedgerQuery(limit=100))) < 13:
                assert asyncio.get_running_loop().time() < deadline, f"{len(recorded)} of 13 in the ledger"
                await asyncio.sleep(0.05)
        finally:
            await ledger.aclose()
        data = await dashboard(gw, store_url)
        assert sum(r.amount for r in data.daily) == earned, data  # the ledger's revenue is what reached pay_to

        page, _ = await show(browser, data, OUTPUT / "dashboard.png")
        assert await page.evaluate(text("total")) == "$0.29"
        assert await page.evaluate(text("count")) == "13"
        bars = await page.evaluate(
            "[...document.querySelectorAll('#activity rect.bar')].filter(r => +r.getAttribute('height') > 0).length"
        )
        assert bars >= 2
        assert await page.evaluate("document.querySelectorAll('#daily rect.bar').length") == 30
        assert await page.evaluate("document.querySelectorAll('#recent tbody tr').length") == 13
        routes = await page.evaluate(text("routes"))
        assert "GET /report" in routes and "$0.02" in routes and "$0.01 until" in routes  # the old price's grace
        assert "paused" in routes
        health = await page.evaluate(text("health"))
        assert "store: ok" in health and "rpc:base: ok" in health and "upstream: ok" in health
        by_route = await page.evaluate(text("by-route"))
        assert "$0.14" in by_route and "$0.15" in by_route


async def test_the_dashboard_of_a_gateway_with_no_payments_renders(
    base_chain: DevChain, tmp_path: Path, browser: Chromium
) -> None:
    store_url = f"sqlite:///{tmp_path / 'receipts.db'}"
    async with reloadable_gateway(base_chain, tmp_path, store_url=store_url) as gw:
        data = await dashboard(gw, store_url)
        page, _ = await show(browser, data, OUTPUT / "dashboard-empty.png")
        assert await page.evaluate(text("total")) == "$0.00"
        assert "no payments yet" in await page.evaluate(text("recent"))
        assert "nothing pending" in await page.evaluate(text("pending"))
        assert "GET /report" in await page.evaluate(text("routes"))
