"""Sessions without a chain: configuration refusals, digests equal to the official client's, metered charges."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from eth_account import Account
from x402.mechanisms.evm.batch_settlement.authorizer_signer import sign_claim_batch, sign_refund
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig as OfficialConfig
from x402.mechanisms.evm.batch_settlement.types import VoucherClaim
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner

from gateway.config import MeterConfig, parse_config
from gateway.errors import ConfigError
from gateway.schemes.batch.meter import Meter
from gateway.x402 import sessions
from gateway.x402.eip712 import recover_signer

RELAYER = "0x" + "ab" * 32
AUTHORIZER = "0x" + "cd" * 32
ENV = {"X402_RELAYER_KEY": RELAYER, "X402_AUTHORIZER_KEY": AUTHORIZER}
SESSION_ROUTE = {"route": "GET /s", "price": "0.01", "schemes": ["exact", "batch-settlement"]}


def doc(routes: list[dict[str, Any]] | None = None, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9000"},
        "payment": {"pay_to": "0x" + "11" * 20},
        "networks": {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}},
        "routes": routes or [SESSION_ROUTE],
    }
    d.update(over)
    return d


def test_a_session_route_loads_with_the_authorizer_key_and_defaults() -> None:
    config = parse_config(doc(), env=ENV)
    assert config.routes[0].schemes == ("exact", "batch-settlement")
    assert config.sessions.withdraw_delay == 86_400
    assert AUTHORIZER[2:] not in repr(config.sessions)


@pytest.mark.parametrize(
    ("d", "env", "key"),
    [
        (doc(), {"X402_RELAYER_KEY": RELAYER}, "sessions.authorizer_key_env"),  # no authorizer key
        (doc(), {"X402_RELAYER_KEY": RELAYER, "X402_AUTHORIZER_KEY": RELAYER}, "sessions.authorizer_key_env"),
        (doc(), {**ENV, "X402_AUTHORIZER_KEY": "nothex"}, "sessions.authorizer_key_env"),
        (doc(sessions={"withdraw_delay": 899}), ENV, "sessions.withdraw_delay"),
        (doc(sessions={"withdraw_delay": 2_592_001}), ENV, "sessions.withdraw_delay"),
        (doc([{**SESSION_ROUTE, "schemes": ["exact", "stream"]}]), ENV, "routes[0].schemes[1]"),
        (doc([{**SESSION_ROUTE, "schemes": []}]), ENV, "routes[0].schemes"),
        (doc([{**SESSION_ROUTE, "schemes": ["exact"], "meter": {"header": "x-cost"}}]), ENV, "routes[0].meter"),
        (doc([{**SESSION_ROUTE, "meter": {"header": "x-cost", "json": "a.b"}}]), ENV, "routes[0].meter"),
        (doc([{**SESSION_ROUTE, "meter": {"json": "usage.tokens"}}]), ENV, "routes[0].meter.unit_price"),
        (doc([{**SESSION_ROUTE, "meter": {"json": "a..b", "unit_price": "0.01"}}]), ENV, "routes[0].meter.json"),
        (doc([{**SESSION_ROUTE, "meter": {"header": "x cost"}}]), ENV, "routes[0].meter.header"),
        (doc([{**SESSION_ROUTE, "meter": {"header": "x-cost", "unit": "eur"}}]), ENV, "routes[0].meter.unit"),
    ],
)
def test_a_bad_session_setting_fails_at_load_naming_its_key(d: dict[str, Any], env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(d, env=env)
    assert info.value.key == key, info.value


def test_sessions_need_a_network_the_gateway_settles_itself() -> None:
    networks = {"base": {"rpc_urls": ["http://127.0.0.1:8545"], "verifier": "facilitator",
                         "facilitator": {"url": "https://f.example.com"}}}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config(doc(networks=networks), env=ENV)
    assert info.value.key == "routes[0].schemes"


def _configs() -> tuple[OfficialConfig, sessions.ChannelConfig, Any, Any]:
    payer, receiver = Account.create(), Account.create()
    token = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    official = OfficialConfig(
        payer=payer.address,
        payer_authorizer=payer.address,
        receiver=receiver.address,
        receiver_authorizer=receiver.address,
        token=token,
        withdraw_delay=900,
        salt="0x" + "42" * 32,
    )
    ours = sessions.parse_config(official.to_dict())
    return official, ours, payer, receiver


def test_channel_ids_and_every_digest_agree_with_the_official_client() -> None:
    official, ours, payer, receiver = _configs()
    cid = compute_channel_id(official, "eip155:8453")
    assert sessions.channel_id(ours, 8453) == cid
    assert sessions.channel_id(ours, 137) != cid  # bound to the chain
    voucher = sign_voucher(EthAccountSigner(payer), cid, "123456", "eip155:8453")
    digest = sessions.voucher_digest(cid, 123456, 8453)
    assert recover_signer(digest, bytes.fromhex(voucher.signature[2:])) == payer.address.lower()

    def raw(sig: Any) -> bytes:
        return sig if isinstance(sig, bytes) else bytes.fromhex(sig.removeprefix("0x"))

    refund = sign_refund(EthAccountSigner(receiver), cid, "5", "3", "eip155:8453")
    assert recover_signer(sessions.refund_digest(cid, 3, 5, 8453), raw(refund)) == receiver.address.lower()
    claim = VoucherClaim(channel=official, max_claimable_amount="100", signature="0x", total_claimed="90")
    batch = sign_claim_batch(EthAccountSigner(receiver), [claim], "eip155:8453")
    digest = sessions.claim_batch_digest([(cid, 100, 90)], 8453)
    assert recover_signer(digest, raw(batch)) == receiver.address.lower()


@pytest.mark.parametrize(
    ("meter", "headers", "expected"),
    [
        (MeterConfig(header="x-cost", unit="atomic"), [(b"x-cost", b"250")], 250),
        (MeterConfig(header="x-cost", unit="usd"), [(b"X-Cost", b"0.0042")], 4200),
        (MeterConfig(header="x-cost", unit="usd"), [(b"x-cost", b"$0.0000001")], 1),  # a fraction rounds up
        (MeterConfig(header="x-cost", unit="atomic"), [(b"x-cost", b"99999999")], 10_000),  # capped at the ceiling
        (MeterConfig(header="x-cost", unit="atomic"), [(b"x-cost", b"-5")], 10_000),  # unreadable: ceiling
        (MeterConfig(header="x-cost", unit="atomic", missing="zero"), [], 0),
        (MeterConfig(header="x-cost", unit="atomic"), [(b"x-cost", b"1"), (b"x-cost", b"2")], 10_000),
        (MeterConfig(header="x-cost", unit="atomic"), [(b"x-cost", b"nan")], 10_000),
    ],
)
def test_a_metered_charge_is_what_the_header_says_never_above_the_ceiling(
    meter: MeterConfig, headers: list[tuple[bytes, bytes]], expected: int
) -> None:
    charge, kept = Meter(meter, 10_000).from_headers([*headers, (b"content-type", b"text/plain")])
    assert charge == expected
    assert kept == [(b"content-type", b"text/plain")]  # the meter's header never reaches the client


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"usage": {"total_tokens": 10}}', 30),
        (b'{"usage": {"total_tokens": 1e9}}', 10_000),
        (b'{"usage": {"total_tokens": true}}', 0),
        (b'data: {"x": 1}\n\ndata: {"usage": {"total_tokens": 4}}\n\ndata: [DONE]\n\n', 12),
        (b'{"a":1}\n{"usage": {"total_tokens": 2}}\n', 6),
        (b"", 0),
    ],
)
def test_a_json_metered_charge_reads_the_answer_or_its_last_event(body: bytes, expected: int) -> None:
    meter = Meter(MeterConfig(json="usage.total_tokens", unit_price=3, missing="zero"), 10_000)
    assert meter.from_json(body) == expected


@pytest.mark.parametrize("unit", ["atomic", "usd"])
@pytest.mark.parametrize(
    "value",
    [b"1e7000000", b"1E7000000", b"9e999999999", b"1e-7000000", b"1e3", b"9" * 31, b"0." + b"0" * 30 + b"1"],
)
def test_a_meter_header_beyond_plain_decimals_is_unreadable_at_once(
    unit: Literal["usd", "atomic"], value: bytes
) -> None:
    # Read as a number, "1e7000000" is a seven-million-digit integer that takes the event loop for tens of seconds
    # (and is then charged the ceiling); an exponent, or more digits than any price has, is no report at all. With
    # missing = "zero", an unreadable report is free, which tells the two apart.
    meter = Meter(MeterConfig(header="x-cost", unit=unit, missing="zero"), 10_000)
    charge, kept = meter.from_headers([(b"x-cost", value)])
    assert charge == 0
    assert kept == []
