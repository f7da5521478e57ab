"""Local development kit: a throw-away anvil chain with the project's own EIP-3009 token and batch-settlement
contracts, and a Redis server.

Used by the test fixtures and by the ``demo`` command. Everything here is synchronous on purpose: pytest session
fixtures and a CLI command are sync, and nothing in here is on the gateway's request path.

This module holds the bundle tests and the demo use (``DevChain``, ``start_dev_chain``) and re-exports the kit's
parts, which live in modules of their own: ``anvil`` (the node), ``token`` (TestUSDC at canonical addresses),
``sessions`` (the batch-settlement contracts at theirs), ``transactions`` and ``contracts`` (sending, deploying),
``keys`` (the dev accounts), ``redis_server``, and ``processes`` (reaping every child).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.chain.rpc import RpcError
from gateway.dev.anvil import Anvil, find_anvil, set_eth_balance
from gateway.dev.contracts import deploy_contract, load_artifact
from gateway.dev.keys import DEPLOYER_KEY, DEV_KEYS, DEV_MNEMONIC, MINTER_KEY
from gateway.dev.redis_server import RedisServer
from gateway.dev.sessions import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    BatchSettlementAddresses,
    OnchainChannel,
    advance_time,
    install_batch_settlement,
    onchain_channel,
)
from gateway.dev.token import (
    BASE_USDC,
    CANONICAL_USDC,
    POLYGON_USDC,
    deploy_test_usdc,
    install_multicall3,
    mint,
    token_balance,
)
from gateway.dev.transactions import TransactionReverted, call, send_transaction, wait_for_receipt

__all__ = [
    "BASE_USDC",
    "BATCH_SETTLEMENT_ADDRESS",
    "CANONICAL_USDC",
    "DEPLOYER_KEY",
    "DEV_KEYS",
    "DEV_MNEMONIC",
    "ERC3009_DEPOSIT_COLLECTOR_ADDRESS",
    "MINTER_KEY",
    "POLYGON_USDC",
    "Anvil",
    "BatchSettlementAddresses",
    "DevChain",
    "OnchainChannel",
    "RedisServer",
    "RpcError",
    "TransactionReverted",
    "advance_time",
    "call",
    "deploy_contract",
    "deploy_test_usdc",
    "find_anvil",
    "install_batch_settlement",
    "install_multicall3",
    "load_artifact",
    "mint",
    "onchain_channel",
    "send_transaction",
    "set_eth_balance",
    "start_dev_chain",
    "token_balance",
    "wait_for_receipt",
]


@dataclass
class DevChain:
    """A running anvil with TestUSDC deployed (at the canonical USDC address when impersonating a known chain),
    and the batch-settlement contracts at their canonical addresses unless started without them."""

    anvil: Anvil
    usdc: str
    token_name: str = "USD Coin"  # noqa: S105 - an EIP-712 domain name, not a secret
    token_version: str = "2"  # noqa: S105
    relayer_key: str = field(default=DEPLOYER_KEY)
    sessions: BatchSettlementAddresses | None = None

    @property
    def chain_id(self) -> int:
        return self.anvil.chain_id

    @property
    def url(self) -> str:
        return self.anvil.url

    @property
    def network(self) -> str:
        """CAIP-2 id, as x402 v2 names networks."""
        return f"eip155:{self.chain_id}"

    def rpc(self, method: str, params: Sequence[Any] = ()) -> Any:
        return self.anvil.rpc(method, params)

    def new_payer(self, amount: int = 10_000_000) -> LocalAccount:
        """A fresh random account holding ``amount`` atomic USDC (and no ETH: EIP-3009 payers never need gas)."""
        acct: LocalAccount = Account.create()
        if amount:
            mint(self.anvil, self.usdc, acct.address, amount)
        return acct

    def mint(self, to: str, amount: int) -> None:
        mint(self.anvil, self.usdc, to, amount)

    def balance(self, addr: str) -> int:
        return token_balance(self.anvil, self.usdc, addr)

    def channel(self, channel_id: bytes) -> OnchainChannel:
        """A batch-settlement channel's on-chain state."""
        if self.sessions is None:
            raise RuntimeError("this dev chain was started without the batch-settlement contracts")
        return onchain_channel(self.anvil, channel_id, settlement=self.sessions.settlement)

    def advance_time(self, seconds: int) -> int:
        """Move the chain's clock forward and mine a block; returns its timestamp. Never on a shared chain."""
        return advance_time(self.anvil, seconds)

    def stop(self) -> None:
        self.anvil.stop()


_CANONICAL: Final = "canonical"


def start_dev_chain(
    chain_id: int = 8453,
    *,
    block_time: float | None = None,
    usdc_at: str | None = _CANONICAL,
    token_name: str | None = None,
    token_version: str | None = None,
    multicall: bool = True,
    sessions: bool = True,
) -> DevChain:
    """Start anvil and deploy TestUSDC (and, unless ``multicall`` is False, Multicall3 at its canonical address,
    as on Base and Polygon; unless ``sessions`` is False, the batch-settlement contracts at theirs).

    ``usdc_at``: "canonical" (default) puts the token at Circle's USDC address when ``chain_id`` is one of
    CANONICAL_USDC, else leaves it where it was deployed; None always leaves it there; an address puts it there.
    The EIP-712 name/version default to the real token's for known chains, else "USD Coin" / "2".
    """
    known = CANONICAL_USDC.get(chain_id)
    name = token_name or (known[1] if known else "USD Coin")
    version = token_version or (known[2] if known else "2")
    at = (known[0] if known else None) if usdc_at == _CANONICAL else usdc_at
    anvil = Anvil(chain_id=chain_id, block_time=block_time).start()
    try:
        usdc = deploy_test_usdc(anvil, name=name, version=version, at=at)
        if multicall:
            install_multicall3(anvil)
        installed = install_batch_settlement(anvil) if sessions else None
    except BaseException:
        anvil.stop()
        raise
    return DevChain(anvil=anvil, usdc=usdc, token_name=name, token_version=version, sessions=installed)
