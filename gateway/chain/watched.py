"""A transaction the finality tracker watches without being able to send it again as a new call: a tx-hash proof's
transfer (the payer's own transaction) or a session deposit (our relayer's execution of the payer's deposit
authorization). What its journal entry keeps, and how its ``Transfer`` is recognised in a receipt
(docs/threat-model.md T28; the tracker is :mod:`gateway.chain.finality`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.chain import abi
from gateway.chain.rpc import hex_int

# The largest signed transaction kept to be sent again. A plain transfer is ~110 bytes, a transferWithAuthorization or
# a smart account's call a few hundred: a bigger one carries padding a payer chose (a token ignores calldata past
# its arguments, up to the node's 128 KB limit), which every pass would read and write again until final. Its sender
# and nonce are still kept (it is counted lost once its nonce is taken); it is not sent again.
MAX_RAW = 4096


@dataclass(frozen=True, slots=True)
class Watched:
    """A watched transaction (module docstring), as its journal entry keeps it in ``calldata`` (JSON)."""

    payer: str  # the Transfer (logged by the entry's asset) that paid: from ...
    pay_to: str  # ... to ...
    value: int  # ... at least this much (atomic units)
    sender: str = ""  # the transaction's sender and account nonce, read when it was served ("", None: not read)
    nonce: int | None = None
    raw: bytes = b""  # the signed transaction, rebuilt and checked against its hash (b"": could not be)
    channel: str = ""  # a deposit's channel id

    def encode(self) -> bytes:
        doc = {
            "payer": self.payer,
            "payTo": self.pay_to,
            "value": str(self.value),
            "sender": self.sender,
            "nonce": self.nonce,
            "raw": "0x" + self.raw.hex(),
            "channel": self.channel,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Watched | None:
        try:
            doc = json.loads(data)
            nonce = doc.get("nonce")
            return cls(
                payer=str(doc["payer"]),
                pay_to=str(doc["payTo"]),
                value=int(doc["value"]),
                sender=str(doc.get("sender") or ""),
                nonce=nonce if isinstance(nonce, int) else None,
                raw=bytes.fromhex(str(doc.get("raw") or "0x")[2:]),
                channel=str(doc.get("channel") or ""),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def pays(receipt: dict[str, Any], asset: str, what: Watched) -> bool:
    """Did this (successful) transaction make the watched Transfer, as ``asset`` itself logs it?"""
    if hex_int(receipt.get("status", "0x0")) != 1:
        return False
    topics = ["0x" + abi.TRANSFER_TOPIC.hex(), _topic(what.payer), _topic(what.pay_to)]
    for entry in receipt.get("logs") or ():
        if not isinstance(entry, dict) or str(entry.get("address", "")).lower() != asset.lower():
            continue
        if [str(t).lower() for t in entry.get("topics") or ()] != topics:
            continue
        if int(str(entry.get("data", "0x0"))[2:] or "0", 16) >= what.value:
            return True
    return False


def _topic(address: str) -> str:
    return "0x" + "0" * 24 + address[2:].lower()


__all__ = ["MAX_RAW", "Watched", "pays"]
