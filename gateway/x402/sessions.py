"""The ``batch-settlement`` scheme's wire formats and digests, sans-IO (docs/sessions.md).

A payment channel is an on-chain escrow identified by the EIP-712 hash of its :class:`ChannelConfig`; a client
pays each request with a cumulative voucher ``Voucher(channelId, maxClaimableAmount)`` signed by the channel's
payer authorizer, and opens or tops up the channel with a ``deposit`` payload carrying an ERC-3009
``ReceiveWithAuthorization`` addressed to the deposit collector. Every payload a client sends is parsed here into
normalised values (lower-case hex, ints), so that one voucher re-encoded differently is the same voucher; anything
malformed is a 400 ``invalid_payment_header``.

All typed data signed in this scheme lives under one domain: name "x402 Batch Settlement", version "1", the chain
id, and the settlement contract's canonical address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from gateway.errors import BadRequest, PaymentRequired
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from gateway.x402.eip712 import address_word, domain_separator, word
from gateway.x402.payload import MAX_HEADER_BYTES, HeaderName

SCHEME = "batch-settlement"
SETTLEMENT_CONTRACT = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
DEPOSIT_COLLECTOR = "0x4020806089470a89826cB9fB1f4059150b550004"
DOMAIN_NAME = "x402 Batch Settlement"
DOMAIN_VERSION = "1"
MIN_WITHDRAW_DELAY = 900  # the contract refuses a shorter or longer delay
MAX_WITHDRAW_DELAY = 30 * 24 * 3600
UINT128_MAX = 2**128 - 1
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"

_CHANNEL_CONFIG_TYPEHASH = keccak(
    b"ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
    b"address token,uint40 withdrawDelay,bytes32 salt)"
)
_VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint128 maxClaimableAmount)")
_REFUND_TYPEHASH = keccak(b"Refund(bytes32 channelId,uint256 nonce,uint128 amount)")
_CLAIM_ENTRY_TYPE = b"ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
_CLAIM_BATCH_TYPEHASH = keccak(b"ClaimBatch(ClaimEntry[] claims)" + _CLAIM_ENTRY_TYPE)
_CLAIM_ENTRY_TYPEHASH = keccak(_CLAIM_ENTRY_TYPE)
_RECEIVE_TYPEHASH = keccak(
    b"ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,"
    b"bytes32 nonce)"
)

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
_HEX = re.compile(r"^0x(?:[0-9a-fA-F]{2})*\Z")
_UINT = re.compile(r"^[0-9]{1,78}\Z")
MAX_SIGNATURE_BYTES = 4096

Kind = Literal["deposit", "voucher", "refund"]


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """A channel's immutable configuration; addresses lower-case, ``salt`` 0x + 64 hex."""

    payer: str
    payer_authorizer: str
    receiver: str
    receiver_authorizer: str
    token: str
    withdraw_delay: int
    salt: str

    def wire(self) -> dict[str, Any]:
        """The JSON form clients send (checksummed addresses)."""
        return {
            "payer": to_checksum_address(self.payer),
            "payerAuthorizer": to_checksum_address(self.payer_authorizer),
            "receiver": to_checksum_address(self.receiver),
            "receiverAuthorizer": to_checksum_address(self.receiver_authorizer),
            "token": to_checksum_address(self.token),
            "withdrawDelay": self.withdraw_delay,
            "salt": self.salt,
        }

    def abi_tuple(self) -> tuple[str, str, str, str, str, int, bytes]:
        """The ``ChannelConfig`` struct as the contract's ABI takes it."""
        return (
            to_checksum_address(self.payer),
            to_checksum_address(self.payer_authorizer),
            to_checksum_address(self.receiver),
            to_checksum_address(self.receiver_authorizer),
            to_checksum_address(self.token),
            self.withdraw_delay,
            bytes.fromhex(self.salt[2:]),
        )


@dataclass(frozen=True, slots=True)
class Voucher:
    channel_id: str  # 0x + 64 lower-case hex
    max_claimable: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class DepositAuthorization:
    """The payer's ERC-3009 ``ReceiveWithAuthorization`` to the deposit collector."""

    amount: int
    valid_after: int
    valid_before: int
    salt: str  # 0x + 64 hex: with the channel id it makes the authorization's nonce
    signature: bytes


@dataclass(frozen=True, slots=True)
class SessionPayment:
    version: int
    header: HeaderName
    kind: Kind
    network: str  # as the client wrote it (CAIP-2)
    accepted: dict[str, Any]
    config: ChannelConfig
    voucher: Voucher
    deposit: DepositAuthorization | None
    refund_amount: int | None  # a refund's requested amount (None: all that is left)
    raw: dict[str, Any]


# ------------------------------------------------------------------------------------------------------ digests


def session_domain(chain_id: int) -> bytes:
    return domain_separator(DOMAIN_NAME, DOMAIN_VERSION, chain_id, SETTLEMENT_CONTRACT)


def _typed(chain_id: int, struct_hash: bytes) -> bytes:
    return keccak(b"\x19\x01" + session_domain(chain_id) + struct_hash)


@lru_cache(maxsize=4096)  # recomputed for every voucher otherwise: a keccak of a config that never changes
def channel_id(config: ChannelConfig, chain_id: int) -> str:
    """The channel's id: the EIP-712 digest of its config (what the contract's ``getChannelId`` returns)."""
    struct = keccak(
        _CHANNEL_CONFIG_TYPEHASH
        + address_word(config.payer)
        + address_word(config.payer_authorizer)
        + address_word(config.receiver)
        + address_word(config.receiver_authorizer)
        + address_word(config.token)
        + word(config.withdraw_delay)
        + bytes.fromhex(config.salt[2:])
    )
    return "0x" + _typed(chain_id, struct).hex()


def voucher_digest(channel: str, max_claimable: int, chain_id: int) -> bytes:
    return _typed(chain_id, keccak(_VOUCHER_TYPEHASH + bytes.fromhex(channel[2:]) + word(max_claimable)))


def refund_digest(channel: str, nonce: int, amount: int, chain_id: int) -> bytes:
    return _typed(chain_id, keccak(_REFUND_TYPEHASH + bytes.fromhex(channel[2:]) + word(nonce) + word(amount)))


def claim_batch_digest(entries: list[tuple[str, int, int]], chain_id: int) -> bytes:
    """``entries``: (channel id, voucher's maxClaimableAmount, totalClaimed to set)."""
    hashes = b"".join(
        keccak(_CLAIM_ENTRY_TYPEHASH + bytes.fromhex(cid[2:]) + word(max_claimable) + word(total))
        for cid, max_claimable, total in entries
    )
    return _typed(chain_id, keccak(_CLAIM_BATCH_TYPEHASH + keccak(hashes)))


def deposit_nonce(channel: str, salt: str) -> bytes:
    """The ERC-3009 nonce of a deposit: ``keccak256(abi.encode(channelId, salt))``."""
    return keccak(bytes.fromhex(channel[2:]) + bytes.fromhex(salt[2:]))


def receive_authorization_digest(
    *,
    token: str,
    token_name: str,
    token_version: str,
    chain_id: int,
    payer: str,
    auth: DepositAuthorization,
    channel: str,
) -> bytes:
    """The digest the payer signed for a deposit: ``ReceiveWithAuthorization`` to the collector, on the token's
    own domain."""
    struct = keccak(
        _RECEIVE_TYPEHASH
        + address_word(payer)
        + address_word(DEPOSIT_COLLECTOR)
        + word(auth.amount)
        + word(auth.valid_after)
        + word(auth.valid_before)
        + deposit_nonce(channel, auth.salt)
    )
    return keccak(b"\x19\x01" + domain_separator(token_name, token_version, chain_id, token) + struct)


# ------------------------------------------------------------------------------------------------------ parsing


def _bad(message: str, reason: str = reasons.INVALID_PAYMENT_HEADER) -> BadRequest:
    return BadRequest(message, reason=reason)


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def _address(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise _bad(f"{what}.{key} must be a 0x-prefixed 20-byte address")
    return value.lower()


def _bytes32(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not _BYTES32.match(value):
        raise _bad(f"{what}.{key} must be 0x followed by 64 hex digits")
    return value.lower()


def _uint(obj: dict[str, Any], key: str, what: str, limit: int = 2**256 - 1) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad(f"{what}.{key} must be a decimal string")
    if isinstance(value, str):
        if not _UINT.match(value):
            raise _bad(f"{what}.{key} must be a non-negative decimal integer")
        value = int(value)
    if not 0 <= value <= limit:
        raise _bad(f"{what}.{key} is out of range")
    return value


def _signature(obj: dict[str, Any], key: str, what: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str) or not _HEX.match(value):
        raise _bad(f"{what}.{key} must be 0x-prefixed hex")
    sig = bytes.fromhex(value[2:])
    if not 64 <= len(sig) <= MAX_SIGNATURE_BYTES:
        raise _bad(f"{what}.{key} has an impossible length")
    if len(sig) == 65 and sig[64] in (0, 1):
        # Recovery accepts v as 0/1 or 27/28, the contract's ECDSA only 27/28: the signature we store and claim
        # with must be the one the contract verifies (docs/threat-model.md T44).
        sig = sig[:64] + bytes([sig[64] + 27])
    return sig


def parse_config(raw: Any) -> ChannelConfig:
    cfg = _obj(raw, "payload.channelConfig")
    what = "channelConfig"
    return ChannelConfig(
        payer=_address(cfg, "payer", what),
        payer_authorizer=_address(cfg, "payerAuthorizer", what),
        receiver=_address(cfg, "receiver", what),
        receiver_authorizer=_address(cfg, "receiverAuthorizer", what),
        token=_address(cfg, "token", what),
        withdraw_delay=_uint(cfg, "withdrawDelay", what, 2**40 - 1),
        salt=_bytes32(cfg, "salt", what),
    )


def parse_voucher(raw: Any) -> Voucher:
    v = _obj(raw, "payload.voucher")
    return Voucher(
        channel_id=_bytes32(v, "channelId", "voucher"),
        max_claimable=_uint(v, "maxClaimableAmount", "voucher", UINT128_MAX),
        signature=_signature(v, "signature", "voucher"),
    )


def _parse_deposit(raw: Any) -> DepositAuthorization:
    dep = _obj(raw, "payload.deposit")
    auth = _obj(dep.get("authorization"), "deposit.authorization")
    if "erc3009Authorization" not in auth:
        raise PaymentRequired(
            "only ERC-3009 deposits are accepted here (no Permit2)", reason=reasons.SESSION_DEPOSIT_PAYLOAD
        )
    e = _obj(auth.get("erc3009Authorization"), "deposit.authorization.erc3009Authorization")
    what = "erc3009Authorization"
    return DepositAuthorization(
        amount=_uint(dep, "amount", "deposit", UINT128_MAX),
        valid_after=_uint(e, "validAfter", what),
        valid_before=_uint(e, "validBefore", what),
        salt=_bytes32(e, "salt", what),
        signature=_signature(e, "signature", what),
    )


def parse_session_payment(value: bytes, header: HeaderName) -> SessionPayment:
    """A ``batch-settlement`` payment from ``PAYMENT-SIGNATURE`` (x402 v2 only: v1 has no such scheme)."""
    if len(value) > MAX_HEADER_BYTES:
        raise BadRequest("payment header is larger than 16 KiB", reason=reasons.PAYMENT_HEADER_TOO_LARGE)
    try:
        doc = _obj(_decoded(value), "payment header")
    except ValueError as exc:
        raise _bad(f"payment header is not base64-encoded JSON ({exc})") from None
    if doc.get("x402Version") != 2 or type(doc.get("x402Version")) is not int:
        raise PaymentRequired("batch-settlement needs x402Version 2", reason=reasons.UNSUPPORTED_VERSION)
    accepted = _obj(doc.get("accepted"), "accepted")
    if accepted.get("scheme") != SCHEME:
        raise PaymentRequired("not a batch-settlement payment", reason=reasons.UNSUPPORTED_SCHEME)
    network = accepted.get("network")
    if not isinstance(network, str):
        raise _bad("accepted.network must be a string")
    payload = _obj(doc.get("payload"), "payload")
    kind = payload.get("type")
    if kind not in ("deposit", "voucher", "refund"):
        raise PaymentRequired("payload.type must be deposit, voucher or refund", reason=reasons.SESSION_PAYLOAD_TYPE)
    refund_amount: int | None = None
    if kind == "refund" and payload.get("amount") is not None:
        refund_amount = _uint(payload, "amount", "payload", UINT128_MAX)
        if refund_amount == 0:
            raise PaymentRequired("a refund's amount must be positive", reason=reasons.SESSION_REFUND_AMOUNT_INVALID)
    return SessionPayment(
        version=2,
        header=header,
        kind=kind,
        network=network,
        accepted=accepted,
        config=parse_config(payload.get("channelConfig")),
        voucher=parse_voucher(payload.get("voucher")),
        deposit=_parse_deposit(payload.get("deposit")) if kind == "deposit" else None,
        refund_amount=refund_amount,
        raw=doc,
    )


@lru_cache(maxsize=256)
def _decoded(value: bytes) -> Any:
    """The header's document, decoded once per request although two steps read it (recognising the scheme, then
    parsing the payment). Cached by the header's bytes; nothing here or after changes the document."""
    return decode_header(value)


def is_session_payment(value: bytes) -> bool:
    """Cheap pre-check: does this header name the batch-settlement scheme? (a full parse follows)."""
    try:
        doc = _decoded(value) if len(value) <= MAX_HEADER_BYTES else None
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("accepted"), dict) and doc["accepted"].get("scheme") == SCHEME


# ------------------------------------------------------------------------------------------------------ answers


@dataclass(frozen=True, slots=True)
class ChannelSnapshot:
    """What a client is told about its channel (``channelState``), amounts as decimal strings on the wire."""

    channel_id: str
    balance: int
    total_claimed: int
    withdraw_requested_at: int
    refund_nonce: int
    charged: int

    def wire(self) -> dict[str, Any]:
        return {
            "channelId": self.channel_id,
            "balance": str(self.balance),
            "totalClaimed": str(self.total_claimed),
            "withdrawRequestedAt": self.withdraw_requested_at,
            "refundNonce": str(self.refund_nonce),
            "chargedCumulativeAmount": str(self.charged),
        }


def corrective_extra(snapshot: ChannelSnapshot, signed_max: int, signature: str) -> dict[str, Any]:
    """The extra keys of the corrective 402's batch-settlement entry: the client resynchronises from them (it
    checks the signature against its own authorizer and the chain's ``totalClaimed``)."""
    out: dict[str, Any] = {"channelState": snapshot.wire()}
    if signature:
        out["voucherState"] = {"signedMaxClaimable": str(signed_max), "signature": signature}
    return out


__all__ = [
    "DEPOSIT_COLLECTOR",
    "MAX_WITHDRAW_DELAY",
    "MIN_WITHDRAW_DELAY",
    "SCHEME",
    "SETTLEMENT_CONTRACT",
    "ChannelConfig",
    "ChannelSnapshot",
    "DepositAuthorization",
    "SessionPayment",
    "Voucher",
    "channel_id",
    "claim_batch_digest",
    "corrective_extra",
    "deposit_nonce",
    "is_session_payment",
    "parse_session_payment",
    "receive_authorization_digest",
    "refund_digest",
    "voucher_digest",
]
