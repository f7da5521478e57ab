"""The dashboard page without a browser (docs/operating.md, "Dashboard"): it renders with no payments and with
thousands (the page stays small: it lists a bounded number of rows and one bar per bucket), its figures are the
ledger's own sums, everything inserted is escaped, its only stylesheet is the one its CSP allows by hash, and a
ledger that cannot answer leaves a page that says so instead of an error."""

from __future__ import annotations

import base64
import hashlib
import random
import re
from datetime import UTC, datetime
from pathlib import Path

from gateway.http.admin.dashboard import HEADERS, RECENT, DashboardData, gather_dashboard, render_dashboard
from gateway.money import format_usd
from gateway.storage.ledger import LedgerEntry, SQLiteLedgerStore

NOW = 1_767_225_600.0 + 13 * 3600  # 2026-01-01 13:00 UTC
HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def entry(i: int, at: float, route: str, amount: int, **kw: object) -> LedgerEntry:
    fields: dict[str, object] = {
        "key": f"exact:8453:usdc:payer:{i}",
        "at": at,
        "route": route,
        "method": "GET",
        "resource": "http://gw/" + route,
        "amount": amount,
        "network": "base",
        "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        "payer": f"0x{i:040x}",
        "pay_to": "0x" + "22" * 20,
        "kind": "exact",
        "tx_hash": f"0x{i:064x}",
        "block": i,
        "request_id": f"req-{i}",
        **kw,
    }
    return LedgerEntry(**fields)  # type: ignore[arg-type]


def policy_hash(page: bytes) -> str:
    [css] = re.findall(rb"<style>(.*?)</style>", page, re.S)
    return "'sha256-" + base64.b64encode(hashlib.sha256(css).digest()).decode() + "'"


def test_an_empty_dashboard_renders_and_its_only_style_is_the_one_its_policy_allows() -> None:
    page = render_dashboard(DashboardData(generated_at=NOW))
    text = page.decode()
    assert "no payments yet" in text and "nothing pending" in text and "no payments in the last 24 hours" in text
    policy = dict(HEADERS)[b"content-security-policy"].decode()
    assert f"style-src {policy_hash(page)};" in policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "script-src" not in policy and b"<script" not in page  # no script at all
    assert b" style=" not in page  # no inline style attribute, which the policy would refuse


async def test_thousands_of_payments_render_a_bounded_page_with_the_ledgers_own_sums(tmp_path: Path) -> None:
    rng = random.Random(7)
    routes = ["GET /report", "POST /agent/prompt", "GET /weather/{city}", f"GET /{HOSTILE}"]
    entries = [
        entry(i, NOW - rng.uniform(0, 12 * 86_400), rng.choice(routes), rng.choice([1_000, 10_000, 250_000]))
        for i in range(4_000)
    ]
    refund = entry(4_000, NOW - 60, "GET /report", -10_000, kind="refund", refund_of=entries[0].key)
    ledger = SQLiteLedgerStore(str(tmp_path / "ledger.db"))
    try:
        for e in [*entries, refund]:
            assert await ledger.record(e)
        data = await gather_dashboard(ledger, now=NOW)
    finally:
        await ledger.aclose()
    everything = [*entries, refund]
    assert len(data.daily) == 30 and data.daily[-1].group == "2026-01-01"
    for day in data.daily:
        assert day.amount == sum(e.amount for e in everything if _day(e.at) == day.group)
    assert {r.group: r.amount for r in data.by_route} == {
        route: sum(e.amount for e in everything if e.route == route) for route in routes
    }
    assert len(data.recent) == RECENT and data.recent[0] == refund
    assert sum(a for _, a, _ in data.activity) == sum(e.amount for e in everything if e.at >= NOW - 86_400)
    assert len(data.activity) <= 61

    page = render_dashboard(data)
    assert len(page) < 200_000  # bounded whatever the ledger holds
    text = page.decode()
    assert HOSTILE not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert text.count("<tr><td") == RECENT + len(routes)  # recent payments, revenue by route (no gateway: no routes)
    assert f'id="total">${format_usd(sum(e.amount for e in everything if e.at >= NOW - 30 * 86_400))}<' in text


async def test_a_ledger_that_cannot_answer_leaves_a_page_that_says_so(tmp_path: Path) -> None:
    ledger = SQLiteLedgerStore(str(tmp_path / "ledger.db"))
    await ledger.aclose()  # every call now fails closed
    data = await gather_dashboard(ledger, now=NOW)
    assert data.unavailable == ("ledger",)
    assert b"Could not read: ledger" in render_dashboard(data)


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")
