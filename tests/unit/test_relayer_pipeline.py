"""The pipelined relayer (gateway/chain/relayer.py): fast signing is byte-identical to eth_account, many settlements in
flight never leave a nonce gap behind, and a settlement that cannot be recorded never leaves at all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from coincurve import PrivateKey
from eth_account import Account

from gateway.chain.relayer import Relayer
from gateway.chain.rpc import ChainRpc
from gateway.chain.transactions import sign_eip1559
from gateway.chain.watcher import ReceiptWatcher
from gateway.config import Secret
from gateway.dev.chain import DevChain, set_eth_balance, start_dev_chain
from gateway.errors import StoreUnavailable


@pytest.mark.parametrize("seed", range(20))
def test_fast_signing_is_byte_identical_to_eth_account(seed: int) -> None:
    rng = random.Random(seed)
    account = Account.create()
    to = Account.create().address
    data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 55, 56, 260, 1000])))
    nonce, gas = rng.choice([0, 1, 127, 128, 2**20]), rng.randint(21_000, 10**6)
    max_fee, priority = rng.randint(10**9, 10**12), rng.choice([0, 1, 10**9])
    chain_id = rng.choice([1, 137, 8453, 84532])
    expected = account.sign_transaction(
        {
            "type": 2,
            "chainId": chain_id,
            "nonce": nonce,
            "to": to,
            "data": "0x" + data.hex(),
            "value": 0,
            "gas": gas,
            "maxFeePerGas": max_fee,
            "maxPriorityFeePerGas": priority,
        }
    )
    tx_hash, raw = sign_eip1559(PrivateKey(bytes(account.key)), chain_id, nonce, to, data, gas, max_fee, priority)
    assert raw == expected.raw_transaction.to_0x_hex()
    assert tx_hash == expected.hash.to_0x_hex()


async def _storm(chain: DevChain, key: str, failing: set[int], n: int) -> tuple[list[object], ChainRpc]:
    async with aiohttp.ClientSession() as session:
        rpc = ChainRpc("base", chain.chain_id, [Secret(chain.url)])
        await rpc.start(session)
        relayer = Relayer(rpc, Secret(key))
        watcher = ReceiptWatcher(rpc, interval=0.02)
        recorded: list[str] = []

        async def one(i: int) -> object:
            async def record(tx_hash: str) -> None:
                await asyncio.sleep(random.random() / 100)  # records finish out of nonce order
                if i in failing:
                    raise StoreUnavailable("store down for this one")
                recorded.append(tx_hash)

            try:
                tx_hash = await relayer.submit(Account.create().address, b"", 21_000, record)
            except StoreUnavailable as exc:
                return exc
            assert tx_hash in recorded  # recorded before it was broadcast
            return await watcher.wait(tx_hash, timeout=20)

        try:
            results = await asyncio.gather(*(one(i) for i in range(n)))
            return results, rpc
        finally:
            await relayer.aclose()
            await watcher.aclose()


def test_many_settlements_in_flight_and_unrecorded_ones_never_leave(base_chain: DevChain) -> None:
    key = "0x" + os.urandom(32).hex()
    address = Account.from_key(key).address
    set_eth_balance(base_chain.anvil, address, 10**20)
    failing = {3, 11, 12, 29}
    results, _ = asyncio.run(_storm(base_chain, key, failing, 40))
    for i, result in enumerate(results):
        if i in failing:
            assert isinstance(result, StoreUnavailable)
        else:
            assert isinstance(result, dict) and int(result["status"], 16) == 1, result
    # Every nonce was used (the unrecorded ones by a no-op to ourselves) and none is stuck in the pool.
    latest = int(base_chain.rpc("eth_getTransactionCount", [address, "latest"]), 16)
    pending = int(base_chain.rpc("eth_getTransactionCount", [address, "pending"]), 16)
    assert latest == pending == 40


def test_batched_broadcasts_on_an_interval_mined_chain_leave_no_gap() -> None:
    # Not automining: the relayer sends up to max_batch transactions per request (see Relayer.max_batch).
    chain = start_dev_chain(8453, block_time=1)
    try:
        key = "0x" + os.urandom(32).hex()
        address = Account.from_key(key).address
        set_eth_balance(chain.anvil, address, 10**20)
        failing = {0, 7, 39}
        results, _ = asyncio.run(_storm(chain, key, failing, 40))
        assert sum(isinstance(r, dict) and int(r["status"], 16) == 1 for r in results) == 40 - len(failing)
        assert all(isinstance(results[i], StoreUnavailable) for i in failing)
        latest = int(chain.rpc("eth_getTransactionCount", [address, "latest"]), 16)
        assert latest == int(chain.rpc("eth_getTransactionCount", [address, "pending"]), 16) == 40
    finally:
        chain.stop()


# ------------------------------------------------------------------------- a stuck nonce never stalls settlement
# docs/threat-model.md T29: a transaction that disappears (dropped from the mempool, reorganised away, evicted for
# its fee) leaves the local sequence ahead of the node's; the nonce keeper repairs it within seconds, no restart.


class Pipeline:
    """A relayer on its own key, a watcher, and every hash each submission recorded."""

    def __init__(self, chain: DevChain, rpc: ChainRpc, relayer: Relayer) -> None:
        self.chain = chain
        self.rpc = rpc
        self.relayer = relayer
        self.watcher = ReceiptWatcher(rpc, interval=0.02)
        self.recorded: dict[int, list[str]] = {}

    async def submit(self, i: int) -> str:
        self.recorded[i] = []

        async def record(tx_hash: str) -> None:
            self.recorded[i].append(tx_hash)

        return await self.relayer.submit(Account.create().address, b"", 21_000, record)

    async def mined(self, tx_hash: str, timeout: float = 30) -> dict[str, object]:
        receipt = await self.watcher.wait(tx_hash, timeout=timeout)
        assert int(str(receipt["status"]), 16) == 1
        return receipt


@contextlib.asynccontextmanager
async def pipeline(chain: DevChain) -> AsyncIterator[Pipeline]:
    async with aiohttp.ClientSession() as session:
        rpc = ChainRpc("base", chain.chain_id, [Secret(chain.url)])
        await rpc.start(session)
        key = "0x" + os.urandom(32).hex()
        set_eth_balance(chain.anvil, Account.from_key(key).address, 10**20)
        relayer = Relayer(rpc, Secret(key))
        p = Pipeline(chain, rpc, relayer)
        try:
            yield p
        finally:
            await relayer.aclose()
            await p.watcher.aclose()


def counts(chain: DevChain, address: str) -> tuple[int, int]:
    latest = int(chain.rpc("eth_getTransactionCount", [address, "latest"]), 16)
    return latest, int(chain.rpc("eth_getTransactionCount", [address, "pending"]), 16)


@pytest.fixture
def interval_chain() -> Iterator[DevChain]:
    chain = start_dev_chain(8453, block_time=1)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture
def automine_chain() -> Iterator[DevChain]:
    chain = start_dev_chain(8453)
    try:
        yield chain
    finally:
        chain.stop()


async def test_a_transaction_dropped_from_the_mempool_is_sent_again_and_later_ones_are_mined(
    interval_chain: DevChain,
) -> None:
    chain = interval_chain
    async with pipeline(chain) as p:
        chain.rpc("evm_setIntervalMining", [0])  # hold the blocks: the first transaction waits in the mempool
        dropped = await p.submit(0)
        chain.rpc("anvil_dropTransaction", [dropped])
        assert chain.rpc("eth_getTransactionByHash", [dropped]) is None
        later = [await p.submit(1), await p.submit(2)]  # behind a gap: the node cannot mine them
        chain.rpc("evm_setIntervalMining", [1])
        for tx_hash in [dropped, *later]:
            await p.mined(tx_hash)  # the dropped one under its own (recorded) hash: sent again as it was
        assert p.recorded[0] == [dropped]
        assert counts(chain, p.relayer.address) == (3, 3)


async def test_a_reorg_that_rewinds_the_sequence_does_not_stall_the_next_settlement(automine_chain: DevChain) -> None:
    chain = automine_chain
    async with pipeline(chain) as p:
        first = await p.submit(0)
        await p.mined(first)
        chain.rpc("anvil_reorg", [1, []])  # the node's count goes back to 0; ours stays at 1
        assert counts(chain, p.relayer.address) == (0, 0)
        second = await p.submit(1)
        await p.mined(second)
        await p.mined(first)  # it would still succeed: sent again under its own hash
        assert counts(chain, p.relayer.address) == (2, 2)


async def test_a_gap_whose_transaction_is_unknown_is_filled_with_a_no_op(automine_chain: DevChain) -> None:
    chain = automine_chain
    async with pipeline(chain) as p:
        p.relayer.retain = 0.0  # mined transactions are forgotten at once: the reorg leaves an unknown hole
        first = await p.submit(0)
        await p.mined(first)
        await asyncio.sleep(p.relayer.check_interval * 1.5)  # a nonce check prunes it
        chain.rpc("anvil_reorg", [1, []])
        second = await p.submit(1)
        await p.mined(second)
        assert chain.rpc("eth_getTransactionReceipt", [first]) is None  # never sent again
        assert counts(chain, p.relayer.address) == (2, 2)
        head = int(chain.rpc("eth_blockNumber"), 16)
        ours = [
            tx
            for n in range(head + 1)
            for tx in chain.rpc("eth_getBlockByNumber", [hex(n), True])["transactions"]
            if tx["from"].lower() == p.relayer.address.lower()
        ]
        (filler,) = [tx for tx in ours if int(tx["nonce"], 16) == 0]
        assert filler["to"].lower() == p.relayer.address.lower() and int(filler["value"], 16) == 0
        assert filler["input"] == "0x"


async def test_a_transaction_evicted_for_its_fee_is_replaced_at_a_higher_price_under_a_recorded_hash(
    interval_chain: DevChain,
) -> None:
    chain = interval_chain
    async with pipeline(chain) as p:
        chain.rpc("evm_setIntervalMining", [0])
        first = await p.submit(0)
        price = int(chain.rpc("eth_gasPrice"), 16)
        chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(price * 100)])
        chain.rpc("evm_mine", [])  # the base fee jumps past the transaction's cap: the node evicts it
        assert chain.rpc("eth_getTransactionByHash", [first]) is None
        for _ in range(100):  # the keeper replaces it (and records the replacement before it leaves)
            if len(p.recorded[0]) == 2 and chain.rpc("eth_getTransactionByHash", [p.recorded[0][1]]):
                break
            await asyncio.sleep(0.1)
        replacement = p.recorded[0][-1]
        assert replacement != first
        chain.rpc("evm_setIntervalMining", [1])
        await p.mined(replacement)
        assert chain.rpc("eth_getTransactionReceipt", [first]) is None
        assert counts(chain, p.relayer.address) == (1, 1)


async def test_a_settlement_refused_for_its_fee_is_signed_again_at_the_same_nonce(interval_chain: DevChain) -> None:
    chain = interval_chain
    async with pipeline(chain) as p:
        chain.rpc("evm_setIntervalMining", [0])
        await p.relayer._fees_now()  # a price read just before the base fee jumps (cached for fee_ttl)
        price = int(chain.rpc("eth_gasPrice"), 16)
        chain.rpc("anvil_setNextBlockBaseFeePerGas", [hex(price * 100)])
        chain.rpc("evm_mine", [])
        tx_hash = await p.submit(0)  # refused "max fee per gas less than block base fee", then priced afresh
        assert len(p.recorded[0]) == 2 and p.recorded[0][-1] == tx_hash
        chain.rpc("evm_setIntervalMining", [1])
        await p.mined(tx_hash)
        assert counts(chain, p.relayer.address) == (1, 1)
