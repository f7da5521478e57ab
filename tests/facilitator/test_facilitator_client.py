"""Remote verification and settlement against a facilitator nobody here wrote: the ``x402`` package's own.

The facilitator runs as an HTTP service (tests/support/facilitator.py) over the session's anvil impersonating Base,
with TestUSDC at the canonical USDC address; our :class:`~gateway.facilitator.FacilitatorClient` talks to it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import pytest
from eth_abi.abi import decode as abi_decode
from eth_utils.crypto import keccak

from gateway.chain.facilitator import CdpAuth, FacilitatorClient, FacilitatorUnavailable
from gateway.config import Secret
from gateway.dev.chain import DevChain, start_dev_chain
from gateway.errors import BadGateway, GatewayError
from tests.support.facilitator import FacilitatorControl, make_payment, refused_url, run_x402_facilitator

TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
VERSIONS = [pytest.param(2, id="v2"), pytest.param(1, id="v1")]


async def client_for(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> FacilitatorClient:
    c = FacilitatorClient(Secret(url), **kwargs)
    await c.start(http)
    return c


def transfers(chain: DevChain, tx_hash: str) -> list[tuple[str, str, int]]:
    """(from, to, value) of every Transfer log the token emitted in ``tx_hash``."""
    receipt = chain.rpc("eth_getTransactionReceipt", [tx_hash])
    out = []
    for entry in receipt["logs"]:
        if entry["address"].lower() == chain.usdc.lower() and entry["topics"][0] == TRANSFER_TOPIC:
            value = abi_decode(["uint256"], bytes.fromhex(entry["data"][2:]))[0]
            out.append(("0x" + entry["topics"][1][-40:], "0x" + entry["topics"][2][-40:], value))
    return out


# ------------------------------------------------------------------------------------------------ the real thing


async def test_supported_lists_exact_on_base_for_v2_and_v1(client: FacilitatorClient) -> None:
    kinds = await client.supported()
    assert client.supports(kinds, version=2, scheme="exact", network="eip155:8453")
    assert client.supports(kinds, version=1, scheme="exact", network="base")
    assert not client.supports(kinds, version=2, scheme="exact", network="eip155:137")  # not registered for v2
    assert not client.supports(kinds, version=2, scheme="upto", network="eip155:8453")


@pytest.mark.parametrize("version", VERSIONS)
async def test_verify_accepts_a_valid_authorization_and_names_the_payer(
    client: FacilitatorClient, base_chain: DevChain, version: int
) -> None:
    p = make_payment(base_chain, version=version)
    result = await client.verify(version, p.payload, p.requirements)
    assert result.is_valid, result
    assert result.invalid_reason is None
    assert result.payer is not None and result.payer.lower() == p.payer.address.lower()


@pytest.mark.parametrize("version", VERSIONS)
async def test_verify_refuses_a_wrong_amount_with_the_facilitators_reason(
    client: FacilitatorClient, base_chain: DevChain, version: int
) -> None:
    p = make_payment(base_chain, version=version, amount=10_000, signed_amount=9_999)
    result = await client.verify(version, p.payload, p.requirements)
    assert not result.is_valid
    assert result.invalid_reason == "invalid_exact_evm_payload_authorization_value_mismatch"
    assert result.payer is not None and result.payer.lower() == p.payer.address.lower()


async def test_request_carries_the_servers_own_requirement_not_the_clients_copy(
    client: FacilitatorClient, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    p = make_payment(base_chain, version=2, amount=10_000, signed_amount=1)
    assert p.payload["accepted"]["amount"] == "1"  # the client claims it was asked for 1 unit
    result = await client.verify(2, p.payload, p.requirements)
    assert not result.is_valid
    (call,) = facilitator_control.calls
    assert call.body == {"x402Version": 2, "paymentPayload": p.payload, "paymentRequirements": p.requirements}
    assert call.body["paymentRequirements"]["amount"] == "10000"


@pytest.mark.parametrize("version", VERSIONS)
async def test_settle_mines_the_transfer_and_debits_the_payer_exactly_once(
    client: FacilitatorClient, base_chain: DevChain, version: int
) -> None:
    p = make_payment(base_chain, version=version, amount=10_000, funds=50_000)
    result = await client.settle(version, p.payload, p.requirements)
    assert result.success, result
    assert result.error_reason is None and not result.pending
    assert result.network == p.requirements["network"]
    assert result.payer is not None and result.payer.lower() == p.payer.address.lower()
    receipt = base_chain.rpc("eth_getTransactionReceipt", [result.transaction])
    assert int(receipt["status"], 16) == 1
    assert transfers(base_chain, result.transaction) == [(p.payer.address.lower(), p.pay_to.lower(), 10_000)]
    assert base_chain.balance(p.payer.address) == 40_000
    assert base_chain.balance(p.pay_to) == 10_000


async def test_settling_the_same_payload_again_fails_without_a_second_debit(
    client: FacilitatorClient, base_chain: DevChain
) -> None:
    p = make_payment(base_chain, amount=10_000, funds=50_000)
    first = await client.settle(2, p.payload, p.requirements)
    assert first.success
    again = await client.settle(2, p.payload, p.requirements)
    assert not again.success
    # The x402 facilitator does not simulate before a settle (simulate_in_settle=False): it broadcasts the replay,
    # which reverts on chain ("authorization is used"), and reports that reverted transaction.
    assert again.error_reason == "transaction_failed"
    assert again.transaction != first.transaction
    if again.transaction:
        assert int(base_chain.rpc("eth_getTransactionReceipt", [again.transaction])["status"], 16) == 0
    assert base_chain.balance(p.payer.address) == 40_000
    assert base_chain.balance(p.pay_to) == 10_000


async def test_verify_after_settlement_reports_the_nonce_as_used(
    client: FacilitatorClient, base_chain: DevChain
) -> None:
    p = make_payment(base_chain)
    assert (await client.settle(2, p.payload, p.requirements)).success
    result = await client.verify(2, p.payload, p.requirements)
    assert not result.is_valid
    assert result.invalid_reason == "invalid_exact_evm_nonce_already_used"


async def test_settlement_pending_carries_the_hash_and_a_retry_reconciles_without_a_second_transfer(
    http: aiohttp.ClientSession,
) -> None:
    # A private chain (its mining is switched off) whose token is NOT at a canonical USDC address, chain id 31337:
    # the x402 facilitator accepts any contract that implements EIP-3009 with the requirement's EIP-712 domain.
    chain = start_dev_chain(31337)
    try:
        with run_x402_facilitator(chain, confirmation_timeout=1.0) as url:
            client = await client_for(http, url, timeout=20.0)
            assert client.supports(await client.supported(), version=2, scheme="exact", network="eip155:31337")
            p = make_payment(chain, amount=10_000, funds=50_000)
            assert (await client.verify(2, p.payload, p.requirements)).is_valid
            chain.rpc("evm_setAutomine", [False])
            pending = await client.settle(2, p.payload, p.requirements)
            assert not pending.success and pending.pending
            assert pending.error_reason == "settlement_pending"
            assert pending.transaction.startswith("0x") and len(pending.transaction) == 66
            assert chain.rpc("eth_getTransactionByHash", [pending.transaction]) is not None  # broadcast ...
            assert chain.rpc("eth_getTransactionReceipt", [pending.transaction]) is None  # ... not mined
            assert chain.balance(p.payer.address) == 50_000
            chain.rpc("evm_mine", [])
            chain.rpc("evm_setAutomine", [True])
            retried = await client.settle(2, p.payload, p.requirements)
            assert retried.success, retried
            assert retried.transaction == pending.transaction  # reconciled, not re-broadcast
            assert transfers(chain, retried.transaction) == [(p.payer.address.lower(), p.pay_to.lower(), 10_000)]
            assert chain.balance(p.payer.address) == 40_000
    finally:
        chain.stop()


# ------------------------------------------------------------------------------------------------ failures


async def test_refused_connection_is_facilitator_unavailable_and_never_sent(http: aiohttp.ClientSession) -> None:
    client = await client_for(http, refused_url(), timeout=5.0)
    with pytest.raises(FacilitatorUnavailable) as info:
        await client.verify(2, {"x402Version": 2}, {"network": "eip155:8453"})
    assert info.value.status == 503
    assert info.value.reason == "facilitator_unavailable"
    assert info.value.request_sent is False


async def test_connection_dropped_mid_answer_is_facilitator_unavailable(
    client: FacilitatorClient, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    facilitator_control.mode = "down"
    p = make_payment(base_chain)
    with pytest.raises(FacilitatorUnavailable) as info:
        await client.settle(2, p.payload, p.requirements)
    assert info.value.status == 503
    assert info.value.request_sent is True  # a settle may have happened: the caller must reconcile


async def test_http_5xx_is_facilitator_unavailable(
    client: FacilitatorClient, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    facilitator_control.mode = "error"
    p = make_payment(base_chain)
    with pytest.raises(FacilitatorUnavailable):
        await client.verify(2, p.payload, p.requirements)
    with pytest.raises(FacilitatorUnavailable):
        await client.supported()


async def test_garbage_answer_is_bad_gateway(
    client: FacilitatorClient, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    facilitator_control.mode = "garbage"
    p = make_payment(base_chain)
    for call in (client.verify, client.settle):
        with pytest.raises(BadGateway) as info:
            await call(2, p.payload, p.requirements)
        assert info.value.status == 502
        assert info.value.reason == "facilitator_bad_answer"
    with pytest.raises(BadGateway):
        await client.supported()


async def test_json_with_missing_fields_or_wrong_types_is_bad_gateway(
    client: FacilitatorClient, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    p = make_payment(base_chain)
    facilitator_control.mode = "wrong_types"
    for call in (client.verify, client.settle):
        with pytest.raises(BadGateway, match="facilitator"):
            await call(2, p.payload, p.requirements)
    with pytest.raises(BadGateway):
        await client.supported()
    facilitator_control.mode, facilitator_control.status = "canned", 200
    tx = "0x" + "ab" * 32
    bad_answers: list[tuple[Any, Any]] = [
        (client.verify, {}),
        (client.verify, [True]),
        (client.verify, {"isValid": True, "payer": 12}),
        (client.settle, {"success": True, "network": "eip155:8453"}),  # success without a transaction
        (client.settle, {"success": True, "transaction": "0x1234", "network": "eip155:8453"}),
        (client.settle, {"success": True, "transaction": tx, "network": "eip155:137"}),  # another network
        (client.settle, {"success": False, "errorReason": "settlement_pending", "transaction": ""}),
    ]
    for call, answer in bad_answers:
        facilitator_control.canned = answer
        with pytest.raises(BadGateway):
            await call(2, p.payload, p.requirements)


async def test_slow_facilitator_beyond_timeout_is_facilitator_unavailable(
    http: aiohttp.ClientSession, facilitator_url: str, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    client = await client_for(http, facilitator_url, timeout=0.5)
    facilitator_control.mode, facilitator_control.delay = "slow", 3.0
    p = make_payment(base_chain)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(FacilitatorUnavailable) as info:
        await client.verify(2, p.payload, p.requirements)
    assert loop.time() - started < 2.0
    assert info.value.request_sent is True


async def test_a_4xx_refusal_with_a_reason_is_a_normal_result(
    client: FacilitatorClient, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    facilitator_control.mode, facilitator_control.reason, facilitator_control.status = "invalid", "expired", 400
    p = make_payment(base_chain)
    verified = await client.verify(2, p.payload, p.requirements)
    assert (verified.is_valid, verified.invalid_reason) == (False, "expired")
    settled = await client.settle(2, p.payload, p.requirements)
    assert (settled.success, settled.error_reason, settled.transaction) == (False, "expired", "")
    # A reason that is not a clean token (spaces, markup, huge) is replaced, never echoed into our 402.
    facilitator_control.reason = "<script>alert(1)</script> " + "x" * 500
    verified = await client.verify(2, p.payload, p.requirements)
    assert (verified.is_valid, verified.invalid_reason) == (False, "facilitator_rejected")
    settled = await client.settle(2, p.payload, p.requirements)
    assert (settled.success, settled.error_reason) == (False, "settlement_failed")
    assert base_chain.balance(p.payer.address) == 50_000


async def test_a_4xx_without_a_verdict_is_bad_gateway(
    client: FacilitatorClient, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    facilitator_control.mode, facilitator_control.status = "canned", 401
    facilitator_control.canned = {"errorType": "unauthorized", "errorMessage": "bad JWT"}
    p = make_payment(base_chain)
    with pytest.raises(BadGateway):
        await client.verify(2, p.payload, p.requirements)
    facilitator_control.canned, facilitator_control.status = {"isValid": True}, 400  # "valid" on an error status
    with pytest.raises(BadGateway):
        await client.verify(2, p.payload, p.requirements)


@pytest.mark.parametrize("mode", ["down", "error", "garbage", "wrong_types", "slow"])
async def test_error_messages_never_show_the_facilitator_url_or_the_payment(
    http: aiohttp.ClientSession,
    facilitator_url: str,
    base_chain: DevChain,
    facilitator_control: FacilitatorControl,
    mode: str,
) -> None:
    secret_path = "/v2/k3y-s3cr3t-t0k3n"
    client = await client_for(http, facilitator_url + secret_path, timeout=0.5, name="cdp")
    facilitator_control.mode, facilitator_control.delay = mode, 2.0  # type: ignore[assignment]
    p = make_payment(base_chain)
    with pytest.raises(GatewayError) as info:
        await client.settle(2, p.payload, p.requirements)
    text = f"{info.value} {info.value!r} {info.value.message} {client!r}"
    host = facilitator_url.removeprefix("http://")
    assert "k3y-s3cr3t" not in text
    assert host not in text
    assert p.payload["payload"]["signature"][2:20] not in text
    assert "cdp" in str(info.value)  # the configured name says which facilitator failed
    assert facilitator_control.calls[0].path == secret_path + "/settle"


async def test_cdp_auth_signs_each_request_for_its_own_method_and_path(
    http: aiohttp.ClientSession, facilitator_url: str, base_chain: DevChain, facilitator_control: FacilitatorControl
) -> None:
    from Crypto.PublicKey import ECC

    env = {
        "CDP_API_KEY_ID": "organizations/o/apiKeys/k",
        "CDP_API_KEY_SECRET": ECC.generate(curve="P-256").export_key(format="PEM"),
    }
    client = await client_for(http, facilitator_url, auth=CdpAuth(env=env))
    await client.supported()
    p = make_payment(base_chain)
    await client.verify(2, p.payload, p.requirements)
    await client.settle(2, p.payload, p.requirements)
    host = facilitator_url.removeprefix("http://")
    uris = []
    for call in facilitator_control.calls:
        scheme, _, token = call.headers["authorization"].partition(" ")
        assert scheme == "Bearer"
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        assert claims["sub"] == "organizations/o/apiKeys/k"
        uris.append(claims["uris"])
    assert uris == [[f"GET {host}/supported"], [f"POST {host}/verify"], [f"POST {host}/settle"]]
