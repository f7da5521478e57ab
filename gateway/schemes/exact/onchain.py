"""The chain's side of verifying an ``exact`` payment, and of recognising its settlement.

One batched round trip answers: is the nonce unused (``authorizationState``), does the payer hold the money
(``balanceOf``), would ``transferWithAuthorization`` succeed right now (``eth_estimateGas`` from the relayer,
which simulates and prices it at once), and, for a contract wallet, does ``isValidSignature`` vouch for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.chain import abi
from gateway.chain.authorization import transfer_log
from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.errors import ChainUnavailable, PaymentRequired
from gateway.schemes.exact.check import SignatureKind
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.eip712 import authorization_digest, erc1271_approves, split_signature
from gateway.x402.payload import Authorization, ExactPayment


@dataclass(frozen=True, slots=True)
class Preflight:
    gas: int  # estimated gas of the settlement call (0 when the nonce is already used)
    nonce_used: bool  # the authorization was already executed on chain (by someone, maybe not us)


def settlement_calldata(payment: ExactPayment) -> bytes:
    a = payment.authorization
    args = (a.from_, a.to, a.value, a.valid_after, a.valid_before, a.nonce)
    parts = split_signature(payment.signature)
    if parts is not None:
        # The (v, r, s) overload exists on every USDC deployment; the bytes one only on FiatToken v2.2+.
        v, r, s = parts
        return abi.TRANSFER_WITH_AUTHORIZATION_VRS.encode(*args, v, r, s)
    return abi.TRANSFER_WITH_AUTHORIZATION_BYTES.encode(*args, payment.signature)


def _hex_bytes(text: str) -> bytes:
    """The bytes of an RPC's 0x-hex answer (empty when it is not hex)."""
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        return b""


def _word_bool(result: Any) -> bool:
    return isinstance(result, str) and len(result) >= 66 and int(result[2:66], 16) != 0


async def preflight_exact(
    rpc: ChainRpc,
    req: Requirement,
    payment: ExactPayment,
    kind: SignatureKind,
    relayer: str,
    *,
    simulate: bool = True,
    gas_hint: int | None = None,
    calldata: bytes | None = None,
) -> Preflight:
    """``simulate=False`` (the re-check just before settling, docs/threat-model.md T10) leaves out
    ``eth_estimateGas``: what a payer can change in the meantime, balance and nonce state, is read directly by the
    two view calls, and the simulation is by far the node's most expensive call (measured on anvil: ~1.8 ms of
    ~2.4 ms per preflight).
    Anything else would make the settlement revert on chain, which is detected there (no Transfer to us: 402),
    at the price of one failed transaction's gas. The returned ``gas`` is then 0.

    ``gas_hint`` (the settlement gas this network's earlier estimates reached, see ``GasBook``) simulates with one
    ``eth_call`` instead: the same execution from the relayer, reverting exactly when the estimate would, without
    the estimator's search over gas limits (~1 ms of node CPU per payment on anvil). The hint is returned as ``gas``.

    ``calldata``: ``settlement_calldata(payment)`` when the caller already encoded it (it sends the same bytes)."""
    auth = payment.authorization
    calls: list[tuple[str, list[Any]]] = [
        (
            "eth_call",
            [{"to": req.asset, "data": "0x" + abi.AUTHORIZATION_STATE.encode(auth.from_, auth.nonce).hex()}, "latest"],
        ),
        ("eth_call", [{"to": req.asset, "data": "0x" + abi.BALANCE_OF.encode(auth.from_).hex()}, "latest"]),
    ]
    if simulate:
        data = settlement_calldata(payment) if calldata is None else calldata
        call = {"from": relayer, "to": req.asset, "data": "0x" + data.hex()}
        calls.append(("eth_estimateGas", [call, "latest"]) if gas_hint is None else ("eth_call", [call, "latest"]))
    if kind is SignatureKind.CONTRACT:
        digest = authorization_digest(req, auth)
        data = abi.IS_VALID_SIGNATURE.encode(digest, payment.signature)
        calls.append(("eth_call", [{"to": auth.from_, "data": "0x" + data.hex()}, "latest"]))
    results = await rpc.batch(calls)
    state, balance = results[0], results[1]
    gas: Any = results[2] if simulate else "0x0"
    if isinstance(state, RpcError) or isinstance(balance, RpcError):
        # The asset answered an error to a view call: it is not the token we think it is, or the node is sick.
        raise ChainUnavailable(f"network {rpc.name}: the USDC contract did not answer a view call")
    if kind is SignatureKind.CONTRACT:
        verdict = results[-1]
        if not (isinstance(verdict, str) and erc1271_approves(_hex_bytes(verdict))):
            raise PaymentRequired("the signature is not by the payer", reason=reasons.INVALID_SIGNATURE)
    if _word_bool(state):
        return Preflight(gas=0, nonce_used=True)
    if int(str(balance)[2:66] or "0", 16) < auth.value:
        raise PaymentRequired("the payer's balance is below the price", reason=reasons.INSUFFICIENT_BALANCE)
    if isinstance(gas, RpcError):
        raise PaymentRequired("transferWithAuthorization would revert", reason=reasons.SIMULATION_FAILED)
    return Preflight(gas=hex_int(gas) if gas_hint is None else gas_hint, nonce_used=False)


@dataclass(frozen=True, slots=True)
class Settlement:
    """An execution of one authorization to us, as the chain shows it."""

    tx_hash: str
    log_index: int  # position of the Transfer to us in the receipt: with the chain and tx hash, the effect's key
    sender: str  # the transaction's sender, lowercase (our relayer's address when we settled it)
    block_number: int


def settlement_in_receipt(receipt: dict[str, Any], req: Requirement, auth: Authorization) -> Settlement | None:
    """Did this (successful) transaction execute *this* authorization, moving exactly the authorised amount from
    the payer to us, as logged by the USDC contract itself (:func:`gateway.chain.authorization.transfer_log`)?"""
    moved = transfer_log(receipt, req.asset, auth.from_, req.pay_to, auth.value, auth.nonce)
    if moved is None:
        return None
    return Settlement(
        tx_hash=str(receipt.get("transactionHash", "")).lower(),
        log_index=(receipt.get("logs") or []).index(moved),  # position in the receipt: see txhash.check
        sender=str(receipt.get("from", "")).lower(),
        block_number=hex_int(receipt.get("blockNumber")),
    )


def transfer_in_receipt(receipt: dict[str, Any], req: Requirement, auth: Authorization) -> bool:
    return settlement_in_receipt(receipt, req, auth) is not None


async def find_prior_settlement(
    rpc: ChainRpc, req: Requirement, auth: Authorization, *, lookback_blocks: int = 10_000
) -> Settlement | None:
    """If this authorization was already executed *to us* (by anyone), that execution.

    docs/threat-model.md T9: a watcher (or the payer's own facilitator) may front-run our settlement; the money still
    arrived, so the payment counts. Found through the token's ``AuthorizationUsed(from, nonce)`` event.
    """
    head = hex_int(await rpc.request("eth_blockNumber", []))
    logs = await rpc.request(
        "eth_getLogs",
        [
            {
                "address": req.asset,
                "fromBlock": hex(max(0, head - lookback_blocks)),
                "toBlock": "latest",
                "topics": [
                    "0x" + abi.AUTHORIZATION_USED_TOPIC.hex(),
                    "0x" + (bytes(12) + bytes.fromhex(auth.from_[2:])).hex(),
                    "0x" + auth.nonce.hex(),
                ],
            }
        ],
    )
    for entry in logs or ():
        tx_hash = entry.get("transactionHash")
        if not isinstance(tx_hash, str):
            continue
        receipt = await rpc.request("eth_getTransactionReceipt", [tx_hash])
        found = settlement_in_receipt(receipt, req, auth) if isinstance(receipt, dict) else None
        if found is not None:
            return found
    return None


async def block_time(rpc: ChainRpc, block_number: int) -> int | None:
    """The timestamp of block ``block_number`` (None if the node does not have it)."""
    block = await rpc.request("eth_getBlockByNumber", [hex(block_number), False])
    return hex_int(block.get("timestamp")) if isinstance(block, dict) else None
