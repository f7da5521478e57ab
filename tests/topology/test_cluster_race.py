"""Two gateway processes on a 3-master Redis Cluster: one payment raced against both reaches the upstream once, and
different payments are each served once (docs/scaling.md).

Everything a paid request touches lives on the cluster: receipts (one hash tag: a claim and the transfer it spent
change in one script), idempotency records, rate-limit counters.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from eth_account import Account

from gateway.dev.chain import DevChain
from tests.support.gateway import GatewayUnderTest
from tests.support.processes import funded_relayer_keys, paid_route_config, post_all, serve_processes
from tests.support.servers import RecordingUpstream, serve_asgi

RACERS = 20


def test_one_payment_raced_against_two_instances_on_a_cluster_reaches_the_upstream_once(
    cluster_url: str, base_chain: DevChain, tmp_path: Path
) -> None:
    upstream = RecordingUpstream()
    pay_to = Account.create().address
    with serve_asgi(upstream) as upstream_url:
        config = tmp_path / "gateway.toml"
        config.write_text(
            paid_route_config(upstream_url=upstream_url, store_url=cluster_url, chain=base_chain, pay_to=pay_to)
        )
        with serve_processes(config, tmp_path, funded_relayer_keys(base_chain, 2)) as procs:
            urls = [p.url for p in procs]
            signer = GatewayUnderTest(url=urls[0], config=None, upstream=upstream, chains={}, pay_to=pay_to)  # type: ignore[arg-type]
            payer = base_chain.new_payer(1_000_000)
            before = (base_chain.balance(payer.address), base_chain.balance(pay_to))
            challenge = httpx.post(urls[1] + "/paid")
            assert challenge.status_code == 402
            name, header = signer.sign(payer, challenge)

            codes = asyncio.run(post_all([(urls[i % 2] + "/paid", {name: header}) for i in range(RACERS)]))
            assert sum(200 <= c < 300 for c in codes) == 1, codes
            assert set(codes) <= {200, 402, 409}, codes
            assert len(upstream.requests) == 1
            assert (base_chain.balance(payer.address), base_chain.balance(pay_to)) == (
                before[0] - 100_000,
                before[1] + 100_000,
            )

            # Control: different payments, spread over both instances, are each served once.
            payers = [base_chain.new_payer(1_000_000) for _ in range(4)]
            signed = [signer.sign(p, challenge) for p in payers]
            codes = asyncio.run(post_all([(urls[i % 2] + "/paid", dict([signed[i]])) for i in range(len(signed))]))
            assert codes == [200] * len(signed)
            assert len(upstream.requests) == 1 + len(signed)

            ready = httpx.get(urls[0] + "/readyz").json()
            assert ready["status"] == "ready" and ready["store"]["topology"] == "cluster", ready
