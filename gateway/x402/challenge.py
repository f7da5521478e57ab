"""The server's own payment requirements and the 402 challenge built from them.

Every 402 carries both protocol versions (docs/protocol.md §1): the v2 ``PAYMENT-REQUIRED`` header, which v2 clients
read first, and a complete v1 JSON body, which v1 clients read only. The v1 body must pass the legacy clients'
strict schema: ``resource`` absolute, ``description``/``mimeType`` strings, no ``outputSchema: null``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.x402.codec import RawHeaders, dumps, encode_header

EXPOSE_HEADERS = b"PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE"


@dataclass(frozen=True, slots=True)
class Requirement:
    """What this route costs on one network: the only thing a payment is ever checked against."""

    network: str  # v1 name, e.g. "base"
    chain_id: int
    asset: str  # checksummed USDC address
    amount: int  # atomic units
    pay_to: str
    max_timeout_seconds: int
    eip712_name: str
    eip712_version: str
    scheme: str = "exact"
    more: tuple[tuple[str, Any], ...] = ()  # further ``extra`` keys of this scheme (batch-settlement's terms)
    legacy: bool = True  # also listed in the v1 body (a scheme v1 clients do not know is v2-only)

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"

    def matches_network(self, network: str) -> bool:
        return network in (self.network, self.caip2)

    def extra(self) -> dict[str, Any]:
        return {"name": self.eip712_name, "version": self.eip712_version, **dict(self.more)}

    def v1(self, resource: str, description: str, mime_type: str) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "network": self.network,
            "maxAmountRequired": str(self.amount),
            "resource": resource,
            "description": description,
            "mimeType": mime_type,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "asset": self.asset,
            "extra": self.extra(),
        }

    def v2(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "network": self.caip2,
            "amount": str(self.amount),
            "asset": self.asset,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": self.extra(),
        }


@dataclass(frozen=True, slots=True)
class Challenge:
    """A ready-to-send 402 (or other refusal that carries the payment options)."""

    status: int
    headers: RawHeaders
    body: bytes
    document: dict[str, Any]  # the v2 PAYMENT-REQUIRED document, as encoded in ``headers`` (for the paywall)


def build_challenge(
    accepts: tuple[Requirement, ...],
    *,
    resource: str,
    description: str,
    mime_type: str,
    reason: str,
    message: str = "",
    status: int = 402,
    extensions: Mapping[str, Any] | None = None,
    v1_extra: Mapping[str, Any] | None = None,
    resource_extra: Mapping[str, Any] | None = None,
) -> Challenge:
    """The 402, built and encoded once: ``extensions`` go into the v2 document only, ``v1_extra`` are extra keys of
    the v1 body after ``accepts`` (the legacy schema ignores unknown keys), ``resource_extra`` extends v2's
    ``resource`` object (service metadata)."""
    v2: dict[str, Any] = {
        "x402Version": 2,
        "error": reason,
        "resource": {"url": resource, "description": description, "mimeType": mime_type, **(resource_extra or {})},
        "accepts": [r.v2() for r in accepts],
    }
    if extensions:
        v2["extensions"] = dict(extensions)
    # v1 clients read only accepts from the body; ``message`` is extra context for people and is ignored by the
    # legacy schema (unknown keys are stripped, not rejected).
    v1: dict[str, Any] = {
        "x402Version": 1,
        "error": reason,
        "accepts": [r.v1(resource, description, mime_type) for r in accepts if r.legacy],
    }
    if message:
        v1["message"] = message
    v1.update(v1_extra or {})
    body = dumps(v1)
    headers: RawHeaders = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"payment-required", encode_header(v2).encode("ascii")),
        (b"cache-control", b"no-store"),
        (b"access-control-expose-headers", EXPOSE_HEADERS),
    ]
    return Challenge(status=status, headers=headers, body=body, document=v2)
