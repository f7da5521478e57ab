"""What is served on a channel must be claimable on chain, or the payer is served for free and takes the deposit
back by withdrawal (docs/threat-model.md T44):

* a signature with v = 0/1 recovers off chain, but the contract's ECDSA takes only 27/28: the gateway keeps and
  claims the canonical form, so such a voucher (and such a deposit authorization) is served *and* paid;
* a channel whose ``payerAuthorizer`` is zero makes the payer's code the judge of every voucher at claim time (it
  could accept now and refuse later): refused before anything is deposited or served.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.sessions.crafted import CraftedChannel, corrective, session_offer
from tests.sessions.test_official_client_sessions import engine_of, wait_for
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url

PRICE = 1_000
DEPOSIT = 10_000
ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]}]
# Everything owed is claimed a second after it was charged, and swept to pay_to right after.
CLAIMING = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 0.2, "claim_after": 1.0, "settle_interval": 0.2}
ZERO = "0x" + "00" * 20
# Runtime code answering every call with the ERC-1271 magic value (isValidSignature: "valid").
ACCEPTS_EVERYTHING = "0x631626ba7e60e01b60005260206000f3"


@pytest.fixture(scope="module")
def gw(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    store = sqlite_url(tmp_path_factory.mktemp("claimable"))
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=CLAIMING) as gateway:
        yield gateway


def low_v(signed: dict[str, Any]) -> dict[str, Any]:
    """The same signature with v as 0/1 (what some signers emit) instead of 27/28."""
    raw = bytes.fromhex(signed["signature"][2:])
    assert raw[64] in (27, 28)
    return {**signed, "signature": "0x" + (raw[:64] + bytes([raw[64] - 27])).hex()}


def pay(gw: GatewayUnderTest, payload: dict[str, Any], ch: CraftedChannel) -> httpx.Response:
    return httpx.get(gw.url + "/session", headers=ch.header(payload), timeout=30)


def test_a_voucher_and_a_deposit_signed_with_v_0_or_1_are_served_and_paid_to_pay_to(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    offer = session_offer(httpx.get(gw.url + "/session"))
    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, offer)
    deposit = ch.deposit(DEPOSIT, voucher_max=PRICE)
    deposit["voucher"] = low_v(deposit["voucher"])
    auth = deposit["deposit"]["authorization"]["erc3009Authorization"]
    deposit["deposit"]["authorization"]["erc3009Authorization"] = low_v(auth)
    r = pay(gw, deposit, ch)
    assert r.status_code == 200, r.text
    assert base_chain.balance(payer.address) == 1_000_000 - DEPOSIT
    for n in range(2, 6):
        voucher = ch.paying(n * PRICE)
        voucher["voucher"] = low_v(voucher["voucher"])
        r = pay(gw, voucher, ch)
        assert r.status_code == 200, r.text
    charged = 5 * PRICE
    assert int(decode_header(r.headers["payment-response"])["extra"]["channelState"]["chargedCumulativeAmount"]) == (
        charged
    )
    # The claim of those vouchers lands (the contract verified what the gateway kept), and pay_to is paid.
    wait_for(lambda: ch.onchain(base_chain).total_claimed == charged, timeout=20)
    wait_for(lambda: base_chain.balance(gw.pay_to) == charged, timeout=20)
    assert engine_of(gw).claimer.stats.dropped == 0  # no claim of it was ever going to revert
    # The corrective 402 hands the stored voucher back: in the canonical form, which the client can check too.
    r = pay(gw, ch.paying(charged), ch)
    assert r.status_code == 402
    assert corrective(r)["voucherState"]["signature"][-2:] in ("1b", "1c")


def test_a_channel_without_a_payer_authorizer_is_refused_and_nothing_is_served(
    gw: GatewayUnderTest, base_chain: DevChain
) -> None:
    offer = session_offer(httpx.get(gw.url + "/session"))
    payer = base_chain.new_payer(1_000_000)
    # The payer's account has code (a smart wallet, or an EOA's EIP-7702 delegation) that accepts every signature
    # today through ERC-1271; the same code could refuse them when the claim executes.
    base_chain.rpc("anvil_setCode", [payer.address, ACCEPTS_EVERYTHING])
    asked = base_chain.rpc("eth_call", [{"to": payer.address, "data": "0x1626ba7e" + "00" * 96}, "latest"])
    assert asked.startswith("0x1626ba7e")
    ch = CraftedChannel.from_offer(payer, offer, payer_authorizer=ZERO)
    for payload in (ch.deposit(DEPOSIT, voucher_max=PRICE), ch.paying(PRICE)):
        before = len(gw.upstream.requests)
        r = pay(gw, payload, ch)
        assert r.status_code == 402, r.text
        assert decode_header(r.headers["payment-required"])["error"] == reasons.SESSION_VOUCHER_SIGNATURE
        assert len(gw.upstream.requests) == before
    assert base_chain.balance(payer.address) == 1_000_000  # nothing deposited
    assert ch.onchain(base_chain).balance == 0
