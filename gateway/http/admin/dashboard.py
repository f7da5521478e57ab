"""The operator's dashboard: one server-rendered page on the admin listener (``GET /admin/``; docs/operating.md,
"Dashboard").

It shows revenue over time (two inline SVG charts: by day for :data:`DAYS` days, and the latest payments in time
buckets sized to their span), revenue by route, the routes with their prices in force, recent payments, settlements
not final yet (and session charges not claimed yet), and the health of the store, each RPC and the upstream. The page
is built from :class:`DashboardData` (:func:`gather_dashboard` reads it from the ledger, the gateway and the
settlement journal) by :func:`render_dashboard`, a pure function.

No build step, no CDN, no script: HTML and one inline stylesheet, allowed by its SHA-256 hash in a
Content-Security-Policy as strict as the paywall's (:data:`HEADERS`; the page repeats it in a ``<meta>``). Bars are
SVG geometry, not inline styles, which the policy would refuse. Everything inserted is escaped (routes and
descriptions come from the config, payers and hashes from the ledger). Its size is bounded whatever the ledger
holds: at most :data:`RECENT` payments, :data:`PENDING` pending rows and one bar per bucket; :data:`ACTIVITY`
payments at most are read for the activity chart.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.engine.reload import RouteState
from gateway.errors import GatewayError
from gateway.money import format_usd
from gateway.storage.ledger import LedgerEntry, LedgerQuery, LedgerStore, Revenue
from gateway.storage.settlements import SettlementJournal

if TYPE_CHECKING:
    from gateway.http.app import Gateway

__all__ = [
    "ACTIVITY",
    "DAYS",
    "HEADERS",
    "PENDING",
    "RECENT",
    "DashboardData",
    "PendingRow",
    "gather_dashboard",
    "render_dashboard",
]

log = logging.getLogger("gateway.admin")

DAYS = 30  # the daily chart's span
RECENT = 50  # payments listed
PENDING = 50  # pending rows listed (per source)
ACTIVITY = 5000  # payments the activity chart reads at most (the newest, within a day)
ACTIVITY_WINDOW = 86_400.0
_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)  # seconds; at most ~60 bars
MIN_BARS = 30
_DAY = 86_400


@dataclass(frozen=True, slots=True)
class PendingRow:
    kind: str  # "settlement": served and settled, not final yet; "session": charged, not claimed yet
    network: str
    reference: str  # the settlement's transaction hash, or the channel id
    amount: int | None  # atomic units, when known
    since: float  # epoch seconds
    state: str  # for people: "mined in block 123", "not seen in a block yet", "3 requests' worth owed"


@dataclass(frozen=True, slots=True)
class DashboardData:
    generated_at: float
    daily: tuple[Revenue, ...] = ()  # oldest first, one per day (UTC), zero-filled
    activity: tuple[tuple[float, int, int], ...] = ()  # (bucket start, amount, payments), oldest first
    activity_bucket: int = 60  # seconds per activity bar
    activity_capped: bool = False  # more payments than ACTIVITY in the window: the chart shows the newest
    by_route: tuple[Revenue, ...] = ()  # over the daily chart's span, largest first
    recent: tuple[LedgerEntry, ...] = ()
    pending: tuple[PendingRow, ...] = ()
    health: Mapping[str, str] = field(default_factory=dict)  # {"store": "ok", "rpc:base": "timeout", ...}
    routes: tuple[RouteState, ...] = ()
    unavailable: tuple[str, ...] = ()  # the sections that could not be read (shown as such, never a 500)


# ----------------------------------------------------------------------------------------------------- gathering


async def gather_dashboard(
    ledger: LedgerStore,
    *,
    gateway: Gateway | None = None,
    journal: SettlementJournal | None = None,
    now: float | None = None,
) -> DashboardData:
    """Everything the page shows, read now. ``gateway``: health, routes and session channels; ``journal``: the
    settlement journal (settlements not final yet). A section whose source cannot answer is marked unavailable;
    the page still renders."""
    now = time.time() if now is None else now
    unavailable: list[str] = []
    first_day = (int(now) // _DAY - (DAYS - 1)) * _DAY
    daily: tuple[Revenue, ...] = ()
    by_route: tuple[Revenue, ...] = ()
    recent: tuple[LedgerEntry, ...] = ()
    activity: tuple[tuple[float, int, int], ...] = ()
    bucket, capped = 60, False
    try:
        days = {r.group: r for r in await ledger.revenue("day", since=first_day)}
        daily = tuple(days.get(d, Revenue(d, 0, 0)) for d in (_day(first_day + i * _DAY) for i in range(DAYS)))
        by_route = tuple(sorted(await ledger.revenue("route", since=first_day), key=lambda r: (-r.amount, r.group)))
        recent = tuple(await ledger.find(LedgerQuery(limit=RECENT)))
        latest = await ledger.find(LedgerQuery(since=now - ACTIVITY_WINDOW, limit=ACTIVITY))
        activity, bucket = _bucketed(latest, now)
        capped = len(latest) >= ACTIVITY
    except GatewayError:
        log.warning("dashboard: the ledger could not be read", exc_info=True)
        unavailable.append("ledger")
    health: dict[str, str] = {}
    routes: tuple[RouteState, ...] = ()
    pending: list[PendingRow] = []
    if gateway is not None:
        health = await gateway.readiness.check()
        routes = tuple(gateway.reloader.states())
        pending.extend(await _unclaimed(gateway, now, unavailable))
    if journal is not None and gateway is not None:
        pending[:0] = await _unsettled(journal, list(gateway.payments.engine.networks), unavailable)
    return DashboardData(
        generated_at=now,
        daily=daily,
        activity=activity,
        activity_bucket=bucket,
        activity_capped=capped,
        by_route=by_route,
        recent=recent,
        pending=tuple(pending),
        health=health,
        routes=routes,
        unavailable=tuple(unavailable),
    )


async def _unsettled(journal: SettlementJournal, networks: Sequence[str], unavailable: list[str]) -> list[PendingRow]:
    rows: list[PendingRow] = []
    try:
        for name in networks:
            for e in await journal.pending(name, limit=PENDING):
                state = "not seen in a block yet" if e.block_number is None else f"mined in block {e.block_number}"
                rows.append(PendingRow("settlement", e.network, e.tx_hash, None, e.created_at, state))
    except GatewayError:
        log.warning("dashboard: the settlement journal could not be read", exc_info=True)
        unavailable.append("settlements")
    return rows


async def _unclaimed(gateway: Gateway, now: float, unavailable: list[str]) -> list[PendingRow]:
    engine = gateway.payments.engine
    if engine.sessions is None:
        return []
    rows: list[PendingRow] = []
    try:
        for name, net in engine.networks.items():
            for ch in await engine.sessions.store.unclaimed(net.config.chain_id, now=now, limit=PENDING):
                rows.append(PendingRow("session", name, ch.channel_id, ch.unclaimed, ch.updated_at, "not claimed yet"))
    except GatewayError:
        log.warning("dashboard: the channel store could not be read", exc_info=True)
        unavailable.append("sessions")
    return rows


def _bucketed(entries: Sequence[LedgerEntry], now: float) -> tuple[tuple[tuple[float, int, int], ...], int]:
    """Payments (newest first) summed into buckets sized so that their span fills about 60 bars."""
    if not entries:
        return (), 60
    oldest = min(e.at for e in entries)
    span = max(now - oldest, 1.0)
    size = next((b for b in _BUCKETS if span / b <= 60), _BUCKETS[-1])
    last = math.floor(now / size) * size
    start = min(math.floor(oldest / size) * size, last - (MIN_BARS - 1) * size)  # a few payments: still a timeline
    count = int((last - start) // size) + 1
    amounts, payments = [0] * count, [0] * count
    for e in entries:
        i = min(max(int((e.at - start) // size), 0), count - 1)
        amounts[i] += e.amount
        payments[i] += 1 if e.kind != "refund" else 0
    return tuple((start + i * size, amounts[i], payments[i]) for i in range(count)), size


def _day(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d")


# ----------------------------------------------------------------------------------------------------- rendering

_CSS = """
:root { color-scheme: light dark; --fg: #16181d; --muted: #5d6472; --bg: #f4f5f8; --card: #fff; --line: #dfe2e8;
  --accent: #1652f0; --ok: #0b7a3e; --bad: #b42318; --warn: #a15c00; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e8eaef; --muted: #9aa1ae; --bg: #111318; --card: #1a1d24; --line: #2c313b; --accent: #4c7dff;
    --ok: #3ccf7c; --bad: #ff6b5e; --warn: #f0a640; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 20px 40px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 0 0 10px; }
.muted { color: var(--muted); font-size: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px;
  margin: 0 0 14px; overflow-x: auto; }
.totals { display: flex; gap: 28px; flex-wrap: wrap; }
.total b { display: block; font-size: 24px; }
.health { display: flex; gap: 8px; flex-wrap: wrap; list-style: none; margin: 0; padding: 0; }
.health li { border: 1px solid var(--line); border-radius: 999px; padding: 2px 10px; font-size: 12px; }
.health .ok { color: var(--ok); border-color: var(--ok); }
.health .bad { color: var(--bad); border-color: var(--bad); font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { text-align: left; padding: 5px 8px; border-top: 1px solid var(--line); white-space: nowrap; }
th { color: var(--muted); font-weight: 600; border-top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.empty { color: var(--muted); font-style: italic; padding: 8px 0; }
.paused { color: var(--warn); font-weight: 600; }
.refund { color: var(--bad); }
svg { display: block; width: 100%; height: auto; }
svg .bar { fill: var(--accent); }
svg .axis { stroke: var(--line); stroke-width: 1; }
svg text { fill: var(--muted); font-size: 11px; font-family: inherit; }
.unavailable { color: var(--bad); font-weight: 600; }
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# As strict as the paywall's, stricter still: no script at all, no connections.
_POLICY = f"default-src 'none'; style-src {_sha256(_CSS)}; img-src data:; base-uri 'none'; form-action 'none'"
HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-security-policy", (_POLICY + "; frame-ancestors 'none'").encode("ascii")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _usd(atomic: int) -> str:
    return ("-$" if atomic < 0 else "$") + format_usd(abs(atomic))


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%SZ")


def _short(value: str, keep: int = 10) -> str:
    return value if len(value) <= 2 * keep + 1 else f"{value[:keep]}…{value[-keep + 2 :]}"


def _chart(bars: Sequence[tuple[str, int, str]], *, label: str) -> str:
    """An SVG bar chart: (x label, atomic amount, hover title) per bar; labels under the first, middle and last."""
    width, height, left, bottom, top = 1000, 190, 64, 24, 10
    plot_h = height - bottom - top
    peak = max((v for _, v, _ in bars), default=0)
    scale = _nice(peak)
    n = max(len(bars), 1)
    step = (width - left - 8) / n
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg">',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 4}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{width - 4}" y2="{top}"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{_e(_usd(scale))}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">$0</text>',
    ]
    for i, (_, value, title) in enumerate(bars):
        h = 0.0 if scale == 0 else plot_h * max(value, 0) / scale
        if value > 0:
            h = max(h, 1.5)  # a payment is never invisible next to a large day
        x = left + i * step + step * 0.12
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{step * 0.76:.1f}" height="{h:.1f}">'
            f"<title>{_e(title)}</title></rect>"
        )
    for i in sorted({0, len(bars) // 2, len(bars) - 1} if bars else set()):
        x = left + i * step + step / 2
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">{_e(bars[i][0])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _nice(peak: int) -> int:
    """A round axis maximum at or above ``peak`` (1, 2 or 5 times a power of ten atomic units)."""
    if peak <= 0:
        return 0
    power = 1
    while power * 10 <= peak:
        power *= 10
    for m in (1, 2, 5, 10):
        if m * power >= peak:
            return m * power
    return 10 * power


def _daily_chart(data: DashboardData) -> str:
    bars = [(r.group[5:], r.amount, f"{r.group}: {_usd(r.amount)} from {r.payments} payment(s)") for r in data.daily]
    return _chart(bars, label=f"revenue per day, last {len(bars)} days")


def _activity_chart(data: DashboardData) -> str:
    size = data.activity_bucket
    fmt = "%H:%M:%S" if size < 60 else "%H:%M"
    bars = []
    for start, amount, count in data.activity:
        at = datetime.fromtimestamp(start, UTC).strftime(fmt)
        bars.append((at, amount, f"{at} UTC (+{size} s): {_usd(amount)} from {count} payment(s)"))
    return _chart(bars, label=f"revenue per {size} seconds")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: Sequence[int] = (), empty: str) -> str:
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    cls = [' class="num"' if i in numeric else "" for i in range(len(head))]
    out = ["<table><thead><tr>", *(f"<th{cls[i]}>{_e(h)}</th>" for i, h in enumerate(head)), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td{cls[i]}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _health(data: DashboardData) -> str:
    if not data.health:
        return '<p class="empty">no health checks (not attached to a gateway)</p>'
    items = "".join(
        f'<li class="{"ok" if result == "ok" else "bad"}">{_e(name)}: {_e(result)}</li>'
        for name, result in data.health.items()
    )
    return f'<ul class="health" id="health">{items}</ul>'


def render_dashboard(data: DashboardData) -> bytes:
    """The page for ``data``: complete HTML, to be sent with :data:`HEADERS`."""
    window_total = sum(r.amount for r in data.daily)
    window_count = sum(r.payments for r in data.daily)
    today = data.daily[-1] if data.daily else Revenue(_day(data.generated_at), 0, 0)
    unavailable = (
        f'<p class="unavailable">Could not read: {_e(", ".join(data.unavailable))}</p>' if data.unavailable else ""
    )
    routes = _table(
        ["route", "price", "file price", "state", "earlier prices honoured"],
        [
            [
                f"<code>{_e(s.route)}</code>",
                _e(_usd(s.price)),
                _e(_usd(s.file_price)) + (" (overridden)" if s.override and s.override.price is not None else ""),
                '<span class="paused">paused</span>' if s.paused else "serving",
                _e(", ".join(f"{_usd(p.amount)} until {_clock(p.until)}" for p in s.earlier) or "—"),
            ]
            for s in data.routes
        ],
        numeric=(1, 2),
        empty="no routes (not attached to a gateway)",
    )
    by_route = _table(
        ["route", "revenue", "payments"],
        [[f"<code>{_e(r.group)}</code>", _e(_usd(r.amount)), _e(r.payments)] for r in data.by_route],
        numeric=(1, 2),
        empty=f"no payments in the last {DAYS} days",
    )
    recent = _table(
        ["time (UTC)", "route", "amount", "kind", "network", "payer", "tx"],
        [
            [
                _e(_time(p.at)),
                f"<code>{_e(p.route)}</code>",
                (f'<span class="refund">{_e(_usd(p.amount))}</span>' if p.amount < 0 else _e(_usd(p.amount))),
                _e(p.kind),
                _e(p.network),
                f'<code title="{_e(p.payer)}">{_e(_short(p.payer))}</code>',
                f'<code title="{_e(p.tx_hash)}">{_e(_short(p.tx_hash))}</code>' if p.tx_hash else "—",
            ]
            for p in data.recent
        ],
        numeric=(2,),
        empty="no payments yet",
    )
    pending = _table(
        ["since (UTC)", "kind", "network", "reference", "owed", "state"],
        [
            [
                _e(_time(p.since)),
                _e(p.kind),
                _e(p.network),
                f'<code title="{_e(p.reference)}">{_e(_short(p.reference))}</code>',
                "—" if p.amount is None else _e(_usd(p.amount)),
                _e(p.state),
            ]
            for p in data.pending
        ],
        numeric=(4,),
        empty="nothing pending: every settlement is final and every session charge claimed",
    )
    capped = f" (the newest {ACTIVITY})" if data.activity_capped else ""
    activity = _activity_chart(data) if data.activity else '<p class="empty">no payments in the last 24 hours</p>'
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(_POLICY)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>x402 gateway: dashboard</title>
<style>{_CSS}</style></head>
<body><main>
<header><h1>x402 gateway</h1><p class="muted">generated {_e(_time(data.generated_at))}</p>{unavailable}</header>
<section class="card" id="summary"><div class="totals">
<div class="total"><span class="muted">revenue, last {DAYS} days</span><b id="total">{_e(_usd(window_total))}</b></div>
<div class="total"><span class="muted">payments, last {DAYS} days</span><b id="count">{window_count}</b></div>
<div class="total"><span class="muted">today (UTC)</span><b id="today">{_e(_usd(today.amount))}</b></div>
</div></section>
<section class="card"><h2>Health</h2>{_health(data)}</section>
<section class="card" id="daily"><h2>Revenue per day</h2>{_daily_chart(data)}</section>
<section class="card" id="activity">
<h2>Latest payments, per {data.activity_bucket} s{_e(capped)}</h2>{activity}</section>
<section class="card" id="by-route"><h2>Revenue by route, last {DAYS} days</h2>{by_route}</section>
<section class="card" id="routes"><h2>Routes in force</h2>{routes}</section>
<section class="card" id="pending"><h2>Pending settlements</h2>{pending}</section>
<section class="card" id="recent"><h2>Recent payments</h2>{recent}</section>
</main></body></html>
"""
    return page.encode("utf-8")
