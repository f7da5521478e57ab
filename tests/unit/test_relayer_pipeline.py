"""The pipelined relayer (gateway/chain/relayer.py): fast signing is byte-identical to eth_account, many settlements in
flight never leave a nonce gap behind, and a settlement that cannot be recorded never leaves at all."""

from __future__ import annotations

import asyncio
import os
import random

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
