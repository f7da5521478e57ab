"""The spend budget is a safety limit: an amount that may have left the wallet stays counted until it is known not to
have. A tx-hash transfer whose broadcast got no answer may still be mined, so it stays in the budget; it is given
back only when the node, asked afterwards, knows no transaction with its hash and the wallet's nonce is unused.

Real anvil behind a JSON-RPC hop that loses the broadcast (tests/client/rpc_proxy.py); the 402 comes from a stand-in
server (the gateway is not what is tested here: the client's payment is refused before anything is presented).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.client import AsyncX402Client, PaymentFailed, PaymentRefused, SpendControls, TxHashPayments
from gateway.dev.chain import DevChain
from tests.client.rpc_proxy import RpcProxy, rpc_proxy
from tests.txhash.helpers import new_tx_payer

PRICE = 10_000


@pytest.fixture
def payer(base_chain: DevChain) -> LocalAccount:
    return new_tx_payer(base_chain, usdc=10 * PRICE)


@pytest.fixture
def pay_to() -> str:
    return Account.create().address


def gateway(chain: DevChain, pay_to: str) -> httpx.MockTransport:
    """Answers every request with a v1 402 offering one tx-hash payment of PRICE on Base."""
    option = {
        "scheme": "txhash",
        "network": "base",
        "chainId": chain.chain_id,
        "recipient": pay_to,
        "asset": chain.usdc,
        "amount": str(PRICE),
    }
    doc = {"x402Version": 1, "error": "payment_required", "accepts": [], "payment": [option]}
    return httpx.MockTransport(lambda request: httpx.Response(402, json=doc))


def client(chain: DevChain, payer: LocalAccount, pay_to: str, rpc_url: str) -> AsyncX402Client:
    settings = TxHashPayments(rpc_urls={"base": rpc_url}, confirmations=1, poll_interval=0.05, timeout=10)
    return AsyncX402Client(
        "http://gateway.test",
        account=payer,
        pay_with="txhash",
        tx_hash=settings,
        spend=SpendControls(budget=PRICE),  # room for one payment
        transport=gateway(chain, pay_to),
    )


@pytest.fixture
def proxied(base_chain: DevChain, request: pytest.FixtureRequest) -> Iterator[tuple[str, RpcProxy]]:
    with rpc_proxy(base_chain.url, **request.param) as served:
        yield served


def nonce(chain: DevChain, address: str) -> int:
    return int(chain.rpc("eth_getTransactionCount", [address, "pending"]), 16)


@pytest.mark.parametrize("proxied", [{"broadcast": "lose_answer"}], indirect=True)
async def test_a_transfer_whose_broadcast_got_no_answer_stays_counted_in_the_budget(
    base_chain: DevChain, payer: LocalAccount, pay_to: str, proxied: tuple[str, RpcProxy]
) -> None:
    url, proxy = proxied
    async with client(base_chain, payer, pay_to, url + "/v2/key") as c:
        with pytest.raises(PaymentFailed) as caught:
            await c.get("/paid")
        assert caught.value.reason == "transfer_broadcast_failed" and caught.value.tx_hash
        # The node took it: the money left, and the budget says so.
        assert base_chain.balance(pay_to) == PRICE
        assert (c.spent, c.remaining_budget) == (PRICE, 0)
        with pytest.raises(PaymentRefused) as refused:  # so the next payment cannot overspend the budget
            await c.get("/paid")
        assert refused.value.reason == "budget_exhausted"
    assert proxy.methods[-1] == "eth_getTransactionByHash"  # the check found it: nothing more was asked
    assert base_chain.balance(pay_to) == PRICE  # paid once (web3 may resend the same signed bytes: one hash)


@pytest.mark.parametrize("proxied", [{"broadcast": "lose_first_answer"}], indirect=True)
async def test_a_broadcast_the_node_took_then_refused_as_resent_stays_counted(
    base_chain: DevChain, payer: LocalAccount, pay_to: str, proxied: tuple[str, RpcProxy]
) -> None:
    """web3 resends a broadcast that got no answer; the node refuses the resend of what it already took. That
    refusal is no proof that nothing left."""
    url, proxy = proxied
    async with client(base_chain, payer, pay_to, url + "/v2/key") as c:
        with pytest.raises(PaymentFailed) as caught:
            await c.get("/paid")
        assert caught.value.reason == "transfer_broadcast_failed"
        assert base_chain.balance(pay_to) == PRICE
        assert (c.spent, c.remaining_budget) == (PRICE, 0)
    assert proxy.methods.count("eth_sendRawTransaction") >= 2


@pytest.mark.parametrize("proxied", [{"broadcast": "lose_request"}], indirect=True)
async def test_a_broadcast_the_node_never_saw_is_given_back_to_the_budget(
    base_chain: DevChain, payer: LocalAccount, pay_to: str, proxied: tuple[str, RpcProxy]
) -> None:
    url, proxy = proxied
    before = nonce(base_chain, payer.address)
    async with client(base_chain, payer, pay_to, url + "/v2/key") as c:
        with pytest.raises(PaymentRefused) as caught:
            await c.get("/paid")
        assert caught.value.reason == "transfer_not_sent"
        assert (c.spent, c.remaining_budget) == (0, PRICE)
    # What the client checked: the node knows no such transaction, and the wallet's nonce is unused.
    assert proxy.methods[-2:] == ["eth_getTransactionByHash", "eth_getTransactionCount"]
    assert nonce(base_chain, payer.address) == before
    assert base_chain.balance(pay_to) == 0


@pytest.mark.parametrize("proxied", [{"broadcast": "lose_request", "down_after_broadcast": True}], indirect=True)
async def test_a_broadcast_whose_fate_cannot_be_checked_stays_counted(
    base_chain: DevChain, payer: LocalAccount, pay_to: str, proxied: tuple[str, RpcProxy]
) -> None:
    url, _ = proxied
    async with client(base_chain, payer, pay_to, url + "/v2/key") as c:
        with pytest.raises(PaymentFailed) as caught:
            await c.get("/paid")
        assert caught.value.reason == "transfer_broadcast_failed"
        # Nothing reached the chain this time, but the client cannot know it: it stays counted.
        assert (c.spent, c.remaining_budget) == (PRICE, 0)
    assert base_chain.balance(pay_to) == 0
