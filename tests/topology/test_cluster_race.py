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

from gateway.dev.chain import DevChain, set_eth_balance
from tests.support.gateway import GatewayUnderTest
from tests.support.processes import serve_processes
from tests.support.servers import RecordingUpstream, serve_asgi

RACERS = 20


def write_config(path: Path, *, upstream_url: str, store_url: str, chain: DevChain, pay_to: str) -> None:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:8402"

[upstream]
url = "{upstream_url}"
read_timeout = 10.0

[store]
url = "{store_url}"

[rate_limits]
storage_url = "{store_url}"

[payment]
pay_to = "{pay_to}"
relayer_key_env = "TEST_RELAYER_KEY"
settle_timeout = 20.0

[networks.base]
rpc_urls = ["{chain.url}"]
receipt_poll_interval = 0.02

[[routes]]
route = "POST /paid"
price = "0.10"
"""
    )


async def post_all(targets: list[tuple[str, dict[str, str]]]) -> list[int]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=len(targets))) as client:
        return [r.status_code for r in await asyncio.gather(*(client.post(u, headers=h) for u, h in targets))]


def test_one_payment_raced_against_two_instances_on_a_cluster_reaches_the_upstream_once(
    cluster_url: str, base_chain: DevChain, tmp_path: Path
) -> None:
    upstream = RecordingUpstream()
    pay_to = Account.create().address
    with serve_asgi(upstream) as upstream_url:
        config = tmp_path / "gateway.toml"
        write_config(config, upstream_url=upstream_url, store_url=cluster_url, chain=base_chain, pay_to=pay_to)
        relayers = [Account.create() for _ in range(2)]
        for r in relayers:
            set_eth_balance(base_chain.anvil, r.address, 10**19)
        with serve_processes(config, tmp_path, [r.key.to_0x_hex() for r in relayers]) as procs:
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
