"""EIP-1559 transactions, RLP-encoded and signed locally with coincurve (no web3 on the hot path); and a node's
answer about a signed transaction turned back into its bytes (for the finality tracker, docs/threat-model.md T28)."""

from __future__ import annotations

from typing import Any

from coincurve import PrivateKey
from eth_utils.crypto import keccak

from gateway.chain.rpc import hex_int


def _rlp_length(length: int, offset: int) -> bytes:
    if length < 56:
        return bytes([offset + length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([offset + 55 + len(encoded)]) + encoded


def _rlp(item: int | bytes | list[Any]) -> bytes:
    """Recursive Length Prefix encoding of the few shapes a transaction needs (ints, bytes, lists)."""
    if isinstance(item, list):
        body = b"".join(_rlp(x) for x in item)
        return _rlp_length(len(body), 0xC0) + body
    if isinstance(item, int):
        item = item.to_bytes((item.bit_length() + 7) // 8, "big")  # 0 -> b"" (RLP's canonical zero)
    if len(item) == 1 and item[0] < 0x80:
        return item
    return _rlp_length(len(item), 0x80) + item


def sign_eip1559(
    key: PrivateKey, chain_id: int, nonce: int, to: str, data: bytes, gas: int, max_fee: int, priority: int
) -> tuple[str, str]:
    """(tx hash, raw transaction), both 0x-hex, of a type-2 transaction with value 0 and no access list.

    Byte-identical to ``eth_account``'s ``sign_transaction`` (both RFC 6979 over libsecp256k1; a test pins it),
    at a tenth of the cost: that one validates and normalises a dict on every call, which is most of the time a
    settlement spent holding the nonce sequence."""
    fields: list[Any] = [chain_id, nonce, priority, max_fee, gas, bytes.fromhex(to[2:]), 0, data, []]
    signature = key.sign_recoverable(keccak(b"\x02" + _rlp(fields)), hasher=None)
    fields += [signature[64], int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")]
    raw = b"\x02" + _rlp(fields)
    return "0x" + keccak(raw).hex(), "0x" + raw.hex()


def signed_transaction(tx: dict[str, Any], tx_hash: str) -> bytes:
    """The signed transaction's bytes, rebuilt from a node's ``eth_getTransactionByHash`` answer: only if they hash
    to ``tx_hash`` (so no node can make us send anything else), and only for types 0, 1 and 2; b"" otherwise (a
    blob or newer type, a field missing, an answer that does not add up)."""

    def num(name: str) -> int:
        return hex_int(tx[name])

    def data(value: Any) -> bytes:
        return bytes.fromhex(str(value or "0x")[2:])

    try:
        kind = hex_int(tx.get("type", "0x0"))
        to, value, payload = data(tx.get("to")), num("value"), data(tx.get("input"))
        signature = [num("r"), num("s")]
        access = [
            [data(item["address"]), [data(key) for key in item.get("storageKeys") or ()]]
            for item in tx.get("accessList") or ()
        ]
        parity = hex_int(tx.get("yParity", tx.get("v")))
        if kind == 0:
            fields = [num("nonce"), num("gasPrice"), num("gas"), to, value, payload, num("v"), *signature]
            raw = _rlp(fields)
        elif kind == 1:
            fields = [num("chainId"), num("nonce"), num("gasPrice"), num("gas"), to, value, payload, access]
            raw = b"\x01" + _rlp([*fields, parity, *signature])
        elif kind == 2:
            fees = [num("maxPriorityFeePerGas"), num("maxFeePerGas")]
            fields = [num("chainId"), num("nonce"), *fees, num("gas"), to, value, payload, access]
            raw = b"\x02" + _rlp([*fields, parity, *signature])
        else:
            return b""
    except (KeyError, ValueError, TypeError, AttributeError):
        return b""
    return raw if "0x" + keccak(raw).hex() == tx_hash.lower() else b""
