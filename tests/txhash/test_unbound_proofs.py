"""Tx-hash proofs without a payer binding, on the routes that opt in (``tx_hash_binding = "optional"``): the agents
that send only ``x-payment: <tx hash>`` and ``x-payment-network`` (docs/threat-model.md T43).

Real gateway, real anvil, real SQLite/Redis stores. The default stays as it was (T3: an unbound proof is refused
with ``payment_binding_required``); on an optional route the transfer's effect key still pays exactly once, so the
first presenter is served and every later presentation of the same transfer, bound or not, anywhere, is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.schemas.v1 import PaymentRequiredV1

from gateway.config import parse_config
from gateway.dev.chain import DevChain, mint
from gateway.errors import ConfigError
from gateway.x402 import reasons, txhash
from tests.ops.support import samples, value
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url
from tests.txhash.helpers import (
    PRICE,
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

ROUTES: list[dict[str, Any]] = [
    {"route": "POST /paid", "price": "0.10"},  # the default: binding required
    {"route": "POST /open", "price": "0.10", "tx_hash_binding": "optional"},
    {"route": "GET /open-get", "price": "0.10", "tx_hash_binding": "optional"},
]


def unbound(tx_hash: str, network: str = "base") -> dict[str, str]:
    """What the seed-004 agents send: the hash and the network, nothing else (lowercase names, as they spell them)."""
    return {"x-payment": tx_hash, "x-payment-network": network}


def post(gw: GatewayUnderTest, headers: dict[str, str], path: str = "/open") -> httpx.Response:
    with gw.client() as client:
        return client.post(path, headers=headers, json={"q": 1})


@pytest.fixture
def open_gw(base_chain: DevChain, tmp_path: Path) -> Any:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        yield gw


# ------------------------------------------------------------------------------------------- 1. the challenge


def test_402_of_an_optional_route_says_the_binding_is_optional_and_what_that_risks(open_gw: GatewayUnderTest):
    gw = open_gw
    open_402, paid_402 = post(gw, {}), post(gw, {}, "/paid")
    assert (open_402.status_code, paid_402.status_code) == (402, 402)

    ext = b64json(open_402.headers["payment-required"])["extensions"]["txhash"]
    assert ext["binding"] == "optional"
    assert ext["note"] == txhash.UNBOUND_NOTE
    assert "first" in ext["note"] and "anyone who sees" in ext["note"].lower()
    assert open_402.json()["payment"] == ext["options"]  # v1 agents read the same options, note included
    for option in ext["options"]:
        assert option["binding"]["required"] is False
        assert option["binding"]["note"] == txhash.UNBOUND_NOTE
        # A payer who wants the protection can still sign: the message is the same as on a required route.
        assert option["binding"]["message"] == txhash.binding_message("<tx hash>", "base", "POST", gw.url + "/open")
    PaymentRequiredV1.model_validate(open_402.json())  # strict clients still read it

    required = b64json(paid_402.headers["payment-required"])["extensions"]["txhash"]
    assert required["binding"] == "required" and "note" not in required
    for option in required["options"]:
        assert option["binding"]["required"] is True and "note" not in option["binding"]


# --------------------------------------------------------------------------------- 2. the default is unchanged


def test_the_default_route_still_refuses_an_unbound_proof(base_chain: DevChain, open_gw: GatewayUnderTest):
    """docs/threat-model.md T3 holds on a route that did not opt in, even beside one that did."""
    gw = open_gw
    payer, tx = pay(base_chain, gw)
    assert_refused(post(gw, unbound(tx), "/paid"), gw, reasons.BINDING_REQUIRED)
    assert_served(post(gw, proof(gw, payer, tx), "/paid"), tx)  # the refusal consumed nothing


# ------------------------------------------------------------------------------------- 3. first presenter wins


def test_an_unbound_proof_is_served_once_and_the_transfer_never_pays_again(base_chain: DevChain, store_url: str):
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES) as gw:
        payer, tx = pay(base_chain, gw)
        receipt = assert_served(post(gw, unbound(tx)), tx)
        assert receipt["payer"].lower() == payer.address.lower()  # whose money it was, not who presented it
        (seen,) = gw.upstream.requests
        assert not {"x-payment", "x-payment-network"} & {k for k, _ in seen.headers}

        # The same presentation again; another presenter on its own connection, spelling the hash and the network
        # another way; another optional route with another method.
        assert_refused(post(gw, unbound(tx)), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)
        other = {"X-PAYMENT": "0x" + tx[2:].upper(), "X-PAYMENT-NETWORK": "eip155:8453"}
        with httpx.Client(base_url=gw.url, timeout=30) as someone_else:
            again = someone_else.post("/open", headers=other, content=b"{}")
        assert_refused(again, gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)
        with gw.client() as client:
            as_get = client.get("/open-get", headers=unbound(tx))
        assert_refused(as_get, gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)

        # The payer's own bound presentation comes too late, on this route and on a route that requires the binding.
        assert_refused(post(gw, proof(gw, payer, tx, path="/open")), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)
        assert_refused(post(gw, proof(gw, payer, tx), "/paid"), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)


def test_a_bound_proof_on_an_optional_route_is_checked_as_on_any_route(base_chain: DevChain, open_gw: GatewayUnderTest):
    """A binding that is sent must be the sender's (T3); a wrong or malformed one is never read as "no binding"."""
    gw = open_gw
    payer, tx = pay(base_chain, gw)
    assert_refused(post(gw, proof(gw, other_account(), tx, path="/open")), gw, txhash.BINDING_MISMATCH)
    assert_refused(post(gw, proof(gw, payer, tx, path="/paid")), gw, txhash.BINDING_MISMATCH)  # signed for /paid
    malformed = {**unbound(tx), "X-PAYMENT-BINDING": "0xzz"}
    assert_refused(post(gw, malformed), gw, reasons.INVALID_PAYMENT_HEADER, status=400)
    assert_served(post(gw, proof(gw, payer, tx, path="/open")), tx)
    assert_refused(post(gw, unbound(tx)), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)


def test_an_unbound_proof_skips_the_binding_and_nothing_else(
    base_chain: DevChain, open_gw: GatewayUnderTest, fake_token: str
):
    """Fake token, wrong recipient, underpayment, unknown hash, wrong or missing network, and our own relayer's
    settlement of an ``exact`` payment (public, and already collected: T26) are refused without a binding too."""
    gw = open_gw
    forger = new_tx_payer(base_chain, usdc=0)
    mint(base_chain.anvil, fake_token, forger.address, PRICE)
    forged = erc20_transfer(base_chain, forger, pay_to(gw), PRICE, token=fake_token)
    assert_refused(post(gw, unbound(forged)), gw, txhash.TRANSFER_NOT_FOUND)
    _, elsewhere = pay(base_chain, gw, to=other_account().address)
    assert_refused(post(gw, unbound(elsewhere)), gw, txhash.TRANSFER_NOT_FOUND)
    _, short = pay(base_chain, gw, PRICE - 1)
    assert_refused(post(gw, unbound(short)), gw, txhash.AMOUNT_TOO_LOW)
    assert_refused(post(gw, unbound("0x" + "ab" * 32)), gw, txhash.TX_NOT_FOUND)
    _, tx = pay(base_chain, gw)
    assert_refused(post(gw, unbound(tx, network="polygon")), gw, reasons.NETWORK_MISMATCH)
    assert_refused(post(gw, {"x-payment": tx}), gw, txhash.NETWORK_REQUIRED)

    exact_payer = base_chain.new_payer(1_000_000)
    with gw.client() as client:
        name, value = gw.sign(exact_payer, client.post("/paid", json={}))
        settled = client.post("/paid", json={}, headers={name: value})
    assert settled.status_code == 200, settled.text
    settlement = b64json(settled.headers["payment-response"])["transaction"]
    assert_refused(post(gw, unbound(settlement)), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=1)

    assert_served(post(gw, unbound(tx)), tx)  # none of the refusals consumed the genuine transfer


def test_concurrent_unbound_presentations_serve_once(base_chain: DevChain, store_url: str):
    """docs/threat-model.md T2 for the first-presenter rule: a race of presenters has exactly one winner."""
    with running_gateway(base_chain, store_url=store_url, routes=ROUTES) as gw:
        _, tx = pay(base_chain, gw)
        storm = fire_together(gw.url, "POST", "/open", unbound(tx), 50)
        assert len(storm.served) == 1, [(r.status_code, r.text[:80]) for r in storm.served]
        assert_served(storm.served[0], tx)
        for r in storm.refused:
            assert (r.status_code, r.json()["error"]) in {
                (402, reasons.PAYMENT_ALREADY_USED),
                (409, reasons.PAYMENT_IN_FLIGHT),
            }, (r.status_code, r.text)
        assert len(gw.upstream.requests) == 1


# ----------------------------------------------------------------------------------------- 4. what operators see


def test_unbound_proofs_served_are_counted_and_marked_in_the_access_log(
    base_chain: DevChain, open_gw: GatewayUnderTest, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = open_gw
    _, first = pay(base_chain, gw)
    signer, second = pay(base_chain, gw)
    assert_served(post(gw, unbound(first)), first)
    assert_served(post(gw, proof(gw, signer, second, path="/open")), second)  # bound: not counted
    assert_refused(post(gw, unbound(first)), gw, reasons.PAYMENT_ALREADY_USED, upstream_calls=2)  # refused: not counted
    _, third = pay(base_chain, gw)
    assert_refused(post(gw, unbound(third), "/paid"), gw, reasons.BINDING_REQUIRED, upstream_calls=2)

    with gw.client() as client:
        m = samples(client.get("/metrics").text)
    counted = {labels: v for (name, labels), v in m.items() if name == "x402_gateway_unbound_txhash_total"}
    assert counted == {(("route", "POST /open"),): 1.0}
    assert value(m, "x402_gateway_payments_verified_total", kind="txhash") == 2  # both kinds are still payments

    lines = [r.__dict__["access"] for r in caplog.records if r.name == "gateway.access"]
    paid = {line["tx_hash"]: line for line in lines if line["outcome"] == "paid"}
    assert paid[first]["unbound"] is True
    assert paid[second]["unbound"] is False
    refused = [line for line in lines if line["outcome"] == "refused"]
    assert len(refused) == 2 and not any(line["unbound"] for line in refused)


# ----------------------------------------------------------------------------------------- 5. configuration

ENV = {"X402_RELAYER_KEY": "0x" + "ab" * 32}


def config_with(**route: Any) -> Any:
    return parse_config(
        {
            "upstream": {"url": "http://127.0.0.1:9000"},
            "payment": {"pay_to": "0x" + "11" * 20},
            "networks": {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}},
            "routes": [{"route": "POST /a", "price": "0.10", **route}],
        },
        env=ENV,
    )


def test_the_binding_is_required_unless_a_route_opts_out():
    assert config_with().routes[0].tx_hash_binding == "required"
    assert config_with(tx_hash_binding="required").routes[0].tx_hash_binding == "required"
    assert config_with(tx_hash_binding="optional").routes[0].tx_hash_binding == "optional"


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"tx_hash_binding": "Optional"}, 'must be one of "required", "optional"'),
        ({"tx_hash_binding": "none"}, 'must be one of "required", "optional"'),
        ({"tx_hash_binding": ""}, 'must be one of "required", "optional"'),
        ({"tx_hash_binding": False}, "expected a string"),
        ({"tx_hash_binding": "optional", "tx_hash": False}, "needs tx_hash = true"),
    ],
    ids=["capitalised", "none", "empty", "bool", "without-tx-hash"],
)
def test_a_bad_tx_hash_binding_fails_at_load_naming_the_key(route: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as info:
        config_with(**route)
    assert info.value.key == "routes[0].tx_hash_binding"
    assert message in str(info.value), str(info.value)
