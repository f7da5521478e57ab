"""Our SDK against a server that lies to take more than it served, at the price the user accepted, or more than the
user's spend controls allow.

* A session server that refuses a voucher with a corrective 402 naming that very voucher as already charged (its
  ``voucherState`` is the client's own signature, echoed) must not make the client sign another price on top of it:
  one call signs at most one price beyond what the wallet owed before the call, however the server answers.
* A server that settles an ``exact`` authorization and then answers 402 must not get past the budget: a presented
  authorization stays counted, whatever the server says about it.
* A tx-hash offer whose ``chainId`` is not its ``network``'s must not send the transfer on another chain than the
  one the spend controls allowed.

The session server is a stand-in (vouchers need no chain: it keeps every voucher the client signs, which is what it
could claim); the exact one is the real gateway on anvil behind a wrapper that swaps its paid answer for a 402; the
tx-hash one offers a transfer and the client sends it on real anvil chains.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.client import AsyncX402Client, PaymentFailed, PaymentRefused, SpendControls, TxHashPayments
from gateway.client.session import signed_by
from gateway.dev.chain import DevChain, set_eth_balance
from gateway.networks import KNOWN_NETWORKS
from gateway.x402 import reasons
from gateway.x402.codec import decode_header, encode_header
from tests.client.conftest import FAST_RETRY
from tests.e2e.helpers import Balances
from tests.support.gateway import running_gateway, sqlite_url
from tests.support.servers import serve_asgi
from tests.txhash.helpers import new_tx_payer

PRICE = 1_000
MIN_DEPOSIT = 5 * PRICE
BASE = KNOWN_NETWORKS["base"]
POLYGON = KNOWN_NETWORKS["polygon"]
LIES_PER_CALL = 2


# ------------------------------------------------------------------------------------------------------ sessions


class LyingSessionServer:
    """A ``batch-settlement`` server at ``GET /paid`` that keeps every voucher the payer signed (all of them are
    claimable) and serves a voucher at its own charged + PRICE.

    ``lie``: on those calls (counted by ``Idempotency-Key``, from 1) it instead refuses such a voucher with a
    corrective 402 that says the voucher was already charged, echoing the payer's own signature as the
    ``voucherState``, up to LIES_PER_CALL times (as often as the client would resynchronise), then serves.
    ``refuse_preemptive``: on those calls it first answers the voucher that arrives with the request itself (before
    any 402 of that call) with a plain 402, so that the client pays the call afresh."""

    def __init__(self, payer: str, *, lie: set[int], refuse_preemptive: set[int] | None = None) -> None:
        self.payer = payer.lower()
        self.lie, self.refuse_preemptive = lie, refuse_preemptive or set()
        self.pay_to = Account.create().address
        self.authorizer = Account.create().address
        self.charged: dict[str, int] = {}
        self.vouchers: list[int] = []  # every maxClaimableAmount the payer signed, in order
        self.served = 0
        self._calls: dict[str, int] = {}
        self._seen: dict[str, int] = {}  # presentations per call
        self._lies: dict[str, int] = {}

    def offer(self, state: dict[str, Any] | None = None) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "name": "USD Coin",
            "version": "2",
            "receiverAuthorizer": self.authorizer,
            "withdrawDelay": 86400,
            "minDeposit": str(MIN_DEPOSIT),
        }
        extra.update(state or {})
        return {
            "scheme": "batch-settlement",
            "network": "eip155:8453",
            "asset": BASE.usdc,
            "amount": str(PRICE),
            "payTo": self.pay_to,
            "maxTimeoutSeconds": 300,
            "extra": extra,
        }

    def challenge(self, error: str, state: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
        doc = {"x402Version": 2, "error": error, "resource": {"url": "/paid"}, "accepts": [self.offer(state)]}
        return 402, {"payment-required": encode_header(doc)}, json.dumps({"error": error}).encode()

    def corrective(self, cid: str, charged: int, voucher: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        state = {
            "channelState": {
                "channelId": cid,
                "balance": str(MIN_DEPOSIT),
                "totalClaimed": "0",
                "chargedCumulativeAmount": str(charged),
            },
            "voucherState": {"signedMaxClaimable": str(charged), "signature": voucher["signature"]},
        }
        return self.challenge(reasons.SESSION_CUMULATIVE_MISMATCH, state)

    def answer(self, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        key = headers.get("idempotency-key", "")
        call = self._calls.setdefault(key, len(self._calls) + 1)
        value = headers.get("payment-signature")
        if not value:
            self._seen.setdefault(key, 0)
            return self.challenge(reasons.PAYMENT_REQUIRED)
        payload = decode_header(value)["payload"]
        voucher = payload["voucher"]
        cid, claimable = voucher["channelId"].lower(), int(voucher["maxClaimableAmount"])
        assert signed_by(self.payer, cid, claimable, voucher["signature"], BASE.chain_id)
        self.vouchers.append(claimable)
        preemptive = key not in self._seen
        self._seen[key] = self._seen.get(key, 0) + 1
        charged = self.charged.get(cid, 0)
        if claimable != charged + PRICE:
            return self.corrective(cid, charged, {"signature": "0x"})
        if preemptive and call in self.refuse_preemptive:
            return self.challenge(reasons.PAYMENT_REQUIRED)
        if call in self.lie and self._lies.get(key, 0) < LIES_PER_CALL:
            self._lies[key] = self._lies.get(key, 0) + 1
            self.charged[cid] = claimable  # "already charged": the client's own voucher, refused, is the proof
            return self.corrective(cid, claimable, voucher)
        self.charged[cid] = claimable
        self.served += 1
        deposit = payload.get("deposit")
        receipt = {
            "success": True,
            "payer": self.payer,
            "network": "eip155:8453",
            "transaction": "0x" + "ab" * 32 if deposit else "",
            "amount": deposit["amount"] if deposit else "",
            "extra": {"chargedAmount": str(PRICE), "channelState": {"chargedCumulativeAmount": str(claimable)}},
        }
        return 200, {"payment-response": encode_header(receipt)}, b"served"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status, extra, body = self.answer(headers)
        out = [(k.encode(), v.encode()) for k, v in extra.items()] + [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": body})


async def refusal(call: Awaitable[httpx.Response]) -> str | None:
    """The reason of the PaymentFailed the call raised, or None if it was paid."""
    try:
        await call
    except PaymentFailed as failed:
        return failed.reason
    return None


def session_client(url: str, payer: LocalAccount) -> AsyncX402Client:
    return AsyncX402Client(url, account=payer, pay_with="session", retry=FAST_RETRY)


async def test_a_corrective_402_calling_the_voucher_it_refuses_charged_does_not_get_the_call_paid_again() -> None:
    payer = Account.create()
    server = LyingSessionServer(payer.address, lie={1})
    with serve_asgi(server) as url:
        async with session_client(url, payer) as client:
            refused = await refusal(client.get("/paid"))
    # The one voucher this call signed, and nothing on top of it: the server could claim one price, not three.
    assert (server.served, max(server.vouchers)) == (0, PRICE)
    assert refused == "session_resync"


async def test_a_refused_preemptive_voucher_then_a_corrective_402_do_not_get_one_call_paid_twice() -> None:
    payer = Account.create()
    server = LyingSessionServer(payer.address, lie={2}, refuse_preemptive={2})
    with serve_asgi(server) as url:
        async with session_client(url, payer) as client:
            assert (await client.get("/paid")).status_code == 200
            # The second call sends its voucher with the request (the URL's offer is known), the server refuses it
            # plainly, the client pays the call's 402 afresh with the same voucher, and the server calls that
            # voucher charged: it is this call's own, so no evidence that anything before the call was.
            refused = await refusal(client.get("/paid"))
    assert (server.served, max(server.vouchers)) == (1, 2 * PRICE)
    assert refused == "session_resync"


# --------------------------------------------------------------------------------------------------------- exact


class TakesThePaymentAndSays402:
    """Wraps the real gateway: a paid request is served (so the gateway settles the authorization on chain), then
    the answer is swapped for a 402 that says the payment was refused."""

    def __call__(self, app: Any) -> Any:
        async def lying(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not any(k == b"payment-signature" for k, _ in scope["headers"]):
                await app(scope, receive, send)
                return

            async def swap(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message = {"type": "http.response.start", "status": 402, "headers": []}
                elif message["type"] == "http.response.body":
                    if message.get("more_body"):
                        return
                    message = {"type": "http.response.body", "body": b'{"error": "invalid_exact_evm_payload"}'}
                await send(message)

            await app(scope, receive, swap)

        return lying


async def test_a_server_that_settles_the_payment_then_answers_402_cannot_take_more_than_the_budget(
    base_chain: DevChain, tmp_path: Path
) -> None:
    cheap = 10_000  # GET /cheap of the default test routes
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), wrap=TakesThePaymentAndSays402()) as gw:
        money = Balances(gw, payer.address)
        spend = SpendControls(budget=2 * cheap)
        async with AsyncX402Client(gw.url, account=payer, spend=spend, retry=FAST_RETRY) as client:
            for _ in range(2):
                with pytest.raises(PaymentFailed):
                    await client.get("/cheap")
            with pytest.raises(PaymentRefused) as over:  # nothing more is signed
                await client.get("/cheap")
            assert over.value.reason == "budget_exhausted"
            assert client.spent == 2 * cheap
        deadline = time.monotonic() + 30
        while money.moved()[0] < 2 * cheap and time.monotonic() < deadline:  # the settlements land
            await asyncio.sleep(0.05)
        assert money.moved() == (2 * cheap, 2 * cheap)  # the server took both: exactly the budget


# ------------------------------------------------------------------------------------------------------- tx-hash


@pytest.fixture
def pay_to() -> str:
    return Account.create().address


def txhash_offer(network: str, chain_id: int, asset: str, pay_to: str) -> httpx.MockTransport:
    option = {
        "scheme": "txhash",
        "network": network,
        "chainId": chain_id,
        "recipient": pay_to,
        "asset": asset,
        "amount": str(PRICE),
    }
    doc = {"x402Version": 1, "error": "payment_required", "accepts": [], "payment": [option]}
    return httpx.MockTransport(lambda request: httpx.Response(402, json=doc))


def nonce(chain: DevChain, address: str) -> int:
    return int(chain.rpc("eth_getTransactionCount", [address, "pending"]), 16)


@pytest.mark.parametrize(
    ("network", "chain_id", "asset", "spend", "reason"),
    [
        # The user pays on Base only (both USDCs pinned, as a user of both chains would): "base" with Polygon's id.
        (
            "base",
            POLYGON.chain_id,
            POLYGON.usdc,
            {"networks": {"base"}, "assets": {BASE.usdc, POLYGON.usdc}},
            "network_not_allowed",
        ),
        # Default controls (USDC only on the chains the client knows): a name it does not know, on Base, for a
        # token that is not USDC.
        ("base-mainnet-v2", BASE.chain_id, "0x" + "22" * 20, {}, "asset_not_allowed"),
    ],
    ids=["known-name-other-chain", "unknown-name-known-chain"],
)
async def test_a_txhash_offer_is_judged_by_the_chain_its_transfer_goes_to_not_by_its_name(
    base_chain: DevChain,
    polygon_chain: DevChain,
    pay_to: str,
    network: str,
    chain_id: int,
    asset: str,
    spend: dict[str, Any],
    reason: str,
) -> None:
    payer = new_tx_payer(base_chain, usdc=10 * PRICE)
    set_eth_balance(polygon_chain.anvil, payer.address, 10**18)  # and there: only the spend controls stand in the way
    polygon_chain.mint(payer.address, 10 * PRICE)
    settings = TxHashPayments(
        rpc_urls={"polygon": polygon_chain.url, "base": base_chain.url}, confirmations=1, poll_interval=0.05, timeout=10
    )
    async with AsyncX402Client(
        "http://gateway.test",
        account=payer,
        pay_with="txhash",
        tx_hash=settings,
        spend=SpendControls(**spend),
        transport=txhash_offer(network, chain_id, asset, pay_to),
    ) as client:
        with pytest.raises(PaymentRefused) as refused:
            await client.get("/paid")
    assert refused.value.reason == reason
    assert (nonce(base_chain, payer.address), nonce(polygon_chain, payer.address)) == (0, 0)  # nothing was sent
