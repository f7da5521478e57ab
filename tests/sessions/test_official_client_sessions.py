"""Interoperability: the official ``x402`` PyPI client pays by channel (``batch-settlement``) on the anvil fixture.

One deposit, then vouchers only: no transaction per request, each upstream call once, and after claim + sweep
``payTo`` gained exactly the sum charged; a metered route charges what the upstream reports; a cooperative refund
returns exactly the unclaimed remainder.
"""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme, RefundOptions
from x402.mechanisms.evm.signers import EthAccountSigner

from gateway.dev.chain import DevChain
from gateway.x402.codec import decode_header
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url
from tests.support.servers import Behaviour, RecordingUpstream

PRICE = 1_000  # $0.001 per request: the voucher's ceiling
ROUTES: list[dict[str, Any]] = [
    {"route": "GET /session", "price": "0.001", "schemes": ["exact", "batch-settlement"]},
    {"route": "POST /chat", "price": "0.001", "schemes": ["exact", "batch-settlement"]},
    {
        "route": "GET /metered",
        "price": "0.001",
        "schemes": ["batch-settlement"],
        "meter": {"header": "x-usage-cost", "unit": "atomic"},
    },
    {
        "route": "GET /tokens",
        "price": "0.001",
        "schemes": ["batch-settlement"],
        "meter": {"json": "usage.total_tokens", "unit_price": "0.000002", "missing": "zero"},
    },
]
# A deposit covers 1,000 requests at the ceiling; the claimer claims and sweeps within a second of being asked.
FAST_CLAIMS = {**SESSIONS, "min_deposit": "1.00", "claim_interval": 0.2, "claim_after": 1.0, "settle_interval": 0.2}


def session_client(payer: LocalAccount) -> tuple[x402Client, BatchSettlementEvmScheme]:
    scheme = BatchSettlementEvmScheme(EthAccountSigner(payer))
    client = x402Client()
    client.register("eip155:8453", scheme)
    return client, scheme


def relayer_nonce(chain: DevChain) -> int:
    from eth_account import Account

    address = Account.from_key(chain.relayer_key).address
    return int(chain.rpc("eth_getTransactionCount", [address, "latest"]), 16)


async def pay_many(client: x402Client, url: str, n: int) -> list[httpx.Response]:
    out = []
    async with x402HttpxClient(client, timeout=30) as http:
        for _ in range(n):
            out.append(await http.get(url))
    return out


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_one_deposit_then_a_hundred_vouchers_and_pay_to_gains_exactly_the_sum(
    base_chain: DevChain, tmp_path: Any
) -> None:
    payer = base_chain.new_payer(5_000_000)
    client, _scheme = session_client(payer)
    store = sqlite_url(tmp_path)
    quiet = {**FAST_CLAIMS, "claim_interval": 3600}  # no claims while the requests run
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=quiet) as gw:
        pay_to = gw.pay_to
        txs_before = relayer_nonce(base_chain)
        paid_before = gw.balance(pay_to)
        responses = asyncio.run(pay_many(client, gw.url + "/session", 120))
        assert [r.status_code for r in responses] == [200] * 120, responses[-1].text
        assert len(gw.upstream.requests) == 120
        receipts = [decode_header(r.headers["payment-response"]) for r in responses]
        assert receipts[0]["transaction"]  # the deposit's transaction
        assert all(r["transaction"] == "" for r in receipts[1:])  # vouchers: no transaction each
        cumulative = [int(r["extra"]["channelState"]["chargedCumulativeAmount"]) for r in receipts]
        assert cumulative == [PRICE * (i + 1) for i in range(120)]  # never skips
        assert relayer_nonce(base_chain) - txs_before == 1  # the deposit, and nothing per request
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'x402_gateway_payments_settled_total{kind="batch-settlement",network="base"} 120.0' in metrics
        assert 'x402_gateway_ledger_entries_total{result="written"} 120.0' in metrics
    # A gateway restarted on the same store finds the charges and claims them (then sweeps them to pay_to).
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=FAST_CLAIMS, pay_to=pay_to) as gw:
        wait_for(lambda: gw.balance(pay_to) - paid_before == 120 * PRICE)
        stats = engine_of(gw).claimer.stats
        assert stats.vouchers_claimed == 1 and stats.value_claimed == 120 * PRICE
        metrics = httpx.get(gw.url + "/metrics").text  # what an operator sees
        assert "x402_gateway_session_vouchers_claimed_total 1.0" in metrics
        assert f"x402_gateway_session_claimed_atomic_total {float(120 * PRICE)}" in metrics


def test_a_metered_route_charges_what_the_upstream_reports(base_chain: DevChain, tmp_path: Any) -> None:
    costs = [1, 250, 999, 1000, 0, 37]
    upstream = RecordingUpstream()
    payer = base_chain.new_payer(5_000_000)
    client, _scheme = session_client(payer)
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=FAST_CLAIMS, upstream=upstream
    ) as gw:
        paid_before = gw.balance(gw.pay_to)

        async def run() -> list[httpx.Response]:
            out = []
            async with x402HttpxClient(client, timeout=30) as http:
                for cost in costs:
                    upstream.behaviour = Behaviour(headers=[("x-usage-cost", str(cost))])
                    out.append(await http.get(gw.url + "/metered"))
            return out

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * len(costs), responses[-1].text
        assert all("x-usage-cost" not in r.headers for r in responses)  # the meter's header is ours
        charged = [int(decode_header(r.headers["payment-response"])["extra"]["chargedAmount"]) for r in responses]
        assert charged == costs
        wait_for(lambda: gw.balance(gw.pay_to) - paid_before == sum(costs))


def test_a_json_metered_route_charges_tokens_times_the_unit_price(base_chain: DevChain, tmp_path: Any) -> None:
    answers = [b'{"usage": {"total_tokens": 7}}', b'{"usage": {"total_tokens": 499}}', b'{"no": "usage"}', b"not json"]
    expected = [14, 998, 0, 0]  # 2 atomic units per token; no usage reported: "missing = zero"
    upstream = RecordingUpstream()
    payer = base_chain.new_payer(5_000_000)
    client, _scheme = session_client(payer)
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=FAST_CLAIMS, upstream=upstream
    ) as gw:
        paid_before = gw.balance(gw.pay_to)

        async def run() -> list[httpx.Response]:
            out = []
            async with x402HttpxClient(client, timeout=30) as http:
                for body in answers:
                    upstream.behaviour = Behaviour(body=body, headers=[("content-type", "application/json")])
                    out.append(await http.get(gw.url + "/tokens"))
            return out

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * len(answers)
        assert [r.content for r in responses] == answers  # the answer itself is untouched
        charged = [int(decode_header(r.headers["payment-response"])["extra"]["chargedAmount"]) for r in responses]
        assert charged == expected
        wait_for(lambda: gw.balance(gw.pay_to) - paid_before == sum(expected))


def test_a_cooperative_refund_returns_exactly_the_unclaimed_remainder(base_chain: DevChain, tmp_path: Any) -> None:
    payer = base_chain.new_payer(5_000_000)
    client, scheme = session_client(payer)
    sessions = {**SESSIONS, "min_deposit": "1.00", "claim_interval": 3600}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=sessions) as gw:
        start = gw.balance(payer.address)
        responses = asyncio.run(pay_many(client, gw.url + "/session", 7))
        assert [r.status_code for r in responses] == [200] * 7
        assert gw.balance(payer.address) == start - 1_000_000  # the deposit
        settle = scheme.refund(gw.url + "/session", RefundOptions())
        assert settle.success, settle
        # all but what the seven requests were charged came back; the charged part was claimed for us
        assert gw.balance(payer.address) == start - 7 * PRICE
        assert len(gw.upstream.requests) == 7


def test_a_refund_on_a_route_priced_for_post_needs_a_fetch_that_posts(base_chain: DevChain, tmp_path: Any) -> None:
    """What README.md's session example says: the official client's refund asks the URL with GET (its probe for the
    402, then the refund itself). On a route priced for POST only, a GET is not priced (it reaches the upstream
    free), so the default refund fails before anything is signed; with a ``fetch`` that POSTs, it refunds exactly
    the unclaimed remainder."""
    payer = base_chain.new_payer(5_000_000)
    client, scheme = session_client(payer)
    sessions = {**SESSIONS, "min_deposit": "1.00", "claim_interval": 3600}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=sessions) as gw:
        url = gw.url + "/chat"
        start = gw.balance(payer.address)

        async def post_three() -> list[httpx.Response]:
            async with x402HttpxClient(client, timeout=30) as http:
                return [await http.post(url, json={"q": n}) for n in range(3)]

        assert [r.status_code for r in asyncio.run(post_three())] == [200] * 3
        with pytest.raises(RuntimeError, match="expected 402, got 200"):
            scheme.refund(url)  # GET /chat is not priced: the upstream answered it

        def post(url: str, headers: dict[str, str]) -> Any:
            answer = httpx.post(url, headers=headers)
            return types.SimpleNamespace(status=answer.status_code, header=answer.headers.get)

        settle = scheme.refund(url, RefundOptions(fetch=post))
        assert settle.success, settle
        assert gw.balance(payer.address) == start - 3 * PRICE
        assert [r.method for r in gw.upstream.requests] == ["POST", "POST", "POST", "GET"]


@pytest.mark.parametrize("n", [50])
def test_concurrent_requests_on_one_channel_are_each_served_at_most_once_and_charged_in_order(
    base_chain: DevChain, tmp_path: Any, n: int
) -> None:
    payer = base_chain.new_payer(5_000_000)
    client, _scheme = session_client(payer)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=FAST_CLAIMS) as gw:
        paid_before = gw.balance(gw.pay_to)
        first = asyncio.run(pay_many(client, gw.url + "/session", 1))  # opens the channel
        assert first[0].status_code == 200

        async def storm() -> list[httpx.Response]:
            async with x402HttpxClient(client, timeout=30) as http:
                return list(await asyncio.gather(*(http.get(gw.url + "/session") for _ in range(n))))

        responses = asyncio.run(storm())
        ok = [r for r in responses if r.status_code == 200]
        assert all(r.status_code in (200, 402) for r in responses)
        served = 1 + len(ok)
        assert len(gw.upstream.requests) == served  # nothing served without its charge, nothing twice
        cumulative = sorted(
            int(decode_header(r.headers["payment-response"])["extra"]["channelState"]["chargedCumulativeAmount"])
            for r in ok
        )
        assert cumulative == [PRICE * (i + 2) for i in range(len(ok))]  # the cumulative never skips
        wait_for(lambda: gw.balance(gw.pay_to) - paid_before == served * PRICE)


def engine_of(gw: GatewayUnderTest) -> Any:
    return gw.app.payments.engine
