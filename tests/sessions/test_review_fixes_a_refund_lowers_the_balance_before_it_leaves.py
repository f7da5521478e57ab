"""Vouchers on a known channel are checked against the store's mirror of its balance, with no RPC call; a mirror
above the chain's balance serves vouchers over money that is gone. A refund therefore lowers the mirror *before* its
transaction leaves: when nothing after the transaction reaches the store (here the node stops answering reads the
moment the refund is sent; a crash or a store outage there is the same), the mirror is low, never high.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.sessions.crafted import CraftedChannel, corrective, session_offer
from tests.sessions.rpc_proxy import SEND_METHODS, RpcProxy
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url
from tests.support.servers import serve_asgi

PRICE = 1_000
DEPOSIT = 10_000
ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]}]
QUIET = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600}  # no claimer reads to refresh the mirror


class ReadsFailAfterASend:
    """Once armed: the next transaction goes through, then every contract read fails (a node falling over)."""

    def __init__(self) -> None:
        self.armed = False
        self.sent = False

    def __call__(self, call: dict[str, Any]) -> dict[str, Any] | None:
        if not self.armed:
            return None
        if call.get("method") in SEND_METHODS:
            self.sent = True
        elif self.sent and call.get("method") == "eth_call":
            return {"code": -32000, "message": "header not found"}
        return None


def test_a_refund_whose_aftermath_is_lost_leaves_the_mirror_at_the_lowered_balance(
    base_chain: DevChain, tmp_path: Path
) -> None:
    proxy = RpcProxy(base_chain.url)
    fault = ReadsFailAfterASend()
    proxy.fault = fault
    with serve_asgi(proxy) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(
            base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=QUIET, networks=networks
        ) as gw:
            url = gw.url + "/session"
            payer = base_chain.new_payer(1_000_000)
            ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(url)))
            assert httpx.get(url, headers=ch.header(ch.deposit(DEPOSIT, voucher_max=PRICE))).status_code == 200

            fault.armed = True
            r = httpx.get(url, headers=ch.header(ch.refund(PRICE)), timeout=30)
            assert r.status_code in (200, 503), r.text  # the refund landed; whether we could say so is not the point
            assert fault.sent and proxy.refused  # the read after the refund did fail
            fault.armed = False
            state = ch.onchain(base_chain)
            assert (state.balance, state.total_claimed) == (PRICE, PRICE)  # everything but the charge went back
            assert base_chain.balance(payer.address) == 1_000_000 - PRICE

            # The mirror (what a stale voucher's corrective 402 reports) has the refunded balance.
            stale = httpx.get(url, headers=ch.header(ch.paying(PRICE)), timeout=30)
            assert int(corrective(stale)["channelState"]["balance"]) == PRICE
            # So the next voucher, over money that went back to the payer, is refused and not served.
            served = len(gw.upstream.requests)
            r = httpx.get(url, headers=ch.header(ch.paying(2 * PRICE)), timeout=30)
            assert r.status_code == 402, r.text
            assert decode_header(r.headers["payment-required"])["error"] == reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE
            assert len(gw.upstream.requests) == served
