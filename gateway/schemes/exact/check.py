"""Sans-IO checks of an x402 ``exact`` (EIP-3009) payment against the server's own requirement.

Nothing here does I/O: these are the decisions that need no chain (x402-notes §2). The chain checks
(nonce unused, balance, simulation, ERC-1271) live in :mod:`gateway.verify.onchain`.
"""

from __future__ import annotations

import enum
from functools import lru_cache

from coincurve import PublicKey
from eth_utils.crypto import keccak

from gateway.errors import PaymentRequired
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.payload import Authorization, ExactPayment

_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
_AUTH_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,"
    b"bytes32 nonce)"
)
# ERC-6492: a signature for a wallet that is not deployed yet ends with this magic suffix.
ERC6492_MAGIC = bytes.fromhex("6492649264926492649264926492649264926492649264926492649264926492")


class SignatureKind(enum.Enum):
    EOA = "eoa"  # recovered to ``from``: valid without asking the chain
    CONTRACT = "contract"  # must be checked with ERC-1271 ``isValidSignature`` on ``from``


def _word(n: int) -> bytes:
    return n.to_bytes(32, "big")


def _addr_word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


@lru_cache(maxsize=64)
def domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak(
        _DOMAIN_TYPEHASH
        + keccak(name.encode())
        + keccak(version.encode())
        + _word(chain_id)
        + _addr_word(verifying_contract.lower())
    )


def authorization_digest(requirement: Requirement, auth: Authorization) -> bytes:
    """The EIP-712 digest the payer signed, over *our* domain (asset and chain from the requirement)."""
    domain = domain_separator(
        requirement.eip712_name, requirement.eip712_version, requirement.chain_id, requirement.asset
    )
    struct = keccak(
        _AUTH_TYPEHASH
        + _addr_word(auth.from_)
        + _addr_word(auth.to)
        + _word(auth.value)
        + _word(auth.valid_after)
        + _word(auth.valid_before)
        + auth.nonce
    )
    return keccak(b"\x19\x01" + domain + struct)


def split_signature(signature: bytes) -> tuple[int, bytes, bytes] | None:
    """(v, r, s) of a 65-byte signature with v normalised to 27/28, or None if it cannot be one that the USDC
    contract's ECRecover accepts (EIP-2 high-s and unknown v are rejected on chain, so they are here)."""
    if len(signature) != 65:
        return None
    r, s, v = signature[:32], signature[32:64], signature[64]
    if v in (0, 1):
        v += 27
    if v not in (27, 28) or int.from_bytes(s, "big") > _SECP256K1_N // 2:
        return None
    return v, r, s


def recover_signer(digest: bytes, signature: bytes) -> str | None:
    parts = split_signature(signature)
    if parts is None:
        return None
    v, r, s = parts
    try:
        public = PublicKey.from_signature_and_message(r + s + bytes([v - 27]), digest, hasher=None)
    except (ValueError, Exception):  # coincurve raises a bare Exception for an unrecoverable point
        return None
    return "0x" + keccak(public.format(compressed=False)[1:])[-20:].hex()


def select_requirement(payment: ExactPayment, requirements: tuple[Requirement, ...]) -> Requirement:
    """The server's requirement for the network the client chose; the client's copy is only compared, never used
    (THREATS 4: a payment for a cheap route must not open an expensive one)."""
    for req in requirements:
        if req.matches_network(payment.network):
            break
    else:
        raise PaymentRequired(
            f"network {payment.network[:40]!r} is not accepted on this route", reason=reasons.NETWORK_MISMATCH
        )
    if payment.version == 1 and payment.network != req.network:
        raise PaymentRequired("x402 v1 payments name the network by its v1 name", reason=reasons.NETWORK_MISMATCH)
    echo = payment.accepted
    if echo is not None:
        if str(echo.get("asset", "")).lower() != req.asset.lower():
            raise PaymentRequired("accepted.asset is not this route's asset", reason=reasons.ASSET_MISMATCH)
        if str(echo.get("payTo", "")).lower() != req.pay_to.lower():
            raise PaymentRequired("accepted.payTo is not this route's recipient", reason=reasons.RECIPIENT_MISMATCH)
        if str(echo.get("amount", "")) != str(req.amount):
            raise PaymentRequired("accepted.amount is not this route's price", reason=reasons.VALUE_MISMATCH)
    return req


def check_exact(
    payment: ExactPayment,
    req: Requirement,
) -> SignatureKind:
    """Every check that needs neither chain nor clock. Returns how the signature must be confirmed; raises
    PaymentRequired. The validity window is :func:`check_window`: a payment already paid (settled earlier, its
    request failed) stays usable for its free retry even after its authorization window closed."""
    auth = payment.authorization
    if auth.to != req.pay_to.lower():
        raise PaymentRequired("the authorization pays someone else", reason=reasons.RECIPIENT_MISMATCH)
    if auth.value != req.amount:
        raise PaymentRequired(
            f"the authorization moves {auth.value} units; this route costs exactly {req.amount}",
            reason=reasons.VALUE_MISMATCH,
        )
    if payment.signature.endswith(ERC6492_MAGIC):
        raise PaymentRequired(
            "signatures of undeployed smart wallets (ERC-6492) are not accepted; deploy the wallet first",
            reason=reasons.UNDEPLOYED_SMART_WALLET,
        )
    signer = recover_signer(authorization_digest(req, auth), payment.signature)
    if signer == auth.from_:
        return SignatureKind.EOA
    # Not an EOA signature by ``from``: only a contract wallet at ``from`` can still vouch for it (ERC-1271).
    return SignatureKind.CONTRACT


def check_window(
    payment: ExactPayment, req: Requirement, *, now: int, min_validity_seconds: int, clock_skew_seconds: int
) -> None:
    """x402-notes §2 / THREATS 8: validAfter <= now, validBefore >= now + grace and <= now + maxTimeoutSeconds."""
    auth = payment.authorization
    if auth.valid_after > now:
        raise PaymentRequired("the authorization is not valid yet", reason=reasons.VALID_AFTER_FUTURE)
    if auth.valid_before < now + min_validity_seconds:
        raise PaymentRequired(
            f"the authorization expires in less than {min_validity_seconds} s", reason=reasons.VALID_BEFORE_EXPIRED
        )
    if auth.valid_before > now + req.max_timeout_seconds + clock_skew_seconds:
        # A far-future authorization would keep our replay record alive for ever and lets the payer sit on a
        # signed payment; the route promises maxTimeoutSeconds, so that is what we accept.
        raise PaymentRequired(
            f"validBefore is more than maxTimeoutSeconds ({req.max_timeout_seconds}) ahead",
            reason=reasons.VALID_BEFORE_TOO_FAR,
        )


def payment_key(req: Requirement, auth: Authorization) -> str:
    """The store key of the money: one EIP-3009 authorization is one (chain, asset, payer, nonce)."""
    return f"exact:{req.chain_id}:{req.asset.lower()}:{auth.from_}:0x{auth.nonce.hex()}"
