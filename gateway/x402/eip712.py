"""EIP-712 typed-data digests and secp256k1 signature recovery, sans-IO (docs/protocol.md §2).

One implementation for everything that checks a signature off chain: the EIP-3009 authorization of an ``exact``
payment, and (with :func:`gateway.x402.digests.eip191_digest`) the EIP-191 messages of tx-hash bindings and payer
auth. The rules are the USDC contract's own, so that what passes here also passes on chain.
"""

from __future__ import annotations

from functools import lru_cache

from coincurve import PublicKey
from eth_utils.crypto import keccak

from gateway.x402.challenge import Requirement
from gateway.x402.payload import Authorization

_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
_AUTH_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,"
    b"bytes32 nonce)"
)
# ERC-1271: a contract approves a signature by returning isValidSignature's own selector as a bytes4, i.e. one ABI
# word holding the selector followed by 28 zero bytes.
_ERC1271_APPROVED = keccak(b"isValidSignature(bytes32,bytes)")[:4] + bytes(28)


def word(n: int) -> bytes:
    """A uint256 ABI word."""
    return n.to_bytes(32, "big")


def address_word(address: str) -> bytes:
    """A 0x address as a left-padded ABI word."""
    return bytes(12) + bytes.fromhex(address[2:])


@lru_cache(maxsize=64)
def domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak(
        _DOMAIN_TYPEHASH
        + keccak(name.encode())
        + keccak(version.encode())
        + word(chain_id)
        + address_word(verifying_contract.lower())
    )


def authorization_digest(requirement: Requirement, auth: Authorization) -> bytes:
    """The EIP-712 digest the payer signed, over *our* domain (asset and chain from the requirement)."""
    domain = domain_separator(
        requirement.eip712_name, requirement.eip712_version, requirement.chain_id, requirement.asset
    )
    struct = keccak(
        _AUTH_TYPEHASH
        + address_word(auth.from_)
        + address_word(auth.to)
        + word(auth.value)
        + word(auth.valid_after)
        + word(auth.valid_before)
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
    """The lowercase address whose key signed ``digest``, or None (malformed, high-s, or not a point)."""
    parts = split_signature(signature)
    if parts is None:
        return None
    v, r, s = parts
    try:
        public = PublicKey.from_signature_and_message(r + s + bytes([v - 27]), digest, hasher=None)
    except (ValueError, Exception):  # coincurve raises a bare Exception for an unrecoverable point
        return None
    return "0x" + keccak(public.format(compressed=False)[1:])[-20:].hex()


def erc1271_approves(answer: bytes) -> bool:
    """Whether ``answer``, what an ``isValidSignature`` call returned, approves the signature: its first word is the
    magic value, zero-padded, as the USDC contract's ``SignatureChecker`` (and OpenZeppelin's) compare it. Comparing
    only the first four bytes would take the answer of a contract whose fallback echoes its call (the call starts
    with the same selector) for an approval no contract gave."""
    return len(answer) >= 32 and answer[:32] == _ERC1271_APPROVED
