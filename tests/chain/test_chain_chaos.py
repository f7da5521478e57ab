"""Chain chaos: a real ``x402-gateway serve`` under paid load while its RPC misbehaves, its node stops, restarts or
reorganises, its transactions vanish from the mempool, its nonce is taken, its gas money runs out or it is killed
mid-batch. Afterwards the money invariant must hold (docs/threat-model.md T12, T18, T22, T28, T29): every served
request paid exactly once on chain, nothing paid that was not served, no 402 for a payment that pays (a fault of
ours is a 5xx), no attempt hanging past its bound, and the relayer back on its own (a fresh payment served, no nonce
gap left). The rig is :mod:`tests.chain.chaos_rig`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.dev.anvil import set_eth_balance
from gateway.dev.chain import DevChain, start_dev_chain
from tests.chain.chaos_rig import (
    Load,
    RpcProxy,
    Served,
    anvil_stopped,
    foreign_transaction,
    recovers,
    restart_anvil,
    settled_view,
    violations,
)
from tests.support.servers import RecordingUpstream, serve_asgi

PAYERS = 3


@pytest.fixture(params=[None], ids=["automine"])
def chain(request: pytest.FixtureRequest) -> Iterator[DevChain]:
    chain = start_dev_chain(8453, block_time=request.param)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture
def upstream_url() -> Iterator[str]:
    with serve_asgi(RecordingUpstream()) as url:
        yield url


def _finish(served: Served, chain: DevChain, load: Load) -> None:
    load.stop()
    problems = settled_view(chain, served.pay_to, load.payments)
    problems += recovers(served, chain, load)
    problems += settled_view(chain, served.pay_to, load.payments, timeout=5)
    assert not problems, "\n".join(problems) + "\n--- gateway log ---\n" + served.log_text()[-6000:]
    assert load.served() >= 5


def test_paid_load_through_a_misbehaving_rpc_is_paid_exactly_once(
    chain: DevChain, upstream_url: str, tmp_path: Path
) -> None:
    with RpcProxy(chain.url, seed=1) as proxy:
        served = Served(tmp_path, rpc_url=proxy.url, relayer_key=chain.relayer_key, upstream_url=upstream_url).start()
        try:
            load = Load(served.url, chain, PAYERS).start()
            assert load.wait_served(3)
            proxy.faults.delay, proxy.faults.delay_rate = 1.0, 0.3
            time.sleep(4)
            proxy.calm()
            proxy.faults.status_rate = 0.2
            time.sleep(4)
            proxy.calm()
            proxy.faults.drop_rate = 0.1
            time.sleep(4)
            proxy.calm()
            proxy.faults.duplicate_rate, proxy.faults.partial_rate, proxy.faults.shuffle_rate = 0.3, 0.2, 0.5
            time.sleep(4)
            proxy.calm()
            with anvil_stopped(chain):
                time.sleep(4)
            assert load.wait_served(2)
            _finish(served, chain, load)
        finally:
            served.stop()


def test_a_settlement_retry_the_chain_could_not_answer_hands_its_claim_over(
    chain: DevChain, upstream_url: str, tmp_path: Path
) -> None:
    """A retry that took over a claim with a recorded settlement hash the node never saw, and then met an RPC
    failure while settling (503 chain_unavailable), must end its lease like any other unknown settlement
    (docs/threat-model.md T31): the next presentation is served, not refused 409 ``payment_in_flight`` until the
    claim's lease lapses (120 s)."""
    with RpcProxy(chain.url) as proxy:
        served = Served(tmp_path, rpc_url=proxy.url, relayer_key=chain.relayer_key, upstream_url=upstream_url).start()
        try:
            load = Load(served.url, chain, 1)
            payment = load.sign(load.accounts[0])
            with httpx.Client(base_url=served.url, timeout=60) as http:

                def present() -> httpx.Response:
                    return http.post("/paid", json={}, headers=dict([payment.header]))

                # 1. The broadcast never reaches the node (its connection is reset): recorded, fate unknown.
                proxy.faults.rule = lambda methods: "reset" if any("sendRaw" in m for m in methods) else None
                first = present()
                assert (first.status_code, first.json()["error"]) == (503, "settlement_pending"), first.text
                # 2. The retry takes the claim over, finds the hash unknown to the node, and settles afresh; the
                # re-check of balance and nonce just before it (two eth_calls) gets no answer.
                proxy.faults.rule = lambda methods: "refuse" if methods == ["eth_call", "eth_call"] else None
                second = present()
                assert (second.status_code, second.json()["error"]) == (503, "chain_unavailable"), second.text
                # 3. The chain answers again: the very next presentation is served, and paid once.
                proxy.calm()
                third = present()
                assert third.status_code == 200, third.text
            payment.final = 200
            assert not violations(chain, served.pay_to, load.payments), violations(chain, served.pay_to, load.payments)
        finally:
            served.stop()


@pytest.mark.parametrize("chain", [1], indirect=True, ids=["interval-mined"])
def test_paid_load_through_a_node_restarted_from_its_state_dump_is_paid_exactly_once(
    chain: DevChain, upstream_url: str, tmp_path: Path
) -> None:
    """anvil killed and started again from a dump of its state (its mempool gone), twice, under load."""
    with RpcProxy(chain.url, seed=2) as proxy:
        served = Served(tmp_path, rpc_url=proxy.url, relayer_key=chain.relayer_key, upstream_url=upstream_url).start()
        try:
            load = Load(served.url, chain, PAYERS).start()
            for _ in range(2):
                assert load.wait_served(3)
                restart_anvil(chain, proxy)
            assert load.wait_served(3)
            _finish(served, chain, load)
        finally:
            served.stop()


@pytest.mark.parametrize("chain", [1], indirect=True, ids=["interval-mined"])
def test_paid_load_through_dropped_stuck_and_foreign_transactions_is_paid_exactly_once(
    chain: DevChain, upstream_url: str, tmp_path: Path
) -> None:
    """Blocks every second, automine off: the relayer's transactions are dropped from the pool while pending, a
    stuck transaction (fee below the base fee) and another sender's transaction take its key's next nonce, and the
    key's nonce is moved on under it (anvil_setNonce)."""
    rng = random.Random(3)
    with RpcProxy(chain.url) as proxy:
        served = Served(tmp_path, rpc_url=proxy.url, relayer_key=chain.relayer_key, upstream_url=upstream_url).start()
        try:
            load = Load(served.url, chain, PAYERS).start()
            assert load.wait_served(3)
            for _ in range(4):
                time.sleep(rng.uniform(0.2, 1.5))
                pool = chain.rpc("txpool_content")["pending"].get(served.relayer.lower(), {})
                pool = pool or chain.rpc("txpool_content")["pending"].get(served.relayer, {})
                for tx in list(pool.values())[:1]:
                    chain.rpc("anvil_dropTransaction", [tx["hash"]])
                time.sleep(rng.uniform(0.2, 1.5))
                chain.rpc("anvil_dropAllTransactions")
            assert load.wait_served(3)
            foreign_transaction(chain, chain.relayer_key, max_fee=1, priority=1)  # stuck: below the base fee
            assert load.wait_served(3)
            foreign_transaction(chain, chain.relayer_key)  # someone else with our key takes the next nonce
            assert load.wait_served(3)
            latest = int(chain.rpc("eth_getTransactionCount", [served.relayer, "latest"]), 16)
            chain.rpc("anvil_setNonce", [served.relayer, hex(latest + 3)])
            assert load.wait_served(3)
            _finish(served, chain, load)
        finally:
            served.stop()


@pytest.mark.parametrize("chain", [1], indirect=True, ids=["interval-mined"])
@pytest.mark.parametrize(("store", "confirmations"), [("sqlite", 0), ("sqlite", 2), ("redis", 0), ("redis", 2)])
def test_paid_load_through_reorgs_is_paid_exactly_once(
    chain: DevChain, upstream_url: str, tmp_path: Path, request: pytest.FixtureRequest, store: str, confirmations: int
) -> None:
    """Reorgs of depth 1 to 5 at random moments after paid requests were served: every dropped settlement is
    settled again by the finality tracker and each served request is paid exactly once."""
    rng = random.Random(confirmations)
    store_url = request.getfixturevalue("redis_url") if store == "redis" else None
    with RpcProxy(chain.url) as proxy:
        served = Served(
            tmp_path,
            rpc_url=proxy.url,
            relayer_key=chain.relayer_key,
            upstream_url=upstream_url,
            store_url=store_url,
            network={"confirmations": confirmations},
        ).start()
        try:
            load = Load(served.url, chain, PAYERS).start()
            for depth in rng.sample(range(1, 6), 3):
                assert load.wait_served(rng.randint(1, 3))
                chain.rpc("anvil_reorg", [depth, []])
            assert load.wait_served(2)
            _finish(served, chain, load)
        finally:
            served.stop()


@pytest.mark.parametrize("chain", [1], indirect=True, ids=["interval-mined"])
def test_a_gateway_killed_with_a_batch_in_flight_is_paid_exactly_once_after_restart(
    chain: DevChain, upstream_url: str, tmp_path: Path
) -> None:
    """SIGKILL while a Multicall3 batch of settlements waits in the pool; the gateway is started again and every
    client presents the same payment again until it is answered for good."""
    with RpcProxy(chain.url) as proxy:
        served = Served(tmp_path, rpc_url=proxy.url, relayer_key=chain.relayer_key, upstream_url=upstream_url).start()
        try:
            load = Load(served.url, chain, 6).start()
            assert load.wait_served(6)

            def batch_pending() -> bool:
                pool = chain.rpc("txpool_content")["pending"]
                return any(len(txs) > 0 and k.lower() == served.relayer.lower() for k, txs in pool.items())

            deadline = time.monotonic() + 20
            while not batch_pending() and time.monotonic() < deadline:
                time.sleep(0.02)
            served.kill()
            time.sleep(1.5)  # the batch is mined meanwhile (or not: a restart must not care)
            served.start()
            assert load.wait_served(6)
            _finish(served, chain, load)
        finally:
            served.stop()


def test_a_relayer_out_of_gas_money_mid_load_is_503_then_recovers_once_refilled(
    chain: DevChain, upstream_url: str, tmp_path: Path
) -> None:
    """The relayer's ETH drained mid-load: payments answer 503 (never 402, nothing charged); refilled, the same
    payments are served, each paid once."""
    with RpcProxy(chain.url) as proxy:
        served = Served(tmp_path, rpc_url=proxy.url, relayer_key=chain.relayer_key, upstream_url=upstream_url).start()
        try:
            load = Load(served.url, chain, PAYERS).start()
            assert load.wait_served(3)
            set_eth_balance(chain.anvil, served.relayer, 10**9)  # a few gwei: not one settlement's gas
            time.sleep(3)
            refused = sum(a.reason == "relayer_refused" for p in load.payments for a in p.attempts)
            set_eth_balance(chain.anvil, served.relayer, 10**20)
            assert load.wait_served(3)
            _finish(served, chain, load)
            assert refused > 0
        finally:
            served.stop()
