"""What a settled ``transferWithAuthorization`` says: the call's fields, and whether a receipt executed it to us.

Pure reads of calldata and receipts (no I/O), split from :mod:`gateway.chain.finality` (the tracker that acts on
them, docs/threat-model.md T28).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from gateway.chain import abi
from gateway.chain.rpc import RpcError, hex_int


@dataclass(frozen=True, slots=True)
class Authorization:
    """The fields of a ``transferWithAuthorization`` call the tracker needs (both overloads start alike)."""

    payer: str  # lowercase 0x address
    pay_to: str
    value: int
    valid_before: int
    nonce: bytes

    @classmethod
    def of_calldata(cls, data: bytes) -> Authorization | None:
        if len(data) < 4 + 6 * 32:
            return None
        words = [data[4 + 32 * i : 4 + 32 * (i + 1)] for i in range(6)]
        return cls(
            payer="0x" + words[0][12:].hex(),
            pay_to="0x" + words[1][12:].hex(),
            value=int.from_bytes(words[2], "big"),
            valid_before=int.from_bytes(words[4], "big"),
            nonce=words[5],
        )


def transfer_log(
    receipt: dict[str, Any], asset: str, payer: str, pay_to: str, value: int, nonce: bytes
) -> dict[str, Any] | None:
    """The ``Transfer`` log by which this (successful) transaction executed the authorization ``(payer, nonce)``,
    moving exactly ``value`` from the payer to ``pay_to`` as the token ``asset`` itself logs it; None otherwise.

    The token logs ``AuthorizationUsed(payer, nonce)`` and, as the very next log, the ``Transfer`` it made. The
    pair is required: a transaction may carry several settlements (a Multicall3 batch, ours or anyone's), and a
    Transfer alone could be another authorization's of the same payer and amount. Logs of any other contract are
    ignored: a fake token emits identical events."""
    if not isinstance(receipt, dict) or hex_int(receipt.get("status", "0x0")) != 1:
        return None
    # Compared as the node's hex text, lower-cased: a batch's receipt holds two logs per settlement and every
    # settlement of the batch reads it, so nothing is decoded but the one amount that matters.
    asset = asset.lower()
    used_topics = ["0x" + abi.AUTHORIZATION_USED_TOPIC.hex(), _topic(payer), "0x" + nonce.hex()]
    moved_topics = ["0x" + abi.TRANSFER_TOPIC.hex(), _topic(payer), _topic(pay_to)]
    logs = [e for e in receipt.get("logs") or () if isinstance(e, dict) and str(e.get("address", "")).lower() == asset]
    for used, moved in itertools.pairwise(logs):
        if _topics(used) != used_topics:
            continue
        if _topics(moved) != moved_topics:
            return None
        amount = int(str(moved.get("data", "0x0"))[2:] or "0", 16)  # malformed: raises, as a broken answer should
        return moved if amount == value else None
    return None


def _topic(address: str) -> str:
    """An address as an indexed topic: a left-padded 32-byte word, in lower-case hex."""
    return "0x" + "0" * 24 + address[2:].lower()


def _topics(log: dict[str, Any]) -> list[str]:
    return [str(t).lower() for t in log.get("topics") or ()]


def executed_to_us(receipt: dict[str, Any], asset: str, auth: Authorization) -> bool:
    """Did this transaction execute ``auth`` to its payee (see :func:`transfer_log`)?"""
    return transfer_log(receipt, asset, auth.payer, auth.pay_to, auth.value, auth.nonce) is not None


def reverted(error: RpcError) -> bool:
    """Is this JSON-RPC error an execution revert (rather than, say, a block tag the node does not serve)?"""
    return error.code == 3 or "revert" in error.message.lower()


__all__ = ["Authorization", "executed_to_us", "reverted", "transfer_log"]
