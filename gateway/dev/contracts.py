"""The project's compiled contracts (``contracts_abi/``, built by ``contracts/build.mjs``) and deploying them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address

from gateway.dev import paths
from gateway.dev.anvil import Anvil
from gateway.dev.keys import DEPLOYER_KEY
from gateway.dev.transactions import send_transaction

__all__ = ["deploy_contract", "load_artifact"]


def load_artifact(name: str) -> dict[str, Any]:
    """contracts_abi/<name>.json: packaged next to the module in a wheel, at the repo root in a checkout."""
    for base in (paths.PACKAGE_DIR / "contracts_abi", paths.REPO_ROOT / "contracts_abi"):
        path = base / f"{name}.json"
        if path.is_file():
            data: dict[str, Any] = json.loads(path.read_text())
            return data
    raise FileNotFoundError(f"artifact {name}.json not found (rebuild with: node contracts/build.mjs)")


def deploy_contract(
    anvil: Anvil,
    artifact_name: str,
    constructor_args_types: Sequence[str] = (),
    args: Sequence[Any] = (),
    *,
    key: str = DEPLOYER_KEY,
) -> str:
    """Deploy contracts_abi/<artifact_name>.json with ABI-encoded constructor args; returns the checksummed address."""
    bytecode = bytes.fromhex(load_artifact(artifact_name)["bytecode"].removeprefix("0x"))
    data = bytecode + (abi_encode(list(constructor_args_types), list(args)) if constructor_args_types else b"")
    receipt = send_transaction(anvil, key, None, data)
    return str(to_checksum_address(receipt["contractAddress"]))
