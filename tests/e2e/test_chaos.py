"""Chaos: a short paid load while the chain reorganises, a settlement transaction vanishes from the mempool and
Redis restarts. Afterwards every served request was paid on chain exactly once, and every payment whose money
moved was served (docs/threat-model.md T28, T29, T31 and the money invariant as a whole).

The clients behave like real ones: each retries its own payment (never a new one) on 503 and 409 until it is
served or refused.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from eth_abi import decode

from gateway.chain import abi
from gateway.dev.chain import DevChain, start_dev_chain
from gateway.dev.redis_server import RedisServer
from tests.e2e.helpers import decode_payment
from tests.support.gateway import running_gateway

PRICE = 100_000
PAYMENTS = 24


def authorization_used(chain: DevChain, payer: str, nonce: str) -> bool:
    data = abi.AUTHORIZATION_STATE.encode(payer, bytes.fromhex(nonce[2:]))
    out = chain.rpc("eth_call", [{"to": chain.usdc, "data": "0x" + data.hex()}, "latest"])
    (used,) = decode(["bool"], bytes.fromhex(out[2:]))
    return bool(used)


def until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return bool(condition())


def test_paid_load_through_a_reorg_a_dropped_transaction_and_a_redis_restart_is_paid_exactly_once(
    tmp_path: Path,
) -> None:
    chain = start_dev_chain(8453)
    redis_server = RedisServer(persistent=True).start()
    try:
        networks = {"base": {"rpc_urls": [chain.url], "receipt_poll_interval": 0.05, "confirmations": 1}}
        with running_gateway(
            chain,
            store_url=redis_server.url,
            networks=networks,
            payment={"settle_timeout": 5.0},
            store={"heartbeat_seconds": 2.0},
        ) as gw:
            before = chain.balance(gw.pay_to)
            payments: list[tuple[str, dict[str, str]]] = []
            for _ in range(PAYMENTS):
                payer = chain.new_payer(1_000_000)
                name, value = gw.sign(payer, httpx.post(gw.url + "/paid"))
                payments.append((payer.address, {name: value}))
            outcomes: dict[int, int] = {}
            served = threading.Semaphore(0)

            def client(i: int) -> None:
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    try:
                        r = httpx.post(gw.url + "/paid", headers=payments[i][1], timeout=30)
                    except httpx.HTTPError:
                        time.sleep(0.3)
                        continue
                    if r.status_code in (503, 409):
                        time.sleep(0.3)
                        continue
                    outcomes[i] = r.status_code
                    if r.status_code == 200:
                        served.release()
                    return
                outcomes[i] = 0  # never answered for good

            def chaos() -> None:
                for _ in range(PAYMENTS // 4):
                    served.acquire(timeout=30)
                chain.rpc("anvil_reorg", [1, []])  # the last settlement's block is gone
                for _ in range(PAYMENTS // 4):
                    served.acquire(timeout=30)
                chain.rpc("evm_setAutomine", [False])
                pending: list[str] = []
                until(lambda: bool(pending.extend(_pending_hashes(chain)) or pending), 10)
                for tx_hash in pending[:1]:
                    chain.rpc("anvil_dropTransaction", [tx_hash])  # vanished from the mempool
                chain.rpc("evm_setAutomine", [True])
                chain.rpc("evm_mine", [])
                for _ in range(PAYMENTS // 4):
                    served.acquire(timeout=30)
                redis_server.stop()
                time.sleep(1.0)
                redis_server.start()

            faults = threading.Thread(target=chaos, daemon=True)
            faults.start()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(client, range(PAYMENTS)))
            faults.join(60)

            served_ids = [i for i, status in outcomes.items() if status == 200]
            # Re-submissions after the reorg land in their own time: wait until the money of every served request
            # is on chain again (or give up and let the assertions below say what is missing).
            until(lambda: chain.balance(gw.pay_to) - before == len(served_ids) * PRICE, 60)
            moved = [
                i
                for i, (payer, headers) in enumerate(payments)
                if authorization_used(chain, payer, decode_payment(next(iter(headers.values())))[0]["nonce"])
            ]
            assert sorted(moved) == sorted(served_ids), (outcomes, moved)  # charged <=> served
            assert chain.balance(gw.pay_to) - before == len(served_ids) * PRICE  # each exactly once
            assert len(gw.upstream.requests) >= len(served_ids)
            assert len(served_ids) >= PAYMENTS - 2, outcomes  # the faults may cost a payment or two, never money
    finally:
        redis_server.stop()
        chain.stop()


def _pending_hashes(chain: DevChain) -> list[str]:
    pool = chain.rpc("txpool_content", [])
    hashes: list[str] = []
    for by_nonce in (pool or {}).get("pending", {}).values():
        for tx in by_nonce.values():
            hashes.append(str(tx["hash"]))
    return hashes
