"""Fail closed on the channel store: while Redis is down, a session request cannot be told from a replay and its
charge cannot be recorded, so it answers 503 and the upstream is never called; nothing is charged (the same voucher
is served once Redis is back, and the cumulative goes on from there). The same when Redis dies while the upstream
is answering: the answer is withheld, nothing is charged, and the channel is usable again once the store is back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain, RedisServer
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.e2e.helpers import HookedUpstream
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway

PRICE = 1_000
ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]}]
QUIET = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600}


@pytest.fixture
def gw(base_chain: DevChain, redis_url: str) -> Iterator[GatewayUnderTest]:
    with running_gateway(
        base_chain, store_url=redis_url, routes=ROUTES, sessions=QUIET, upstream=HookedUpstream()
    ) as gateway:
        yield gateway


def opened(gw: GatewayUnderTest, chain: DevChain, requests: int) -> CraftedChannel:
    ch = CraftedChannel.from_offer(chain.new_payer(1_000_000), session_offer(httpx.get(gw.url + "/session")))
    assert (
        httpx.get(gw.url + "/session", headers=ch.header(ch.deposit(10 * PRICE, voucher_max=PRICE))).status_code == 200
    )
    for n in range(2, requests + 1):
        assert httpx.get(gw.url + "/session", headers=ch.header(ch.paying(n * PRICE))).status_code == 200
    return ch


def cumulative(r: httpx.Response) -> int:
    return int(decode_header(r.headers["payment-response"])["extra"]["channelState"]["chargedCumulativeAmount"])


def test_while_the_store_is_down_session_requests_answer_503_and_the_session_continues_after(
    gw: GatewayUnderTest, base_chain: DevChain, redis_server: RedisServer
) -> None:
    ch = opened(gw, base_chain, 3)
    served = len(gw.upstream.requests)
    nxt = ch.header(ch.paying(4 * PRICE))
    redis_server.stop()
    for headers in (nxt, nxt, ch.header(ch.paying(5 * PRICE))):
        r = httpx.get(gw.url + "/session", headers=headers, timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == reasons.STORE_UNAVAILABLE
    assert len(gw.upstream.requests) == served  # nothing served
    redis_server.start()
    r = httpx.get(gw.url + "/session", headers=nxt, timeout=30)  # the voucher refused during the outage
    assert r.status_code == 200, r.text
    assert cumulative(r) == 4 * PRICE  # nothing was charged meanwhile
    r = httpx.get(gw.url + "/session", headers=ch.header(ch.paying(5 * PRICE)), timeout=30)
    assert r.status_code == 200 and cumulative(r) == 5 * PRICE
    assert len(gw.upstream.requests) == served + 2


def test_a_store_lost_while_the_upstream_answers_withholds_the_answer_and_charges_nothing(
    gw: GatewayUnderTest, base_chain: DevChain, redis_server: RedisServer
) -> None:
    ch = opened(gw, base_chain, 2)
    upstream = gw.upstream
    assert isinstance(upstream, HookedUpstream)
    upstream.on_request = redis_server.stop  # the store dies after the lock, before the charge is committed
    nxt = ch.header(ch.paying(3 * PRICE))
    r = httpx.get(gw.url + "/session", headers=nxt, timeout=30)
    assert r.status_code == 503, r.text  # the answer is withheld: its charge could not be recorded
    assert "payment-response" not in r.headers
    redis_server.start()
    # The channel is not stuck behind the failed request's lock, and the voucher it carried was not charged.
    r = httpx.get(gw.url + "/session", headers=nxt, timeout=30)
    assert r.status_code == 200, r.text
    assert cumulative(r) == 3 * PRICE
