"""How the SDK pays: spend controls refuse before anything is signed; retries resend the same payment so one
logical call pays once; v1-only 402s; tx-hash payments; and standard x402 against a server that is not ours."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from gateway.client import AsyncX402Client, PaymentRefused, SpendControls, TxHashPayments, X402Client, payment_receipt
from gateway.dev.chain import DevChain
from tests.client.conftest import FAST_RETRY, POLL, STEPS, RecordingTransport
from tests.e2e.helpers import Balances
from tests.e2e.test_official_client import strip_v2_challenge
from tests.jobs.helpers import PRICE, jobs_gateway
from tests.support.facilitator import run_x402_facilitator
from tests.support.gateway import running_gateway, sqlite_url
from tests.support.jobs_upstreams import API_KEY, FakeJobsApi, SlowAgent
from tests.support.servers import serve_asgi
from tests.txhash.helpers import new_tx_payer

CHEAP, DEAR = 10_000, 1_000_000  # GET /cheap ($0.01) and GET /dear ($1.00) of the default test routes


async def test_spend_caps_refuse_an_expensive_route_before_anything_is_signed_or_paid(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(5_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        money = Balances(gw, payer.address)
        capped = SpendControls(max_per_payment=Decimal("0.50"))
        async with AsyncX402Client(gw.url, account=payer, spend=capped) as client:
            with pytest.raises(PaymentRefused) as over:
                await client.get("/dear")
            assert (over.value.status, over.value.reason) == (402, "amount_over_limit")
            assert "$1.00" in over.value.message and "$0.50" in over.value.message
            assert client.spent == 0
        for spend, reason in (
            (SpendControls(networks={"polygon"}), "network_not_allowed"),
            (SpendControls(assets={"0x" + "11" * 20}), "asset_not_allowed"),
        ):
            async with AsyncX402Client(gw.url, account=payer, spend=spend) as client:
                with pytest.raises(PaymentRefused) as refused:
                    await client.get("/cheap")
                assert refused.value.reason == reason
        async with AsyncX402Client(gw.url) as walletless:
            with pytest.raises(PaymentRefused) as no_wallet:
                await walletless.get("/cheap")
            assert no_wallet.value.reason == "no_wallet"
        money.assert_unchanged()
        assert gw.upstream.requests == []
        # the same capped client pays a route under its cap
        async with AsyncX402Client(gw.url, account=payer, spend=capped) as client:
            assert (await client.get("/cheap")).status_code == 200
        money.assert_charged_once(CHEAP)


async def test_the_budget_holds_under_concurrent_requests_and_is_never_overspent(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(5_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        money = Balances(gw, payer.address)
        async with AsyncX402Client(gw.url, account=payer, spend=SpendControls(budget=5 * CHEAP)) as client:
            results = await asyncio.gather(*(client.get("/cheap") for _ in range(10)), return_exceptions=True)
            assert client.spent == 5 * CHEAP and client.remaining_budget == 0
        served = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, PaymentRefused)]
        assert [r.status_code for r in served] == [200] * 5
        assert len(refused) == 5 and {r.reason for r in refused} == {"budget_exhausted"}
        money.assert_charged_once(5 * CHEAP)


class FailsOnce:
    """A jobs API whose first submit answers ``status`` (with ``Retry-After`` if given), then behaves."""

    def __init__(self, inner: FakeJobsApi, status: int, retry_after: str | None) -> None:
        self.inner, self.status, self.retry_after = inner, status, retry_after
        self.submits = 0

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) == ("POST", "/agent/prompt"):
            self.submits += 1
            if self.submits == 1:
                while (await receive()).get("more_body"):
                    pass
                body = json.dumps({"error": "Service unavailable", "message": "try again shortly"}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if self.retry_after is not None:
                    headers.append((b"retry-after", self.retry_after.encode()))
                await send({"type": "http.response.start", "status": self.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.inner(scope, receive, send)


@pytest.mark.parametrize(
    ("settlement", "status", "retry_after"),
    [("after", 503, None), ("before", 503, None), ("after", 429, "1")],
)
async def test_a_transient_upstream_failure_is_retried_with_the_same_payment_and_paid_once(
    base_chain: DevChain, tmp_path: Path, settlement: str, status: int, retry_after: str | None
) -> None:
    payer = base_chain.new_payer(1_000_000)
    upstream = FailsOnce(FakeJobsApi("agent"), status, retry_after)
    with jobs_gateway(
        base_chain,
        store_url=sqlite_url(tmp_path),
        upstream=upstream,
        mode="front",
        style="agent",
        settlement=settlement,
    ) as gw:
        money = Balances(gw, payer.address)
        wire = RecordingTransport()
        async with AsyncX402Client(gw.url, account=payer, retry=FAST_RETRY, transport=wire) as client:
            started = time.monotonic()
            job = await client.prompt_and_wait("hello", **POLL)
            elapsed = time.monotonic() - started
            assert client.spent == PRICE
        assert (job.status, job.response) == ("completed", "Echo: hello")
        assert upstream.submits == 2  # the failure and the retry
        paid = wire.paid("payment-signature")
        assert [status for _, status, _ in paid] == [status, 202]
        # the retry resent the very same payment and Idempotency-Key (and body): it could not pay twice
        (first, _, _), (retry, _, _) = paid
        assert retry["payment-signature"] == first["payment-signature"]
        assert retry["idempotency-key"] == first["idempotency-key"]
        if retry_after is not None:
            assert elapsed >= 1.0  # Retry-After honoured
        money.assert_charged_once(PRICE)


def test_a_v1_only_402_is_paid_with_x_payment(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), wrap=strip_v2_challenge) as gw:
        money = Balances(gw, payer.address)
        wire = RecordingTransport()
        with X402Client(gw.url, account=payer, transport=wire) as client:
            response = client.post("/paid", json={"prompt": "hello"})
        assert response.status_code == 200, response.text
        assert len(wire.paid("x-payment")) == 1 and wire.paid("payment-signature") == []
        # the gateway answers in the version the client paid with: v1 -> X-PAYMENT-RESPONSE, v1 network name
        assert "payment-response" not in response.headers
        receipt = payment_receipt(response.headers)
        assert receipt is not None and receipt.success and receipt.network == "base" and receipt.tx_hash
        assert len(gw.upstream.requests) == 1
        money.assert_charged_once(100_000)


@contextmanager
def mining_once(base_chain: DevChain, start: Callable[[], bool]) -> Iterator[None]:
    """Mines an empty block every 0.1 s once ``start()`` is true, so confirmations accrue without other
    transactions, and only after the moment the test wants to see (mining from the outset let a slow run reach
    the gateway's confirmations before the client ever presented the proof)."""
    stop = threading.Event()

    def mine() -> None:
        while not stop.wait(0.02):
            if start():
                break
        while not stop.wait(0.1):
            base_chain.rpc("evm_mine", [])

    thread = threading.Thread(target=mine, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def test_tx_hash_mode_pays_by_transfer_and_waits_out_the_gateways_confirmations(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = new_tx_payer(base_chain, usdc=1_000_000)
    network = {"rpc_urls": [base_chain.url], "receipt_poll_interval": 0.02, "confirmations": 3}
    with running_gateway(
        base_chain,
        store_url=sqlite_url(tmp_path),
        routes=[{"route": "POST /agent/prompt", "price": "0.02"}],
        upstream=SlowAgent(steps=STEPS, step_delay=0.02),
        upstream_settings={"headers": {"X-API-Key": API_KEY}},
        networks={"base": network},
        jobs={"mode": "runner", "style": "agent", "runner_upstream_path": "/run", "shutdown_grace_seconds": 0},
    ) as gw:
        money = Balances(gw, payer.address)
        # The client waits for 1 confirmation; the gateway wants 3 and says transaction_not_final until then.
        settings = TxHashPayments(rpc_urls={"base": base_chain.url}, confirmations=1, poll_interval=0.1, timeout=30)
        wire = RecordingTransport()

        def told_not_final() -> bool:
            return any(status == 402 for _, status, _ in wire.paid("x-payment"))

        with (
            mining_once(base_chain, start=told_not_final),
            X402Client(gw.url, account=payer, pay_with="txhash", tx_hash=settings, transport=wire) as client,
        ):
            job = client.prompt_and_wait("pay by transfer", **POLL)
            assert client.spent == PRICE
        presented = wire.paid("x-payment")
        assert {h["x-payment"] for h, _, _ in presented} == {job.submission and job.submission.tx_hash}
        assert {h["x-payment-network"] for h, _, _ in presented} == {"base"}
        statuses = [status for _, status, _ in presented]
        assert statuses[-1] == 202 and set(statuses[:-1]) == {402} and len(statuses) >= 2
        assert all(json.loads(body)["error"] == "transaction_not_final" for _, _, body in presented[:-1])
        assert (job.status, job.response) == ("completed", "Answer: pay by transfer")
        sub = job.submission
        assert sub is not None and sub.tx_hash
        tx = base_chain.rpc("eth_getTransactionByHash", [sub.tx_hash])
        assert tx["from"].lower() == payer.address.lower() and tx["to"].lower() == base_chain.usdc.lower()
        money.assert_charged_once(PRICE)


def official_x402_app(facilitator_url: str, pay_to: str, network: str) -> Any:
    """A FastAPI app guarded by the official ``x402`` package's own middleware: not this gateway's code."""
    from fastapi import FastAPI, Request
    from x402 import x402ResourceServer
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient
    from x402.http.middleware.fastapi import payment_middleware
    from x402.mechanisms.evm.exact import register_exact_evm_server

    server = x402ResourceServer(HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url, timeout=60)))
    register_exact_evm_server(server, network)
    routes = {
        "GET /weather": {
            "accepts": {"scheme": "exact", "payTo": pay_to, "price": "$0.01", "network": network},
            "description": "today's weather",
            "mimeType": "application/json",
        }
    }
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    guard = payment_middleware(routes, server)

    @app.middleware("http")
    async def x402_middleware(request: Request, call_next: Any) -> Any:
        return await guard(request, call_next)

    @app.get("/weather")
    async def weather() -> dict[str, str]:
        return {"report": "sunny, 21 C"}

    return app


async def test_the_sdk_pays_an_endpoint_guarded_by_the_official_x402_middleware_once(base_chain: DevChain) -> None:
    payer = base_chain.new_payer(1_000_000)
    pay_to = Account.create().address
    with (
        run_x402_facilitator(base_chain) as facilitator_url,
        serve_asgi(official_x402_app(facilitator_url, pay_to, base_chain.network)) as url,
    ):
        before = (base_chain.balance(payer.address), base_chain.balance(pay_to))
        async with AsyncX402Client(account=payer) as client:
            response = await client.get(url + "/weather")
            assert client.spent == CHEAP
        assert response.status_code == 200, response.text
        assert response.json() == {"report": "sunny, 21 C"}
        receipt = payment_receipt(response.headers)
        assert receipt is not None and receipt.success and receipt.tx_hash
        after = (base_chain.balance(payer.address), base_chain.balance(pay_to))
        assert after == (before[0] - CHEAP, before[1] + CHEAP)
