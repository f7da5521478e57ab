"""A settlement waits for its receipt as long as the chain needs (gateway/chain/watcher.py, relayer.py): looked up
the moment it is broadcast, answered by the broadcast itself where the node offers ``eth_sendRawTransactionSync``
(support learned once per endpoint, a plain broadcast where it is missing), and a broadcast waiting for its block
never holds back the next nonce."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from eth_account import Account

from gateway.chain.relayer import Relayer
from gateway.chain.rpc import ChainRpc
from gateway.chain.watcher import ReceiptWatcher
from gateway.config import Secret
from gateway.dev.chain import DevChain, set_eth_balance, start_dev_chain
from tests.support.servers import serve_asgi

SYNC = "eth_sendRawTransactionSync"


@dataclass
class CountingRelay:
    """JSON-RPC to ``target``, counting every method asked; ``refuse`` methods get "method not found" (a node
    without them), as geth answers a method it does not have."""

    target: str
    refuse: frozenset[str] = frozenset()
    asked: list[tuple[str, list[Any]]] = field(default_factory=list)

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.asked if m == method)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = json.loads(body)
        items = request if isinstance(request, list) else [request]
        self.asked += [(item["method"], item.get("params", [])) for item in items]
        refused = [item for item in items if item["method"] in self.refuse]
        if refused and not isinstance(request, list):
            error = {"code": -32601, "message": f"the method {request['method']} does not exist/is not available"}
            answer = json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}).encode()
        else:
            async with (
                aiohttp.ClientSession() as session,
                session.post(self.target, data=body, headers={"content-type": "application/json"}) as resp,
            ):
                answer = await resp.read()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


@contextlib.contextmanager
def relayed(chain: DevChain, refuse: frozenset[str] = frozenset()) -> Iterator[tuple[CountingRelay, str]]:
    relay = CountingRelay(chain.url, refuse)
    with serve_asgi(relay, lifespan="off") as url:
        yield relay, url


@contextlib.asynccontextmanager
async def settling(
    url: str, chain: DevChain, *, interval: float = 0.1
) -> AsyncIterator[tuple[Relayer, ReceiptWatcher]]:
    """A relayer on a fresh funded key and the network's receipt watcher, both on the RPC at ``url``."""
    key = "0x" + os.urandom(32).hex()
    set_eth_balance(chain.anvil, Account.from_key(key).address, 10**20)
    async with aiohttp.ClientSession() as session:
        rpc = ChainRpc("base", chain.chain_id, [Secret(url)])
        await rpc.start(session)
        relayer = Relayer(rpc, Secret(key))
        watcher = ReceiptWatcher(rpc, interval=interval)
        try:
            yield relayer, watcher
        finally:
            await relayer.aclose()
            await watcher.aclose()
            await rpc.aclose()


async def _noop(tx_hash: str) -> None:
    return None


async def settle(relayer: Relayer, watcher: ReceiptWatcher, *, timeout: float = 10.0) -> dict[str, Any]:
    tx_hash = await relayer.submit(Account.create().address, b"", 21_000, _noop)
    return await watcher.wait(tx_hash, timeout=timeout)


def test_a_broadcast_hash_is_looked_up_at_once_not_after_the_poll_interval(base_chain: DevChain) -> None:
    # Plain broadcasts (no eth_sendRawTransactionSync): the watcher alone finds the receipts. With a 60 s poll
    # interval, a second settlement handed in while the watcher is between polls is still looked up at once.
    async def run() -> None:
        with relayed(base_chain, refuse=frozenset({SYNC})) as (_, url):
            async with settling(url, base_chain, interval=60.0) as (relayer, watcher):
                for _ in range(3):
                    receipt = await settle(relayer, watcher, timeout=10.0)
                    assert int(receipt["status"], 16) == 1

    asyncio.run(run())


def test_a_node_that_answers_the_broadcast_with_its_receipt_is_not_polled_for_it(base_chain: DevChain) -> None:
    async def run() -> None:
        with relayed(base_chain) as (relay, url):
            async with settling(url, base_chain) as (relayer, watcher):
                relayer.accept_window = 10.0  # (however slow the machine: the broadcast's own answer is awaited)
                receipts = [await settle(relayer, watcher) for _ in range(3)]
        assert all(int(r["status"], 16) == 1 for r in receipts)
        # Every settlement went out through the synchronous broadcast (after one probe that sends nothing) ...
        real = [params for method, params in relay.asked if method == SYNC and params != ["0x"]]
        assert len(real) == 3
        assert relay.asked.count((SYNC, ["0x"])) == 1
        # ... and nobody asked for a receipt the broadcast had already answered with.
        assert relay.count("eth_getTransactionReceipt") == 0

    asyncio.run(run())


def test_an_endpoint_without_the_synchronous_broadcast_gets_plain_broadcasts_and_is_asked_once(
    base_chain: DevChain,
) -> None:
    async def run() -> None:
        with relayed(base_chain, refuse=frozenset({SYNC})) as (relay, url):
            async with settling(url, base_chain) as (relayer, watcher):
                receipts = [await settle(relayer, watcher) for _ in range(3)]
        assert all(int(r["status"], 16) == 1 for r in receipts)
        assert relay.count(SYNC) == 1  # the probe, with an empty transaction: nothing was sent by it
        assert relay.count("eth_sendRawTransaction") == 3

    asyncio.run(run())


def test_a_broadcast_waiting_for_its_block_does_not_hold_back_the_next_nonce() -> None:
    # A chain that mines only when told: the first settlement's synchronous broadcast gets no answer until then.
    # The sender goes on to the next nonce once the node holds the first transaction, so both are in the pool,
    # and one block carries both.
    chain = start_dev_chain(8453)
    try:
        chain.rpc("evm_setAutomine", [False])

        async def run() -> None:
            with relayed(chain) as (relay, url):
                async with settling(url, chain) as (relayer, watcher):
                    first = await relayer.submit(Account.create().address, b"", 21_000, _noop)
                    second = await relayer.submit(Account.create().address, b"", 21_000, _noop)
                    assert relay.count(SYNC) >= 2  # the probe, and the first settlement's broadcast
                    pool = chain.rpc("txpool_content")["pending"]
                    assert sum(len(txs) for txs in pool.values()) == 2
                    chain.rpc("evm_mine", [])
                    a, b = await asyncio.gather(watcher.wait(first, timeout=30), watcher.wait(second, timeout=30))
            assert a["blockNumber"] == b["blockNumber"]
            assert int(a["status"], 16) == int(b["status"], 16) == 1

        asyncio.run(run())
    finally:
        chain.stop()


@pytest.mark.parametrize("confirmations", [2])
def test_a_receipt_the_broadcast_answered_with_still_waits_for_its_confirmations(
    base_chain: DevChain, confirmations: int
) -> None:
    # The broadcast's receipt says "mined": a wait for two blocks still waits for the second one.
    async def run() -> None:
        with relayed(base_chain) as (_, url):
            async with settling(url, base_chain, interval=0.02) as (relayer, watcher):
                tx_hash = await relayer.submit(Account.create().address, b"", 21_000, _noop)
                waiting = asyncio.ensure_future(watcher.wait(tx_hash, timeout=30, confirmations=confirmations))
                await asyncio.sleep(0.3)
                assert not waiting.done()
                base_chain.rpc("evm_mine", [])
                receipt = await waiting
                assert int(receipt["status"], 16) == 1

    asyncio.run(run())
