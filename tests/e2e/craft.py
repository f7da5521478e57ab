"""Hand-made x402 ``exact`` payments for adversarial tests.

Deliberately independent of ``gateway.client`` and ``gateway.x402``: the typed data is built field by field
with eth_account's ``encode_typed_data``, and the envelopes are plain dicts, so a test can get any one field
wrong (recipient, value, window, chain id, verifying contract, signer, network, scheme, version) while keeping
everything else valid.

    auth = authorization(payer.address, gw.pay_to, 100_000)
    sig = sign_authorization(payer, auth, chain_id=8453, verifying_contract=BASE_USDC)
    header_value = encode(v2_envelope(auth, sig, accepted=requirement))
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from gateway.dev.chain import DevChain, send_transaction

EIP712_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
TRANSFER_WITH_AUTHORIZATION = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
_TWA_VRS = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"


def random_nonce() -> str:
    return "0x" + os.urandom(32).hex()


def authorization(
    from_: str,
    to: str,
    value: int,
    *,
    valid_after: int | None = None,
    valid_before: int | None = None,
    nonce: str | None = None,
    now: int | None = None,
    timeout: int = 300,
) -> dict[str, str]:
    """An EIP-3009 authorization as it travels in a header: every value a string. Defaults are what the official
    clients do: ``validAfter = now - 600``, ``validBefore = now + timeout``, a random nonce."""
    now = int(time.time()) if now is None else now
    return {
        "from": from_,
        "to": to,
        "value": str(value),
        "validAfter": str(now - 600 if valid_after is None else valid_after),
        "validBefore": str(now + timeout if valid_before is None else valid_before),
        "nonce": nonce or random_nonce(),
    }


def typed_data(
    auth: Mapping[str, str], *, chain_id: int, verifying_contract: str, name: str = "USD Coin", version: str = "2"
) -> dict[str, Any]:
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN, "TransferWithAuthorization": TRANSFER_WITH_AUTHORIZATION},
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": name, "version": version, "chainId": chain_id, "verifyingContract": verifying_contract},
        "message": {
            "from": auth["from"],
            "to": auth["to"],
            "value": int(auth["value"]),
            "validAfter": int(auth["validAfter"]),
            "validBefore": int(auth["validBefore"]),
            "nonce": bytes.fromhex(auth["nonce"][2:]),
        },
    }


def sign_authorization(
    signer: LocalAccount | str,
    auth: Mapping[str, str],
    *,
    chain_id: int,
    verifying_contract: str,
    name: str = "USD Coin",
    version: str = "2",
) -> str:
    """0x-hex 65-byte signature of ``auth`` by ``signer`` (whatever ``auth["from"]`` says) over the given domain."""
    account = Account.from_key(signer) if isinstance(signer, str) else signer
    message = encode_typed_data(
        full_message=typed_data(
            auth, chain_id=chain_id, verifying_contract=verifying_contract, name=name, version=version
        )
    )
    return "0x" + bytes(account.sign_message(message).signature).hex()


def sign_for(signer: LocalAccount | str, auth: Mapping[str, str], chain: DevChain, **domain: Any) -> str:
    """``sign_authorization`` over ``chain``'s real USDC domain, any field overridable."""
    fields: dict[str, Any] = {
        "chain_id": chain.chain_id,
        "verifying_contract": chain.usdc,
        "name": chain.token_name,
        "version": chain.token_version,
    }
    fields.update(domain)
    return sign_authorization(signer, auth, **fields)


def v1_envelope(
    auth: Mapping[str, Any], signature: str, *, network: str = "base", scheme: str = "exact", **overrides: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "x402Version": 1,
        "scheme": scheme,
        "network": network,
        "payload": {"signature": signature, "authorization": dict(auth)},
    }
    doc.update(overrides)
    return doc


def v2_envelope(
    auth: Mapping[str, Any],
    signature: str,
    *,
    accepted: Mapping[str, Any],
    resource: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "x402Version": 2,
        "accepted": dict(accepted),
        "payload": {"signature": signature, "authorization": dict(auth)},
    }
    if resource is not None:
        doc["resource"] = dict(resource)
    doc.update(overrides)
    return doc


def encode(
    doc: Any, *, padding: bool = True, urlsafe: bool = False, sort_keys: bool = False, compact: bool = True
) -> str:
    """base64(JSON(doc)) with the knobs clients differ on."""
    text = json.dumps(doc, sort_keys=sort_keys, separators=(",", ":") if compact else None)
    raw = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(text.encode()).decode("ascii")
    return raw if padding else raw.rstrip("=")


def header_name(version: int) -> str:
    return "PAYMENT-SIGNATURE" if version == 2 else "X-PAYMENT"


def reversed_keys(obj: Any) -> Any:
    """The same JSON document with every object's keys in reverse order."""
    if isinstance(obj, dict):
        return {k: reversed_keys(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [reversed_keys(v) for v in obj]
    return obj


def upper_hex(value: str) -> str:
    """``0xabc`` -> ``0xABC``: same bytes, other case (the ``0x`` prefix stays lowercase)."""
    return "0x" + value[2:].upper()


def transfer_with_authorization_calldata(auth: Mapping[str, str], signature: str) -> bytes:
    sig = bytes.fromhex(signature[2:])
    r, s, v = sig[:32], sig[32:64], sig[64]
    args = [
        auth["from"],
        auth["to"],
        int(auth["value"]),
        int(auth["validAfter"]),
        int(auth["validBefore"]),
        bytes.fromhex(auth["nonce"][2:]),
        v if v >= 27 else v + 27,
        r,
        s,
    ]
    types = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"]
    return keccak(text=_TWA_VRS)[:4] + abi_encode(types, args)


def execute_authorization(chain: DevChain, auth: Mapping[str, str], signature: str, *, key: str) -> str:
    """Submit ``transferWithAuthorization`` ourselves (a third party, paying gas with ``key``); return the tx hash."""
    receipt = send_transaction(chain.anvil, key, chain.usdc, transfer_with_authorization_calldata(auth, signature))
    return str(receipt["transactionHash"])
