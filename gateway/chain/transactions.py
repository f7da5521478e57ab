"""EIP-1559 transactions, RLP-encoded and signed locally with coincurve (no web3 on the hot path); and a node's
answer about a signed transaction turned back into its bytes and its signer (for the finality tracker,
docs/threat-model.md T28)."""

from __future__ import annotations

from typing import Any

from coincurve import PrivateKey, PublicKey
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


def _rebuilt(tx: dict[str, Any]) -> tuple[bytes, bytes, bytes] | None:
    """(signed bytes, the digest that was signed, the 65-byte recoverable signature) of a node's answer about a
    transaction of type 0, 1 or 2; None otherwise (a blob or newer type, a field missing, an answer that does not
    add up). Nothing here is checked against the transaction's hash: the callers do that."""

    def num(name: str) -> int:
        return hex_int(tx[name])

    def data(value: Any) -> bytes:
        return bytes.fromhex(str(value or "0x")[2:])

    try:
        kind = hex_int(tx.get("type", "0x0"))
        to, value, payload = data(tx.get("to")), num("value"), data(tx.get("input"))
        r, s = num("r"), num("s")
        access = [
            [data(item["address"]), [data(key) for key in item.get("storageKeys") or ()]]
            for item in tx.get("accessList") or ()
        ]
        parity = hex_int(tx.get("yParity", tx.get("v")))
        if kind == 0:
            fields = [num("nonce"), num("gasPrice"), num("gas"), to, value, payload]
            v = num("v")
            raw = _rlp([*fields, v, r, s])
            if v in (27, 28):  # before EIP-155: no chain id in what was signed
                signed, parity = _rlp(fields), v - 27
            else:
                signed, parity = _rlp([*fields, (v - 35) // 2, 0, 0]), (v - 35) % 2
        elif kind == 1:
            fields = [num("chainId"), num("nonce"), num("gasPrice"), num("gas"), to, value, payload, access]
            raw, signed = b"\x01" + _rlp([*fields, parity, r, s]), b"\x01" + _rlp(fields)
        elif kind == 2:
            fees = [num("maxPriorityFeePerGas"), num("maxFeePerGas")]
            fields = [num("chainId"), num("nonce"), *fees, num("gas"), to, value, payload, access]
            raw, signed = b"\x02" + _rlp([*fields, parity, r, s]), b"\x02" + _rlp(fields)
        else:
            return None
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([parity])
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError):
        return None
    return raw, keccak(signed), signature


def signed_transaction(tx: dict[str, Any], tx_hash: str) -> bytes:
    """The signed transaction's bytes, rebuilt from a node's ``eth_getTransactionByHash`` answer: only if they hash
    to ``tx_hash`` (so no node can make us send anything else), and only for types 0, 1 and 2; b"" otherwise (a
    blob or newer type, a field missing, an answer that does not add up)."""
    return signed_by(tx, tx_hash)[0]


def signer(tx: dict[str, Any], tx_hash: str) -> str:
    """The address (lowercase) that signed the transaction a node describes; "" unless its bytes hash right."""
    return signed_by(tx, tx_hash)[1]


def signed_by(tx: dict[str, Any], tx_hash: str) -> tuple[bytes, str]:
    """(:func:`signed_transaction`, the address its signature recovers to), or (b"", "") unless the rebuilt bytes
    hash to ``tx_hash``. A node's ``from`` is its word: nothing binds it to the hash, and whose account nonce
    decides that a dropped transaction can never be mined must not be a node's word (docs/threat-model.md T28)."""
    rebuilt = _rebuilt(tx)
    if rebuilt is None or "0x" + keccak(rebuilt[0]).hex() != tx_hash.lower():
        return b"", ""
    raw, digest, signature = rebuilt
    try:
        key = PublicKey.from_signature_and_message(signature, digest, hasher=None)
    except (ValueError, TypeError):
        return b"", ""
    return raw, "0x" + keccak(key.format(compressed=False)[1:])[-20:].hex()
