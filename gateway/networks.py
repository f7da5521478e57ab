"""Networks the gateway knows out of the box: chain id, CAIP-2 id, canonical USDC and its EIP-712 domain.

Facts from docs/protocol.md §4. Operators can override any field or add a network in the config; these are only the
defaults a config entry starts from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KnownNetwork:
    name: str  # the x402 v1 network name
    chain_id: int
    usdc: str
    eip712_name: str
    eip712_version: str

    @property
    def caip2(self) -> str:
        return f"eip155:{self.chain_id}"


KNOWN_NETWORKS: dict[str, KnownNetwork] = {
    n.name: n
    for n in (
        KnownNetwork("base", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin", "2"),
        KnownNetwork("base-sepolia", 84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"),
        KnownNetwork("polygon", 137, "0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359", "USD Coin", "2"),
        KnownNetwork("polygon-amoy", 80002, "0x41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582", "USDC", "2"),
    )
}

# Chains whose blocks carry proof-of-authority extraData (longer than 32 bytes). Our JSON-RPC layer reads raw
# fields and never validates extraData, so it needs no web3 POA middleware; the list documents why.
POA_CHAIN_IDS = frozenset({137, 80002})

USDC_DECIMALS = 6


def caip2(chain_id: int) -> str:
    return f"eip155:{chain_id}"
