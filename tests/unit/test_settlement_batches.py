"""Settlements batched through Multicall3 (gateway/chain/batcher.py) on a real anvil with the test token:
one transaction carries many authorizations, one that fails does not take the others down or count as paid, and
a batch whose hash could not be recorded for every settlement never leaves as signed."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from eth_account import Account

from gateway.chain.abi import MULTICALL3_ADDRESS
from gateway.chain.batcher import SettlementBatcher
from gateway.chain.relayer import Relayer
from gateway.chain.rpc import ChainRpc
from gateway.chain.watcher import ReceiptWatcher
from gateway.client.exact import Option, sign_exact_payment
from gateway.config import Secret
from gateway.dev.chain import DevChain, set_eth_balance
from gateway.errors import StoreUnavailable
from gateway.schemes.exact.onchain import settlement_calldata, transfer_in_receipt
from gateway.x402.codec import encode_header
from gateway.x402.payload import Authorization, ExactPayment, parse_exact_payment
from tests.support.facilitator import Payment, make_payment, requirement
from tests.support.facilitator import wire as wire_of

GAS = 120_000


def exact(payment: Payment) -> ExactPayment:
    return parse_exact_payment(encode_header(payment.payload).encode(), "payment-signature")


@dataclass
class Settled:
    outcomes: list[Any]  # per payment: its transaction hash, or the error its submit raised
    recorded: dict[int, list[str]]  # per payment: every hash its recorder was given, in order
    batcher: SettlementBatcher
    watcher: ReceiptWatcher

    async def pays(self, chain: DevChain, payment: Payment, authorization: Authorization, tx_hash: str) -> bool:
        """Does the mined transaction pay ``payment`` through this very authorization?"""
        receipt = await self.watcher.wait(tx_hash, timeout=20)
        req = requirement(chain, amount=payment.amount, pay_to=payment.pay_to)
        return transfer_in_receipt(receipt, req, authorization)


@contextlib.asynccontextmanager
async def settled(
    chain: DevChain, payments: list[ExactPayment], *, failing_record: frozenset[int] = frozenset()
) -> AsyncIterator[Settled]:
    """Submit every payment's settlement at once through a batcher on a fresh relayer key."""
    async with aiohttp.ClientSession() as session:
        rpc = ChainRpc("base", chain.chain_id, [Secret(chain.url)])
        await rpc.start(session)
        key = "0x" + os.urandom(32).hex()
        set_eth_balance(chain.anvil, Account.from_key(key).address, 10**20)
        relayer = Relayer(rpc, Secret(key))
        batcher = SettlementBatcher(relayer, MULTICALL3_ADDRESS, max_items=50)
        recorded: dict[int, list[str]] = {i: [] for i in range(len(payments))}

        async def one(i: int, payment: ExactPayment) -> Any:
            async def record(tx_hash: str) -> None:
                if i in failing_record:
                    raise StoreUnavailable("store down for this one")
                recorded[i].append(tx_hash)

            try:
                return await batcher.submit(chain.usdc, settlement_calldata(payment), GAS, record)
            except StoreUnavailable as exc:
                return exc

        outcomes = await asyncio.gather(*(one(i, p) for i, p in enumerate(payments)))
        await relayer.aclose()
        watcher = ReceiptWatcher(rpc, interval=0.02)
        try:
            yield Settled(list(outcomes), recorded, batcher, watcher)
        finally:
            await watcher.aclose()


async def test_many_settlements_share_a_transaction_and_each_is_found_in_it_by_its_own_authorization(
    base_chain: DevChain,
) -> None:
    payments = [make_payment(base_chain) for _ in range(12)]
    wire = [exact(p) for p in payments]
    async with settled(base_chain, wire) as run:
        assert run.batcher.batches >= 1 and len(set(run.outcomes)) < len(run.outcomes)  # fewer txs than payments
        for i, (payment, tx_hash) in enumerate(zip(payments, run.outcomes, strict=True)):
            assert run.recorded[i][-1] == tx_hash  # recorded before it left
            assert await run.pays(base_chain, payment, wire[i].authorization, tx_hash)
            assert base_chain.balance(payment.pay_to) == payment.amount


async def test_a_failing_authorization_in_a_batch_is_not_paid_and_does_not_stop_the_others(
    base_chain: DevChain,
) -> None:
    good = [make_payment(base_chain) for _ in range(3)]
    broke = make_payment(base_chain, amount=10_000, funds=1)  # signs 10,000 but holds 1: its call reverts
    payments = [good[0], broke, good[1], good[2]]
    wire = [exact(p) for p in payments]
    async with settled(base_chain, wire) as run:
        for payment, w, tx_hash in zip(payments, wire, run.outcomes, strict=True):
            assert await run.pays(base_chain, payment, w.authorization, tx_hash) is (payment is not broke)
            assert base_chain.balance(payment.pay_to) == (0 if payment is broke else payment.amount)


async def test_a_transfer_of_another_authorization_in_the_same_batch_never_counts_as_this_one(
    base_chain: DevChain,
) -> None:
    # Same payer, same payee, same amount, two nonces; only one can be paid (the payer holds one price).
    first = make_payment(base_chain, amount=10_000, funds=10_000)
    req = requirement(base_chain, amount=10_000, pay_to=first.pay_to)
    resource = {"url": "https://example.test/x", "description": "d", "mimeType": "application/json"}
    _, header = sign_exact_payment(first.payer, Option(2, wire_of(req, 2), resource))
    wire = [exact(first), parse_exact_payment(header.encode(), "payment-signature")]
    async with settled(base_chain, wire) as run:
        verdicts = [
            await run.pays(base_chain, first, w.authorization, tx_hash)
            for w, tx_hash in zip(wire, run.outcomes, strict=True)
        ]
        assert sorted(verdicts) == [False, True]  # one Transfer in the logs: it answers for one authorization only
        assert base_chain.balance(first.pay_to) == 10_000


async def test_a_batch_that_could_not_be_recorded_whole_never_leaves_and_the_rest_go_in_the_next(
    base_chain: DevChain,
) -> None:
    payments = [make_payment(base_chain) for _ in range(6)]
    wire = [exact(p) for p in payments]
    async with settled(base_chain, wire, failing_record=frozenset({2})) as run:
        assert isinstance(run.outcomes[2], StoreUnavailable)
        assert base_chain.balance(payments[2].pay_to) == 0  # never settled
        abandoned = [h for i, hashes in run.recorded.items() if i != 2 for h in hashes[:-1]]
        assert abandoned  # the others did record the first batch's hash, then a new one
        for tx_hash in abandoned:
            assert base_chain.rpc("eth_getTransactionByHash", [tx_hash]) is None  # that batch never left
        for i, tx_hash in enumerate(run.outcomes):
            if i != 2:
                assert run.recorded[i][-1] == tx_hash
                assert await run.pays(base_chain, payments[i], wire[i].authorization, tx_hash)
