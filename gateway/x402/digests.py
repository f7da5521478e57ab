"""Message digests that wallets sign, computed sans-IO (no eth_account: the server only hashes and recovers)."""

from __future__ import annotations

from eth_utils.crypto import keccak

_EIP191_PREFIX = b"\x19Ethereum Signed Message:\n"


def eip191_digest(text: str) -> bytes:
    """The digest ``personal_sign`` (EIP-191 version 0x45) signs for ``text``: keccak256 of the prefix, the
    message's UTF-8 length in decimal, and the message. What ``eth_account``'s ``encode_defunct(text=...)``
    produces, so a signature made by any wallet recovers here."""
    data = text.encode("utf-8")
    return keccak(_EIP191_PREFIX + str(len(data)).encode("ascii") + data)
