"""A claim transaction must be one the node takes: geth's txpool (and op-geth's, Base's) refuses a transaction over
128 KiB, and a claim row is ~482 bytes of calldata, so a batch sized by gas alone (~390 rows at the dev contract's
cost) would be refused on every pass once that many channels are due together. Claim batches are capped at 200 rows,
and a batch the node refuses anyway is split, as one whose simulation fails is.

The channels owing here are made cheaply: their balances written into the contract's storage, their vouchers signed
here and their charges committed straight into the gateway's channel store. The node is anvil behind a proxy that
refuses what geth would (or, for the split, less).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_utils.crypto import keccak

from gateway.dev.chain import BATCH_SETTLEMENT_ADDRESS, DevChain, start_dev_chain
from gateway.storage.channels import Channel, open_channel_store
from tests.sessions.crafted import CraftedChannel
from tests.sessions.rpc_proxy import GETH_TX_MAX_SIZE, RpcProxy, oversized, raw_size
from tests.sessions.test_official_client_sessions import engine_of, wait_for
from tests.support.gateway import AUTHORIZER_KEY, SESSIONS, running_gateway, sqlite_url
from tests.support.servers import serve_asgi

PRICE = 1_000
DEPOSIT = 10_000
ROUTES: list[dict[str, Any]] = [{"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]}]
# Everything owed is claimed a second after the gateway first saw it. By gas alone (12M per transaction at the dev
# contract's ~20,300 per row) a batch could hold ~590 rows.
CLAIMING = {
    **SESSIONS,
    "min_deposit": "0.01",
    "claim_interval": 0.2,
    "claim_after": 1.0,
    "settle_interval": 0.2,
    "claim_gas_per_voucher": 20_300,
    "max_claim_gas": 12_000_000,
}


@pytest.fixture(scope="module")
def chain() -> Iterator[DevChain]:
    dev = start_dev_chain(8453)
    try:
        yield dev
    finally:
        dev.stop()


def owing_channels(chain: DevChain, store_url: str, pay_to: str, n: int) -> list[CraftedChannel]:
    """``n`` channels to ``pay_to``, each funded with ``DEPOSIT`` on chain and charged ``PRICE`` in the store."""
    offer = {
        "network": chain.network,
        "payTo": pay_to,
        "asset": chain.usdc,
        "extra": {"receiverAuthorizer": Account.from_key(AUTHORIZER_KEY).address, "withdrawDelay": 900},
    }
    payer = Account.create()
    channels = [CraftedChannel.from_offer(payer, offer) for _ in range(n)]
    writes = []
    for i, ch in enumerate(channels):
        slot = keccak(bytes.fromhex(ch.id[2:]) + (0).to_bytes(32, "big"))  # channels[id]: balance, totalClaimed
        params = [BATCH_SETTLEMENT_ADDRESS, "0x" + slot.hex(), "0x" + f"{DEPOSIT:064x}"]
        writes.append({"jsonrpc": "2.0", "id": i, "method": "anvil_setStorageAt", "params": params})
    assert all("error" not in a for a in httpx.post(chain.url, json=writes, timeout=60).json())
    chain.mint(BATCH_SETTLEMENT_ADDRESS, n * DEPOSIT)  # the deposits' tokens, for the sweep to move
    vouchers = [ch.voucher(PRICE)["signature"] for ch in channels]

    async def commit_charges() -> None:
        store = open_channel_store(store_url)
        now = time.time()
        try:
            for ch, signature in zip(channels, vouchers, strict=True):
                c = ch.config()
                await store.open(
                    Channel(
                        channel_id=ch.id,
                        chain_id=chain.chain_id,
                        payer=c["payer"],
                        payer_authorizer=c["payerAuthorizer"],
                        receiver=c["receiver"],
                        receiver_authorizer=c["receiverAuthorizer"],
                        token=c["token"],
                        withdraw_delay=c["withdrawDelay"],
                        salt=c["salt"],
                        balance=DEPOSIT,
                    ),
                    now=now,
                )
                await store.begin(
                    ch.id, "seed", expected_charged=0, voucher_max=PRICE, signature=signature, now=now, lease=30
                )
                assert await store.commit(ch.id, "seed", PRICE, now=now) is not None
        finally:
            await store.aclose()

    asyncio.run(commit_charges())
    return channels


def claim_sizes(proxy: RpcProxy) -> list[int]:
    return [raw_size(call) for call in proxy.sent()]


def test_450_channels_due_together_are_claimed_in_transactions_of_at_most_200_rows(
    chain: DevChain, tmp_path: Path
) -> None:
    store, pay_to = sqlite_url(tmp_path), Account.create().address
    channels = owing_channels(chain, store, pay_to, 450)
    proxy = RpcProxy(chain.url)
    proxy.fault = oversized(GETH_TX_MAX_SIZE)
    with serve_asgi(proxy) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(
            chain, store_url=store, routes=ROUTES, sessions=CLAIMING, pay_to=pay_to, networks=networks
        ) as gw:
            stats = engine_of(gw).claimer.stats
            wait_for(lambda: stats.vouchers_claimed == 450, timeout=60)
            wait_for(lambda: chain.balance(pay_to) == 450 * PRICE, timeout=20)  # and swept
            assert stats.claim_transactions == 3  # 200 + 200 + 50
    assert proxy.refused == []  # the node took every transaction it was sent
    assert max(claim_sizes(proxy)) <= 100 * 1024
    assert all(ch.onchain(chain).total_claimed == PRICE for ch in channels[::50])


def test_a_claim_the_node_refuses_is_split_not_sent_again_whole(chain: DevChain, tmp_path: Path) -> None:
    store, pay_to = sqlite_url(tmp_path), Account.create().address
    owing_channels(chain, store, pay_to, 200)
    proxy = RpcProxy(chain.url)
    proxy.fault = oversized(64 * 1024)  # a stricter node: 200 rows are too many, 100 are not
    with serve_asgi(proxy) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(
            chain, store_url=store, routes=ROUTES, sessions=CLAIMING, pay_to=pay_to, networks=networks
        ) as gw:
            stats = engine_of(gw).claimer.stats
            wait_for(lambda: stats.vouchers_claimed == 200, timeout=60)
            wait_for(lambda: chain.balance(pay_to) == 200 * PRICE, timeout=20)
            assert stats.claim_transactions == 2  # the refused batch, in halves
    # One transaction refused (the relayer may offer it more than one way), never signed and offered whole again.
    assert len({call["params"][0] for call in proxy.refused}) == 1
    assert max(claim_sizes(proxy)) <= 64 * 1024
