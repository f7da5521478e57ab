"""The hot path's contract calls are encoded word by word (gateway/chain/abi.py): the bytes must be eth_abi's, and
a value eth_abi refuses must still be refused."""

from __future__ import annotations

import random
from typing import Any

import pytest
from eth_abi.abi import encode
from eth_utils.address import to_checksum_address

from gateway.chain import abi

SIMPLE_CALLS = [
    abi.TRANSFER_WITH_AUTHORIZATION_VRS,
    abi.TRANSFER_WITH_AUTHORIZATION_BYTES,
    abi.BALANCE_OF,
    abi.AUTHORIZATION_STATE,
    abi.IS_VALID_SIGNATURE,
]


def _value(kind: str, rng: random.Random) -> Any:
    if kind == "address":
        raw = "0x" + rng.randbytes(20).hex()
        return rng.choice([raw, raw.upper().replace("0X", "0x"), to_checksum_address(raw)])
    if kind == "bool":
        return rng.choice([True, False])
    if kind.startswith("uint"):
        bits = int(kind[4:])
        return rng.choice([0, 1, (1 << bits) - 1, rng.getrandbits(bits)])
    if kind == "bytes":
        return rng.randbytes(rng.choice([0, 1, 31, 32, 33, 65, 100]))
    if kind.startswith("bytes"):
        return rng.randbytes(int(kind[5:]))
    raise AssertionError(kind)


@pytest.mark.parametrize("function", SIMPLE_CALLS, ids=lambda f: f.signature)
def test_simple_calls_encode_to_the_same_bytes_as_eth_abi(function: abi.Function) -> None:
    rng = random.Random(function.signature)
    for _ in range(300):
        args = [_value(kind, rng) for kind in function.input_types]
        assert function.encode(*args) == function.selector + encode(function.input_types, args)


def _refused_by_eth_abi(function: abi.Function, args: list[Any]) -> bool:
    try:
        encode(function.input_types, args)
    except Exception:
        return True
    return False


BAD_VALUES: dict[str, list[Any]] = {
    "address": [
        "0x" + "ab" * 19,  # short
        "0x" + "aB" * 20,  # mixed case with a wrong checksum
        "ab" * 20,  # no 0x
        None,
        1,
    ],
    "uint256": [-1, 1 << 256, 1.0, "5", True],
    "uint8": [256, -1],
    "bytes32": [b"\x01" * 33, "00" * 32, None],
    "bytes": ["0x00", None, 5],
}


@pytest.mark.parametrize("function", SIMPLE_CALLS, ids=lambda f: f.signature)
def test_a_value_eth_abi_refuses_is_refused_on_the_fast_path_too(function: abi.Function) -> None:
    rng = random.Random(1)
    good = [_value(kind, rng) for kind in function.input_types]
    for position, kind in enumerate(function.input_types):
        for bad in BAD_VALUES.get(kind, []):
            args = list(good)
            args[position] = bad
            if _refused_by_eth_abi(function, args):
                with pytest.raises(Exception):  # noqa: B017 - whatever eth_abi raises for it
                    function.encode(*args)
            else:  # eth_abi takes it (e.g. a bool as a uint): so do we, with eth_abi's bytes
                assert function.encode(*args) == function.selector + encode(function.input_types, args)
