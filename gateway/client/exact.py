"""Answering a 402 with an EIP-3009 authorization: read the challenge, pick an option, sign, encode.

Speaks both protocol versions the way the official clients do: v2 (``PAYMENT-SIGNATURE``, the chosen
requirement echoed in ``accepted``) when the 402 carries a ``PAYMENT-REQUIRED`` header, v1 (``X-PAYMENT``)
from the JSON body otherwise.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount

from gateway.networks import KNOWN_NETWORKS
from gateway.x402.codec import decode_header, encode_header, loads

# The longest an authorization signed here stays valid, whatever a 402's maxTimeoutSeconds asks: a server may hold
# a signed authorization and settle it at any time before its validBefore (gateways ask for minutes; a day leaves
# room for upstreams that answer in hours, as this gateway's read_timeout may).
MAX_VALIDITY_SECONDS = 86_400


@dataclass(frozen=True, slots=True)
class Option:
    version: int
    requirement: dict[str, Any]  # exactly as the server sent it
    resource: dict[str, Any] | None  # v2 top-level resource

    @property
    def chain_id(self) -> int:
        network = str(self.requirement["network"])
        if network.startswith("eip155:"):
            return int(network.split(":", 1)[1])
        return KNOWN_NETWORKS[network].chain_id

    @property
    def amount(self) -> int:
        return int(self.requirement["amount" if self.version == 2 else "maxAmountRequired"])


def parse_challenge(headers: Any, body: bytes) -> list[Option]:
    """Every payment option of a 402: the v2 header's if present, else the v1 body's."""
    raw = headers.get("payment-required")
    if raw:
        doc = decode_header(raw)
        return [Option(2, r, doc.get("resource")) for r in doc.get("accepts", [])]
    doc = loads(body or b"{}")
    return [Option(1, r, None) for r in doc.get("accepts", [])]


def choose_requirement(options: list[Option], *, networks: set[str] | None = None) -> Option:
    for option in options:
        if option.requirement.get("scheme") != "exact":
            continue
        if networks is None or option.requirement["network"] in networks:
            return option
    raise LookupError("no exact-scheme option this client can pay")


def sign_exact_payment(
    account: LocalAccount, option: Option, *, now: int | None = None, valid_after: int | None = None
) -> tuple[str, str]:
    """(header name, header value) paying ``option`` with ``account``."""
    req = option.requirement
    now = int(time.time()) if now is None else now
    message = {
        "from": account.address,
        "to": req["payTo"],
        "value": option.amount,
        "validAfter": now - 600 if valid_after is None else valid_after,
        "validBefore": now + min(int(req["maxTimeoutSeconds"]), MAX_VALIDITY_SECONDS),
        "nonce": "0x" + os.urandom(32).hex(),
    }
    extra = req.get("extra") or {}
    typed = {
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
        "domain": {
            "name": extra.get("name", "USD Coin"),
            "version": extra.get("version", "2"),
            "chainId": option.chain_id,
            "verifyingContract": req["asset"],
        },
        "message": message,
    }
    signed = account.sign_message(encode_typed_data(full_message=typed))
    authorization = {k: str(v) if isinstance(v, int) else v for k, v in message.items()}
    inner = {"signature": "0x" + bytes(signed.signature).hex(), "authorization": authorization}
    if option.version == 2:
        doc: dict[str, Any] = {"x402Version": 2, "accepted": req, "payload": inner}
        if option.resource:
            doc["resource"] = option.resource
        return "PAYMENT-SIGNATURE", encode_header(doc)
    return "X-PAYMENT", encode_header(
        {"x402Version": 1, "scheme": "exact", "network": req["network"], "payload": inner}
    )
