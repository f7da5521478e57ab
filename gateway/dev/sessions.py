"""The dev kit's batch-settlement contracts (sessions): the project's own X402BatchSettlement and
ERC3009DepositCollector, placed at the canonical addresses the x402 ``batch-settlement`` scheme uses, so that the
official client and facilitator work against the dev chain unchanged (docs/sessions.md, "Contracts in the dev
kit"); and what a test needs around them: a channel's on-chain state and moving the chain's clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from gateway.dev.anvil import Anvil
from gateway.dev.contracts import load_artifact
from gateway.dev.transactions import call
from gateway.x402.sessions import DEPOSIT_COLLECTOR, SETTLEMENT_CONTRACT

__all__ = [
    "BATCH_SETTLEMENT_ADDRESS",
    "ERC3009_DEPOSIT_COLLECTOR_ADDRESS",
    "BatchSettlementAddresses",
    "OnchainChannel",
    "advance_time",
    "install_batch_settlement",
    "onchain_channel",
]

# The official deployments' addresses (the same on every chain): the official client signs vouchers for the
# settlement contract's EIP-712 domain and ERC-3009 deposits payable to the collector, both at these addresses.
BATCH_SETTLEMENT_ADDRESS: Final = SETTLEMENT_CONTRACT  # the runtime's constants: one place for each address
ERC3009_DEPOSIT_COLLECTOR_ADDRESS: Final = DEPOSIT_COLLECTOR


@dataclass(frozen=True, slots=True)
class BatchSettlementAddresses:
    settlement: str
    erc3009_collector: str


@dataclass(frozen=True, slots=True)
class OnchainChannel:
    """What the settlement contract holds for one channel (atomic token units, unix seconds)."""

    balance: int
    total_claimed: int
    withdraw_amount: int
    withdraw_initiated_at: int  # 0: no timed withdrawal pending
    refund_nonce: int

    @property
    def unclaimed(self) -> int:
        return self.balance - self.total_claimed


def install_batch_settlement(
    anvil: Anvil,
    *,
    settlement: str = BATCH_SETTLEMENT_ADDRESS,
    collector: str = ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
) -> BatchSettlementAddresses:
    """Put the settlement contract and the ERC-3009 deposit collector at ``settlement`` and ``collector``.

    No transaction is sent (no dev key's nonce moves). The settlement contract has no constructor and no
    immutables, so its compiled runtime code is placed as is. The collector keeps the settlement address in an
    immutable, as the official one does: its runtime code is what its constructor returns for that address,
    obtained by running the creation code in an ``eth_call``.
    """
    settlement = str(to_checksum_address(settlement))
    collector = str(to_checksum_address(collector))
    anvil.rpc("anvil_setCode", [settlement, load_artifact("X402BatchSettlement")["deployedBytecode"]])
    creation = load_artifact("ERC3009DepositCollector")["bytecode"] + abi_encode(["address"], [settlement]).hex()
    runtime: str = anvil.rpc("eth_call", [{"data": creation}, "latest"])
    anvil.rpc("anvil_setCode", [collector, runtime])
    return BatchSettlementAddresses(settlement=settlement, erc3009_collector=collector)


def onchain_channel(anvil: Anvil, channel_id: bytes, *, settlement: str = BATCH_SETTLEMENT_ADDRESS) -> OnchainChannel:
    """The channel's escrow, claims, pending withdrawal and refund nonce, read from the contract's getters."""
    arg = abi_encode(["bytes32"], [channel_id])
    balance, claimed = abi_decode(["uint128", "uint128"], call(anvil, settlement, _selector("channels(bytes32)") + arg))
    amount, initiated = abi_decode(
        ["uint128", "uint40"], call(anvil, settlement, _selector("pendingWithdrawals(bytes32)") + arg)
    )
    (nonce,) = abi_decode(["uint256"], call(anvil, settlement, _selector("refundNonce(bytes32)") + arg))
    return OnchainChannel(
        balance=balance,
        total_claimed=claimed,
        withdraw_amount=amount,
        withdraw_initiated_at=initiated,
        refund_nonce=nonce,
    )


def advance_time(anvil: Anvil, seconds: int) -> int:
    """Move the chain's clock forward by ``seconds`` and mine a block there; returns that block's timestamp.

    The chain's clock then runs ahead of the wall clock: clients that take validity windows from the wall clock
    (the official client's deposits) see their authorizations as expired on such a chain.
    """
    anvil.rpc("evm_increaseTime", [hex(seconds)])
    anvil.rpc("evm_mine", [])
    timestamp: str = anvil.rpc("eth_getBlockByNumber", ["latest", False])["timestamp"]
    return int(timestamp, 16)


def _selector(signature: str) -> bytes:
    return bytes(keccak(text=signature)[:4])
