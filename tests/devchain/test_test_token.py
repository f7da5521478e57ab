"""The project's TestUSDC must behave like Circle's FiatToken v2.2 wherever the gateway can observe it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from eth_abi import decode, encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from gateway.dev.chain import (
    BASE_USDC,
    DEV_KEYS,
    POLYGON_USDC,
    DevChain,
    RpcError,
    call,
    deploy_contract,
    deploy_test_usdc,
    send_transaction,
    start_dev_chain,
)

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
TWA_VRS = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
TWA_BYTES = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
TRANSFER_TOPIC = keccak(text="Transfer(address,address,uint256)")
AUTH_USED_TOPIC = keccak(text="AuthorizationUsed(address,bytes32)")
PAY_TO = Account.from_key(DEV_KEYS[1]).address


def sel(signature: str) -> bytes:
    return bytes(keccak(text=signature)[:4])


def view(
    chain: DevChain,
    signature: str,
    out: list[str],
    types: list[str] | None = None,
    args: list[Any] | None = None,
    *,
    at: str | None = None,
) -> Any:
    data = sel(signature) + (encode(types, args) if types else b"")
    return decode(out, call(chain.anvil, at or chain.usdc, data))[0]


def domain(chain: DevChain, token: str | None = None) -> dict[str, Any]:
    return {
        "name": chain.token_name,
        "version": chain.token_version,
        "chainId": chain.chain_id,
        "verifyingContract": token or chain.usdc,
    }


def typed_authorization(chain: DevChain, auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": domain(chain),
        "message": auth,
    }


def authorization(
    payer: str,
    *,
    value: int = 10_000,
    valid_after: int | None = None,
    valid_before: int | None = None,
    to: str = PAY_TO,
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "from": payer,
        "to": to,
        "value": value,
        "validAfter": now - 600 if valid_after is None else valid_after,
        "validBefore": now + 300 if valid_before is None else valid_before,
        "nonce": os.urandom(32),
    }


def sign(chain: DevChain, signer: LocalAccount, auth: dict[str, Any]) -> bytes:
    """What an x402 client does: EIP-712 sign_message over the typed data (65 bytes r || s || v)."""
    return bytes(signer.sign_message(encode_typed_data(full_message=typed_authorization(chain, auth))).signature)


def _auth_args(auth: dict[str, Any]) -> list[Any]:
    return [auth["from"], auth["to"], auth["value"], auth["validAfter"], auth["validBefore"], auth["nonce"]]


def calldata_vrs(auth: dict[str, Any], sig: bytes) -> bytes:
    r, s, v = sig[:32], sig[32:64], sig[64]
    types = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"]
    return sel(TWA_VRS) + encode(types, [*_auth_args(auth), v, r, s])


def calldata_bytes(auth: dict[str, Any], sig: bytes) -> bytes:
    types = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"]
    return sel(TWA_BYTES) + encode(types, [*_auth_args(auth), sig])


def revert_reason(chain: DevChain, data: bytes) -> str:
    """Simulate from the relayer (as a facilitator does) and return anvil's revert message."""
    with pytest.raises(RpcError) as err:
        chain.rpc(
            "eth_call",
            [
                {"from": Account.from_key(chain.relayer_key).address, "to": chain.usdc, "data": "0x" + data.hex()},
                "latest",
            ],
        )
    return err.value.message


def auth_state(chain: DevChain, auth: dict[str, Any]) -> bool:
    result: bool = view(
        chain, "authorizationState(address,bytes32)", ["bool"], ["address", "bytes32"], [auth["from"], auth["nonce"]]
    )
    return result


def settle(chain: DevChain, data: bytes) -> dict[str, Any]:
    return send_transaction(chain.anvil, chain.relayer_key, chain.usdc, data)


@pytest.fixture(scope="module")
def own_chain() -> Iterator[DevChain]:
    """A private chain for the tests that move the clock (the session chains must keep wall-clock time)."""
    chain = start_dev_chain(8453)
    yield chain
    chain.stop()


# ------------------------------------------------------------------------------------------------ domain, metadata


@pytest.mark.parametrize("chain_fixture", ["base_chain", "polygon_chain"])
def test_onchain_domain_separator_equals_offchain_eip712_domain_hash(
    chain_fixture: str, request: pytest.FixtureRequest
) -> None:
    chain: DevChain = request.getfixturevalue(chain_fixture)
    signable = encode_typed_data(full_message=typed_authorization(chain, authorization(PAY_TO)))
    onchain = view(chain, "DOMAIN_SEPARATOR()", ["bytes32"])
    assert onchain == bytes(signable.header)  # header = hashStruct(EIP712Domain)
    assert chain.chain_id == int(chain.rpc("eth_chainId"), 16)


def test_token_sits_at_canonical_usdc_address_of_each_impersonated_chain(
    base_chain: DevChain, polygon_chain: DevChain
) -> None:
    assert base_chain.usdc == BASE_USDC and base_chain.chain_id == 8453
    assert polygon_chain.usdc == POLYGON_USDC and polygon_chain.chain_id == 137
    assert base_chain.rpc("eth_getCode", [BASE_USDC, "latest"]) not in ("0x", "0x0")


def test_name_version_symbol_decimals_survive_setcode(base_chain: DevChain) -> None:
    assert view(base_chain, "name()", ["string"]) == "USD Coin"
    assert view(base_chain, "version()", ["string"]) == "2"
    assert view(base_chain, "symbol()", ["string"]) == "USDC"
    assert view(base_chain, "decimals()", ["uint8"]) == 6


def test_domain_follows_the_code_address_not_the_deploy_address(own_chain: DevChain) -> None:
    # A 31-byte name is the longest the packed immutable holds; the copy must still compute its own domain.
    name = "N" * 31
    target = to_checksum_address("0x" + "42" * 20)
    at = deploy_test_usdc(own_chain.anvil, name=name, version="7", at=target)
    assert at == target
    assert view(own_chain, "name()", ["string"], at=at) == name
    assert view(own_chain, "version()", ["string"], at=at) == "7"
    typed = typed_authorization(own_chain, authorization(PAY_TO))
    typed["domain"] = {"name": name, "version": "7", "chainId": own_chain.chain_id, "verifyingContract": at}
    expected = bytes(encode_typed_data(full_message=typed).header)
    assert view(own_chain, "DOMAIN_SEPARATOR()", ["bytes32"], at=at) == expected


def test_names_longer_than_31_bytes_are_refused_at_deploy(own_chain: DevChain) -> None:
    with pytest.raises(RpcError, match="longer than 31 bytes"):
        deploy_test_usdc(own_chain.anvil, name="N" * 32)


def test_known_testnet_gets_its_usdc_name_and_address() -> None:
    chain = start_dev_chain(84532)
    try:
        assert chain.usdc == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
        assert view(chain, "name()", ["string"]) == "USDC"
    finally:
        chain.stop()


# ------------------------------------------------------------------------------------------------ settlement


@pytest.mark.parametrize("overload", ["vrs", "bytes"])
def test_signed_authorization_settles_and_marks_nonce_used(base_chain: DevChain, overload: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    auth = authorization(payer.address, value=250_000)
    sig = sign(base_chain, payer, auth)
    data = calldata_vrs(auth, sig) if overload == "vrs" else calldata_bytes(auth, sig)
    before_to = base_chain.balance(PAY_TO)
    assert auth_state(base_chain, auth) is False

    receipt = settle(base_chain, data)

    assert int(receipt["status"], 16) == 1
    assert auth_state(base_chain, auth) is True
    assert base_chain.balance(payer.address) == 750_000
    assert base_chain.balance(PAY_TO) == before_to + 250_000
    logs = [log for log in receipt["logs"] if to_checksum_address(log["address"]) == base_chain.usdc]
    topics = [[bytes.fromhex(t[2:]) for t in log["topics"]] for log in logs]
    used = [t for t in topics if t[0] == AUTH_USED_TOPIC]
    assert used == [[AUTH_USED_TOPIC, bytes(12) + bytes.fromhex(payer.address[2:]), auth["nonce"]]]
    transfers = [(t, log) for t, log in zip(topics, logs, strict=True) if t[0] == TRANSFER_TOPIC]
    assert len(transfers) == 1
    t, log = transfers[0]
    assert t[1][12:] == bytes.fromhex(payer.address[2:]) and t[2][12:] == bytes.fromhex(PAY_TO[2:])
    assert int(log["data"], 16) == 250_000


def test_same_authorization_cannot_settle_twice(base_chain: DevChain) -> None:
    payer = base_chain.new_payer()
    auth = authorization(payer.address)
    sig = sign(base_chain, payer, auth)
    settle(base_chain, calldata_vrs(auth, sig))
    assert "FiatTokenV2: authorization is used or canceled" in revert_reason(base_chain, calldata_vrs(auth, sig))
    # the other overload shares the nonce space
    assert "authorization is used or canceled" in revert_reason(base_chain, calldata_bytes(auth, sig))


def test_expired_authorization_reverts(base_chain: DevChain) -> None:
    payer = base_chain.new_payer()
    auth = authorization(payer.address, valid_after=0, valid_before=int(time.time()) - 5)
    assert "FiatTokenV2: authorization is expired" in revert_reason(
        base_chain, calldata_vrs(auth, sign(base_chain, payer, auth))
    )


def test_not_yet_valid_authorization_reverts(base_chain: DevChain) -> None:
    payer = base_chain.new_payer()
    auth = authorization(payer.address, valid_after=int(time.time()) + 3600, valid_before=int(time.time()) + 7200)
    reason = revert_reason(base_chain, calldata_vrs(auth, sign(base_chain, payer, auth)))
    assert "FiatTokenV2: authorization is not yet valid" in reason


@pytest.mark.parametrize("edge", ["validAfter", "validBefore"])
def test_validity_window_is_exclusive_at_both_ends_like_circle(own_chain: DevChain, edge: str) -> None:
    # Circle: require(block.timestamp > validAfter) and require(block.timestamp < validBefore).
    payer = own_chain.new_payer()
    latest = int(own_chain.rpc("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
    ts = latest + 10
    auth = authorization(
        payer.address,
        valid_after=ts if edge == "validAfter" else 0,
        valid_before=ts if edge == "validBefore" else ts + 600,
    )
    own_chain.rpc("evm_setNextBlockTimestamp", [ts])
    receipt = send_transaction(
        own_chain.anvil,
        own_chain.relayer_key,
        own_chain.usdc,
        calldata_vrs(auth, sign(own_chain, payer, auth)),
        gas=200_000,
        check=False,
    )
    assert int(receipt["status"], 16) == 0
    assert auth_state(own_chain, auth) is False


def test_authorization_signed_by_someone_else_reverts(base_chain: DevChain) -> None:
    payer = base_chain.new_payer()
    auth = authorization(payer.address)
    forged = sign(base_chain, Account.create(), auth)
    assert "FiatTokenV2: invalid signature" in revert_reason(base_chain, calldata_vrs(auth, forged))
    assert "FiatTokenV2: invalid signature" in revert_reason(base_chain, calldata_bytes(auth, forged))


def test_signature_over_different_terms_reverts(base_chain: DevChain) -> None:
    payer = base_chain.new_payer()
    auth = authorization(payer.address, value=1)
    sig = sign(base_chain, payer, auth)
    assert "invalid signature" in revert_reason(base_chain, calldata_vrs({**auth, "value": 2}, sig))


def test_malleable_high_s_and_bad_v_signatures_are_rejected(base_chain: DevChain) -> None:
    payer = base_chain.new_payer()
    auth = authorization(payer.address)
    sig = sign(base_chain, payer, auth)
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])  # same signer, high s
    assert "invalid signature 's' value" in revert_reason(base_chain, calldata_bytes(auth, twin))
    assert "invalid signature 'v' value" in revert_reason(base_chain, calldata_bytes(auth, sig[:64] + bytes([v - 27])))
    assert "invalid signature length" in revert_reason(base_chain, calldata_bytes(auth, sig[:64]))
    settle(base_chain, calldata_bytes(auth, sig))  # the canonical form still works


def test_cancelled_authorization_cannot_be_used(base_chain: DevChain) -> None:
    payer = base_chain.new_payer()
    auth = authorization(payer.address)
    typed = {
        "types": {
            "EIP712Domain": typed_authorization(base_chain, auth)["types"]["EIP712Domain"],
            "CancelAuthorization": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}],
        },
        "primaryType": "CancelAuthorization",
        "domain": domain(base_chain),
        "message": {"authorizer": payer.address, "nonce": auth["nonce"]},
    }
    csig = bytes(payer.sign_message(encode_typed_data(full_message=typed)).signature)
    data = sel("cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)") + encode(
        ["address", "bytes32", "uint8", "bytes32", "bytes32"],
        [payer.address, auth["nonce"], csig[64], csig[:32], csig[32:64]],
    )
    receipt = settle(base_chain, data)
    assert bytes.fromhex(receipt["logs"][0]["topics"][0][2:]) == keccak(text="AuthorizationCanceled(address,bytes32)")
    assert auth_state(base_chain, auth) is True
    assert "used or canceled" in revert_reason(base_chain, calldata_vrs(auth, sign(base_chain, payer, auth)))


# ------------------------------------------------------------------------------------------------ ERC-1271 payers


@pytest.fixture(scope="module")
def wallet(base_chain: DevChain) -> tuple[str, LocalAccount]:
    owner: LocalAccount = Account.create()
    address = deploy_contract(base_chain.anvil, "TestWallet1271", ["address"], [owner.address])
    base_chain.mint(address, 5_000_000)
    return address, owner


@pytest.mark.parametrize("overload", ["bytes", "vrs"])
def test_contract_wallet_authorization_settles_via_erc1271(
    base_chain: DevChain, wallet: tuple[str, LocalAccount], overload: str
) -> None:
    address, owner = wallet
    auth = authorization(address, value=1_000)
    sig = sign(base_chain, owner, auth)  # the owner signs the token's EIP-712 digest; the wallet vouches for it
    before = base_chain.balance(address)
    settle(base_chain, calldata_bytes(auth, sig) if overload == "bytes" else calldata_vrs(auth, sig))
    assert base_chain.balance(address) == before - 1_000
    assert auth_state(base_chain, auth) is True


def test_contract_wallet_rejects_signature_not_by_its_owner(
    base_chain: DevChain, wallet: tuple[str, LocalAccount]
) -> None:
    address, _owner = wallet
    auth = authorization(address)
    assert "FiatTokenV2: invalid signature" in revert_reason(
        base_chain, calldata_bytes(auth, sign(base_chain, Account.create(), auth))
    )
    # a contract payer is never checked with ecrecover, even when the signature is "from" its own address
    assert view(
        base_chain,
        "isValidSignature(bytes32,bytes)",
        ["bytes4"],
        ["bytes32", "bytes"],
        [bytes(32), b"\x00" * 65],
        at=address,
    ) == bytes.fromhex("ffffffff")


# ------------------------------------------------------------------------------------------------ receive (payee pulls)

RWA_VRS = "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
RWA_BYTES = "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
PAYEE_KEY = DEV_KEYS[4]
PAYEE = Account.from_key(PAYEE_KEY).address


def sign_receive(chain: DevChain, signer: LocalAccount, auth: dict[str, Any]) -> bytes:
    typed = typed_authorization(chain, auth)
    typed["types"]["ReceiveWithAuthorization"] = typed["types"].pop("TransferWithAuthorization")
    typed["primaryType"] = "ReceiveWithAuthorization"
    return bytes(signer.sign_message(encode_typed_data(full_message=typed)).signature)


def receive_calldata(overload: str, auth: dict[str, Any], sig: bytes) -> bytes:
    if overload == "vrs":
        types = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"]
        return sel(RWA_VRS) + encode(types, [*_auth_args(auth), sig[64], sig[:32], sig[32:64]])
    types = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"]
    return sel(RWA_BYTES) + encode(types, [*_auth_args(auth), sig])


@pytest.mark.parametrize("overload", ["vrs", "bytes"])
def test_receive_with_authorization_pays_only_when_the_payee_calls(base_chain: DevChain, overload: str) -> None:
    payer = base_chain.new_payer(1_000_000)
    auth = authorization(payer.address, value=40_000, to=PAYEE)
    data = receive_calldata(overload, auth, sign_receive(base_chain, payer, auth))
    # Anyone else who saw the authorization (the relayer here) cannot front-run the payee with it.
    assert "FiatTokenV2: caller must be the payee" in revert_reason(base_chain, data)
    before = base_chain.balance(PAYEE)
    send_transaction(base_chain.anvil, PAYEE_KEY, base_chain.usdc, data)
    assert base_chain.balance(PAYEE) == before + 40_000
    assert base_chain.balance(payer.address) == 960_000
    assert auth_state(base_chain, auth) is True
    with pytest.raises(RpcError, match="authorization is used or canceled"):
        base_chain.rpc("eth_call", [{"from": PAYEE, "to": base_chain.usdc, "data": "0x" + data.hex()}, "latest"])


def test_receive_and_transfer_authorizations_are_not_interchangeable_but_share_nonces(base_chain: DevChain) -> None:
    payer = base_chain.new_payer()
    auth = authorization(payer.address, to=PAYEE)

    def as_payee(data: bytes) -> None:
        base_chain.rpc("eth_call", [{"from": PAYEE, "to": base_chain.usdc, "data": "0x" + data.hex()}, "latest"])

    # A TransferWithAuthorization signature does not authorize a receive (different EIP-712 type), nor back.
    with pytest.raises(RpcError, match="FiatTokenV2: invalid signature"):
        as_payee(receive_calldata("bytes", auth, sign(base_chain, payer, auth)))
    assert "invalid signature" in revert_reason(base_chain, calldata_bytes(auth, sign_receive(base_chain, payer, auth)))
    # One nonce space: a receive spends the nonce for transfers too.
    received = receive_calldata("bytes", auth, sign_receive(base_chain, payer, auth))
    send_transaction(base_chain.anvil, PAYEE_KEY, base_chain.usdc, received)
    assert "used or canceled" in revert_reason(base_chain, calldata_bytes(auth, sign(base_chain, payer, auth)))


def test_receive_with_authorization_from_a_contract_wallet_uses_erc1271(
    base_chain: DevChain, wallet: tuple[str, LocalAccount]
) -> None:
    address, owner = wallet
    auth = authorization(address, value=2_000, to=PAYEE)
    before = base_chain.balance(address)
    data = receive_calldata("bytes", auth, sign_receive(base_chain, owner, auth))
    send_transaction(base_chain.anvil, PAYEE_KEY, base_chain.usdc, data)
    assert base_chain.balance(address) == before - 2_000
