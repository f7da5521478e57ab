"""The settlement receipt header: ``X-PAYMENT-RESPONSE`` for v1 clients, ``PAYMENT-RESPONSE`` for v2."""

from __future__ import annotations

from gateway.x402.challenge import Requirement
from gateway.x402.codec import encode_header


def receipt_header(
    version: int, requirement: Requirement, *, success: bool, transaction: str, payer: str, reason: str | None = None
) -> tuple[bytes, bytes]:
    body: dict[str, object] = {
        "success": success,
        "transaction": transaction,
        "network": requirement.network if version == 1 else requirement.caip2,
        "payer": payer,
    }
    if reason:
        body["errorReason"] = reason
    name = b"x-payment-response" if version == 1 else b"payment-response"
    return name, encode_header(body).encode("ascii")
