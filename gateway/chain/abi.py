"""Contract ABIs the gateway loads from ``contracts_abi/``, and the few encodings it needs from them.

Selectors and event topics are derived from the ABI files at import, not typed in by hand, so that a typo
cannot silently point a call at the wrong function.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from eth_abi.abi import decode, encode
from eth_utils.crypto import keccak

_PACKAGE = Path(__file__).resolve().parents[1]  # gateway/


def abi_dir() -> Path:
    """``gateway/contracts_abi`` in an installed wheel, the repository's ``contracts_abi/`` in a checkout."""
    for candidate in (_PACKAGE / "contracts_abi", _PACKAGE.parent / "contracts_abi"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("contracts_abi/ not found next to the gateway package")


@cache
def load_abi(name: str) -> list[dict[str, Any]]:
    doc = json.loads((abi_dir() / f"{name}.json").read_text())
    abi: list[dict[str, Any]] = doc["abi"] if isinstance(doc, dict) else doc
    return abi


def _canonical(param: dict[str, Any]) -> str:
    """A parameter's type as selectors spell it: a struct is its components in parentheses."""
    kind = str(param["type"])
    if kind.startswith("tuple"):
        return "(" + ",".join(_canonical(c) for c in param["components"]) + ")" + kind[len("tuple") :]
    return kind


def _signature(entry: dict[str, Any]) -> str:
    return f"{entry['name']}({','.join(_canonical(i) for i in entry.get('inputs', []))})"


class Function:
    def __init__(self, abi_name: str, name: str, input_types: tuple[str, ...]) -> None:
        for entry in load_abi(abi_name):
            if (
                entry.get("type") == "function"
                and entry["name"] == name
                and tuple(_canonical(i) for i in entry["inputs"]) == input_types
            ):
                self.signature = _signature(entry)
                self.selector = keccak(text=self.signature)[:4]
                self.input_types = list(input_types)
                self.output_types = [_canonical(o) for o in entry.get("outputs", [])]
                return
        raise LookupError(f"{name}{input_types} is not in contracts_abi/{abi_name}.json")

    def encode(self, *args: Any) -> bytes:
        return self.selector + encode(self.input_types, list(args))

    def decode_output(self, data: bytes) -> tuple[Any, ...]:
        return tuple(decode(self.output_types, data))


def event_topic(abi_name: str, name: str) -> bytes:
    for entry in load_abi(abi_name):
        if entry.get("type") == "event" and entry["name"] == name:
            return keccak(text=_signature(entry))
    raise LookupError(f"event {name} is not in contracts_abi/{abi_name}.json")


_A3009 = ("address", "address", "uint256", "uint256", "uint256", "bytes32")
BALANCE_OF = Function("eip3009", "balanceOf", ("address",))
AUTHORIZATION_STATE = Function("eip3009", "authorizationState", ("address", "bytes32"))
TRANSFER_WITH_AUTHORIZATION_VRS = Function(
    "eip3009", "transferWithAuthorization", (*_A3009, "uint8", "bytes32", "bytes32")
)
TRANSFER_WITH_AUTHORIZATION_BYTES = Function("eip3009", "transferWithAuthorization", (*_A3009, "bytes"))
IS_VALID_SIGNATURE = Function("erc1271", "isValidSignature", ("bytes32", "bytes"))
ERC1271_MAGIC = IS_VALID_SIGNATURE.selector  # isValidSignature returns its own selector on success
# Multicall3.aggregate3((address target, bool allowFailure, bytes callData)[]): several settlements in one transaction.
AGGREGATE3 = Function("multicall3", "aggregate3", ("(address,bool,bytes)[]",))
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"  # the same on Base, Polygon and most EVM chains
TRANSFER_TOPIC = event_topic("eip3009", "Transfer")
AUTHORIZATION_USED_TOPIC = event_topic("eip3009", "AuthorizationUsed")
