"""A metered charge is what the upstream reports, whatever the client asks for (docs/threat-model.md T49):

* a client asking for ``Accept-Encoding: gzip`` would get a compressed answer whose usage the gateway cannot read,
  and so be charged the fallback (nothing, with ``missing = "zero"``; the ceiling otherwise): the upstream of a
  JSON-metered session request is asked for the identity encoding;
* the meter's header is the gateway's: an ``exact`` payer on a metered route (charged the price) does not see it.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain
from gateway.x402.codec import decode_header
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url

PRICE = 1_000
TOKENS = 10  # the usage every answer reports: 10 tokens at 1 atomic unit each
ROUTES: list[dict[str, Any]] = [
    {
        "route": f"GET /tokens-{missing}",
        "price": "0.001",
        "schemes": ["batch-settlement"],
        "meter": {"json": "usage.total_tokens", "unit_price": "0.000001", "missing": missing},
    }
    for missing in ("zero", "ceiling")
] + [
    {
        "route": "GET /metered",
        "price": "0.001",
        "schemes": ["exact", "batch-settlement"],
        "meter": {"header": "x-usage-cost", "unit": "atomic"},
    }
]
QUIET = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600}


class CompressingUpstream:
    """Answers JSON with its usage, gzip-compressed whenever the request accepts gzip (as most servers do), and
    ``/metered`` with its cost in ``x-usage-cost``. Records each request's ``accept-encoding``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"accept-encoding"]
        with self._lock:
            self.seen.append((scope["path"], values[0] if len(values) == 1 else repr(values or None)))
        headers = [(b"content-type", b"application/json")]
        if scope["path"] == "/metered":
            body = b'{"answer": "metered"}'
            headers.append((b"x-usage-cost", b"250"))
        else:
            body = json.dumps({"answer": "x" * 200, "usage": {"total_tokens": TOKENS}}).encode()
            if values and "gzip" in values[0]:
                body = gzip.compress(body)
                headers.append((b"content-encoding", b"gzip"))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def upstream() -> CompressingUpstream:
    return CompressingUpstream()


@pytest.fixture(scope="module")
def gw(
    base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory, upstream: CompressingUpstream
) -> Iterator[GatewayUnderTest]:
    store = sqlite_url(tmp_path_factory.mktemp("metered"))
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=QUIET, upstream=upstream) as gateway:
        yield gateway


def charged(response: httpx.Response) -> int:
    return int(decode_header(response.headers["payment-response"])["extra"]["chargedAmount"])


@pytest.mark.parametrize("missing", ["zero", "ceiling"])
def test_a_client_asking_for_gzip_is_charged_the_usage_in_the_answer(
    gw: GatewayUnderTest, base_chain: DevChain, upstream: CompressingUpstream, missing: str
) -> None:
    url = f"{gw.url}/tokens-{missing}"
    ch = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), session_offer(httpx.get(url)))
    r = httpx.get(url, headers={**ch.header(ch.deposit(10 * PRICE, voucher_max=PRICE)), "accept-encoding": "identity"})
    assert r.status_code == 200, r.text
    assert charged(r) == TOKENS
    for n, encoding in enumerate(["gzip", "gzip, deflate, br", "br;q=1.0, gzip;q=0.8, *;q=0.1"]):
        cumulative = (n + 1) * TOKENS + PRICE
        before = len(upstream.seen)
        r = httpx.get(url, headers={**ch.header(ch.paying(cumulative)), "accept-encoding": encoding})
        assert r.status_code == 200, r.text
        assert charged(r) == TOKENS  # not 0, not the ceiling
        assert r.json()["usage"]["total_tokens"] == TOKENS  # and the client got the answer it paid for
        assert upstream.seen[before:] == [(f"/tokens-{missing}", "identity")]


def test_an_exact_payer_on_a_metered_route_does_not_see_the_meters_header(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    name, value = gw.sign(payer, httpx.get(gw.url + "/metered"))
    r = httpx.get(gw.url + "/metered", headers={name: value}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"answer": "metered"}
    assert "x-usage-cost" not in r.headers
    assert base_chain.balance(payer.address) == 1_000_000 - PRICE  # exact stays fixed-price: the price, not 250
