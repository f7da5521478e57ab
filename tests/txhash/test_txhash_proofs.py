"""Tx-hash proofs end to end: the payer sends USDC itself, then presents ``X-PAYMENT: 0x<tx hash>`` with
``X-PAYMENT-NETWORK`` and ``X-PAYMENT-BINDING`` (docs/protocol.md §5).

Real gateway (uvicorn), real anvil chains, real SQLite/Redis stores. Every refusal is checked for its status,
its exact reason and zero upstream calls. Threats proven closed (docs/threat-model.md): T1 same proof twice
(replay, other route, restart, other encoding), T2 concurrent race, T3 stolen tx hash, T4 route confusion, T5 spoofed
token, T6 wrong recipient / underpayment, T7 reverted / stale / not final / other chain, T11 upstream failure not
charged, T17 store outage, T18 lying RPC.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from x402.http.utils import decode_payment_required_header, decode_payment_response_header
from x402.schemas import PaymentRequired
from x402.schemas.helpers import parse_payment_required
from x402.schemas.v1 import PaymentRequiredV1

from gateway.client.txhash import tx_proof_headers
from gateway.dev.chain import BASE_USDC, POLYGON_USDC, DevChain, RedisServer, mint
from gateway.x402 import reasons, txhash
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url
from tests.support.servers import Behaviour, RecordingUpstream, serve_asgi
from tests.txhash.helpers import (
    PRICE,
    HeadLiar,
    assert_refused,
    assert_served,
    b64json,
    erc20_transfer,
    fire_together,
    new_tx_payer,
    other_account,
    pay,
    pay_to,
    proof,
)

MULTI = [{"route": "POST /multi", "price": "0.10", "networks": ["base", "polygon"]}]


def post(gw: GatewayUnderTest, headers: dict[str, str], path: str = "/paid") -> httpx.Response:
    with gw.client() as client:
        return client.post(path, headers=headers, json={"q": 1})


# ------------------------------------------------------------------------------------------- 1. the challenge


def test_402_advertises_the_tx_option_per_network(base_chain: DevChain, polygon_chain: DevChain, tmp_path: Path):
    routes = [*MULTI, {"route": "GET /dear", "price": "1.00", "networks": ["base"]}]
    with running_gateway([base_chain, polygon_chain], store_url=sqlite_url(tmp_path), routes=routes) as gw:
        with gw.client() as client:
            r = client.post("/multi", json={})
            dear = client.get("/dear")
        assert r.status_code == 402
        body = r.json()
        v2 = b64json(r.headers["payment-required"])
        expected = {
            "base": (8453, BASE_USDC),
            "polygon": (137, POLYGON_USDC),
        }
        for options in (body["payment"], v2["extensions"]["txhash"]["options"]):
            assert [o["network"] for o in options] == ["base", "polygon"]
            for o in options:
                chain_id, usdc = expected[o["network"]]
                assert o["scheme"] == "txhash"
                assert o["chainId"] == chain_id
                assert o["caip2"] == f"eip155:{chain_id}"
                assert o["recipient"] == pay_to(gw)
                assert o["asset"] == usdc
                assert o["amount"] == "100000"
                assert isinstance(o["amount"], str)
                assert o["amountUsd"] == "0.10"
                assert o["decimals"] == 6
                assert o["headers"]["X-PAYMENT-NETWORK"] == o["network"]
                # The exact message to sign, with the method and the resource as the 402 states them.
                assert o["binding"]["scheme"] == "eip191"
                assert o["binding"]["message"] == txhash.binding_message(
                    "<tx hash>", o["network"], "POST", gw.url + "/multi"
                )
        assert body["payment"] == v2["extensions"]["txhash"]["options"]

        # Strict official clients still read both versions of the challenge.
        legacy = PaymentRequiredV1.model_validate(body)
        assert [a.network for a in legacy.accepts] == ["base", "polygon"]
        assert isinstance(parse_payment_required(r.content), PaymentRequiredV1)
        current = PaymentRequired.model_validate(v2)
        assert [a.network for a in current.accepts] == ["eip155:8453", "eip155:137"]
        assert current.extensions is not None and "txhash" in current.extensions
        assert isinstance(decode_payment_required_header(r.headers["payment-required"]), PaymentRequired)

        (opt,) = dear.json()["payment"]
        assert (opt["amount"], opt["amountUsd"]) == ("1000000", "1.00")
        assert opt["binding"]["message"].endswith(f"method: GET\nresource: {gw.url}/dear")
        PaymentRequiredV1.model_validate(dear.json())


def test_route_without_tx_hash_neither_offers_nor_accepts_it(base_chain: DevChain, tmp_path: Path):
    routes = [{"route": "POST /paid", "price": "0.10", "tx_hash": False}]
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=routes) as gw:
        r = post(gw, {})
        assert r.status_code == 402
        assert "payment" not in r.json()
        assert "txhash" not in (b64json(r.headers["payment-required"]).get("extensions") or {})
        payer, tx = pay(base_chain, gw)
        r = post(gw, proof(gw, payer, tx))
        assert r.status_code == 402, r.text
        assert r.json()["error"] == reasons.UNSUPPORTED_PAYMENT_KIND
        assert gw.upstream.requests == []


# --------------------------------------------------------------------------------------- 2. the genuine payment


def test_genuine_transfer_pays_exactly_once(base_chain: DevChain, store_url: str):
    with running_gateway(base_chain, store_url=store_url) as gw:
        payer, tx = pay(base_chain, gw)
        headers = proof(gw, payer, tx)
        r = post(gw, headers)
        receipt = assert_served(r, tx)
        assert receipt["payer"].lower() == payer.address.lower()
        settle = decode_payment_response_header(r.headers["x-payment-response"])  # the official client reads it
        assert settle.success and settle.transaction.lower() == tx
        (seen,) = gw.upstream.requests
        assert seen.path == "/paid"
        assert not {"x-payment", "x-payment-network", "x-payment-binding"} & {k for k, _ in seen.headers}

        # docs/threat-model.md T1: the same proof again, in another encoding, and on another route of the same price.
        assert_refused(post(gw, headers), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)
        upper = {**headers, "X-PAYMENT": "0x" + tx[2:].upper()}
        assert_refused(post(gw, upper), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)
        other_route = proof(gw, payer, tx, path="/paid-before")
        assert_refused(post(gw, other_route, "/paid-before"), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)


# ------------------------------------------------------------------------------------ 3. the adversarial matrix


def test_fake_token_with_identical_events_is_worthless(base_chain: DevChain, gw: GatewayUnderTest, fake_token: str):
    payer = new_tx_payer(base_chain, usdc=0)
    mint(base_chain.anvil, fake_token, payer.address, PRICE)
    tx = erc20_transfer(base_chain, payer, pay_to(gw), PRICE, token=fake_token)
    (log,) = base_chain.rpc("eth_getTransactionReceipt", [tx])["logs"]
    assert log["address"].lower() == fake_token.lower() and len(log["topics"]) == 3  # a perfect Transfer event
    assert_refused(post(gw, proof(gw, payer, tx)), gw, txhash.TRANSFER_NOT_FOUND)


def test_transfer_to_someone_else_is_not_a_payment(base_chain: DevChain, gw: GatewayUnderTest):
    payer, tx = pay(base_chain, gw, to=other_account().address)
    assert_refused(post(gw, proof(gw, payer, tx)), gw, txhash.TRANSFER_NOT_FOUND)


def test_price_minus_one_unit_is_too_low(base_chain: DevChain, gw: GatewayUnderTest):
    payer, tx = pay(base_chain, gw, PRICE - 1)
    assert_refused(post(gw, proof(gw, payer, tx)), gw, txhash.AMOUNT_TOO_LOW)


def test_cheap_payment_does_not_open_a_dear_route(base_chain: DevChain, gw: GatewayUnderTest):
    """docs/threat-model.md T4: the price is the server's for this route (GET /dear costs $1.00), never the payer's."""
    payer, tx = pay(base_chain, gw)
    with gw.client() as client:
        r = client.get("/dear", headers=proof(gw, payer, tx, method="GET", path="/dear"))
    assert_refused(r, gw, txhash.AMOUNT_TOO_LOW)


def test_reverted_transaction(base_chain: DevChain, gw: GatewayUnderTest):
    payer = new_tx_payer(base_chain, usdc=PRICE)
    tx = erc20_transfer(base_chain, payer, pay_to(gw), 10 * PRICE, gas=100_000, check=False)
    assert base_chain.rpc("eth_getTransactionReceipt", [tx])["status"] == "0x0"
    assert_refused(post(gw, proof(gw, payer, tx)), gw, txhash.TX_REVERTED)


def test_network_not_accepted_on_the_route(base_chain: DevChain, gw: GatewayUnderTest):
    payer, tx = pay(base_chain, gw)
    assert_refused(post(gw, proof(gw, payer, tx, network="polygon")), gw, reasons.NETWORK_MISMATCH)
    assert_refused(post(gw, proof(gw, payer, tx, network="ethereum")), gw, reasons.NETWORK_MISMATCH)
    assert_served(post(gw, proof(gw, payer, tx)), tx)  # the refusals consumed nothing


def test_unknown_transaction(base_chain: DevChain, gw: GatewayUnderTest):
    tx = "0x" + os.urandom(32).hex()
    assert_refused(post(gw, proof(gw, other_account(), tx)), gw, txhash.TX_NOT_FOUND)


def test_transaction_of_another_chain(base_chain: DevChain, polygon_chain: DevChain, gw: GatewayUnderTest):
    """A real USDC payment to the right recipient, but on Polygon, presented as a Base payment."""
    payer, tx = pay(polygon_chain, gw)
    assert_refused(post(gw, proof(gw, payer, tx, network="base")), gw, txhash.TX_NOT_FOUND)


def test_transfer_older_than_the_window(old_chain: DevChain, tmp_path: Path):
    """Every block of ``old_chain`` is ~2 h old: refused under the default 1 h window, accepted under a 3 h one."""
    recipient = other_account().address
    with running_gateway(old_chain, store_url=sqlite_url(tmp_path), payment={"pay_to": recipient}) as gw:
        payer, tx = pay(old_chain, gw)
        assert_refused(post(gw, proof(gw, payer, tx)), gw, txhash.TX_TOO_OLD)
    wide = {"pay_to": recipient, "tx_max_age_seconds": 3 * 3600}
    with running_gateway(old_chain, store_url=sqlite_url(tmp_path), payment=wide) as gw:
        assert_served(post(gw, proof(gw, payer, tx)), tx)


def test_not_final_until_enough_confirmations(base_chain: DevChain, tmp_path: Path):
    networks = {"base": {"rpc_urls": [base_chain.url], "confirmations": 3}}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), networks=networks) as gw:
        payer, tx = pay(base_chain, gw)
        headers = proof(gw, payer, tx)
        assert_refused(post(gw, headers), gw, txhash.TX_NOT_FINAL)  # 1 of 3
        base_chain.rpc("evm_mine", [])
        assert_refused(post(gw, headers), gw, txhash.TX_NOT_FINAL)  # 2 of 3
        base_chain.rpc("evm_mine", [])
        assert_served(post(gw, headers), tx)  # 3 of 3
        assert len(gw.upstream.requests) == 1
        assert_refused(post(gw, headers), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)


def test_not_final_until_under_the_safe_tag(other_base: DevChain, tmp_path: Path):
    """``finality = "safe"``: the transfer's block must be at or below the node's ``safe`` block (anvil: head-32)."""
    chain = other_base
    networks = {"base": {"rpc_urls": [chain.url], "finality": "safe"}}
    with running_gateway(chain, store_url=sqlite_url(tmp_path), networks=networks) as gw:
        payer, tx = pay(chain, gw)
        headers = proof(gw, payer, tx)
        assert_refused(post(gw, headers), gw, txhash.TX_NOT_FINAL)
        chain.rpc("anvil_mine", [hex(31)])
        assert_refused(post(gw, headers), gw, txhash.TX_NOT_FINAL)  # safe = its block - 1
        chain.rpc("anvil_mine", [hex(1)])
        assert_served(post(gw, headers), tx)


def test_transfer_in_a_future_block(future_chain: DevChain, tmp_path: Path):
    with running_gateway(future_chain, store_url=sqlite_url(tmp_path)) as gw:
        payer, tx = pay(future_chain, gw)
        r = post(gw, proof(gw, payer, tx))
        assert r.status_code == 402, r.text
        assert r.json()["error"] == txhash.TX_IN_FUTURE
        assert gw.upstream.requests == []


def test_stolen_hash_cannot_be_spent_by_another_wallet(base_chain: DevChain, gw: GatewayUnderTest):
    """docs/threat-model.md T3: anyone can read the hash off a block explorer; only the transfer's sender can spend
    it."""
    payer, tx = pay(base_chain, gw)
    thief = other_account()
    assert_refused(post(gw, proof(gw, thief, tx)), gw, txhash.BINDING_MISMATCH)
    assert_served(post(gw, proof(gw, payer, tx)), tx)  # the thief's attempt consumed nothing


def test_binding_is_for_one_method_and_resource(base_chain: DevChain, gw: GatewayUnderTest):
    payer, tx = pay(base_chain, gw)
    for method, path, network in (("POST", "/paid-before", "base"), ("GET", "/paid", "base")):
        signed_elsewhere = proof(gw, payer, tx, method=method, path=path, network=network)
        assert_refused(post(gw, signed_elsewhere), gw, txhash.BINDING_MISMATCH)
    # Signed for network "eip155:8453" but presented as "base": the message names the network as sent.
    as_caip2 = proof(gw, payer, tx, network="eip155:8453")
    assert_refused(post(gw, {**as_caip2, "X-PAYMENT-NETWORK": "base"}), gw, txhash.BINDING_MISMATCH)
    # 65 bytes of nothing: well-formed hex, no signer.
    assert_refused(
        post(gw, {**proof(gw, payer, tx), "X-PAYMENT-BINDING": "0x" + "00" * 65}), gw, txhash.BINDING_MISMATCH
    )


def test_binding_resource_includes_the_query(base_chain: DevChain, gw: GatewayUnderTest):
    payer, tx = pay(base_chain, gw)
    r = post(gw, {}, "/paid?item=7")
    assert r.json()["accepts"][0]["resource"] == gw.url + "/paid?item=7"
    assert_refused(post(gw, proof(gw, payer, tx), "/paid?item=7"), gw, txhash.BINDING_MISMATCH)
    assert_served(post(gw, proof(gw, payer, tx, path="/paid?item=7"), "/paid?item=7"), tx)


def test_binding_header_required(base_chain: DevChain, gw: GatewayUnderTest):
    payer, tx = pay(base_chain, gw)
    headers = proof(gw, payer, tx)
    del headers["X-PAYMENT-BINDING"]
    assert_refused(post(gw, headers), gw, txhash.BINDING_REQUIRED)


@pytest.mark.parametrize("network", [None, ""])
def test_network_header_required(base_chain: DevChain, gw: GatewayUnderTest, network: str | None):
    payer, tx = pay(base_chain, gw)
    headers = proof(gw, payer, tx)
    if network is None:
        del headers["X-PAYMENT-NETWORK"]
    else:
        headers["X-PAYMENT-NETWORK"] = network
    assert_refused(post(gw, headers), gw, txhash.NETWORK_REQUIRED)


GOOD_HASH = "0x" + "ab" * 32
GOOD_SIG = "0x" + "11" * 65


@pytest.mark.parametrize(
    ("x_payment", "binding"),
    [
        ("0x" + "ab" * 31 + "a", GOOD_SIG),  # 63 hex digits
        ("0x" + "ab" * 33, GOOD_SIG),  # 66 hex digits
        ("0x" + "ab" * 31 + "zz", GOOD_SIG),  # not hex
        ("ab" * 33, GOOD_SIG),  # no 0x, 66 characters
        (GOOD_HASH, "0xzz"),
        (GOOD_HASH, "0xabc"),  # odd length
        (GOOD_HASH, "0x"),
        (GOOD_HASH, "11" * 65),  # no 0x
        (GOOD_HASH, "0x" + "11" * 5000),  # absurdly long
    ],
    ids=["hash-63", "hash-66", "hash-nonhex", "hash-no-0x", "sig-nonhex", "sig-odd", "sig-empty", "sig-no-0x", "huge"],
)
def test_malformed_hash_or_binding_is_400(gw: GatewayUnderTest, x_payment: str, binding: str):
    headers = {"X-PAYMENT": x_payment, "X-PAYMENT-NETWORK": "base", "X-PAYMENT-BINDING": binding}
    assert_refused(post(gw, headers), gw, reasons.INVALID_PAYMENT_HEADER, status=400)


# ------------------------------------------------------------------------------- 4. exactly once across restarts


def test_consumed_proof_stays_consumed_across_a_restart_sqlite(base_chain: DevChain, tmp_path: Path):
    store = sqlite_url(tmp_path)
    recipient = other_account().address
    with running_gateway(base_chain, store_url=store, payment={"pay_to": recipient}) as gw:
        payer, tx = pay(base_chain, gw)
        assert_served(post(gw, proof(gw, payer, tx)), tx)
    with running_gateway(base_chain, store_url=store, payment={"pay_to": recipient}) as gw:
        assert_refused(post(gw, proof(gw, payer, tx)), gw, reasons.PAYMENT_ALREADY_USED)


def test_consumed_proof_stays_consumed_across_a_restart_redis(
    base_chain: DevChain, redis_url: str, redis_server: RedisServer
):
    recipient = other_account().address
    with running_gateway(base_chain, store_url=redis_url, payment={"pay_to": recipient}) as gw:
        payer, tx = pay(base_chain, gw)
        assert_served(post(gw, proof(gw, payer, tx)), tx)
    redis_server.stop()  # the whole store restarts too (AOF, fsync always)
    redis_server.start()
    with running_gateway(base_chain, store_url=redis_url, payment={"pay_to": recipient}) as gw:
        assert_refused(post(gw, proof(gw, payer, tx)), gw, reasons.PAYMENT_ALREADY_USED)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_unserved_proof_survives_a_restart(
    base_chain: DevChain, tmp_path: Path, request: pytest.FixtureRequest, backend: str
):
    """docs/threat-model.md T11 across a restart: paid, the upstream failed, the gateway restarted: served once, then
    spent."""
    store = sqlite_url(tmp_path) if backend == "sqlite" else request.getfixturevalue("redis_url")
    payment = {"pay_to": other_account().address}
    failing = RecordingUpstream(behaviour=Behaviour(status=503))
    with running_gateway(base_chain, store_url=store, payment=payment, upstream=failing) as gw:
        payer, tx = pay(base_chain, gw)
        assert post(gw, proof(gw, payer, tx)).status_code == 503
        assert len(failing.requests) == 1
    with running_gateway(base_chain, store_url=store, payment=payment) as gw:
        assert_served(post(gw, proof(gw, payer, tx)), tx)
        assert_refused(post(gw, proof(gw, payer, tx)), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)


# --------------------------------------------------------------------------------------- 5. a storm of one proof


def test_hundred_concurrent_presentations_serve_once(base_chain: DevChain, store_url: str):
    with running_gateway(base_chain, store_url=store_url) as gw:
        payer, tx = pay(base_chain, gw)
        storm = fire_together(gw.url, "POST", "/paid", proof(gw, payer, tx), 100)
        assert len(storm.served) == 1, [(r.status_code, r.text[:80]) for r in storm.served]
        assert_served(storm.served[0], tx)
        for r in storm.refused:
            assert (r.status_code, r.json()["error"]) in {
                (402, reasons.PAYMENT_ALREADY_USED),
                (409, reasons.PAYMENT_IN_FLIGHT),
            }, (r.status_code, r.text)
        assert len(gw.upstream.requests) == 1


def test_storm_across_two_gateways_sharing_redis(base_chain: DevChain, redis_url: str):
    """docs/threat-model.md T1-T2 across instances: two gateways behind one public URL, one Redis, one upstream; 100
    requests with one proof released together, alternating between the instances."""
    upstream = RecordingUpstream()
    shared = {
        "store_url": redis_url,
        "payment": {"pay_to": other_account().address},
        "server": {"public_url": "https://api.example"},
        "upstream": upstream,
    }
    with running_gateway(base_chain, **shared) as one, running_gateway(base_chain, **shared) as two:
        payer, tx = pay(base_chain, one)
        headers = tx_proof_headers(payer, tx, "base", "POST", "https://api.example/paid")
        storm = fire_together([one.url, two.url], "POST", "/paid", headers, 100)
        assert len(storm.served) == 1
        assert_served(storm.served[0], tx)
        for r in storm.refused:
            assert (r.status_code, r.json()["error"]) in {
                (402, reasons.PAYMENT_ALREADY_USED),
                (409, reasons.PAYMENT_IN_FLIGHT),
            }, (r.status_code, r.text)
        assert len(upstream.requests) == 1


# ---------------------------------------------------------------------------------------- 6. upstream failure


@pytest.mark.parametrize("path", ["/paid", "/paid-before"])
def test_upstream_failure_does_not_consume_the_proof(base_chain: DevChain, tmp_path: Path, path: str):
    """docs/threat-model.md T11: the money is already on chain; a failed request leaves it usable until one succeeds."""
    upstream = RecordingUpstream(behaviour=Behaviour(status=500, body=b"boom"))
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=upstream) as gw:
        payer, tx = pay(base_chain, gw)
        headers = proof(gw, payer, tx, path=path)
        r = post(gw, headers, path)
        assert (r.status_code, r.content) == (500, b"boom")
        assert len(upstream.requests) == 1
        upstream.reset()  # the upstream is back
        assert_served(post(gw, headers, path), tx)
        assert len(upstream.requests) == 1
        assert_refused(post(gw, headers, path), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)


# ----------------------------------------------------------------------------------------- 7. two networks


def test_route_on_two_networks_takes_a_proof_from_each(base_chain: DevChain, polygon_chain: DevChain, tmp_path: Path):
    with running_gateway([base_chain, polygon_chain], store_url=sqlite_url(tmp_path), routes=MULTI) as gw:
        on_base, base_tx = pay(base_chain, gw)
        on_polygon, polygon_tx = pay(polygon_chain, gw)
        # Each hash exists on one chain only: named with the other network it is not found.
        wrong = proof(gw, on_polygon, polygon_tx, network="base", path="/multi")
        assert_refused(post(gw, wrong, "/multi"), gw, txhash.TX_NOT_FOUND)
        assert_served(post(gw, proof(gw, on_base, base_tx, path="/multi"), "/multi"), base_tx)
        assert_served(
            post(gw, proof(gw, on_polygon, polygon_tx, network="polygon", path="/multi"), "/multi"),
            polygon_tx,
            network="polygon",
        )
        # A network may also be named by its CAIP-2 id (the binding then names it the same way).
        payer, tx = pay(base_chain, gw)
        assert_served(post(gw, proof(gw, payer, tx, network="eip155:8453", path="/multi"), "/multi"), tx)
        assert len(gw.upstream.requests) == 3
        again = proof(gw, on_polygon, polygon_tx, network="polygon", path="/multi")
        assert_refused(post(gw, again, "/multi"), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=3)


# -------------------------------------------------------------------------------------------- 8. a lying RPC


def test_rpc_endpoints_must_agree(base_chain: DevChain, other_base: DevChain, tmp_path: Path):
    """docs/threat-model.md T18: Base through two endpoints, one of which serves another history (a lying or forked
    node)."""
    recipient = other_account().address
    payment = {"pay_to": recipient}
    store = sqlite_url(tmp_path)
    networks = {"base": {"rpc_urls": [base_chain.url, other_base.url]}}
    with running_gateway(base_chain, store_url=store, payment=payment, networks=networks) as gw:
        payer, tx = pay(base_chain, gw)  # real, but the second endpoint has never seen it
        assert_refused(post(gw, proof(gw, payer, tx)), gw, "rpc_disagreement", status=503)
        # The dangerous direction: a payment only the lying endpoint claims to have seen.
        forger, forged = pay(other_base, gw)
        assert_refused(post(gw, proof(gw, forger, forged)), gw, "rpc_disagreement", status=503)
        other_base.stop()  # one of two endpoints left: no majority
        assert_refused(post(gw, proof(gw, payer, tx)), gw, "rpc_no_quorum", status=503)
    honest = {"base": {"rpc_urls": [base_chain.url, base_chain.url]}}
    with running_gateway(base_chain, store_url=store, payment=payment, networks=honest) as gw:
        assert_served(post(gw, proof(gw, payer, tx)), tx)  # nothing was consumed by the refusals
        assert_refused(post(gw, proof(gw, payer, tx)), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)


def test_no_rpc_answering_is_503_not_402(other_base: DevChain, tmp_path: Path):
    """docs/threat-model.md T18: the chain cannot be asked, so the gateway cannot know: fail closed with a 5xx, consume
    nothing."""
    with running_gateway(other_base, store_url=sqlite_url(tmp_path)) as gw:
        payer, tx = pay(other_base, gw)
        other_base.stop()
        assert_refused(post(gw, proof(gw, payer, tx)), gw, "chain_unavailable", status=503)


def test_one_lying_endpoint_cannot_fake_confirmations(base_chain: DevChain, tmp_path: Path):
    with serve_asgi(HeadLiar(base_chain.url, ahead=10)) as liar:
        networks = {"base": {"rpc_urls": [liar, base_chain.url], "confirmations": 3}}
        with running_gateway(base_chain, store_url=sqlite_url(tmp_path), networks=networks) as gw:
            payer, tx = pay(base_chain, gw)
            assert_refused(post(gw, proof(gw, payer, tx)), gw, txhash.TX_NOT_FINAL)


# ------------------------------------------------------------------------------------------- 9. store outage


def test_store_outage_fails_closed_then_the_proof_works_once(
    base_chain: DevChain, redis_url: str, redis_server: RedisServer
):
    with running_gateway(base_chain, store_url=redis_url) as gw:
        payer, tx = pay(base_chain, gw)
        headers = proof(gw, payer, tx)
        redis_server.stop()
        try:
            assert_refused(post(gw, headers), gw, "store_unavailable", status=503)
        finally:
            redis_server.start()
        assert_served(post(gw, headers), tx)
        assert_refused(post(gw, headers), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)
