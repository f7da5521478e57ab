"""The withdrawal race: vouchers reserve nothing on chain, so a payer who starts a timed withdrawal could take back
everything we charged but did not claim yet. The claimer must see the withdrawal and claim before its delay ends;
the payer's ``finalizeWithdraw`` then returns only the unclaimed remainder, and ``pay_to`` ends with exactly the
sum charged. And once the withdrawal ends within ``withdraw_margin``, no new voucher is served (its charge could
not be claimed in time).

A private chain (its clock is moved past the withdrawal delay); the payer calls the contract directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from gateway.dev.chain import DevChain, RedisServer, start_dev_chain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.sessions.test_official_client_sessions import wait_for
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url
from tests.support.servers import read_body, serve_asgi

PRICE = 1_000
DEPOSIT = 100_000
ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]}]
# The claimer passes every 0.2 s but nothing is old or large enough to claim: only a withdrawal makes it claim.
WATCHING = {
    **SESSIONS,
    "min_deposit": "0.10",
    "claim_interval": 0.2,
    "claim_after": 3600,
    "settle_interval": 0.2,
    "withdraw_margin": 600,  # a withdrawal's last 10 minutes (of 15): no new charges
}


@pytest.fixture(scope="module")
def chain() -> Iterator[DevChain]:
    dev = start_dev_chain(8453)
    try:
        yield dev
    finally:
        dev.stop()


def relayer_nonce(chain: DevChain) -> int:
    address = Account.from_key(chain.relayer_key).address
    return int(chain.rpc("eth_getTransactionCount", [address, "latest"]), 16)


def test_a_withdrawal_gets_only_the_unclaimed_remainder_and_pay_to_gets_every_charge(
    chain: DevChain, tmp_path: Path
) -> None:
    store = sqlite_url(tmp_path)
    pay_to = Account.create().address
    payer = chain.new_payer(1_000_000)
    with running_gateway(chain, store_url=store, routes=ROUTES, sessions=WATCHING, pay_to=pay_to) as gw:
        url = gw.url + "/session"
        ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(url)))
        assert httpx.get(url, headers=ch.header(ch.deposit(DEPOSIT, voucher_max=PRICE))).status_code == 200
        for n in range(2, 6):
            assert httpx.get(url, headers=ch.header(ch.paying(n * PRICE))).status_code == 200
        time.sleep(1.0)  # five claimer passes
        assert ch.onchain(chain).total_claimed == 0  # nothing was due: charges are small and young

        # The payer asks for everything back; what we charged is not reserved on chain.
        ch.call_as_payer(chain, "initiateWithdraw", DEPOSIT)
        assert ch.onchain(chain).withdraw_initiated_at > 0
        # The withdrawal ends in 15 minutes, outside the margin: a voucher is still served, and must be claimed too.
        r = httpx.get(url, headers=ch.header(ch.paying(6 * PRICE)))
        assert r.status_code == 200, r.text
        charged = 6 * PRICE
        wait_for(lambda: ch.onchain(chain).total_claimed == charged, timeout=20)
        assert len(gw.upstream.requests) == 6

    # Later, the withdrawal ends within the margin (here: a gateway whose margin is the whole delay): refused.
    closing = {**WATCHING, "withdraw_margin": 900}
    with running_gateway(chain, store_url=store, routes=ROUTES, sessions=closing, pay_to=pay_to) as gw:
        url = gw.url + "/session"
        r = httpx.get(url, headers=ch.header(ch.paying(charged + PRICE)))
        assert r.status_code == 402, r.text
        assert decode_header(r.headers["payment-required"])["error"] == reasons.SESSION_WITHDRAWING
        assert gw.upstream.requests == []  # not served

        chain.advance_time(901)
        before = chain.balance(payer.address)
        ch.call_as_payer(chain, "finalizeWithdraw")
        assert chain.balance(payer.address) - before == DEPOSIT - charged  # only the unclaimed remainder
        state = ch.onchain(chain)
        assert (state.balance, state.total_claimed, state.withdraw_initiated_at) == (charged, charged, 0)
        wait_for(lambda: chain.balance(pay_to) == charged, timeout=20)  # swept: exactly the sum charged


def test_an_idle_claimer_sends_no_transactions(chain: DevChain, tmp_path: Path) -> None:
    # Claims and sweeps cost gas: a pass with nothing owed and nothing claimed-but-unswept must send nothing.
    with running_gateway(chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=WATCHING) as gw:
        payer = chain.new_payer(1_000_000)
        url = gw.url + "/session"
        ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(url)))
        assert httpx.get(url, headers=ch.header(ch.deposit(DEPOSIT, voucher_max=PRICE))).status_code == 200
        sent = relayer_nonce(chain)
        time.sleep(1.5)  # several claim and sweep passes
        assert relayer_nonce(chain) == sent


def test_a_withdrawal_started_while_the_store_is_down_is_still_claimed_in_time(
    chain: DevChain, redis_url: str, redis_server: RedisServer
) -> None:
    # The claimer reads the WithdrawInitiated log during the outage but cannot record it: it must read it again
    # once the store is back, not skip past it (the payer would then take back every unclaimed charge).
    payer = chain.new_payer(1_000_000)
    with running_gateway(chain, store_url=redis_url, routes=ROUTES, sessions=WATCHING) as gw:
        url = gw.url + "/session"
        ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(url)))
        assert httpx.get(url, headers=ch.header(ch.deposit(DEPOSIT, voucher_max=PRICE))).status_code == 200
        for n in range(2, 6):
            assert httpx.get(url, headers=ch.header(ch.paying(n * PRICE))).status_code == 200
        charged = 5 * PRICE
        redis_server.stop()
        ch.call_as_payer(chain, "initiateWithdraw", DEPOSIT)
        passes = gw.app.payments.engine.claimer.stats.failures
        wait_for(lambda: gw.app.payments.engine.claimer.stats.failures >= passes + 2)  # passes that saw the log
        redis_server.start()
        wait_for(lambda: ch.onchain(chain).total_claimed == charged, timeout=20)
        chain.advance_time(901)
        before = chain.balance(payer.address)
        ch.call_as_payer(chain, "finalizeWithdraw")
        assert chain.balance(payer.address) - before == DEPOSIT - charged
        wait_for(lambda: chain.balance(gw.pay_to) == charged, timeout=20)


class RangeCappedRpc:
    """A JSON-RPC pass-through to a dev chain that refuses ``eth_getLogs`` over more than ``limit`` blocks, as
    hosted providers do (some free tiers allow 10)."""

    def __init__(self, target: str, limit: int) -> None:
        self.target = target
        self.limit = limit
        self.refused = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        doc = json.loads(body)
        calls = doc if isinstance(doc, list) else [doc]
        answers = [await asyncio.to_thread(self._answer, call) for call in calls]
        out = json.dumps(answers if isinstance(doc, list) else answers[0]).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    def _answer(self, call: dict[str, Any]) -> dict[str, Any]:
        if call.get("method") == "eth_getLogs":
            flt = call["params"][0]
            first, last = int(flt.get("fromBlock", "0x0"), 16), int(flt.get("toBlock", "0x0"), 16)
            if last - first + 1 > self.limit:
                self.refused += 1
                error = {"code": -32600, "message": f"eth_getLogs is limited to a {self.limit} block range"}
                return {"jsonrpc": "2.0", "id": call.get("id"), "error": error}
        answer: dict[str, Any] = httpx.post(self.target, json=call, timeout=30).json()
        return answer


def test_a_node_that_caps_the_log_range_still_shows_the_claimer_every_withdrawal(
    chain: DevChain, tmp_path: Path
) -> None:
    chain.rpc("anvil_mine", [hex(40), "0x0"])  # more history than one capped eth_getLogs may cover
    rpc = RangeCappedRpc(chain.url, limit=10)
    payer = chain.new_payer(1_000_000)
    with serve_asgi(rpc) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(
            chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=WATCHING, networks=networks
        ) as gw:
            url = gw.url + "/session"
            ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(url)))
            assert httpx.get(url, headers=ch.header(ch.deposit(DEPOSIT, voucher_max=PRICE))).status_code == 200
            for n in range(2, 4):
                assert httpx.get(url, headers=ch.header(ch.paying(n * PRICE))).status_code == 200
            charged = 3 * PRICE
            ch.call_as_payer(chain, "initiateWithdraw", DEPOSIT)
            chain.rpc("anvil_mine", [hex(25), "0x0"])  # and the chain moves on
            wait_for(lambda: ch.onchain(chain).total_claimed == charged, timeout=20)
            wait_for(lambda: chain.balance(gw.pay_to) == charged, timeout=20)  # sweeps still run too
    assert rpc.refused > 0  # the node did refuse the wider ranges
