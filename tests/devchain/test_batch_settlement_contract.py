"""The dev kit's batch-settlement contracts must behave like the official ones wherever the official client, the
official facilitator and the gateway can observe them: channel ids and EIP-712 digests, deposits through the
ERC-3009 collector, claims, settlement, timed withdrawals, cooperative refunds; and what each costs in gas.

Payloads and signatures come from the official ``x402`` package (its client, authorizer and facilitator helpers)
wherever it has them, so an incompatibility shows up here and not in the gateway's scheme.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi import decode, encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from x402.mechanisms.evm.batch_settlement.abi import BATCH_SETTLEMENT_ABI
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.client.eip3009 import create_batch_settlement_eip3009_deposit_payload
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.constants import CLAIM_BATCH_TYPES, REFUND_TYPES, VOUCHER_TYPES
from x402.mechanisms.evm.batch_settlement.facilitator.claim import build_voucher_claim_args
from x402.mechanisms.evm.batch_settlement.facilitator.deposit_eip3009 import build_eip3009_deposit_collector_data
from x402.mechanisms.evm.batch_settlement.facilitator.scheme import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.batch_settlement.facilitator.utils import read_channel_state, to_contract_channel_config
from x402.mechanisms.evm.batch_settlement.types import (
    ChannelConfig,
    ClaimPayload,
    DepositPayload,
    EnrichedRefundPayload,
    SettlePayload,
    VoucherClaim,
    VoucherFields,
)
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id, get_batch_settlement_eip712_domain
from x402.mechanisms.evm.signers import EthAccountSigner, FacilitatorWeb3Signer
from x402.schemas import PaymentPayload, PaymentRequirements

from gateway.dev.chain import (
    BATCH_SETTLEMENT_ADDRESS,
    DEV_KEYS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    DevChain,
    OnchainChannel,
    RpcError,
    call,
    deploy_contract,
    load_artifact,
    send_transaction,
    set_eth_balance,
    start_dev_chain,
)

SETTLEMENT = BATCH_SETTLEMENT_ADDRESS
COLLECTOR = ERC3009_DEPOSIT_COLLECTOR_ADDRESS
AUTHORIZER = Account.from_key(DEV_KEYS[2])  # the receiver authorizer of every channel here
ABI: list[dict[str, Any]] = load_artifact("X402BatchSettlement")["abi"]
COLLECTOR_ABI: list[dict[str, Any]] = load_artifact("ERC3009DepositCollector")["abi"]
ZERO = "0x0000000000000000000000000000000000000000"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_N = SECP256K1_N // 2


# ------------------------------------------------------------------------------------------------ ABI helpers


def _type(param: dict[str, Any]) -> str:
    kind = str(param["type"])
    if kind.startswith("tuple"):
        return "(" + ",".join(_type(c) for c in param["components"]) + ")" + kind[len("tuple") :]
    return kind


def _entry(kind: str, name: str) -> dict[str, Any]:
    (entry,) = [e for e in ABI + COLLECTOR_ABI if e["type"] == kind and e["name"] == name]
    return entry


def _signature(entry: dict[str, Any]) -> str:
    return f"{entry['name']}({','.join(_type(i) for i in entry['inputs'])})"


def calldata(function: str, *args: Any) -> bytes:
    entry = _entry("function", function)
    return keccak(text=_signature(entry))[:4] + encode([_type(i) for i in entry["inputs"]], list(args))


def _norm(value: Any) -> Any:
    """Decoded values with addresses checksummed, so they compare equal to the addresses the tests hold."""
    if isinstance(value, tuple | list):
        return tuple(_norm(v) for v in value)
    if isinstance(value, str) and value.startswith("0x") and len(value) == 42:
        return to_checksum_address(value)
    return value


def view(chain: DevChain, function: str, *args: Any, to: str = SETTLEMENT) -> Any:
    entry = _entry("function", function)
    out = _norm(decode([_type(o) for o in entry["outputs"]], call(chain.anvil, to, calldata(function, *args))))
    return out[0] if len(out) == 1 else out


ERRORS = {keccak(text=_signature(e))[:4]: e["name"] for e in ABI + COLLECTOR_ABI if e["type"] == "error"}


def revert_of(chain: DevChain, data: bytes, *, sender: str | None = None, to: str = SETTLEMENT) -> str:
    """Simulate the call and name what it reverts with: a custom error of the contract, or the revert string."""
    tx = {"from": sender or Account.from_key(chain.relayer_key).address, "to": to, "data": "0x" + data.hex()}
    with pytest.raises(RpcError) as err:
        chain.rpc("eth_call", [tx, "latest"])
    raw = bytes.fromhex(str(err.value.data or "0x").removeprefix("0x"))
    if raw[:4] in ERRORS:
        return ERRORS[raw[:4]]
    if raw[:4] == keccak(text="Error(string)")[:4]:
        return str(decode(["string"], raw[4:])[0])
    return err.value.message


def events(receipt: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The settlement contract's events in a receipt, decoded: [(name, {arg: value})]."""
    by_topic = {keccak(text=_signature(e)): e for e in ABI if e["type"] == "event"}
    out = []
    for log in receipt["logs"]:
        if to_checksum_address(log["address"]) != SETTLEMENT:
            continue
        topics = [bytes.fromhex(t[2:]) for t in log["topics"]]
        entry = by_topic[topics[0]]
        indexed = [i for i in entry["inputs"] if i["indexed"]]
        plain = [i for i in entry["inputs"] if not i["indexed"]]
        values = [decode([_type(i)], t)[0] for i, t in zip(indexed, topics[1:], strict=True)]
        values += decode([_type(i) for i in plain], bytes.fromhex(log["data"][2:]))
        names = [i["name"] for i in indexed + plain]
        out.append((entry["name"], dict(zip(names, _norm(values), strict=True))))
    return out


def send(chain: DevChain, data: bytes, *, key: str | None = None, to: str = SETTLEMENT) -> dict[str, Any]:
    return send_transaction(chain.anvil, key or chain.relayer_key, to, data)


def gas(receipt: dict[str, Any]) -> int:
    return int(receipt["gasUsed"], 16)


# ------------------------------------------------------------------------------------------------ channels


class WalletSigner:
    """The official client's signer for a smart-wallet payer: the wallet's address, its owner's signatures (which
    the wallet vouches for through ERC-1271)."""

    def __init__(self, wallet: str, owner: LocalAccount) -> None:
        self.address = wallet
        self._owner = EthAccountSigner(owner)

    def sign_typed_data(self, domain: Any, types: Any, primary_type: str, message: dict[str, Any]) -> bytes:
        return self._owner.sign_typed_data(domain, types, primary_type, message)


@dataclass
class Channel:
    chain: DevChain
    payer: LocalAccount  # the key that signs for the payer
    signer: EthAccountSigner | WalletSigner
    config: ChannelConfig
    requirements: PaymentRequirements

    @property
    def id_hex(self) -> str:
        return compute_channel_id(self.config, self.chain.network)

    @property
    def id(self) -> bytes:
        return bytes.fromhex(self.id_hex[2:])

    @property
    def args(self) -> tuple[Any, ...]:
        return to_contract_channel_config(self.config)

    def voucher(self, max_claimable: int, *, signer: LocalAccount | None = None) -> VoucherFields:
        """The official client's voucher signature (by the payer unless ``signer`` is given)."""
        by = EthAccountSigner(signer) if signer is not None else self.signer
        return sign_voucher(by, self.id_hex, max_claimable, self.chain.network)

    def claim(self, max_claimable: int, total_claimed: int, *, signer: LocalAccount | None = None) -> VoucherClaim:
        signature = self.voucher(max_claimable, signer=signer).signature
        return VoucherClaim(
            channel=self.config,
            max_claimable_amount=str(max_claimable),
            signature=signature,
            total_claimed=str(total_claimed),
        )

    def deposit_payload(self, amount: int, *, max_claimable: int = 1_000) -> DepositPayload:
        """What the official client sends to pay by deposit (an ERC-3009 authorization to the collector)."""
        return create_batch_settlement_eip3009_deposit_payload(
            self.signer, self.requirements, self.config, amount, max_claimable
        )

    def deposit_call(self, payload: DepositPayload) -> bytes:
        """What the official facilitator sends for that payload."""
        assert payload.deposit is not None
        return calldata(
            "deposit",
            self.args,
            int(payload.deposit.amount),
            COLLECTOR,
            build_eip3009_deposit_collector_data(payload),
        )

    def deposit(self, amount: int) -> dict[str, Any]:
        return send(self.chain, self.deposit_call(self.deposit_payload(amount)))

    def state(self) -> tuple[int, int]:
        balance, claimed = view(self.chain, "channels", self.id)
        return balance, claimed


def new_channel(
    chain: DevChain,
    *,
    payer: LocalAccount | None = None,
    wallet: str | None = None,
    receiver: str | None = None,
    authorizer: str = AUTHORIZER.address,
    withdraw_delay: int = 900,
    payer_authorizer: str | None = None,
    funds: int = 10_000_000,
) -> Channel:
    """A channel's terms (nothing on chain yet); ``wallet``: the payer is that smart wallet, ``payer`` its owner."""
    payer = payer or chain.new_payer(funds)
    signer = EthAccountSigner(payer) if wallet is None else WalletSigner(wallet, payer)
    receiver = receiver or Account.create().address
    requirements = PaymentRequirements(
        scheme="batch-settlement",
        network=chain.network,
        asset=chain.usdc,
        amount="1000",
        payTo=receiver,
        maxTimeoutSeconds=300,
        extra={
            "name": chain.token_name,
            "version": chain.token_version,
            "receiverAuthorizer": authorizer,
            "withdrawDelay": withdraw_delay,
        },
    )
    config = ChannelConfig(
        payer=signer.address,
        payer_authorizer=payer.address if payer_authorizer is None else payer_authorizer,
        receiver=receiver,
        receiver_authorizer=authorizer,
        token=chain.usdc,
        withdraw_delay=withdraw_delay,
        salt="0x" + os.urandom(32).hex(),
    )
    return Channel(chain, payer, signer, config, requirements)


def claim_with_signature(
    chain: DevChain, claims: Sequence[VoucherClaim], *, authorizer: LocalAccount = AUTHORIZER
) -> bytes:
    """claimWithSignature calldata: the official facilitator's rows and the official authorizer's signature."""
    signature = sign_claim_batch(LocalAuthorizerSigner(authorizer), list(claims), chain.network)
    return calldata("claimWithSignature", build_voucher_claim_args(list(claims)), bytes.fromhex(signature[2:]))


def refund_with_signature(channel: Channel, amount: int, nonce: int, *, authorizer: LocalAccount = AUTHORIZER) -> bytes:
    signature = sign_refund(LocalAuthorizerSigner(authorizer), channel.id_hex, amount, nonce, channel.chain.network)
    return calldata("refundWithSignature", channel.args, amount, nonce, bytes.fromhex(signature[2:]))


def receiver_totals(chain: DevChain, channel: Channel) -> tuple[int, int]:
    claimed, settled = view(chain, "receivers", channel.config.receiver, chain.usdc)
    return claimed, settled


@pytest.fixture(scope="module")
def chain() -> Iterator[DevChain]:
    """A private chain whose clock follows the wall clock (the official client dates its deposits by it)."""
    c = start_dev_chain(8453)
    yield c
    c.stop()


@pytest.fixture
def clock_chain() -> Iterator[DevChain]:
    """A fresh chain per test for the tests that move the clock."""
    c = start_dev_chain(8453)
    yield c
    c.stop()


# ------------------------------------------------------------------------------------------------ interface


def test_every_function_and_event_the_official_package_calls_has_the_same_abi() -> None:
    def shapes(abi: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
        return {
            (
                e["type"],
                _signature(e),
                tuple(i.get("indexed") for i in e["inputs"]),
                tuple((o["name"], _type(o)) for o in e.get("outputs", [])),
                e.get("stateMutability"),
            )
            for e in abi
            if e["type"] in ("function", "event")
        }

    assert shapes(BATCH_SETTLEMENT_ABI) <= shapes(ABI)


def test_gateway_abi_subset_holds_the_calls_every_event_and_every_error() -> None:
    subset = load_artifact("batch_settlement")["abi"]
    assert all(entry in ABI for entry in subset)

    def signals(abi: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((e["type"], _signature(e)) for e in abi if e["type"] in ("event", "error"))

    assert signals(subset) == signals(ABI)
    names = {e["name"] for e in subset if e["type"] == "function"}
    assert {"deposit", "claim", "claimWithSignature", "settle", "getChannelId", "channels"} <= names
    assert {"pendingWithdrawals", "refundNonce", "receivers", "refundWithSignature", "multicall"} <= names
    assert {e["name"] for e in subset if e["type"] == "event"} >= {"WithdrawInitiated", "Claimed", "Settled"}
    collector = load_artifact("deposit_collector")["abi"]
    assert {e["name"] for e in collector} == {
        "collect",
        "x402BatchSettlement",
        "OnlyX402BatchSettlement",
        "InvalidX402BatchSettlementAddress",
        "SafeERC20FailedOperation",
    }


# ------------------------------------------------------------------------------------------------ identity, digests


@pytest.mark.parametrize("payer_authorizer", ["payer", "zero"])
def test_channel_id_agrees_with_official_compute_channel_id_and_get_channel_id(
    chain: DevChain, payer_authorizer: str
) -> None:
    channel = new_channel(chain, payer_authorizer=None if payer_authorizer == "payer" else ZERO, funds=0)
    assert view(chain, "getChannelId", channel.args) == channel.id
    other = new_channel(chain, payer=channel.payer, receiver=channel.config.receiver, funds=0)
    assert view(chain, "getChannelId", other.args) == other.id != channel.id  # the salt alone tells them apart


def test_eip712_domain_separator_offchain_equals_onchain(chain: DevChain) -> None:
    domain = get_batch_settlement_eip712_domain(chain.chain_id)
    assert domain["verifyingContract"] == SETTLEMENT
    fields, name, version, chain_id, verifying, salt, extensions = view(chain, "eip712Domain")
    assert (fields, name, version, chain_id) == (b"\x0f", "x402 Batch Settlement", "1", chain.chain_id)
    assert (verifying, salt, extensions) == (SETTLEMENT, bytes(32), ())

    channel = new_channel(chain, funds=0)
    voucher = encode_typed_data(
        domain_data=domain,
        message_types=VOUCHER_TYPES,
        message_data={"channelId": channel.id, "maxClaimableAmount": 12_345},
    )
    # The on-chain digest is keccak256(0x1901 || domainSeparator || structHash): equal digests over the same struct
    # hash mean the separators are equal.
    onchain = view(chain, "getVoucherDigest", channel.id, 12_345)
    assert onchain == keccak(b"\x19\x01" + voucher.header + voucher.body)

    refund = encode_typed_data(
        domain_data=domain,
        message_types=REFUND_TYPES,
        message_data={"channelId": channel.id, "nonce": 7, "amount": 99},
    )
    assert view(chain, "getRefundDigest", channel.id, 7, 99) == keccak(b"\x19\x01" + refund.header + refund.body)

    claims = [channel.claim(500, 400), new_channel(chain, funds=0).claim(900, 900)]
    batch = encode_typed_data(
        domain_data=domain,
        message_types=CLAIM_BATCH_TYPES,
        message_data={
            "claims": [
                {
                    "channelId": bytes.fromhex(compute_channel_id(c.channel, chain.network)[2:]),
                    "maxClaimableAmount": int(c.max_claimable_amount),
                    "totalClaimed": int(c.total_claimed),
                }
                for c in claims
            ]
        },
    )
    expected = keccak(b"\x19\x01" + batch.header + batch.body)
    assert view(chain, "getClaimBatchDigest", build_voucher_claim_args(claims)) == expected


# ------------------------------------------------------------------------------------------------ deposits


def test_official_client_deposit_credits_the_channel_through_the_collector_once(chain: DevChain) -> None:
    channel = new_channel(chain, funds=5_000_000)
    payload = channel.deposit_payload(1_000_000)
    held = chain.balance(SETTLEMENT)

    receipt = send(chain, channel.deposit_call(payload))

    assert channel.state() == (1_000_000, 0)
    assert chain.balance(channel.payer.address) == 4_000_000
    assert chain.balance(SETTLEMENT) == held + 1_000_000
    assert chain.balance(COLLECTOR) == 0  # forwarded in the same call
    assert [name for name, _ in events(receipt)] == ["ChannelCreated", "Deposited"]
    created, deposited = (args for _, args in events(receipt))
    assert created["config"] == channel.args
    assert deposited == {
        "channelId": channel.id,
        "sender": Account.from_key(chain.relayer_key).address,
        "amount": 1_000_000,
        "newBalance": 1_000_000,
    }
    # The payer's authorization is spent: the same deposit again is refused by the token.
    assert revert_of(chain, channel.deposit_call(payload)) == "FiatTokenV2: authorization is used or canceled"
    assert channel.state() == (1_000_000, 0)

    # A top-up (a fresh authorization) adds to the balance and does not re-create the channel.
    top_up = channel.deposit(250_000)
    assert [name for name, _ in events(top_up)] == ["Deposited"]
    assert channel.state() == (1_250_000, 0)


def test_collector_pulls_only_for_the_settlement_contract(chain: DevChain) -> None:
    channel = new_channel(chain)
    payload = channel.deposit_payload(100_000)
    collector_data = build_eip3009_deposit_collector_data(payload)
    collect = calldata("collect", channel.payer.address, chain.usdc, 100_000, channel.id, collector_data)
    assert revert_of(chain, collect, to=COLLECTOR) == "OnlyX402BatchSettlement"
    assert view(chain, "x402BatchSettlement", to=COLLECTOR) == SETTLEMENT
    # Nor can anyone who saw the authorization spend it on the token directly: only its payee (the collector) may.
    assert payload.deposit is not None and payload.deposit.authorization.erc3009_authorization is not None
    auth = payload.deposit.authorization.erc3009_authorization
    nonce = keccak(encode(["bytes32", "uint256"], [channel.id, int(auth.salt, 16)]))
    direct = keccak(text="receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")[
        :4
    ] + encode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"],
        [
            channel.payer.address,
            COLLECTOR,
            100_000,
            int(auth.valid_after),
            int(auth.valid_before),
            nonce,
            bytes.fromhex(auth.signature[2:]),
        ],
    )
    assert revert_of(chain, direct, to=chain.usdc) == "FiatTokenV2: caller must be the payee"
    send(chain, channel.deposit_call(payload))  # and the deposit itself still works
    assert channel.state() == (100_000, 0)


def test_deposit_refuses_an_authorization_for_another_channel_or_amount_and_malformed_terms(chain: DevChain) -> None:
    channel = new_channel(chain)
    payload = channel.deposit_payload(100_000)
    collector_data = build_eip3009_deposit_collector_data(payload)
    # The authorization's nonce binds the channel: presented for a sibling channel, the signature does not verify.
    sibling = new_channel(chain, payer=channel.payer, receiver=channel.config.receiver)
    wrong_channel = calldata("deposit", sibling.args, 100_000, COLLECTOR, collector_data)
    assert revert_of(chain, wrong_channel) == "FiatTokenV2: invalid signature"
    wrong_amount = calldata("deposit", channel.args, 100_001, COLLECTOR, collector_data)
    assert revert_of(chain, wrong_amount) == "FiatTokenV2: invalid signature"
    assert revert_of(chain, calldata("deposit", channel.args, 0, COLLECTOR, collector_data)) == "ZeroDeposit"
    assert revert_of(chain, calldata("deposit", channel.args, 100_000, ZERO, collector_data)) == "InvalidCollector"
    no_receiver = (*channel.args[:2], ZERO, *channel.args[3:])
    assert revert_of(chain, calldata("deposit", no_receiver, 100_000, COLLECTOR, collector_data)) == "InvalidChannel"


@pytest.mark.parametrize(
    ("delay", "outcome"),
    [(899, "WithdrawDelayOutOfRange"), (900, None), (2_592_000, None), (2_592_001, "WithdrawDelayOutOfRange")],
)
def test_withdraw_delay_must_be_between_15_minutes_and_30_days(
    chain: DevChain, delay: int, outcome: str | None
) -> None:
    channel = new_channel(chain, withdraw_delay=delay)
    data = channel.deposit_call(channel.deposit_payload(100_000))
    if outcome is None:
        send(chain, data)
        assert channel.state() == (100_000, 0)
    else:
        assert revert_of(chain, data) == outcome


# ------------------------------------------------------------------------------------------------ claims, settle


def test_claim_batch_moves_claimed_amounts_and_settle_sweeps_exactly_their_sum(chain: DevChain) -> None:
    receiver = Account.create().address
    channels = [new_channel(chain, receiver=receiver) for _ in range(3)]
    for channel in channels:
        channel.deposit(100_000)
    amounts = [10_000, 25_000, 40_000]
    claims = [c.claim(a, a) for c, a in zip(channels, amounts, strict=True)]

    receipt = send(chain, claim_with_signature(chain, claims))

    assert [c.state() for c in channels] == [(100_000, a) for a in amounts]
    assert receiver_totals(chain, channels[0]) == (75_000, 0)
    relayer = Account.from_key(chain.relayer_key).address
    assert events(receipt) == [
        ("Claimed", {"channelId": c.id, "sender": relayer, "claimAmount": a, "newTotalClaimed": a})
        for c, a in zip(channels, amounts, strict=True)
    ]
    assert chain.balance(receiver) == 0  # claims move accounting only

    # A later voucher claims only the difference; replaying the old batch changes nothing.
    send(chain, claim_with_signature(chain, [channels[0].claim(30_000, 30_000)]))
    replay = send(chain, claim_with_signature(chain, claims))
    assert events(replay) == []
    assert channels[0].state() == (100_000, 30_000)
    assert receiver_totals(chain, channels[0]) == (95_000, 0)

    held = chain.balance(SETTLEMENT)
    swept = send(chain, calldata("settle", receiver, chain.usdc))
    assert chain.balance(receiver) == 95_000
    assert chain.balance(SETTLEMENT) == held - 95_000
    assert receiver_totals(chain, channels[0]) == (95_000, 95_000)
    assert events(swept) == [
        (
            "Settled",
            {"receiver": receiver, "token": chain.usdc, "sender": relayer, "amount": 95_000},
        )
    ]
    again = send(chain, calldata("settle", receiver, chain.usdc))
    assert events(again) == [] and chain.balance(receiver) == 95_000


def test_claims_beyond_the_voucher_or_the_balance_revert_with_their_errors(chain: DevChain) -> None:
    channel = new_channel(chain)
    channel.deposit(50_000)
    over_voucher = claim_with_signature(chain, [channel.claim(20_000, 20_001)])
    assert revert_of(chain, over_voucher) == "ClaimExceedsCeiling"
    over_balance = claim_with_signature(chain, [channel.claim(60_000, 50_001)])
    assert revert_of(chain, over_balance) == "ClaimExceedsBalance"
    # A batch fails as a whole: one bad row keeps the good rows from landing too.
    good = new_channel(chain)
    good.deposit(50_000)
    mixed = claim_with_signature(chain, [good.claim(10_000, 10_000), channel.claim(20_000, 20_001)])
    assert revert_of(chain, mixed) == "ClaimExceedsCeiling"
    assert good.state() == (50_000, 0)
    # Exactly the balance, under the voucher, is fine.
    send(chain, claim_with_signature(chain, [channel.claim(60_000, 50_000)]))
    assert channel.state() == (50_000, 50_000)


def test_claims_need_the_payers_voucher_and_the_authorizers_batch_signature(chain: DevChain) -> None:
    channel = new_channel(chain)
    channel.deposit(50_000)
    stranger = Account.create()
    forged_voucher = claim_with_signature(chain, [channel.claim(10_000, 10_000, signer=stranger)])
    assert revert_of(chain, forged_voucher) == "InvalidSignature"
    forged_batch = claim_with_signature(chain, [channel.claim(10_000, 10_000)], authorizer=stranger)
    assert revert_of(chain, forged_batch) == "InvalidSignature"
    # The batch signature covers the claimed totals: a relayer cannot raise one.
    row = channel.claim(10_000, 5_000)
    signature = sign_claim_batch(LocalAuthorizerSigner(AUTHORIZER), [row], chain.network)
    raised = build_voucher_claim_args([channel.claim(10_000, 10_000)])
    assert revert_of(chain, calldata("claimWithSignature", raised, bytes.fromhex(signature[2:]))) == "InvalidSignature"
    assert revert_of(chain, calldata("claimWithSignature", [], bytes.fromhex(signature[2:]))) == "EmptyBatch"
    # All rows must share the signing authorizer.
    other = new_channel(chain, authorizer=stranger.address)
    mixed = claim_with_signature(chain, [channel.claim(10_000, 10_000), other.claim(1, 1)])
    assert revert_of(chain, mixed) == "NotReceiverAuthorizer"
    # Malformed payer signatures fail the way the official contract's ECDSA library fails.
    bad_length = channel.claim(10_000, 10_000)
    bad_length.signature = bad_length.signature[:-2]
    assert revert_of(chain, claim_with_signature(chain, [bad_length])) == "ECDSAInvalidSignatureLength"
    high_s = channel.claim(10_000, 10_000)
    sig = bytes.fromhex(high_s.signature[2:])
    twin_s = SECP256K1_N - int.from_bytes(sig[32:64], "big")  # the same signer's malleable twin
    assert twin_s > HALF_N
    high_s.signature = "0x" + (sig[:32] + twin_s.to_bytes(32, "big") + bytes([55 - sig[64]])).hex()
    assert revert_of(chain, claim_with_signature(chain, [high_s])) == "ECDSAInvalidSignatureS"
    assert channel.state() == (50_000, 0)


def test_direct_claim_is_for_the_receiver_side_only(chain: DevChain) -> None:
    receiver = Account.create()
    set_eth_balance(chain.anvil, receiver.address, 10**18)
    channel = new_channel(chain, receiver=receiver.address)
    channel.deposit(50_000)
    rows = build_voucher_claim_args([channel.claim(10_000, 10_000)])
    assert revert_of(chain, calldata("claim", rows)) == "NotAuthorizedToClaim"  # the relayer is neither
    send(chain, calldata("claim", rows), key=receiver.key.to_0x_hex())
    assert channel.state() == (50_000, 10_000)


def test_payer_without_voucher_key_signs_through_erc1271(chain: DevChain) -> None:
    """payerAuthorizer zero: the contract asks the payer (a smart wallet here) whether the voucher is signed."""
    owner = Account.create()
    wallet = deploy_contract(chain.anvil, "TestWallet1271", ["address"], [owner.address])
    chain.mint(wallet, 1_000_000)
    channel = new_channel(chain, payer=owner, wallet=wallet, payer_authorizer=ZERO)
    channel.deposit(200_000)  # the ERC-3009 authorization is checked by the token through the wallet too
    assert channel.state() == (200_000, 0) and chain.balance(wallet) == 800_000
    send(chain, claim_with_signature(chain, [channel.claim(30_000, 30_000)]))
    assert channel.state() == (200_000, 30_000)
    forged = claim_with_signature(chain, [channel.claim(40_000, 40_000, signer=Account.create())])
    assert revert_of(chain, forged) == "InvalidSignature"


# ------------------------------------------------------------------------------------------------ withdrawal


def test_timed_withdrawal_returns_the_unclaimed_remainder_and_respects_claims_landed_before(
    clock_chain: DevChain,
) -> None:
    chain = clock_chain
    receiver = Account.create().address
    channel = new_channel(chain, receiver=receiver, funds=1_000_000)
    set_eth_balance(chain.anvil, channel.payer.address, 10**18)
    payer_key = channel.payer.key.to_0x_hex()
    channel.deposit(1_000_000)
    send(chain, claim_with_signature(chain, [channel.claim(300_000, 300_000)]))

    too_much = calldata("initiateWithdraw", channel.args, 700_001)
    assert revert_of(chain, too_much, sender=channel.payer.address) == "WithdrawAmountExceedsAvailable"
    assert revert_of(chain, calldata("initiateWithdraw", channel.args, 1)) == "InvalidChannel"  # not the payer
    initiated = send(chain, calldata("initiateWithdraw", channel.args, 700_000), key=payer_key)
    started = int(chain.rpc("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
    assert events(initiated) == [
        ("WithdrawInitiated", {"channelId": channel.id, "amount": 700_000, "finalizeAfter": started + 900})
    ]
    state = chain.channel(channel.id)
    assert (state.withdraw_amount, state.withdraw_initiated_at) == (700_000, started)
    again = calldata("initiateWithdraw", channel.args, 1)
    assert revert_of(chain, again, sender=channel.payer.address) == "WithdrawalAlreadyPending"

    # The receiver side claims a later voucher inside the window: that claim is respected.
    send(chain, claim_with_signature(chain, [channel.claim(400_000, 400_000)]))
    finalize = calldata("finalizeWithdraw", channel.args)
    assert revert_of(chain, finalize, sender=channel.payer.address) == "WithdrawDelayNotElapsed"
    chain.advance_time(900)
    assert revert_of(chain, finalize) == "NotAuthorizedToFinalizeWithdraw"
    finalized = send(chain, finalize, key=payer_key)

    assert chain.balance(channel.payer.address) == 600_000  # 1,000,000 escrowed - 400,000 claimed
    assert events(finalized) == [
        ("WithdrawFinalized", {"channelId": channel.id, "sender": channel.payer.address, "amount": 600_000})
    ]
    assert chain.channel(channel.id) == OnchainChannel(
        balance=400_000, total_claimed=400_000, withdraw_amount=0, withdraw_initiated_at=0, refund_nonce=0
    )
    assert revert_of(chain, finalize, sender=channel.payer.address) == "WithdrawalNotPending"
    # Vouchers not claimed in time are lost: nothing unclaimed is left to claim against.
    late = claim_with_signature(chain, [channel.claim(500_000, 500_000)])
    assert revert_of(chain, late) == "ClaimExceedsBalance"
    send(chain, calldata("settle", receiver, chain.usdc))
    assert chain.balance(receiver) == 400_000


def test_withdrawal_of_everything_unclaimed_closes_the_channel(clock_chain: DevChain) -> None:
    chain = clock_chain
    channel = new_channel(chain, funds=100_000)
    set_eth_balance(chain.anvil, channel.payer.address, 10**18)
    channel.deposit(100_000)
    send(chain, calldata("initiateWithdraw", channel.args, 100_000), key=channel.payer.key.to_0x_hex())
    chain.advance_time(900)
    receipt = send(chain, calldata("finalizeWithdraw", channel.args), key=channel.payer.key.to_0x_hex())
    assert [name for name, _ in events(receipt)] == ["WithdrawFinalized", "ChannelClosed"]
    assert chain.balance(channel.payer.address) == 100_000 and channel.state() == (0, 0)


# ------------------------------------------------------------------------------------------------ refunds


def test_cooperative_refund_returns_exactly_the_amount_once(chain: DevChain) -> None:
    channel = new_channel(chain, funds=500_000)
    channel.deposit(500_000)
    send(chain, claim_with_signature(chain, [channel.claim(100_000, 100_000)]))
    data = refund_with_signature(channel, 150_000, 0)

    receipt = send(chain, data)

    assert chain.balance(channel.payer.address) == 150_000
    assert events(receipt) == [
        (
            "Refunded",
            {"channelId": channel.id, "sender": Account.from_key(chain.relayer_key).address, "amount": 150_000},
        )
    ]
    state = chain.channel(channel.id)
    assert (state.balance, state.total_claimed, state.refund_nonce) == (350_000, 100_000, 1)
    assert revert_of(chain, data) == "InvalidRefundNonce"  # the same signature cannot refund twice
    assert revert_of(chain, refund_with_signature(channel, 1, 1, authorizer=Account.create())) == "InvalidSignature"
    assert revert_of(chain, refund_with_signature(channel, 0, 1)) == "ZeroRefund"
    # A refund is capped at the unclaimed escrow: claimed funds stay for the receiver.
    send(chain, refund_with_signature(channel, 10_000_000, 1))
    assert chain.balance(channel.payer.address) == 400_000
    assert chain.channel(channel.id).balance == 100_000 and chain.channel(channel.id).refund_nonce == 2


def test_refund_shrinks_a_pending_withdrawal_and_direct_refund_is_receiver_side_only(chain: DevChain) -> None:
    receiver = Account.create()
    set_eth_balance(chain.anvil, receiver.address, 10**18)
    channel = new_channel(chain, receiver=receiver.address, funds=500_000)
    set_eth_balance(chain.anvil, channel.payer.address, 10**18)
    channel.deposit(500_000)
    send(chain, calldata("initiateWithdraw", channel.args, 300_000), key=channel.payer.key.to_0x_hex())

    assert revert_of(chain, calldata("refund", channel.args, 1)) == "NotAuthorizedToRefund"
    send(chain, calldata("refund", channel.args, 100_000), key=receiver.key.to_0x_hex())
    state = chain.channel(channel.id)
    assert (state.balance, state.withdraw_amount, state.refund_nonce) == (400_000, 200_000, 1)
    assert state.withdraw_initiated_at != 0
    # The direct refund consumed nonce 0: a signature made for it no longer works.
    assert revert_of(chain, refund_with_signature(channel, 50_000, 0)) == "InvalidRefundNonce"
    send(chain, refund_with_signature(channel, 250_000, 1))
    state = chain.channel(channel.id)
    assert (state.balance, state.withdraw_amount, state.withdraw_initiated_at) == (150_000, 0, 0)
    assert chain.balance(channel.payer.address) == 350_000


def test_multicall_claims_and_refunds_in_one_transaction(chain: DevChain) -> None:
    """The official facilitator's cooperative refund: claim the last voucher, then refund the rest, atomically."""
    channel = new_channel(chain, funds=200_000)
    channel.deposit(200_000)
    claim = claim_with_signature(chain, [channel.claim(70_000, 70_000)])
    receipt = send(chain, calldata("multicall", [claim, refund_with_signature(channel, 130_000, 0)]))
    assert [name for name, _ in events(receipt)] == ["Claimed", "Refunded"]
    assert channel.state() == (70_000, 70_000) and chain.balance(channel.payer.address) == 130_000
    # One failing call reverts the whole batch with that call's own error.
    failing = calldata("multicall", [claim_with_signature(chain, [channel.claim(80_000, 80_000)]), claim])
    assert revert_of(chain, failing) == "ClaimExceedsBalance"


# ------------------------------------------------------------------------------------------------ official stack


def test_official_facilitator_deposits_claims_settles_and_refunds_unchanged(chain: DevChain) -> None:
    """The official facilitator (web3 signer, Multicall3 reads, its own calldata) runs against the dev kit."""
    facilitator = BatchSettlementEvmFacilitator(
        FacilitatorWeb3Signer(DEV_KEYS[3], chain.url), LocalAuthorizerSigner(AUTHORIZER)
    )
    reader = FacilitatorWeb3Signer(DEV_KEYS[3], chain.url)
    channel = new_channel(chain, funds=1_000_000)
    deposit = PaymentPayload(
        accepted=channel.requirements, payload=channel.deposit_payload(100_000, max_claimable=1_000).to_dict()
    )
    verified = facilitator.verify(deposit, channel.requirements)
    assert verified.is_valid, verified.invalid_reason
    settled = facilitator.settle(deposit, channel.requirements)
    assert settled.success, settled.error_message
    assert channel.state() == (100_000, 0)

    voucher = channel.voucher(3_000)
    paid = PaymentPayload(
        accepted=channel.requirements,
        payload={"type": "voucher", "channelConfig": channel.config.to_dict(), "voucher": voucher.to_dict()},
    )
    assert facilitator.verify(paid, channel.requirements).is_valid

    row = VoucherClaim(channel.config, "3000", voucher.signature, "3000")
    claimed = facilitator.settle(
        PaymentPayload(accepted=channel.requirements, payload=ClaimPayload(claims=[row]).to_dict()),
        channel.requirements,
    )
    assert claimed.success, claimed.error_message
    state = read_channel_state(reader, channel.id_hex)  # Multicall3 tryAggregate over the getters
    assert (state.balance, state.total_claimed, state.refund_nonce) == (100_000, 3_000, 0)

    swept = facilitator.settle(
        PaymentPayload(
            accepted=channel.requirements,
            payload=SettlePayload(receiver=channel.config.receiver, token=chain.usdc).to_dict(),
        ),
        channel.requirements,
    )
    assert swept.success, swept.error_message
    assert chain.balance(channel.config.receiver) == 3_000

    last = channel.voucher(4_000)
    refund = EnrichedRefundPayload(
        channel_config=channel.config,
        voucher=last,
        amount="96000",
        refund_nonce="0",
        claims=[VoucherClaim(channel.config, "4000", last.signature, "4000")],
    )
    refunded = facilitator.settle(
        PaymentPayload(accepted=channel.requirements, payload=refund.to_dict()), channel.requirements
    )
    assert refunded.success, refunded.error_message
    assert chain.balance(channel.payer.address) == 900_000 + 96_000
    after = chain.channel(channel.id)
    assert (after.balance, after.total_claimed, after.refund_nonce) == (4_000, 4_000, 1)


# ------------------------------------------------------------------------------------------------ gas


def test_gas_of_deposit_claim_batches_and_settle(chain: DevChain, capsys: pytest.CaptureFixture[str]) -> None:
    """Measured gas, printed for sizing claim batches (docs/sessions.md). Each row is a different channel, all
    paying one receiver whose totals are already non-zero (steady state), vouchers signed by a payer authorizer."""
    receiver = Account.create().address
    payer = chain.new_payer(100_000_000)
    channels = [new_channel(chain, payer=payer, receiver=receiver) for _ in range(112)]
    deposits = [gas(c.deposit(50_000)) for c in channels]
    top_up = gas(channels[0].deposit(50_000))
    # Warm-up: the receiver's totals and token balance leave zero, as they have after its first claim and settle.
    send(chain, claim_with_signature(chain, [channels[0].claim(1_000, 1_000)]))
    send(chain, calldata("settle", receiver, chain.usdc))

    batches: dict[int, int] = {}
    rest = channels[1:]
    for size in (1, 10, 100):
        rows, rest = rest[:size], rest[size:]
        receipt = send(chain, claim_with_signature(chain, [c.claim(20_000, 20_000) for c in rows]))
        batches[size] = gas(receipt)
        assert [c.state()[1] for c in rows] == [20_000] * size
    settle = gas(send(chain, calldata("settle", receiver, chain.usdc)))
    assert chain.balance(receiver) == 1_000 + 111 * 20_000

    per_voucher = (batches[100] - batches[10]) / 90
    fixed = batches[1] - per_voucher
    with capsys.disabled():
        print(
            "\n[batch-settlement gas] "
            f"deposit (new channel) {deposits[1]:,}; deposit (top-up) {top_up:,}; "
            + "; ".join(f"claimWithSignature x{n} {g:,}" for n, g in batches.items())
            + f"; per voucher {per_voucher:,.0f} + {fixed:,.0f} per batch; settle {settle:,}"
        )
    # A 100-voucher batch must fit well inside a block (and a 500k gas limit is far too small for it).
    assert 500_000 < batches[100] < 5_000_000


def test_dev_chain_can_start_without_the_session_contracts() -> None:
    bare = start_dev_chain(8453, sessions=False)
    try:
        assert bare.sessions is None
        assert bare.rpc("eth_getCode", [SETTLEMENT, "latest"]) == "0x"
        assert bare.rpc("eth_getCode", [COLLECTOR, "latest"]) == "0x"
        with pytest.raises(RuntimeError, match="without the batch-settlement contracts"):
            bare.channel(bytes(32))
    finally:
        bare.stop()
