"""Decoding and normalising x402 ``exact`` payment payloads (``X-PAYMENT`` v1, ``PAYMENT-SIGNATURE`` v2).

Everything a client sends is untrusted: each field is type-checked and normalised (lowercase hex, ints) here,
so that one authorization re-encoded with another key order, hex case or padding yields the same
:class:`ExactPayment` and therefore the same store key (docs/threat-model.md T1). Anything malformed raises
:class:`~gateway.errors.BadRequest` (400) with reason ``invalid_payment_header``; never a 5xx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import BadRequest, PaymentRequired
from gateway.x402 import reasons
from gateway.x402.codec import decode_header

MAX_HEADER_BYTES = 16 * 1024
MAX_SIGNATURE_BYTES = 4096  # ERC-6492 wrapped signatures carry factory calldata; EOAs send 65 bytes
UINT256_MAX = 2**256 - 1
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
_HEX = re.compile(r"^0x(?:[0-9a-fA-F]{2})+\Z")
_UINT = re.compile(r"^[0-9]{1,78}\Z")

HeaderName = Literal["x-payment", "payment-signature"]


@dataclass(frozen=True, slots=True)
class Authorization:
    """An EIP-3009 ``TransferWithAuthorization`` message, normalised."""

    from_: str  # lowercase 0x address
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes  # 32 bytes


@dataclass(frozen=True, slots=True)
class ExactPayment:
    version: int
    header: HeaderName
    scheme: str
    network: str  # as the client wrote it: a v1 name or a CAIP-2 id
    accepted: dict[str, Any] | None  # the v2 client's echo of the requirement it chose (never trusted)
    authorization: Authorization
    signature: bytes
    raw: dict[str, Any]  # the decoded document, forwarded as-is to a facilitator

    @property
    def payer(self) -> str:
        return self.authorization.from_


def _bad(message: str) -> BadRequest:
    return BadRequest(message, reason=reasons.INVALID_PAYMENT_HEADER)


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def _str(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _bad(f"{what}.{key} must be a string")
    return value


def _address(obj: dict[str, Any], key: str) -> str:
    value = _str(obj, key, "authorization")
    if not _ADDRESS.match(value):
        raise _bad(f"authorization.{key} must be a 0x-prefixed 20-byte address")
    return value.lower()


def _uint(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    # Clients send decimal strings; a JSON integer is accepted too (same number), a float or bool never is.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad(f"authorization.{key} must be a decimal string")
    if isinstance(value, str):
        if not _UINT.match(value):
            raise _bad(f"authorization.{key} must be a non-negative decimal integer")
        value = int(value)
    if not 0 <= value <= UINT256_MAX:
        raise _bad(f"authorization.{key} is out of the uint256 range")
    return value


def _hexbytes(value: str, what: str) -> bytes:
    if not _HEX.match(value):
        raise _bad(f"{what} must be 0x-prefixed hex")
    return bytes.fromhex(value[2:])


def parse_authorization(raw: Any) -> Authorization:
    auth = _obj(raw, "payload.authorization")
    nonce_text = _str(auth, "nonce", "authorization")
    if not _BYTES32.match(nonce_text):
        raise _bad("authorization.nonce must be 0x followed by 64 hex digits")
    return Authorization(
        from_=_address(auth, "from"),
        to=_address(auth, "to"),
        value=_uint(auth, "value"),
        valid_after=_uint(auth, "validAfter"),
        valid_before=_uint(auth, "validBefore"),
        nonce=bytes.fromhex(nonce_text[2:]),
    )


def parse_exact_payment(value: bytes, header: HeaderName) -> ExactPayment:
    if len(value) > MAX_HEADER_BYTES:
        raise BadRequest("payment header is larger than 16 KiB", reason=reasons.PAYMENT_HEADER_TOO_LARGE)
    try:
        doc = decode_header(value)
    except ValueError as exc:
        raise _bad(f"payment header is not base64-encoded JSON ({exc})") from None
    doc = _obj(doc, "payment header")
    version = doc.get("x402Version")
    if type(version) is not int or version not in (1, 2):
        raise PaymentRequired("x402Version must be 1 or 2", reason=reasons.UNSUPPORTED_VERSION)
    accepted: dict[str, Any] | None = None
    if version == 1:
        scheme = _str(doc, "scheme", "payment")
        network = _str(doc, "network", "payment")
    else:
        accepted = _obj(doc.get("accepted"), "accepted")
        scheme = _str(accepted, "scheme", "accepted")
        network = _str(accepted, "network", "accepted")
    if scheme != "exact":
        raise PaymentRequired(f"scheme {scheme[:40]!r} is not accepted here", reason=reasons.UNSUPPORTED_SCHEME)
    payload = _obj(doc.get("payload"), "payload")
    if "permit2Authorization" in payload and "authorization" not in payload:
        raise PaymentRequired("only EIP-3009 authorizations are accepted", reason=reasons.UNSUPPORTED_SCHEME)
    signature = _hexbytes(_str(payload, "signature", "payload"), "payload.signature")
    if not 64 <= len(signature) <= MAX_SIGNATURE_BYTES:
        raise _bad("payload.signature has an impossible length")
    return ExactPayment(
        version=version,
        header=header,
        scheme=scheme,
        network=network,
        accepted=accepted,
        authorization=parse_authorization(payload.get("authorization")),
        signature=signature,
        raw=doc,
    )
