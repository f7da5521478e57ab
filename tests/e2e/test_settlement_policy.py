"""Settle before or after the upstream: never charged for a failure, never served unpaid
(docs/threat-model.md T9, T10, T11).

``after``: the upstream answers first; only a status < 400 is settled, and a settlement failure turns the answer
into a 402 (the content is swallowed). ``before``: the money moves first; a failed upstream leaves the paid
payment usable for one free retry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from gateway.dev.chain import DEV_KEYS, DevChain
from gateway.x402 import reasons
from tests.e2e import craft
from tests.e2e.helpers import (
    Balances,
    HookedUpstream,
    RpcTap,
    assert_402,
    assert_error,
    authorization_used,
    b64json,
    closed_port_url,
    decode_payment,
    error_of,
    fire_together,
    gateway_with_upstream_url,
    receipt_of,
)
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url
from tests.support.servers import Behaviour, serve_asgi

PRICE = 100_000
THIRD_PARTY_KEY = DEV_KEYS[5]


def pay(gw: GatewayUnderTest, payer: Any, path: str, version: int = 2) -> tuple[str, str]:
    challenge = httpx.post(gw.url + path)
    assert challenge.status_code == 402
    return gw.sign(payer, challenge, version=version)


def nonce_of(value: str) -> str:
    return decode_payment(value)[0]["nonce"]


def drain(chain: DevChain, payer: Any, amount: int) -> Any:
    """A job that moves ``amount`` of the payer's USDC elsewhere through a second authorization (the payer signs,
    a third party submits): the payer spending its balance between our verification and our settlement."""
    auth = craft.authorization(payer.address, Account.create().address, amount)
    sig = craft.sign_for(payer, auth, chain)
    return lambda: craft.execute_authorization(chain, auth, sig, key=THIRD_PARTY_KEY)


# ---------------------------------------------------------------------------------------------------- after


@pytest.mark.parametrize("status", [500, 503, 404])
def test_after_policy_upstream_failure_is_not_charged_and_the_payment_stays_usable(
    base_chain: DevChain, tmp_path: Path, status: int
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, "/paid")
        gw.upstream.reset(Behaviour(status=status, body=b'{"error":"upstream broke"}'))
        failed = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert failed.status_code == status  # the client sees the upstream's failure, not a 402
        assert failed.json() == {"error": "upstream broke"}
        assert "payment-response" not in failed.headers
        assert len(gw.upstream.requests) == 1
        balances.assert_unchanged()
        assert not authorization_used(base_chain, payer.address, nonce_of(value))
        # The upstream recovers: the very same payment (never consumed) now buys exactly one answer.
        gw.upstream.reset()
        ok = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert receipt_of(ok)["success"] is True
        assert_402(httpx.post(gw.url + "/paid", headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_after_policy_upstream_unreachable_is_502_and_not_charged(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    store = sqlite_url(tmp_path)
    with gateway_with_upstream_url(base_chain, store_url=store, upstream_url=closed_port_url()) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, "/paid")
        response = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert_error(response, 502, "upstream_unreachable")
        assert "payment-response" not in response.headers
        balances.assert_unchanged()
        assert not authorization_used(base_chain, payer.address, nonce_of(value))
        pay_to = gw.pay_to
    # Same store, same pay-to, a reachable upstream: the payment was never consumed.
    with running_gateway(base_chain, store_url=store, payment={"pay_to": pay_to}) as fixed:
        ok = httpx.post(fixed.url + "/paid", headers={name: value}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert len(fixed.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_after_policy_payer_drains_balance_while_upstream_works_gets_402_not_the_content(
    base_chain: DevChain, tmp_path: Path
) -> None:
    # docs/threat-model.md T10: verified, then the payer empties its account before we settle. The answer is swallowed.
    payer = base_chain.new_payer(PRICE)
    upstream = HookedUpstream(behaviour=Behaviour(body=b"SECRET CONTENT"))
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=upstream) as gw:
        pay_to_before = gw.balance(gw.pay_to)
        name, value = pay(gw, payer, "/paid")
        upstream.on_request = drain(base_chain, payer, PRICE)
        response = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert_402(response, reasons.INSUFFICIENT_BALANCE)
        assert b"SECRET CONTENT" not in response.content
        assert len(gw.upstream.requests) == 1
        assert gw.balance(gw.pay_to) == pay_to_before
        assert gw.balance(payer.address) == 0  # drained by the payer's other transfer, not by us
        assert not authorization_used(base_chain, payer.address, nonce_of(value))


# --------------------------------------------------------------------------------------------------- before


@pytest.mark.parametrize("path", ["/paid-before", "/paid"])
def test_settlement_reverting_is_a_402_and_never_serves_the_content(
    base_chain: DevChain, tmp_path: Path, path: str
) -> None:
    # The payer holds exactly the price and spends it (a second authorization, settled by a third party) in the
    # instant between our last verification and our broadcast: our transferWithAuthorization reverts.
    # ``before``: the upstream is never called. ``after``: it was called, but its answer is swallowed.
    payer = base_chain.new_payer(PRICE)
    tap = RpcTap(base_chain.url)
    upstream = HookedUpstream(behaviour=Behaviour(body=b"SECRET CONTENT"))
    with serve_asgi(tap) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        store = sqlite_url(tmp_path)
        with running_gateway(base_chain, store_url=store, networks=networks, upstream=upstream) as gw:
            pay_to_before = gw.balance(gw.pay_to)
            name, value = pay(gw, payer, path)
            tap.before_broadcast = drain(base_chain, payer, PRICE)
            response = httpx.post(gw.url + path, headers={name: value}, timeout=30)
            assert tap.broadcasts  # our settlement really was attempted, and reverted
            assert_402(response, reasons.TRANSACTION_FAILED)
            assert b"SECRET CONTENT" not in response.content
            receipt = b64json(response.headers["payment-response"])
            assert receipt["success"] is False
            assert receipt["errorReason"] == reasons.TRANSACTION_FAILED
            assert len(gw.upstream.requests) == (1 if path == "/paid" else 0)
            assert gw.balance(gw.pay_to) == pay_to_before
            assert not authorization_used(base_chain, payer.address, nonce_of(value))
            # The claim was released (no money moved): a retry is verified afresh, and refused for lack of funds.
            retry = httpx.post(gw.url + path, headers={name: value}, timeout=30)
            assert_402(retry, reasons.INSUFFICIENT_BALANCE)
            assert len(gw.upstream.requests) == (1 if path == "/paid" else 0)


def test_before_policy_simulation_failure_never_reaches_upstream(base_chain: DevChain, tmp_path: Path) -> None:
    # The simple form: the balance is gone before the payment is presented; settlement is never attempted.
    payer = base_chain.new_payer(PRICE)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, "/paid-before")
        drain(base_chain, payer, 1)()
        response = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
        assert_402(response, reasons.INSUFFICIENT_BALANCE)
        assert gw.upstream.requests == []
        assert balances.moved() == (1, 0)


def test_before_policy_upstream_failure_charges_once_and_the_retry_is_served_free(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, "/paid-before")
        gw.upstream.reset(Behaviour(status=500))
        failed = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
        assert failed.status_code == 500
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)  # settled before the upstream was asked
        # The upstream recovers; the paid-but-unserved payment is served without a second charge.
        gw.upstream.reset()
        ok = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
        assert ok.status_code == 200, ok.text
        receipt = receipt_of(ok)
        assert receipt["success"] is True
        mined = base_chain.rpc("eth_getTransactionReceipt", [receipt["transaction"]])
        assert int(mined["status"], 16) == 1
        assert len(gw.upstream.requests) == 1
        # ...once.
        assert_402(httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_paid_but_unserved_payment_retried_concurrently_is_served_once(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, "/paid-before")
        gw.upstream.reset(Behaviour(status=502))
        assert httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30).status_code == 502
        gw.upstream.reset()
        responses = fire_together(gw.url, "POST", "/paid-before", {name: value}, 20)
        assert sorted(r.status_code for r in responses)[0] == 200
        assert [r.status_code for r in responses].count(200) == 1, [r.status_code for r in responses]
        for r in responses:
            if r.status_code != 200:
                assert r.status_code in (402, 409), r.text
                assert error_of(r) in (reasons.PAYMENT_IN_FLIGHT, reasons.PAYMENT_ALREADY_USED), r.text
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


# ---------------------------------------------------------------------------------------------- third party


@pytest.mark.parametrize("path", ["/paid", "/paid-before"])
@pytest.mark.parametrize("version", [1, 2])
def test_authorization_settled_by_a_third_party_first_is_served_once(
    base_chain: DevChain, tmp_path: Path, path: str, version: int
) -> None:
    # docs/threat-model.md T9: a watcher (or the payer's own facilitator) submits the authorization before we see it.
    # The money arrived: serve, charge nothing more, and name the transaction that paid.
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, path, version)
        auth, sig, _ = decode_payment(value)
        third_party_tx = craft.execute_authorization(base_chain, auth, sig, key=THIRD_PARTY_KEY)
        balances.assert_charged_once(PRICE)
        response = httpx.post(gw.url + path, headers={name: value}, timeout=30)
        assert response.status_code == 200, response.text
        receipt = receipt_of(response)
        assert receipt["success"] is True
        assert receipt["transaction"].lower() == third_party_tx.lower()
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)
        assert_402(httpx.post(gw.url + path, headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1


def test_third_party_settles_while_the_upstream_works_after_policy_is_served_once(
    base_chain: DevChain, tmp_path: Path
) -> None:
    # Verified, upstream called, and meanwhile someone else executes the very same authorization to us: the
    # re-simulation at settlement sees the nonce used, finds the Transfer to us, and serves.
    payer = base_chain.new_payer(1_000_000)
    upstream = HookedUpstream()
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=upstream) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, "/paid")
        auth, sig, _ = decode_payment(value)
        hashes: list[str] = []
        upstream.on_request = lambda: hashes.append(
            craft.execute_authorization(base_chain, auth, sig, key=THIRD_PARTY_KEY)
        )
        response = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert response.status_code == 200, response.text
        assert receipt_of(response)["transaction"].lower() == hashes[0].lower()
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


@pytest.mark.parametrize("path", ["/paid-before", "/paid"])
def test_third_party_front_runs_our_broadcast_our_revert_is_recognised_as_paid(
    base_chain: DevChain, tmp_path: Path, path: str
) -> None:
    # The same authorization lands on chain (someone else's transaction) just before ours: ours reverts, but the
    # money arrived, so the request is served with the front-runner's transaction as the receipt.
    payer = base_chain.new_payer(1_000_000)
    tap = RpcTap(base_chain.url)
    with serve_asgi(tap) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(base_chain, store_url=sqlite_url(tmp_path), networks=networks) as gw:
            balances = Balances(gw, payer.address)
            name, value = pay(gw, payer, path)
            auth, sig, _ = decode_payment(value)
            hashes: list[str] = []
            tap.before_broadcast = lambda: hashes.append(
                craft.execute_authorization(base_chain, auth, sig, key=THIRD_PARTY_KEY)
            )
            response = httpx.post(gw.url + path, headers={name: value}, timeout=30)
            assert tap.broadcasts
            assert response.status_code == 200, response.text
            assert receipt_of(response)["transaction"].lower() == hashes[0].lower()
            assert len(gw.upstream.requests) == 1
            balances.assert_charged_once(PRICE)
            assert_402(httpx.post(gw.url + path, headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)


def test_paid_but_unserved_payment_stays_usable_after_its_authorization_window(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        balances = Balances(gw, payer.address)
        challenge = httpx.post(gw.url + "/paid-before")
        req = gw.options(challenge)[0].requirement
        now = int(time.time())
        auth = craft.authorization(payer.address, gw.pay_to, PRICE, valid_before=now + 11, now=now)
        headers = {
            "PAYMENT-SIGNATURE": craft.encode(
                craft.v2_envelope(auth, craft.sign_for(payer, auth, base_chain), accepted=req)
            )
        }
        gw.upstream.reset(Behaviour(status=503))
        assert httpx.post(gw.url + "/paid-before", headers=headers, timeout=30).status_code == 503
        balances.assert_charged_once(PRICE)  # paid, not served
        gw.upstream.reset()
        time.sleep(max(0.0, now + 6 - time.time()))  # validBefore is now less than 6 s away
        retry = httpx.post(gw.url + "/paid-before", headers=headers, timeout=30)
        balances.assert_charged_once(PRICE)
        assert retry.status_code == 200, retry.text
        assert len(gw.upstream.requests) == 1
