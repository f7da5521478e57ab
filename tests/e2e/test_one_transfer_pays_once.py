"""One on-chain transfer is one payment, whichever way it is presented, for as long as it could be presented
(docs/threat-model.md T26, T27, T30); an authorization that cannot be settled any more is never broadcast (T32).

The same money can reach the gateway as an ``exact`` authorization (settled by our relayer or by anyone else) and
as a tx-hash proof of the transaction that moved it. Every path that accepts money ends on the transfer's effect
key ``tx:<chain>:<tx>:<log index>``; a transfer our own relayer sent is never a payer's proof; and an authorization
our relayer already settled is refused even when its claim record is gone (expired or lost).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.dev.chain import DEV_KEYS, DevChain
from gateway.x402 import reasons
from tests.e2e import craft
from tests.e2e.helpers import Balances, HookedUpstream, RpcTap, assert_402, decode_payment, receipt_of
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url
from tests.support.servers import serve_asgi
from tests.txhash.helpers import proof

PRICE = 100_000
THIRD_PARTY_KEY = DEV_KEYS[5]


@pytest.fixture
def gw(base_chain: DevChain, store_url: str) -> Iterator[GatewayUnderTest]:
    with running_gateway(base_chain, store_url=store_url) as gw:
        yield gw


def pay(gw: GatewayUnderTest, payer: Any) -> tuple[str, str]:
    challenge = httpx.post(gw.url + "/paid")
    assert challenge.status_code == 402
    return gw.sign(payer, challenge)


def forget(store_url: str, prefix: str) -> int:
    """Delete every receipt record whose key starts with ``prefix`` ("" = all): an expired or lost record. The
    store's identity marker stays (a store that lost it is refused outright, docs/threat-model.md T30): what is
    lost here is records, as a failover that loses the last writes loses them."""
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            return conn.execute("DELETE FROM receipts WHERE key LIKE ?", (prefix + "%",)).rowcount
    client = redis.Redis.from_url(store_url)
    try:
        keys = [k for k in client.scan_iter(f"x402:{prefix}*") if k != b"x402:meta:identity"]
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


def test_our_own_settlement_presented_as_a_tx_hash_proof_is_refused(gw: GatewayUnderTest, base_chain: DevChain) -> None:
    payer = base_chain.new_payer(1_000_000)
    balances = Balances(gw, payer.address)
    name, value = pay(gw, payer)
    served = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
    assert served.status_code == 200, served.text
    tx = receipt_of(served)["transaction"]
    again = httpx.post(gw.url + "/paid", headers=proof(gw, payer, tx), timeout=30)
    assert_402(again, reasons.PAYMENT_ALREADY_USED)
    assert len(gw.upstream.requests) == 1
    balances.assert_charged_once(PRICE)


@pytest.mark.parametrize("first", ["exact", "txhash"])
def test_a_transfer_someone_else_executed_pays_once_whichever_proof_comes_first(
    gw: GatewayUnderTest, base_chain: DevChain, first: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    balances = Balances(gw, payer.address)
    name, value = pay(gw, payer)
    auth, sig, _ = decode_payment(value)
    tx = craft.execute_authorization(base_chain, auth, sig, key=THIRD_PARTY_KEY)
    as_exact = {name: value}
    as_proof = proof(gw, payer, tx)
    winner, loser = (as_exact, as_proof) if first == "exact" else (as_proof, as_exact)
    served = httpx.post(gw.url + "/paid", headers=winner, timeout=30)
    assert served.status_code == 200, served.text
    assert_402(httpx.post(gw.url + "/paid", headers=loser, timeout=30), reasons.PAYMENT_ALREADY_USED)
    assert_402(httpx.post(gw.url + "/paid", headers=winner, timeout=30), reasons.PAYMENT_ALREADY_USED)
    assert len(gw.upstream.requests) == 1
    balances.assert_charged_once(PRICE)


def test_an_authorization_we_settled_stays_spent_when_its_record_is_gone(
    gw: GatewayUnderTest, base_chain: DevChain, store_url: str
) -> None:
    # The record of an exact payment expires an hour after validBefore; a lost store loses it at once. Either
    # way our relayer's own settlement on chain says the money was already collected here.
    payer = base_chain.new_payer(1_000_000)
    balances = Balances(gw, payer.address)
    name, value = pay(gw, payer)
    assert httpx.post(gw.url + "/paid", headers={name: value}, timeout=30).status_code == 200
    assert forget(store_url, "") >= 1  # every record: as if the store had lost them
    assert_402(httpx.post(gw.url + "/paid", headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
    assert len(gw.upstream.requests) == 1
    balances.assert_charged_once(PRICE)


def test_an_authorization_someone_else_executed_stays_spent_when_its_record_expires(
    gw: GatewayUnderTest, base_chain: DevChain, store_url: str
) -> None:
    # Served once as "paid by someone else"; when its own record is gone, the transfer's effect key still is not.
    payer = base_chain.new_payer(1_000_000)
    name, value = pay(gw, payer)
    auth, sig, _ = decode_payment(value)
    craft.execute_authorization(base_chain, auth, sig, key=THIRD_PARTY_KEY)
    assert httpx.post(gw.url + "/paid", headers={name: value}, timeout=30).status_code == 200
    assert forget(store_url, "exact:") == 1
    for _ in range(2):
        assert_402(httpx.post(gw.url + "/paid", headers={name: value}, timeout=30), reasons.PAYMENT_ALREADY_USED)
    assert len(gw.upstream.requests) == 1


def test_an_authorization_that_expires_while_the_upstream_works_is_never_broadcast(
    base_chain: DevChain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/threat-model.md T32: the gateway's clock jumps an hour ahead while the upstream answers. The settlement
    # would revert (validBefore has passed): nothing is broadcast, nothing charged, the content is not served.
    from gateway.schemes.exact import scheme as exact_scheme

    payer = base_chain.new_payer(1_000_000)
    tap = RpcTap(base_chain.url)
    upstream = HookedUpstream()
    with serve_asgi(tap) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(base_chain, store_url=sqlite_url(tmp_path), networks=networks, upstream=upstream) as gw:
            balances = Balances(gw, payer.address)
            name, value = pay(gw, payer)
            real_time = exact_scheme.time.time
            upstream.on_request = lambda: monkeypatch.setattr(exact_scheme.time, "time", lambda: real_time() + 3600)
            refused = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
            assert_402(refused, reasons.VALID_BEFORE_EXPIRED)
            assert not tap.broadcasts
            assert len(gw.upstream.requests) == 1
            balances.assert_unchanged()


def test_no_authorization_makes_a_record_that_never_expires(
    gw: GatewayUnderTest, base_chain: DevChain, store_url: str
) -> None:
    # validBefore = 2**256 - 1 is refused (too far); its claim, made before that check, must still expire soon.
    payer = base_chain.new_payer(1_000_000)
    auth = craft.authorization(payer.address, gw.pay_to, PRICE, valid_before=2**256 - 1)
    doc = craft.v1_envelope(auth, craft.sign_for(payer, auth, base_chain))
    refused = httpx.post(gw.url + "/paid", headers={"X-PAYMENT": craft.encode(doc)}, timeout=30)
    assert_402(refused, reasons.VALID_BEFORE_TOO_FAR)
    if store_url.startswith("redis"):
        client = redis.Redis.from_url(store_url)
        try:
            for key in client.scan_iter("x402:exact:*"):
                assert 0 < client.ttl(key) < 3 * 3600, key
        finally:
            client.close()
    else:
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute("SELECT expires_at FROM receipts WHERE key LIKE 'exact:%'").fetchall()
        assert all(exp is not None and exp < time.time() + 3 * 3600 for (exp,) in rows), rows
