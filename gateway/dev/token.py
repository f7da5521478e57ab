"""The test token: the project's EIP-3009 TestUSDC, put at Circle's canonical USDC address when the dev chain
impersonates a known one, so the gateway's built-in network defaults apply unchanged; minting and balances."""

from __future__ import annotations

from typing import Any, Final

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from gateway.chain.abi import MULTICALL3_ADDRESS
from gateway.dev.anvil import Anvil
from gateway.dev.contracts import deploy_contract, load_artifact
from gateway.dev.keys import MINTER_KEY
from gateway.dev.transactions import call, send_transaction

__all__ = [
    "BASE_USDC",
    "CANONICAL_USDC",
    "POLYGON_USDC",
    "deploy_test_usdc",
    "install_multicall3",
    "mint",
    "token_balance",
]

BASE_USDC: Final = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
POLYGON_USDC: Final = "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359"
# chain id -> (USDC address, EIP-712 name, EIP-712 version), as deployed by Circle (docs/protocol.md §4).
CANONICAL_USDC: Final[dict[int, tuple[str, str, str]]] = {
    8453: (BASE_USDC, "USD Coin", "2"),
    84532: ("0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"),
    137: (POLYGON_USDC, "USD Coin", "2"),
    80002: ("0x41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582", "USDC", "2"),
}


def _selector(signature: str) -> bytes:
    return bytes(keccak(text=signature)[:4])


def deploy_test_usdc(anvil: Anvil, *, name: str = "USD Coin", version: str = "2", at: str | None = None) -> str:
    """Deploy TestUSDC; with ``at``, copy its runtime code there (anvil_setCode) and return that address instead.

    The runtime code is read back with eth_getCode rather than taken from the artifact because the artifact's
    deployedBytecode has zero placeholders where the name/version immutables go.
    """
    address = deploy_contract(anvil, "TestUSDC", ["string", "string"], [name, version])
    if at is None:
        return address
    code = anvil.rpc("eth_getCode", [address, "latest"])
    target = str(to_checksum_address(at))
    anvil.rpc("anvil_setCode", [target, code])
    return target


def install_multicall3(anvil: Anvil) -> str:
    """Put contracts/Multicall3.sol's runtime code at Multicall3's canonical address (the gateway batches
    settlements through it where the chain has it); returns the address."""
    anvil.rpc("anvil_setCode", [MULTICALL3_ADDRESS, load_artifact("Multicall3")["deployedBytecode"]])
    return MULTICALL3_ADDRESS


def mint(anvil: Anvil, token: str, to: str, amount: int, *, key: str = MINTER_KEY) -> dict[str, Any]:
    """TestUSDC.mint (open to anyone). Sent by DEV_KEYS[9] so it never takes a nonce from the relayer key."""
    data = _selector("mint(address,uint256)") + abi_encode(["address", "uint256"], [to, amount])
    return send_transaction(anvil, key, token, data)


def token_balance(anvil: Anvil, token: str, address: str) -> int:
    out = call(anvil, token, _selector("balanceOf(address)") + abi_encode(["address"], [address]))
    value: int = abi_decode(["uint256"], out)[0]
    return value
