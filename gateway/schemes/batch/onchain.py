"""The settlement contract as the session scheme uses it: channel reads, deposits, claims, sweeps and refunds.

Every call goes to the contract's canonical address (docs/sessions.md); transactions are the relayer's (gas
sponsored, nonce-managed, recorded before broadcast by the caller when a crash must be reconciled by hash), and a
transaction counts only once its receipt shows it succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_utils.address import to_checksum_address

from gateway.chain import abi
from gateway.chain.relayer import Relayer
from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.chain.watcher import ReceiptWatcher
from gateway.errors import ChainUnavailable, PaymentRequired, SettlementFailed
from gateway.storage.channels import OnChainState
from gateway.x402 import reasons
from gateway.x402.sessions import DEPOSIT_COLLECTOR, SETTLEMENT_CONTRACT, ChannelConfig, DepositAuthorization

__all__ = ["ChannelChain", "VoucherClaim"]

_CONFIG = "(address,address,address,address,address,uint40,bytes32)"
_CLAIMS = f"(({_CONFIG},uint128),bytes,uint128)[]"
CHANNELS = abi.Function("batch_settlement", "channels", ("bytes32",))
PENDING_WITHDRAWALS = abi.Function("batch_settlement", "pendingWithdrawals", ("bytes32",))
REFUND_NONCE = abi.Function("batch_settlement", "refundNonce", ("bytes32",))
DEPOSIT = abi.Function("batch_settlement", "deposit", (_CONFIG, "uint128", "address", "bytes"))
CLAIM_WITH_SIGNATURE = abi.Function("batch_settlement", "claimWithSignature", (_CLAIMS, "bytes"))
SETTLE = abi.Function("batch_settlement", "settle", ("address", "address"))
REFUND_WITH_SIGNATURE = abi.Function(
    "batch_settlement", "refundWithSignature", (_CONFIG, "uint128", "uint256", "bytes")
)
MULTICALL = abi.Function("batch_settlement", "multicall", ("bytes[]",))
RECEIVERS = abi.Function("batch_settlement", "receivers", ("address", "address"))
WITHDRAW_INITIATED_TOPIC = abi.event_topic("batch_settlement", "WithdrawInitiated")


@dataclass(frozen=True, slots=True)
class VoucherClaim:
    """One channel's entry in a claim: its voucher (config, signed maximum, signature) and the total to claim."""

    config: ChannelConfig
    max_claimable: int
    signature: bytes
    total_claimed: int

    def abi(self) -> tuple[Any, ...]:
        return ((self.config.abi_tuple(), self.max_claimable), self.signature, self.total_claimed)


def claim_calldata(claims: list[VoucherClaim], authorizer_signature: bytes) -> bytes:
    return CLAIM_WITH_SIGNATURE.encode([c.abi() for c in claims], authorizer_signature)


def refund_calldata(config: ChannelConfig, amount: int, nonce: int, signature: bytes) -> bytes:
    return REFUND_WITH_SIGNATURE.encode(config.abi_tuple(), amount, nonce, signature)


def multicall_calldata(calls: list[bytes]) -> bytes:
    return MULTICALL.encode(calls)


class ChannelChain:
    """One network's settlement contract, read through our RPC and written by our relayer."""

    def __init__(
        self, rpc: ChainRpc, relayer: Relayer, watcher: ReceiptWatcher, *, timeout: float, confirmations: int = 1
    ) -> None:
        self.rpc = rpc
        self.relayer = relayer
        self.watcher = watcher
        self.timeout = timeout
        # Blocks a deposit, claim or refund must have before it counts: the network's ``confirmations``, as for an
        # ``exact`` settlement (a deposit served on and then reorganised away would leave vouchers unfunded).
        self.confirmations = confirmations
        self.contract = to_checksum_address(SETTLEMENT_CONTRACT)

    def _call(self, data: bytes) -> tuple[str, list[Any]]:
        return ("eth_call", [{"to": self.contract, "data": "0x" + data.hex()}, "latest"])

    async def state(self, channel_id: str) -> OnChainState:
        """The channel as the chain has it now (one batched request)."""
        cid = bytes.fromhex(channel_id[2:])
        results = await self.rpc.batch(
            [
                self._call(CHANNELS.encode(cid)),
                self._call(PENDING_WITHDRAWALS.encode(cid)),
                self._call(REFUND_NONCE.encode(cid)),
            ]
        )
        if any(isinstance(r, RpcError) or not isinstance(r, str) for r in results):
            raise ChainUnavailable(f"network {self.rpc.name}: the settlement contract did not answer a view call")
        balance, total_claimed = CHANNELS.decode_output(bytes.fromhex(results[0][2:]))
        _amount, initiated_at = PENDING_WITHDRAWALS.decode_output(bytes.fromhex(results[1][2:]))
        (nonce,) = REFUND_NONCE.decode_output(bytes.fromhex(results[2][2:]))
        return OnChainState(
            balance=int(balance),
            total_claimed=int(total_claimed),
            withdraw_requested_at=int(initiated_at),
            refund_nonce=int(nonce),
        )

    @staticmethod
    def deposit_calldata(config: ChannelConfig, auth: DepositAuthorization) -> bytes:
        collector_data = abi_encode(
            ["uint256", "uint256", "bytes32", "bytes"],
            [auth.valid_after, auth.valid_before, bytes.fromhex(auth.salt[2:]), auth.signature],
        )
        return DEPOSIT.encode(config.abi_tuple(), auth.amount, to_checksum_address(DEPOSIT_COLLECTOR), collector_data)

    async def estimate(self, data: bytes) -> int | None:
        """Gas for ``data`` sent by the relayer, or None when it would revert. Any other answer of the node is a
        fault of ours (``ChainUnavailable``: a 503, never a refusal of the payment)."""
        call = {"from": self.relayer.address, "to": self.contract, "data": "0x" + data.hex()}
        try:
            return hex_int(await self.rpc.request("eth_estimateGas", [call, "latest"]))
        except RpcError as exc:
            if exc.code == 3 or "revert" in exc.message.lower():
                return None
            raise ChainUnavailable(f"network {self.rpc.name}: the node could not estimate a transaction") from None

    async def send(self, data: bytes, gas: int) -> tuple[str, dict[str, Any]]:
        """Send ``data`` to the contract and wait until it has ``confirmations`` blocks; raises
        ``SettlementFailed`` if it reverted or its fate stays unknown."""

        async def nothing_to_record(_tx: str) -> None:
            return None

        tx_hash = await self.relayer.submit(self.contract, data, gas, nothing_to_record)
        try:
            receipt = await self.watcher.wait(tx_hash, timeout=self.timeout, confirmations=self.confirmations)
        except TimeoutError:
            raise SettlementFailed(
                "the transaction was not mined in time", reason=reasons.SETTLEMENT_PENDING, unknown=True
            ) from None
        if hex_int(receipt.get("status")) != 1:
            raise SettlementFailed("the transaction reverted", reason=reasons.TRANSACTION_FAILED)
        return tx_hash, receipt

    async def deposit(self, config: ChannelConfig, auth: DepositAuthorization) -> str:
        """Execute the payer's deposit (simulated first: a deposit that would revert costs us nothing)."""
        data = self.deposit_calldata(config, auth)
        gas = await self.estimate(data)
        if gas is None:
            raise PaymentRequired(
                "the deposit would revert (authorization used or expired, or balance too low)",
                reason=reasons.SESSION_DEPOSIT_SIMULATION_FAILED,
            )
        try:
            tx_hash, _receipt = await self.send(data, gas + gas // 5)
        except SettlementFailed as exc:
            if exc.unknown:
                raise
            raise PaymentRequired("the deposit transaction failed", reason=reasons.SESSION_DEPOSIT_FAILED) from None
        return tx_hash

    async def unsettled(self, receiver: str, token: str) -> int:
        """What was claimed for ``receiver`` in ``token`` and not yet swept to it."""
        method, params = self._call(RECEIVERS.encode(receiver, token))
        answer = await self.rpc.request(method, params)
        if not isinstance(answer, str):
            raise ChainUnavailable(f"network {self.rpc.name}: the settlement contract did not answer a view call")
        claimed, settled = RECEIVERS.decode_output(bytes.fromhex(answer[2:]))
        return int(claimed) - int(settled)

    async def head(self) -> int:
        return hex_int(await self.rpc.request("eth_blockNumber", []))

    async def latest_time(self) -> int:
        """The timestamp of the chain's latest block: the clock the contract's withdrawal delay runs on."""
        block = await self.rpc.request("eth_getBlockByNumber", ["latest", False])
        if not isinstance(block, dict):
            raise ChainUnavailable(f"network {self.rpc.name}: the node has no latest block")
        return hex_int(block["timestamp"])

    async def block_time(self, number: int) -> int:
        block = await self.rpc.request("eth_getBlockByNumber", [hex(number), False])
        if not isinstance(block, dict):
            raise ChainUnavailable(f"network {self.rpc.name}: block {number} is unknown to the node")
        return hex_int(block["timestamp"])

    async def withdrawals_between(self, first: int, last: int) -> list[str]:
        """Channel ids with a ``WithdrawInitiated`` logged in blocks ``first`` to ``last``. The node's own refusal
        (a block range over its cap, most often) is raised as :class:`RpcError`."""
        logs = await self.rpc.request(
            "eth_getLogs",
            [
                {
                    "address": self.contract,
                    "fromBlock": hex(first),
                    "toBlock": hex(last),
                    "topics": ["0x" + WITHDRAW_INITIATED_TOPIC.hex()],
                }
            ],
        )
        return [str(log["topics"][1]).lower() for log in logs or [] if len(log.get("topics", ())) > 1]
