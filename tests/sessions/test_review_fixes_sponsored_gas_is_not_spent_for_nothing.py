"""Deposits and refunds are the relayer's transactions (gas we pay): none may be sent for a payment that is refused
anyway, and a refund must be worth its transaction (docs/threat-model.md T48).

* a partial refund below ``min(remainder, minDeposit)`` is refused before any transaction (otherwise one deposit
  buys a hundred thousand sponsored one-unit refunds);
* a deposit whose voucher would not be covered even with the deposit is refused before it is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.sessions.test_a_withdrawal_cannot_take_back_what_was_charged import relayer_nonce
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url

PRICE = 1_000
MIN_DEPOSIT = 10_000
DEAR = 50_000  # a route whose price is above the smallest deposit
ROUTES: list[dict[str, Any]] = [
    {"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]},
    {"route": "GET /dear", "price": "0.05", "schemes": ["batch-settlement"]},
]
QUIET = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600}  # no claims: every transaction is a request's


@pytest.fixture(scope="module")
def gw(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    store = sqlite_url(tmp_path_factory.mktemp("gas"))
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=QUIET) as gateway:
        yield gateway


def pay(gw: GatewayUnderTest, path: str, ch: CraftedChannel, payload: dict[str, Any]) -> httpx.Response:
    return httpx.get(gw.url + path, headers=ch.header(payload), timeout=30)


def refused_unsent(
    gw: GatewayUnderTest, chain: DevChain, path: str, ch: CraftedChannel, payload: dict[str, Any], reason: str
) -> None:
    sent, served = relayer_nonce(chain), len(gw.upstream.requests)
    r = pay(gw, path, ch, payload)
    assert r.status_code == 402, r.text
    assert decode_header(r.headers["payment-required"])["error"] == reason
    assert relayer_nonce(chain) == sent  # no transaction
    assert len(gw.upstream.requests) == served


def test_a_partial_refund_below_the_smallest_deposit_is_refused_without_a_transaction(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(gw.url + "/session")))
    assert pay(gw, "/session", ch, ch.deposit(3 * MIN_DEPOSIT, voucher_max=PRICE)).status_code == 200
    wallet = base_chain.balance(payer.address)
    # 29,000 left: a partial refund must be at least 10,000
    for amount in (1, 2, MIN_DEPOSIT - 1):
        refused_unsent(gw, base_chain, "/session", ch, ch.refund(PRICE, amount), reasons.SESSION_REFUND_AMOUNT_INVALID)
    state = ch.onchain(base_chain)
    assert (state.balance, state.refund_nonce) == (3 * MIN_DEPOSIT, 0)
    assert base_chain.balance(payer.address) == wallet

    # The smallest partial refund allowed, then the whole rest (however small), are each one transaction.
    steps: list[tuple[int | None, int]] = [(MIN_DEPOSIT, MIN_DEPOSIT), (None, 2 * MIN_DEPOSIT - PRICE)]
    for asked, back in steps:
        sent = relayer_nonce(base_chain)
        r = pay(gw, "/session", ch, ch.refund(PRICE, asked))
        assert r.status_code == 200, r.text
        assert relayer_nonce(base_chain) == sent + 1
        assert base_chain.balance(payer.address) - wallet == back
        wallet += back
    assert ch.onchain(base_chain).balance == PRICE  # what was charged, claimed in the refund's transaction


def test_a_deposit_that_cannot_cover_its_own_voucher_is_refused_before_it_is_sent(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(gw.url + "/dear")))
    # a valid deposit (at least minDeposit), but the first request's voucher is five times what it brings
    deposit = ch.deposit(MIN_DEPOSIT, voucher_max=DEAR)
    refused_unsent(gw, base_chain, "/dear", ch, deposit, reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE)
    assert base_chain.balance(payer.address) == 1_000_000
    assert ch.onchain(base_chain).balance == 0
    # A deposit that covers it is sent, once, and serves the request.
    sent = relayer_nonce(base_chain)
    r = pay(gw, "/dear", ch, ch.deposit(DEAR, voucher_max=DEAR))
    assert r.status_code == 200, r.text
    assert relayer_nonce(base_chain) == sent + 1
    assert base_chain.balance(payer.address) == 1_000_000 - DEAR
