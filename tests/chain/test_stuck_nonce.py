"""A stuck nonce never stalls settlement (docs/threat-model.md T29): a settlement transaction that disappears
(dropped from the mempool, reorganised away) leaves the relayer's local nonce ahead of the chain's; the paid
requests after it are still served within seconds, without a restart, and the lost one is sent again."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from gateway.dev.chain import start_dev_chain
from tests.chain.helpers import PRICE, fast_networks, pay, relayer_pool, wait_until
from tests.e2e.helpers import receipt_of
from tests.support.gateway import running_gateway, sqlite_url


def test_a_settlement_dropped_from_the_mempool_does_not_stall_later_paid_requests(tmp_path: Path) -> None:
    chain = start_dev_chain(8453, block_time=1)
    try:
        payers = [chain.new_payer(1_000_000) for _ in range(3)]
        with running_gateway(
            chain, store_url=sqlite_url(tmp_path), networks=fast_networks(chain), payment={"settle_timeout": 30.0}
        ) as gw:
            net = gw.app.payments.engine.networks["base"]
            relayer = net.relayer.address
            answers: dict[int, httpx.Response] = {}

            def paid_request(i: int) -> None:
                with gw.client(timeout=90) as http:
                    answers[i] = pay(gw, http, payers[i])

            chain.rpc("evm_setIntervalMining", [0])  # hold the blocks: the settlement waits in the mempool
            threads = [threading.Thread(target=paid_request, args=(0,))]
            threads[0].start()
            assert wait_until(lambda: len(relayer_pool(chain, relayer)) == 1, timeout=20)
            (dropped,) = [tx["hash"] for tx in relayer_pool(chain, relayer).values()]
            chain.rpc("anvil_dropTransaction", [dropped])
            # Not asserted gone: the gateway may already have sent it again (same hash) by the time we could look.
            for i in (1, 2):
                threads.append(threading.Thread(target=paid_request, args=(i,)))
                threads[-1].start()
            assert wait_until(lambda: len(relayer_pool(chain, relayer)) >= 2, timeout=20)
            chain.rpc("evm_setIntervalMining", [1])
            for t in threads:
                t.join(timeout=80)
            for i in range(3):
                assert answers[i].status_code == 200, (i, answers[i].text)
            assert receipt_of(answers[0])["transaction"] == dropped  # sent again under the hash it recorded
            assert gw.balance(gw.pay_to) == 3 * PRICE
            assert all(gw.balance(p.address) == 1_000_000 - PRICE for p in payers)
    finally:
        chain.stop()


def test_a_reorg_that_rewound_the_relayer_does_not_stall_the_next_paid_request(tmp_path: Path) -> None:
    chain = start_dev_chain(8453)
    try:
        payers = [chain.new_payer(1_000_000) for _ in range(2)]
        with (
            running_gateway(
                chain, store_url=sqlite_url(tmp_path), networks=fast_networks(chain), payment={"settle_timeout": 30.0}
            ) as gw,
            gw.client(timeout=90) as http,
        ):
            first = pay(gw, http, payers[0])
            assert first.status_code == 200, first.text
            chain.rpc("anvil_reorg", [1, []])  # the chain's count for the relayer goes back; the local one does not
            second = pay(gw, http, payers[1])
            assert second.status_code == 200, second.text
            assert wait_until(lambda: gw.balance(gw.pay_to) == 2 * PRICE)
            assert all(gw.balance(p.address) == 1_000_000 - PRICE for p in payers)
    finally:
        chain.stop()
