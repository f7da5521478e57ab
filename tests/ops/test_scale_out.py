"""Scaling out: several gateway PROCESSES sharing one Redis stay exactly-once (docs/threat-model.md T1, T2).

Three ``x402-gateway serve`` processes, each on its own port, one Redis (receipts and rate-limit counters), one
chain, one upstream. One payment sent to all three at once is served exactly once; three different payments,
one per instance, are each served once (the control: the shared store refuses only what it must).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
from eth_account import Account

from gateway.dev.chain import DevChain
from tests.support.gateway import GatewayUnderTest
from tests.support.processes import funded_relayer_keys, paid_route_config, post_all, serve_processes
from tests.support.servers import RecordingUpstream, serve_asgi

ROOT = Path(__file__).resolve().parents[2]
INSTANCES = 3
REQUESTS = 30


@contextlib.contextmanager
def gateway_processes(config: Path, chain: DevChain, logs: Path, keys: list[str]) -> Iterator[list[str]]:
    with serve_processes(config, logs, keys) as procs:
        yield [p.url for p in procs]


def test_three_gateway_processes_on_one_redis_serve_one_payment_exactly_once(
    base_chain: DevChain, redis_url: str, tmp_path: Path
) -> None:
    upstream = RecordingUpstream()
    pay_to = Account.create().address
    with serve_asgi(upstream) as upstream_url:
        config = tmp_path / "gateway.toml"
        config.write_text(
            paid_route_config(upstream_url=upstream_url, store_url=redis_url, chain=base_chain, pay_to=pay_to)
        )
        # One relayer key per instance, as the README recommends: each process keeps its own nonce sequence, so
        # instances settling at the same moment never race for one nonce.
        keys = funded_relayer_keys(base_chain, INSTANCES)
        with gateway_processes(config, base_chain, tmp_path, keys) as urls:
            # A signer for the challenge: our SDK helper, fed by one instance's real 402.
            signer = GatewayUnderTest(url=urls[0], config=None, upstream=upstream, chains={}, pay_to=pay_to)  # type: ignore[arg-type]
            payer = base_chain.new_payer(1_000_000)
            before = (base_chain.balance(payer.address), base_chain.balance(pay_to))
            challenge = httpx.post(urls[1] + "/paid")
            assert challenge.status_code == 402
            name, header = signer.sign(payer, challenge)

            targets = [(urls[i % INSTANCES] + "/paid", {name: header}) for i in range(REQUESTS)]
            codes = asyncio.run(post_all(targets))

            assert sum(200 <= c < 300 for c in codes) == 1, codes
            assert set(codes) <= {200, 402, 409}, codes  # refusals only: never a 5xx, never a second 2xx
            assert len(upstream.requests) == 1
            after = (base_chain.balance(payer.address), base_chain.balance(pay_to))
            assert after == (before[0] - 100_000, before[1] + 100_000)  # debited once

            # Control: three different payments, one per instance, all at once -> each served once.
            payers = [base_chain.new_payer(1_000_000) for _ in range(INSTANCES)]
            signed = [signer.sign(p, httpx.post(urls[0] + "/paid")) for p in payers]
            codes = asyncio.run(post_all([(urls[i] + "/paid", dict([signed[i]])) for i in range(INSTANCES)]))
            assert codes == [200] * INSTANCES
            assert len(upstream.requests) == 1 + INSTANCES
            assert base_chain.balance(pay_to) == before[1] + 100_000 * (1 + INSTANCES)

    # The served processes logged JSON lines, with the paid request on one of them, and never the relayer key.
    lines = [line for i in range(INSTANCES) for line in (tmp_path / f"gateway-{i}.log").read_text().splitlines()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == len(lines), [line for line in lines if not line.startswith("{")][:5]
    paid = [r for r in records if r.get("logger") == "gateway.access" and r.get("outcome") == "paid"]
    assert len(paid) == 1 + INSTANCES
    for key in (k.removeprefix("0x") for k in keys):
        assert all(key not in line.lower() for line in lines)
