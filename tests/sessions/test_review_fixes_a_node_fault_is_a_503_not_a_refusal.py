"""A fault of our node is ours, never the payer's: when the node cannot simulate a deposit (a rate limit, an
overloaded or lagging endpoint), the answer is a 503 that the client retries, not the 402 ``deposit_simulation_failed``
that tells it its deposit is bad. Only a revert is a refusal. Nothing is sent or served meanwhile, and the same
deposit is taken once the node answers again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.sessions.rpc_proxy import RpcProxy
from tests.sessions.test_a_withdrawal_cannot_take_back_what_was_charged import relayer_nonce
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url
from tests.support.servers import serve_asgi

PRICE = 1_000
DEPOSIT = 10_000
ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]}]
QUIET = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600}


def rate_limited(call: dict[str, Any]) -> dict[str, Any] | None:
    if call.get("method") == "eth_estimateGas":
        return {"code": -32005, "message": "request rate exceeded, retry later"}
    return None


def test_a_deposit_the_node_cannot_simulate_is_a_503_and_is_taken_once_it_can(
    base_chain: DevChain, tmp_path: Path
) -> None:
    proxy = RpcProxy(base_chain.url)
    with serve_asgi(proxy) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(
            base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=QUIET, networks=networks
        ) as gw:
            url = gw.url + "/session"
            payer = base_chain.new_payer(1_000_000)
            ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(url)))
            headers = ch.header(ch.deposit(DEPOSIT, voucher_max=PRICE))
            sent = relayer_nonce(base_chain)
            proxy.fault = rate_limited
            r = httpx.get(url, headers=headers, timeout=30)
            assert r.status_code == 503, r.text
            assert r.json()["error"] == reasons.CHAIN_UNAVAILABLE
            assert proxy.refused  # the node did fail the simulation
            assert relayer_nonce(base_chain) == sent
            assert base_chain.balance(payer.address) == 1_000_000
            assert gw.upstream.requests == []

            proxy.fault = lambda call: None
            r = httpx.get(url, headers=headers, timeout=30)  # the same deposit, retried
            assert r.status_code == 200, r.text
            assert base_chain.balance(payer.address) == 1_000_000 - DEPOSIT
            assert len(gw.upstream.requests) == 1
