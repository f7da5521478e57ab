"""One payment buys one request: replays, re-encodings, races and restarts, over both stores
(docs/threat-model.md T1, T2)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.chain.abi import AUTHORIZATION_USED_TOPIC
from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from tests.e2e import craft
from tests.e2e.helpers import Balances, assert_402, decode_payment, error_of, fire_together, receipt_of
from tests.support.gateway import GatewayUnderTest, running_gateway

PRICE = 100_000  # POST /paid and POST /paid-before


def pay(gw: GatewayUnderTest, payer: Any, path: str = "/paid", version: int = 2) -> tuple[str, str]:
    challenge = httpx.post(gw.url + path)
    assert challenge.status_code == 402
    return gw.sign(payer, challenge, version=version)


def test_same_payment_presented_again_is_refused_as_replay(base_chain: DevChain, store_url: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer)
        first = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert first.status_code == 200, first.text
        for _ in range(3):
            again = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
            assert_402(again, reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def _reencodings(value: str, req_v2: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """The same authorization and signature, spelled every way a client (or an attacker) might."""
    auth, sig, doc = decode_payment(value)
    upper_auth = {
        **auth,
        "from": craft.upper_hex(auth["from"]),
        "to": craft.upper_hex(auth["to"]),
        "nonce": craft.upper_hex(auth["nonce"]),
    }
    lower_auth = {**auth, "from": auth["from"].lower(), "to": auth["to"].lower()}
    v_low = "0x" + sig[2:-2] + f"{int(sig[-2:], 16) - 27:02x}"  # v as 0/1 instead of 27/28: same signature
    v2 = "PAYMENT-SIGNATURE"
    return [
        ("reversed key order", {v2: craft.encode(craft.reversed_keys(doc))}),
        ("sorted keys, pretty JSON", {v2: craft.encode(doc, sort_keys=True, compact=False)}),
        ("uppercase hex addresses and nonce", {v2: craft.encode(craft.v2_envelope(upper_auth, sig, accepted=req_v2))}),
        ("lowercase addresses", {v2: craft.encode(craft.v2_envelope(lower_auth, sig, accepted=req_v2))}),
        ("uppercase signature", {v2: craft.encode(craft.v2_envelope(auth, craft.upper_hex(sig), accepted=req_v2))}),
        ("v as 0/1", {v2: craft.encode(craft.v2_envelope(auth, v_low, accepted=req_v2))}),
        ("base64 without padding", {v2: value.rstrip("=")}),
        ("url-safe base64", {v2: craft.encode(doc, urlsafe=True, padding=False)}),
        ("numbers as JSON integers", {v2: craft.encode(craft.v2_envelope(
            {**auth, "value": int(auth["value"]), "validAfter": int(auth["validAfter"])}, sig, accepted=req_v2))}),
        ("v1 envelope", {"X-PAYMENT": craft.encode(craft.v1_envelope(auth, sig))}),
        ("v1 envelope, uppercase hex", {"X-PAYMENT": craft.encode(craft.v1_envelope(upper_auth, sig))}),
        ("v2 document in the v1 header", {"X-PAYMENT": value}),
        ("v1 document in the v2 header", {v2: craft.encode(craft.v1_envelope(auth, sig))}),
    ]  # fmt: skip


def test_reencoded_authorization_is_the_same_payment(base_chain: DevChain, store_url: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        challenge = httpx.post(gw.url + "/paid")
        req_v2 = gw.options(challenge)[0].requirement
        name, value = gw.sign(payer, challenge)
        first = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert first.status_code == 200, first.text
        for label, headers in _reencodings(value, req_v2):
            again = httpx.post(gw.url + "/paid", headers=headers, timeout=30)
            assert again.status_code == 402, (label, again.status_code, again.text)
            assert error_of(again) == reasons.PAYMENT_ALREADY_USED, (label, again.text)
        # Another route at the same price: the key is the money (chain, asset, payer, nonce), not the route.
        elsewhere = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
        assert_402(elsewhere, reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


def test_reencoded_authorization_first_as_v1_then_as_v2(base_chain: DevChain, store_url: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        challenge = httpx.post(gw.url + "/paid")
        req_v2 = gw.options(challenge)[0].requirement
        name, value = gw.sign(payer, challenge, version=1)
        assert name == "X-PAYMENT"
        first = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert first.status_code == 200, first.text
        auth, sig, _ = decode_payment(value)
        as_v2 = craft.encode(craft.v2_envelope(auth, sig, accepted=req_v2))
        again = httpx.post(gw.url + "/paid", headers={"PAYMENT-SIGNATURE": as_v2}, timeout=30)
        assert_402(again, reasons.PAYMENT_ALREADY_USED)
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


@pytest.mark.parametrize("path", ["/paid", "/paid-before"])
def test_50_concurrent_requests_with_one_payment_are_served_once(
    base_chain: DevChain, store_url: str, path: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        name, value = pay(gw, payer, path)
        responses = fire_together(gw.url, "POST", path, {name: value}, 50)
        statuses = sorted(r.status_code for r in responses)
        winners = [r for r in responses if r.status_code < 300]
        assert len(winners) == 1, statuses
        assert receipt_of(winners[0])["success"] is True
        for r in responses:
            if r.status_code >= 300:
                assert r.status_code in (402, 409), (r.status_code, r.text)
                assert error_of(r) in (reasons.PAYMENT_IN_FLIGHT, reasons.PAYMENT_ALREADY_USED), r.text
        assert len(gw.upstream.requests) == 1
        balances.assert_charged_once(PRICE)


USED = "0x" + AUTHORIZATION_USED_TOPIC.hex()


def test_control_20_distinct_payments_concurrently_are_all_served(base_chain: DevChain, store_url: str) -> None:
    payer = base_chain.new_payer(3_000_000)
    with running_gateway(base_chain, store_url=store_url) as gw:
        balances = Balances(gw, payer.address)
        challenge = httpx.post(gw.url + "/paid")
        headers = [dict([gw.sign(payer, challenge)]) for _ in range(20)]  # one payer, 20 distinct nonces
        responses = fire_together(gw.url, "POST", "/paid", headers, 20)
        assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
        assert len(gw.upstream.requests) == 20
        # Settlements may share a transaction (a Multicall3 batch); each receipt must name one that executed
        # that very authorization (its AuthorizationUsed log), and the payer paid exactly 20 times.
        for (value,), r in zip((h.values() for h in headers), responses, strict=True):
            nonce = decode_payment(value)[0]["nonce"].lower()
            mined = base_chain.rpc("eth_getTransactionReceipt", [receipt_of(r)["transaction"]])
            used = [log["topics"][2].lower() for log in mined["logs"] if log["topics"][0] == USED]
            assert nonce in used
        balances.assert_charged_once(20 * PRICE)


def test_payment_consumed_before_a_restart_is_refused_after_it(base_chain: DevChain, store_url: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=store_url) as first_gw:
        pay_to = first_gw.pay_to
        name, value = pay(first_gw, payer)
        ok = httpx.post(first_gw.url + "/paid", headers={name: value}, timeout=30)
        assert ok.status_code == 200, ok.text
    # A new gateway process-equivalent (new app, new store connection) on the same store and the same pay-to.
    with running_gateway(base_chain, store_url=store_url, payment={"pay_to": pay_to}) as second_gw:
        before = (second_gw.balance(payer.address), second_gw.balance(pay_to))
        again = httpx.post(second_gw.url + "/paid", headers={name: value}, timeout=30)
        assert_402(again, reasons.PAYMENT_ALREADY_USED)
        assert second_gw.upstream.requests == []
        assert (second_gw.balance(payer.address), second_gw.balance(pay_to)) == before
