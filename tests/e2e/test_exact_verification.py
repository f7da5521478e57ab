"""Every verification failure of an ``exact`` (EIP-3009) payment -> 402 with its own reason, nothing upstream,
no money moved (docs/protocol.md §2; docs/threat-model.md T4, T6, T7, T8).

Payments are crafted by hand (tests/e2e/craft.py) so that exactly one field is wrong at a time; a genuine
payment built the same way is the control that succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DEV_KEYS, POLYGON_USDC, DevChain
from gateway.x402 import reasons
from tests.e2e import craft
from tests.e2e.helpers import Balances, assert_402, authorization_used, receipt_of
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url

PRICE = 100_000  # POST /paid, $0.10
THIRD_PARTY_KEY = DEV_KEYS[5]  # has ETH; not the gateway's relayer (DEV_KEYS[0]) nor the minter (DEV_KEYS[9])
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.fixture(scope="module")
def gw(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path_factory.mktemp("verify"))) as gw:
        yield gw


@dataclass
class Kit:
    """One payer, the server's own requirement for POST /paid, and ways to pay it (correctly or not)."""

    gw: GatewayUnderTest
    chain: DevChain
    payer: LocalAccount
    req: dict[str, Any]  # the v2 requirement as the 402 offers it
    now: int

    def auth(self, **kw: Any) -> dict[str, str]:
        to = kw.pop("to", self.gw.pay_to)
        value = kw.pop("value", PRICE)
        return craft.authorization(self.payer.address, to, value, now=self.now, **kw)

    def sig(self, auth: dict[str, str], signer: LocalAccount | str | None = None, **domain: Any) -> str:
        return craft.sign_for(signer or self.payer, auth, self.chain, **domain)

    def v1(self, auth: dict[str, str], sig: str, **kw: Any) -> dict[str, str]:
        return {"X-PAYMENT": craft.encode(craft.v1_envelope(auth, sig, **kw))}

    def v2(self, auth: dict[str, str], sig: str, accepted: dict[str, Any] | None = None, **kw: Any) -> dict[str, str]:
        env = craft.v2_envelope(auth, sig, accepted=accepted or self.req, **kw)
        return {"PAYMENT-SIGNATURE": craft.encode(env)}


@pytest.fixture
def kit(gw: GatewayUnderTest, base_chain: DevChain) -> Kit:
    gw.upstream.reset()
    challenge = httpx.post(gw.url + "/paid")
    assert challenge.status_code == 402
    req = gw.options(challenge)[0].requirement
    return Kit(gw, base_chain, base_chain.new_payer(1_000_000), req, int(time.time()))


def refused(kit: Kit, headers: dict[str, str], reason: str, *, method: str = "POST", path: str = "/paid") -> None:
    """The payment is refused with ``reason``; the upstream never hears of it; no money moves."""
    balances = Balances(kit.gw, kit.payer.address)
    response = httpx.request(method, kit.gw.url + path, headers=headers, timeout=30)
    assert_402(response, reason)
    assert kit.gw.upstream.requests == []
    balances.assert_unchanged()


# ------------------------------------------------------------------------------------------------ the control


@pytest.mark.parametrize("version", [1, 2])
def test_genuine_crafted_payment_is_served_once_and_charged_once(kit: Kit, version: int) -> None:
    balances = Balances(kit.gw, kit.payer.address)
    auth = kit.auth()
    headers = (kit.v1 if version == 1 else kit.v2)(auth, kit.sig(auth))
    response = httpx.post(kit.gw.url + "/paid", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert len(kit.gw.upstream.requests) == 1
    balances.assert_charged_once(PRICE)
    assert receipt_of(response)["success"] is True
    assert authorization_used(kit.chain, kit.payer.address, auth["nonce"])


# ------------------------------------------------------------------------------------- one wrong field each


Builder = Callable[[Kit], dict[str, str]]


def _wrong_pay_to_v1(k: Kit) -> dict[str, str]:
    auth = k.auth(to=Account.create().address)
    return k.v1(auth, k.sig(auth))


def _wrong_pay_to_v2_echoed(k: Kit) -> dict[str, str]:
    # The client signs a modified copy of the requirement and echoes that copy back: the echo is never trusted.
    other = Account.create().address
    auth = k.auth(to=other)
    return k.v2(auth, k.sig(auth), accepted={**k.req, "payTo": other})


def _wrong_pay_to_v2_honest_echo(k: Kit) -> dict[str, str]:
    auth = k.auth(to=Account.create().address)
    return k.v2(auth, k.sig(auth))


def _value(delta: int, version: int) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth(value=PRICE + delta)
        if version == 1:
            return k.v1(auth, k.sig(auth))
        return k.v2(auth, k.sig(auth), accepted={**k.req, "amount": str(PRICE + delta)})

    return build


def _value_v2_honest_echo(delta: int) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth(value=PRICE + delta)
        return k.v2(auth, k.sig(auth))

    return build


def _window(**fields: Callable[[int], int]) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth(**{name: f(k.now) for name, f in fields.items()})
        return k.v2(auth, k.sig(auth))

    return build


def _signed_by_another_key(k: Kit) -> dict[str, str]:
    auth = k.auth()  # from = the payer, signed by a stranger
    return k.v2(auth, k.sig(auth, signer=Account.create()))


def _signed_by_another_key_v1(k: Kit) -> dict[str, str]:
    auth = k.auth()
    return k.v1(auth, k.sig(auth, signer=Account.create()))


def _malleated_high_s(k: Kit) -> dict[str, str]:
    # (r, n - s, v ^ 1) recovers to the same signer, but EIP-2 / USDC's ECRecover refuse high s.
    auth = k.auth()
    raw = bytes.fromhex(k.sig(auth)[2:])
    s = SECP256K1_N - int.from_bytes(raw[32:64], "big")
    v = 55 - raw[64]  # 27 <-> 28
    return k.v2(auth, "0x" + (raw[:32] + s.to_bytes(32, "big") + bytes([v])).hex())


def _domain(**domain: Any) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth()
        return k.v2(auth, k.sig(auth, **domain))

    return build


def _domain_v1(**domain: Any) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth()
        return k.v1(auth, k.sig(auth, **domain))

    return build


def _network_v1(network: str, chain_id: int) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth()
        return k.v1(auth, k.sig(auth, chain_id=chain_id), network=network)

    return build


def _network_v2(network: str, chain_id: int) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth()
        return k.v2(auth, k.sig(auth, chain_id=chain_id), accepted={**k.req, "network": network})

    return build


def _asset_v2(asset: str) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth()
        return k.v2(auth, k.sig(auth, verifying_contract=asset), accepted={**k.req, "asset": asset})

    return build


def _scheme_v1(k: Kit) -> dict[str, str]:
    auth = k.auth()
    return k.v1(auth, k.sig(auth), scheme="upto")


def _scheme_v2(k: Kit) -> dict[str, str]:
    auth = k.auth()
    return k.v2(auth, k.sig(auth), accepted={**k.req, "scheme": "upto"})


def _version(version: int, header: str) -> Builder:
    def build(k: Kit) -> dict[str, str]:
        auth = k.auth()
        sig = k.sig(auth)
        if header == "X-PAYMENT":
            return {header: craft.encode(craft.v1_envelope(auth, sig, x402Version=version))}
        return {header: craft.encode(craft.v2_envelope(auth, sig, accepted=k.req, x402Version=version))}

    return build


CASES: list[tuple[str, Builder, str]] = [
    ("wrong_pay_to_v1", _wrong_pay_to_v1, reasons.RECIPIENT_MISMATCH),
    ("wrong_pay_to_v2_echoing_a_modified_requirement", _wrong_pay_to_v2_echoed, reasons.RECIPIENT_MISMATCH),
    ("wrong_pay_to_v2_honest_echo", _wrong_pay_to_v2_honest_echo, reasons.RECIPIENT_MISMATCH),
    ("underpayment_value_minus_one_v1", _value(-1, 1), reasons.VALUE_MISMATCH),
    ("underpayment_value_minus_one_v2", _value(-1, 2), reasons.VALUE_MISMATCH),
    ("underpayment_value_minus_one_v2_honest_echo", _value_v2_honest_echo(-1), reasons.VALUE_MISMATCH),
    ("overpayment_value_plus_one_v1", _value(+1, 1), reasons.VALUE_MISMATCH),
    ("overpayment_value_plus_one_v2", _value(+1, 2), reasons.VALUE_MISMATCH),
    ("decimals_confusion_value_times_ten", _value(PRICE * 9, 1), reasons.VALUE_MISMATCH),
    ("expired_valid_before_in_the_past", _window(valid_before=lambda now: now - 10), reasons.VALID_BEFORE_EXPIRED),
    ("expiring_within_the_6s_grace", _window(valid_before=lambda now: now + 3), reasons.VALID_BEFORE_EXPIRED),
    # settlement "after": the upstream (read_timeout 10 s here) is waited for first, so 6 + 10 s are needed
    (
        "expiring_before_the_upstream_could_answer_and_the_settlement_follow",
        _window(valid_before=lambda now: now + 12),
        reasons.VALID_BEFORE_EXPIRED,
    ),
    (
        "valid_before_beyond_max_timeout_plus_skew",
        _window(valid_before=lambda now: now + 300 + 60 + 120),
        reasons.VALID_BEFORE_TOO_FAR,
    ),
    ("valid_before_uint256_max", _window(valid_before=lambda now: 2**256 - 1), reasons.VALID_BEFORE_TOO_FAR),
    ("not_yet_valid_valid_after_in_the_future", _window(valid_after=lambda now: now + 120), reasons.VALID_AFTER_FUTURE),
    ("bad_signature_by_another_key_v2", _signed_by_another_key, reasons.INVALID_SIGNATURE),
    ("bad_signature_by_another_key_v1", _signed_by_another_key_v1, reasons.INVALID_SIGNATURE),
    ("malleated_high_s_signature", _malleated_high_s, reasons.INVALID_SIGNATURE),
    ("signature_over_another_chain_id", _domain(chain_id=137), reasons.INVALID_SIGNATURE),
    ("signature_over_base_sepolia_chain_id_v1", _domain_v1(chain_id=84532), reasons.INVALID_SIGNATURE),
    ("signature_over_another_eip712_name", _domain(name="USDC"), reasons.INVALID_SIGNATURE),
    ("signature_over_another_eip712_version", _domain(version="1"), reasons.INVALID_SIGNATURE),
    (
        "signature_over_another_verifying_contract_v1",
        _domain_v1(verifying_contract=POLYGON_USDC),
        reasons.INVALID_SIGNATURE,
    ),
    ("wrong_network_v1_polygon_on_a_base_only_route", _network_v1("polygon", 137), reasons.NETWORK_MISMATCH),
    ("wrong_network_v1_with_a_caip2_id", _network_v1("eip155:8453", 8453), reasons.NETWORK_MISMATCH),
    ("wrong_network_v2_ethereum_mainnet", _network_v2("eip155:1", 1), reasons.NETWORK_MISMATCH),
    ("wrong_network_v2_polygon", _network_v2("eip155:137", 137), reasons.NETWORK_MISMATCH),
    ("wrong_asset_v2_polygon_usdc", _asset_v2(POLYGON_USDC), reasons.ASSET_MISMATCH),
    ("wrong_asset_v2_fake_token", _asset_v2(Account.create().address), reasons.ASSET_MISMATCH),
    ("scheme_upto_v1", _scheme_v1, reasons.UNSUPPORTED_SCHEME),
    ("scheme_upto_v2", _scheme_v2, reasons.UNSUPPORTED_SCHEME),
    ("x402_version_3_v2_envelope", _version(3, "PAYMENT-SIGNATURE"), reasons.UNSUPPORTED_VERSION),
    ("x402_version_3_v1_envelope", _version(3, "X-PAYMENT"), reasons.UNSUPPORTED_VERSION),
    ("x402_version_0", _version(0, "X-PAYMENT"), reasons.UNSUPPORTED_VERSION),
]


@pytest.mark.parametrize(("build", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_verification_failure_is_a_402_with_its_own_reason(kit: Kit, build: Builder, reason: str) -> None:
    refused(kit, build(kit), reason)


# ---------------------------------------------------------------------------------------- on-chain failures


@pytest.mark.parametrize("balance", [0, PRICE - 1])
def test_insufficient_balance_is_refused_before_settlement(kit: Kit, balance: int) -> None:
    kit.payer = kit.chain.new_payer(balance)
    auth = kit.auth()
    refused(kit, kit.v2(auth, kit.sig(auth)), reasons.INSUFFICIENT_BALANCE)


def test_nonce_already_used_on_chain_for_a_different_transfer(kit: Kit) -> None:
    # The payer's nonce N already moved money to someone else; an authorization to us with the same N can never
    # execute, and must not be mistaken for "someone else settled our payment first".
    nonce = craft.random_nonce()
    elsewhere = kit.auth(to=Account.create().address, value=1_000, nonce=nonce)
    craft.execute_authorization(kit.chain, elsewhere, kit.sig(elsewhere), key=THIRD_PARTY_KEY)
    assert authorization_used(kit.chain, kit.payer.address, nonce)
    ours = kit.auth(nonce=nonce)
    refused(kit, kit.v2(ours, kit.sig(ours)), reasons.NONCE_ALREADY_USED)


def test_nonce_already_used_for_a_smaller_transfer_to_us(kit: Kit) -> None:
    # Same nonce, executed to our own pay-to but for less: the Transfer log does not match this authorization.
    nonce = craft.random_nonce()
    smaller = kit.auth(value=PRICE - 1, nonce=nonce)
    craft.execute_authorization(kit.chain, smaller, kit.sig(smaller), key=THIRD_PARTY_KEY)
    ours = kit.auth(nonce=nonce)
    balances_before = kit.gw.balance(kit.gw.pay_to)
    refused(kit, kit.v2(ours, kit.sig(ours)), reasons.NONCE_ALREADY_USED)
    assert kit.gw.balance(kit.gw.pay_to) == balances_before


# ------------------------------------------------------------------------------------ price/route confusion


@pytest.mark.parametrize("version", [1, 2])
def test_cheap_route_payment_does_not_open_the_dear_route(kit: Kit, version: int) -> None:
    cheap = httpx.get(kit.gw.url + "/cheap")
    assert cheap.status_code == 402
    name, value = kit.gw.sign(kit.payer, cheap, version=version)
    refused(kit, {name: value}, reasons.VALUE_MISMATCH, method="GET", path="/dear")
    # ...and the same payment still buys what it was made for.
    ok = httpx.get(kit.gw.url + "/cheap", headers={name: value}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert len(kit.gw.upstream.requests) == 1


def test_payment_for_one_gateway_does_not_pay_another(kit: Kit, base_chain: DevChain, tmp_path: Path) -> None:
    # Another operator's gateway on the same chain: its pay-to differs, so its 402's payment is worth nothing here.
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as other:
        name, value = other.sign(kit.payer, httpx.post(other.url + "/paid"))
    refused(kit, {name: value}, reasons.RECIPIENT_MISMATCH)
