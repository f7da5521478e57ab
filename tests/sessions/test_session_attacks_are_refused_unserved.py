"""Crafted session payments that must never buy an answer: each is refused with its own status and reason, the
upstream is not called, nothing is charged (the honest next voucher still fits exactly) and nothing is deposited
twice. One gateway on the shared anvil fixture serves the whole module; each test opens channels of its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from gateway.x402.codec import decode_header, encode_header
from tests.sessions.crafted import CraftedChannel, corrective, other_account, session_offer
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url

PRICE = 1_000  # the route's price: each voucher's step
MIN_DEPOSIT = 10_000
ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["exact", "batch-settlement"]}]
QUIET = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600}  # no claims: the chain shows deposits only


@pytest.fixture(scope="module")
def gw(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    store = sqlite_url(tmp_path_factory.mktemp("attacks"))
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=QUIET) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def offer(gw: GatewayUnderTest) -> dict[str, Any]:
    return session_offer(httpx.get(gw.url + "/session"))


def pay(gw: GatewayUnderTest, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(gw.url + "/session", headers=headers, timeout=30)


def open_channel(gw: GatewayUnderTest, chain: DevChain, offer: dict[str, Any], deposit: int = MIN_DEPOSIT) -> Any:
    """A fresh payer's channel with ``deposit`` in it and one request charged (cumulative ``PRICE``)."""
    ch = CraftedChannel.from_offer(chain.new_payer(1_000_000), offer)
    r = pay(gw, ch.header(ch.deposit(deposit, voucher_max=PRICE)))
    assert r.status_code == 200, r.text
    return ch


def charged_of(response: httpx.Response) -> int:
    return int(decode_header(response.headers["payment-response"])["extra"]["channelState"]["chargedCumulativeAmount"])


def refused(gw: GatewayUnderTest, headers: dict[str, str], status: int, reason: str | None) -> httpx.Response:
    """Send ``headers``; the answer is ``status`` (with ``reason``) and the upstream never saw the request."""
    before = len(gw.upstream.requests)
    r = pay(gw, headers)
    assert r.status_code == status, (r.status_code, r.text[:400])
    if reason is not None:
        body = r.json() if status != 402 else decode_header(r.headers["payment-required"])
        assert body["error"] == reason, body
    assert len(gw.upstream.requests) == before  # nothing served
    return r


def continues(gw: GatewayUnderTest, ch: CraftedChannel, charged: int) -> None:
    """Nothing was charged by what came before: the honest next voucher (``charged + PRICE``) is served."""
    before = len(gw.upstream.requests)
    r = pay(gw, ch.header(ch.paying(charged + PRICE)))
    assert r.status_code == 200, r.text[:400]
    assert charged_of(r) == charged + PRICE
    assert len(gw.upstream.requests) == before + 1


# ----------------------------------------------------------------------------------------------- signatures


def test_a_voucher_signed_by_someone_else_buys_nothing(gw: GatewayUnderTest, base_chain: DevChain, offer: Any) -> None:
    ch = open_channel(gw, base_chain, offer)
    forged = ch.paying(2 * PRICE, signer=other_account())
    refused(gw, ch.header(forged), 402, reasons.SESSION_VOUCHER_SIGNATURE)
    # a deposit payload too: the forged voucher is refused before anything is deposited
    stranger = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), offer)
    deposit = stranger.deposit(MIN_DEPOSIT, voucher_max=PRICE)
    deposit["voucher"] = stranger.voucher(PRICE, signer=other_account())
    refused(gw, stranger.header(deposit), 402, reasons.SESSION_VOUCHER_SIGNATURE)
    assert stranger.onchain(base_chain).balance == 0
    continues(gw, ch, PRICE)


def test_a_voucher_for_another_channel_than_its_config_buys_nothing(
    gw: GatewayUnderTest, base_chain: DevChain, offer: Any
) -> None:
    victim = open_channel(gw, base_chain, offer)
    attacker = open_channel(gw, base_chain, offer)
    # the attacker's own config, signed by the attacker, naming the victim's funded channel
    crossed = attacker.paying(2 * PRICE, channel_id=victim.id)
    refused(gw, attacker.header(crossed), 402, reasons.SESSION_CHANNEL_ID_MISMATCH)
    # the victim's config with the attacker as payer authorizer: another channel (with no balance), not the victim's
    hijack = CraftedChannel.from_offer(victim.payer, offer, salt=victim.salt, payer_authorizer=attacker.payer.address)
    hijacked = hijack.paying(2 * PRICE, signer=attacker.payer, channel_id=victim.id)
    refused(gw, hijack.header(hijacked), 402, reasons.SESSION_CHANNEL_ID_MISMATCH)
    own_id = hijack.paying(2 * PRICE, signer=attacker.payer)
    refused(gw, hijack.header(own_id), 402, reasons.SESSION_CHANNEL_NOT_FOUND)
    continues(gw, victim, PRICE)
    continues(gw, attacker, PRICE)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("receiver", "new", reasons.SESSION_RECEIVER_MISMATCH),
        ("receiver_authorizer", "new", reasons.SESSION_RECEIVER_AUTHORIZER_MISMATCH),
        ("token", "new", reasons.SESSION_TOKEN_MISMATCH),
        ("withdraw_delay", 901, reasons.SESSION_WITHDRAW_DELAY_MISMATCH),
        ("withdraw_delay", 30 * 24 * 3600, reasons.SESSION_WITHDRAW_DELAY_MISMATCH),
    ],
)
def test_a_channel_config_naming_other_terms_buys_nothing(
    gw: GatewayUnderTest, base_chain: DevChain, offer: Any, field: str, value: Any, reason: str
) -> None:
    if value == "new":
        value = other_account().address
    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, offer, **{field: value})  # the voucher names this config's own id
    refused(gw, ch.header(ch.deposit(MIN_DEPOSIT, voucher_max=PRICE)), 402, reason)
    refused(gw, ch.header(ch.paying(PRICE)), 402, reason)
    assert base_chain.balance(payer.address) == 1_000_000  # nothing deposited
    assert ch.onchain(base_chain).balance == 0


# ----------------------------------------------------------------------------------------------- cumulative


@pytest.mark.parametrize("step", [2 * PRICE, 10 * PRICE, 0, -PRICE, -2 * PRICE])
def test_a_voucher_whose_cumulative_skips_ahead_or_goes_back_gets_the_corrective_402(
    gw: GatewayUnderTest, base_chain: DevChain, offer: Any, step: int
) -> None:
    ch = open_channel(gw, base_chain, offer)
    continues(gw, ch, PRICE)
    charged = 2 * PRICE
    r = refused(gw, ch.header(ch.paying(charged + step)), 402, reasons.SESSION_CUMULATIVE_MISMATCH)
    fix = corrective(r)
    state, voucher = fix["channelState"], fix["voucherState"]
    assert state["channelId"] == ch.id
    assert int(state["chargedCumulativeAmount"]) == charged
    assert int(state["balance"]) == MIN_DEPOSIT
    assert int(voucher["signedMaxClaimable"]) == charged
    # the voucher state is the payer's own signature over what we charged: the client can check it is its own
    signable = encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "Voucher": [
                    {"name": "channelId", "type": "bytes32"},
                    {"name": "maxClaimableAmount", "type": "uint128"},
                ],
            },
            "primaryType": "Voucher",
            "domain": ch.domain,
            "message": {"channelId": bytes.fromhex(ch.id[2:]), "maxClaimableAmount": charged},
        }
    )
    assert Account.recover_message(signable, signature=voucher["signature"]) == ch.payer.address
    continues(gw, ch, charged)


def test_a_voucher_above_the_balance_buys_nothing(gw: GatewayUnderTest, base_chain: DevChain, offer: Any) -> None:
    ch = open_channel(gw, base_chain, offer)  # 10 requests' worth, one spent
    for n in range(2, MIN_DEPOSIT // PRICE + 1):
        assert pay(gw, ch.header(ch.paying(n * PRICE))).status_code == 200
    refused(gw, ch.header(ch.paying(MIN_DEPOSIT + PRICE)), 402, reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE)
    # topped up, the same cumulative is served: the refusal charged nothing
    top_up = ch.deposit(MIN_DEPOSIT, voucher_max=MIN_DEPOSIT + PRICE)
    r = pay(gw, ch.header(top_up))
    assert r.status_code == 200, r.text
    assert charged_of(r) == MIN_DEPOSIT + PRICE


def test_a_replayed_voucher_is_not_served_twice(gw: GatewayUnderTest, base_chain: DevChain, offer: Any) -> None:
    ch = open_channel(gw, base_chain, offer)
    headers = ch.header(ch.paying(2 * PRICE))
    assert pay(gw, headers).status_code == 200
    r = refused(gw, headers, 402, reasons.SESSION_CUMULATIVE_MISMATCH)
    assert int(corrective(r)["channelState"]["chargedCumulativeAmount"]) == 2 * PRICE
    continues(gw, ch, 2 * PRICE)


# ----------------------------------------------------------------------------------------------- deposits


def test_a_replayed_deposit_deposits_nothing_and_buys_nothing(
    gw: GatewayUnderTest, base_chain: DevChain, offer: Any
) -> None:
    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, offer)
    authorization = ch.authorization(MIN_DEPOSIT)
    first = ch.header(ch.deposit_with(authorization, voucher_max=PRICE))
    assert pay(gw, first).status_code == 200
    assert base_chain.balance(payer.address) == 1_000_000 - MIN_DEPOSIT
    # the whole header again: its voucher's base is stale
    refused(gw, first, 402, reasons.SESSION_CUMULATIVE_MISMATCH)
    # the used authorization with a fresh, correct voucher: the chain refuses the authorization, nothing is served
    again = ch.header(ch.deposit_with(authorization, voucher_max=2 * PRICE))
    refused(gw, again, 402, reasons.SESSION_DEPOSIT_SIMULATION_FAILED)
    assert base_chain.balance(payer.address) == 1_000_000 - MIN_DEPOSIT  # one deposit
    assert ch.onchain(base_chain).balance == MIN_DEPOSIT
    continues(gw, ch, PRICE)


def test_a_deposit_below_the_minimum_is_refused(gw: GatewayUnderTest, base_chain: DevChain, offer: Any) -> None:
    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, offer)
    refused(gw, ch.header(ch.deposit(MIN_DEPOSIT - 1, voucher_max=PRICE)), 402, reasons.SESSION_DEPOSIT_BELOW_MIN)
    assert base_chain.balance(payer.address) == 1_000_000


@pytest.mark.parametrize("valid_for", [-60, 1])
def test_an_expired_or_expiring_deposit_authorization_is_refused(
    gw: GatewayUnderTest, base_chain: DevChain, offer: Any, valid_for: int
) -> None:
    import time

    payer = base_chain.new_payer(1_000_000)
    ch = CraftedChannel.from_offer(payer, offer)
    expired = ch.deposit(MIN_DEPOSIT, voucher_max=PRICE, valid_before=int(time.time()) + valid_for)
    refused(gw, ch.header(expired), 402, reasons.SESSION_DEPOSIT_VALID_BEFORE)
    assert base_chain.balance(payer.address) == 1_000_000


def test_a_deposit_signed_by_someone_else_is_refused(gw: GatewayUnderTest, base_chain: DevChain, offer: Any) -> None:
    victim = base_chain.new_payer(1_000_000)
    attacker = other_account()
    # the victim's channel config; the attacker signs the transfer out of the victim's wallet (and the voucher)
    ch = CraftedChannel.from_offer(victim, offer, payer_authorizer=attacker.address)
    payload = ch.deposit_with(ch.authorization(MIN_DEPOSIT, signer=attacker), voucher_max=PRICE)
    payload["voucher"] = ch.voucher(PRICE, signer=attacker)
    refused(gw, ch.header(payload), 402, reasons.SESSION_DEPOSIT_SIGNATURE)
    assert base_chain.balance(victim.address) == 1_000_000


# ----------------------------------------------------------------------------------------------- refunds


def test_a_refund_asking_more_than_the_remainder_returns_nothing(
    gw: GatewayUnderTest, base_chain: DevChain, offer: Any
) -> None:
    ch = open_channel(gw, base_chain, offer)
    payer_before = base_chain.balance(ch.payer.address)
    refused(gw, ch.header(ch.refund(PRICE, MIN_DEPOSIT - PRICE + 1)), 402, reasons.SESSION_REFUND_NO_BALANCE)
    # a refund whose voucher is not what we charged is the corrective 402, like any stale voucher
    refused(gw, ch.header(ch.refund(2 * PRICE, PRICE)), 402, reasons.SESSION_CUMULATIVE_MISMATCH)
    assert base_chain.balance(ch.payer.address) == payer_before
    state = ch.onchain(base_chain)
    assert (state.balance, state.refund_nonce) == (MIN_DEPOSIT, 0)
    continues(gw, ch, PRICE)


# ----------------------------------------------------------------------------------------------- garbage


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _doc(payload: Any, **accepted: Any) -> str:
    return encode_header(
        {
            "x402Version": 2,
            "accepted": {"scheme": "batch-settlement", "network": "eip155:8453", **accepted},
            "payload": payload,
        }
    )


def _good_payload(payer: LocalAccount, offer: dict[str, Any]) -> dict[str, Any]:
    return CraftedChannel.from_offer(payer, offer).paying(PRICE)


def _with(payload: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(payload))
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()
_MALFORMED: list[tuple[str, Any]] = [
    ("voucher.maxClaimableAmount", "-1"),
    ("voucher.maxClaimableAmount", "1e3"),
    ("voucher.maxClaimableAmount", str(2**128)),
    ("voucher.maxClaimableAmount", True),
    ("voucher.maxClaimableAmount", 1.5),
    ("voucher.maxClaimableAmount", None),
    ("voucher.signature", "0xzz"),
    ("voucher.signature", "0x" + "ab" * 10),
    ("voucher.signature", "0x" + "ab" * 5000),
    ("voucher.signature", 12),
    ("voucher.channelId", "0x1234"),
    ("voucher", "not an object"),
    ("voucher", _DELETE),
    ("channelConfig", _DELETE),
    ("channelConfig", []),
    ("channelConfig.payer", "0x12"),
    ("channelConfig.token", None),
    ("channelConfig.withdrawDelay", -900),
    ("channelConfig.withdrawDelay", 2**41),
    ("channelConfig.withdrawDelay", "nine hundred"),
    ("channelConfig.salt", "0x00"),
    ("channelConfig.salt", {"nested": ["deep"]}),
]


@pytest.mark.parametrize(("path", "value"), _MALFORMED, ids=[f"{p}={str(v)[:12]}" for p, v in _MALFORMED])
def test_a_malformed_session_payload_is_a_400(
    gw: GatewayUnderTest, base_chain: DevChain, offer: Any, path: str, value: Any
) -> None:
    payload = _with(_good_payload(Account.create(), offer), path, value)
    refused(gw, {"PAYMENT-SIGNATURE": _doc(payload)}, 400, reasons.INVALID_PAYMENT_HEADER)


def test_a_malformed_deposit_or_refund_is_a_400(gw: GatewayUnderTest, base_chain: DevChain, offer: Any) -> None:
    ch = CraftedChannel.from_offer(Account.create(), offer)
    deposit = ch.deposit(MIN_DEPOSIT, voucher_max=PRICE)
    for path, value in [
        ("deposit", _DELETE),
        ("deposit.amount", "ten"),
        ("deposit.authorization", "x"),
        ("deposit.authorization.erc3009Authorization.validBefore", "-1"),
        ("deposit.authorization.erc3009Authorization.salt", "0x1"),
        ("deposit.authorization.erc3009Authorization.signature", "0x"),
    ]:
        refused(gw, ch.header(_with(deposit, path, value)), 400, reasons.INVALID_PAYMENT_HEADER)
    refused(gw, ch.header({**ch.refund(PRICE), "amount": "-5"}), 400, reasons.INVALID_PAYMENT_HEADER)


@pytest.mark.parametrize(
    "value",
    [
        "not base64 at all!",
        _b64(b"not json"),
        _b64(b"[1, 2, 3]"),
        _b64(b"\xff\xfe\x00 binary"),
        _b64(b'{"x402Version": 2, "accepted": {"scheme": "batch-settlement"}, "payload": "x"}'),
        _b64(b'{"x402Version": 2, "accepted": "batch-settlement", "payload": {}}'),
        _b64(b'{"x402Version": 2, "accepted": {"scheme": "batch-settlement", "network": 8453}, "payload": {}}'),
        _b64(b'{"x402Version": 2, "accepted": {"scheme": "batch-settlement", "network": "eip155:8453"}}'),
        _b64(
            b'{"x402Version": 2, "accepted": {"scheme": "batch-settlement", "x": ' + b"[" * 4000 + b"]" * 4000 + b"}}"
        ),
        _b64(b'{"x402Version": "2", "accepted": {"scheme": "batch-settlement", "network": "eip155:8453"}}'),
        _b64(
            b'{"x402Version": 2, "accepted": {"scheme": "batch-settlement", "network": "eip155:8453"}, '
            b'"payload": {"type": ["deposit"]}}'
        ),
        _b64(
            b'{"x402Version": 2, "accepted": {"scheme": "batch-settlement", "network": "eip155:1"}, '
            b'"payload": {"type": "voucher"}}'
        ),
        _b64(b"{" + b'"a": 1, ' * 1500 + b'"accepted": {"scheme": "batch-settlement"}}'),
    ],
)
def test_a_garbage_payment_header_is_refused_4xx_never_5xx(gw: GatewayUnderTest, value: str) -> None:
    before = len(gw.upstream.requests)
    r = pay(gw, {"PAYMENT-SIGNATURE": value})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.status_code in (400, 402), r.status_code
    assert len(gw.upstream.requests) == before


def test_an_oversized_payment_header_is_refused_4xx_never_5xx(gw: GatewayUnderTest, offer: Any) -> None:
    payload = _good_payload(Account.create(), offer)
    before = len(gw.upstream.requests)
    # over the gateway's 16 KiB header cap: refused before any parsing
    for value in (_doc({**payload, "padding": "x" * 13_000}), "A" * 200_000):
        r = pay(gw, {"PAYMENT-SIGNATURE": value})
        assert r.status_code == 431, (r.status_code, r.text[:300])
    # just under it: a signature of impossible length, an unknown bulky field (ignored: the voucher is for a channel
    # nobody opened)
    big_signature = _with(payload, "voucher.signature", "0x" + "ab" * 4097)
    refused(gw, {"PAYMENT-SIGNATURE": _doc(big_signature)}, 400, reasons.INVALID_PAYMENT_HEADER)
    refused(gw, {"PAYMENT-SIGNATURE": _doc({**payload, "padding": "x" * 10_000})}, 402, None)
    assert len(gw.upstream.requests) == before
