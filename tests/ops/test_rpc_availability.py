"""RPC availability with several endpoints (docs/threat-model.md T42): one down at start does not stop the gateway,
a slow one is demoted (hedged, then no longer asked), one serving another chain is never used, and the majority
and agreement rules for tx-hash proofs hold. Fake JSON-RPC endpoints (``RpcRelay``) in front of a real anvil."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from gateway.chain.rpc import ChainRpc
from gateway.config import Secret
from gateway.dev.chain import DevChain
from gateway.errors import ChainUnavailable
from gateway.http.app import build_app
from tests.ops.support import RpcRelay
from tests.support.gateway import GatewayUnderTest, gateway_config, running_gateway, sqlite_url
from tests.support.processes import served_gateway
from tests.support.servers import RecordingUpstream, serve_asgi


@contextlib.contextmanager
def relays(chain: DevChain, n: int) -> Iterator[list[tuple[RpcRelay, str]]]:
    with contextlib.ExitStack() as stack:
        out = []
        for _ in range(n):
            relay = RpcRelay(chain.url)
            out.append((relay, stack.enter_context(serve_asgi(relay)) + "/"))
        yield out


@contextlib.contextmanager
def refused_url() -> Iterator[str]:
    """A bound port nobody listens on: connection refused."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{closed.getsockname()[1]}/"
    finally:
        closed.close()


def networks(urls: list[str], **extra: Any) -> dict[str, Any]:
    return {"base": {"rpc_urls": urls, "receipt_poll_interval": 0.02, **extra}}


def pay(gw: GatewayUnderTest, chain: DevChain, c: httpx.Client) -> httpx.Response:
    payer = chain.new_payer(1_000_000)
    return c.post("/paid", headers=dict([gw.sign(payer, c.post("/paid"))]))


def test_the_gateway_starts_and_takes_payments_with_its_first_rpc_url_down(
    base_chain: DevChain, tmp_path: Path
) -> None:
    with (
        refused_url() as dead,
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), networks=networks([dead, base_chain.url])) as gw,
        gw.client() as c,
    ):
        assert c.get("/readyz").status_code == 200
        r = pay(gw, base_chain, c)
        assert r.status_code == 200, r.text
        assert "payment-response" in r.headers


def test_the_served_process_starts_with_its_first_rpc_url_down(base_chain: DevChain, tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    with (
        refused_url() as dead,
        serve_asgi(upstream) as upstream_url,
        served_gateway(
            base_chain, tmp_path, upstream_url=upstream_url, **{"networks.base": {"rpc_urls": [dead, base_chain.url]}}
        ) as gw,
    ):
        assert httpx.get(gw.url + "/readyz", timeout=10).status_code == 200


def test_the_gateway_does_not_start_when_no_rpc_url_serves_its_chain(base_chain: DevChain, tmp_path: Path) -> None:
    with relays(base_chain, 1) as [(wrong, wrong_url)], refused_url() as dead:
        wrong.mode = "wrong_chain"
        for urls, reason in (([dead], "no RPC endpoint answered"), ([dead, wrong_url], "serves chain 1")):
            config = gateway_config(
                [base_chain],
                upstream_url="http://127.0.0.1:9",
                store_url=sqlite_url(tmp_path),
                pay_to="0x" + "11" * 20,
                networks=networks(urls),
            )
            app = build_app(config)

            async def start(app: Any = app) -> None:
                try:
                    await app.startup()
                finally:
                    await app.shutdown()

            with pytest.raises(ChainUnavailable, match=reason):
                asyncio.run(start())


def test_a_slow_first_rpc_url_is_demoted_and_payments_do_not_wait_for_it(base_chain: DevChain, tmp_path: Path) -> None:
    with relays(base_chain, 1) as [(slow, slow_url)]:
        slow.delay = 2.0
        with (
            running_gateway(
                base_chain, store_url=sqlite_url(tmp_path), networks=networks([slow_url, base_chain.url])
            ) as gw,
            gw.client() as c,
        ):
            asked_at_start = len(slow.methods)
            t0 = time.monotonic()
            for _ in range(4):
                assert pay(gw, base_chain, c).status_code == 200
            elapsed = time.monotonic() - t0
            # Every paid request makes several chain calls: had any waited for the slow endpoint, 2 s each.
            assert elapsed < 4.0, elapsed
            assert len(slow.methods) == asked_at_start


def test_an_rpc_url_that_turns_slow_is_hedged_then_no_longer_asked(base_chain: DevChain, tmp_path: Path) -> None:
    with relays(base_chain, 2) as [(first, first_url), (second, second_url)]:
        second.delay = 0.05  # the first is the better one at start
        with (
            running_gateway(
                base_chain, store_url=sqlite_url(tmp_path), networks=networks([first_url, second_url])
            ) as gw,
            gw.client() as c,
        ):
            assert pay(gw, base_chain, c).status_code == 200
            assert len(first.methods) > len(second.methods)
            first.delay, second.delay = 3.0, 0.0
            t0 = time.monotonic()
            assert pay(gw, base_chain, c).status_code == 200  # hedged: the calls in flight then go to both
            assert time.monotonic() - t0 < 3.0
            demoted_at = len(first.methods)
            t0 = time.monotonic()
            for _ in range(3):
                assert pay(gw, base_chain, c).status_code == 200
            assert time.monotonic() - t0 < 2.0
            assert len(first.methods) == demoted_at  # no longer asked


async def rpc_over(urls: list[str], chain_id: int, **kw: Any) -> tuple[ChainRpc, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    rpc = ChainRpc("base", chain_id, [Secret(u) for u in urls], timeout=5.0, **kw)
    await rpc.start(session)
    return rpc, session


def test_an_rpc_url_down_at_start_joins_once_it_answers_and_proofs_need_its_vote_again(base_chain: DevChain) -> None:
    with relays(base_chain, 1) as [(late, late_url)]:
        late.mode = "down"

        async def scenario() -> None:
            rpc, session = await rpc_over([late_url, base_chain.url], base_chain.chain_id, probe_interval=0.1)
            try:
                await rpc.verify_chain_id()  # starts with the one that answers
                assert rpc.endpoint_states() == ["unverified", "ok"]
                assert await rpc.request("eth_chainId", []) == hex(base_chain.chain_id)
                with pytest.raises(ChainUnavailable) as exc:  # two configured: a proof needs both
                    await rpc.request_all("eth_blockNumber", [])
                assert exc.value.reason == "rpc_no_quorum"
                late.mode = "forward"
                await asyncio.sleep(0.2)
                await rpc.request("eth_blockNumber", [])  # traffic: the endpoint not in use is probed
                await asyncio.sleep(0.2)
                assert rpc.endpoint_states() == ["ok", "ok"]
                assert len(await rpc.request_all("eth_blockNumber", [])) == 2
            finally:
                await rpc.aclose()
                await session.close()

        asyncio.run(scenario())


def test_an_rpc_url_serving_another_chain_is_never_asked_again(base_chain: DevChain) -> None:
    with relays(base_chain, 1) as [(wrong, wrong_url)]:
        wrong.mode = "wrong_chain"

        async def scenario() -> None:
            rpc, session = await rpc_over([wrong_url, base_chain.url], base_chain.chain_id, probe_interval=0.05)
            try:
                await rpc.verify_chain_id()
                asked = len(wrong.methods)
                for _ in range(5):
                    await rpc.request("eth_blockNumber", [])
                    await asyncio.sleep(0.06)
                assert len(wrong.methods) == asked == 1
                assert rpc.endpoint_states() == ["wrong_chain", "ok"]
                with pytest.raises(ChainUnavailable):  # and it never counts towards a proof's majority
                    await rpc.request_all("eth_blockNumber", [])
            finally:
                await rpc.aclose()
                await session.close()

        asyncio.run(scenario())


def test_proofs_keep_the_majority_rule_and_a_slow_minority_does_not_hold_them(base_chain: DevChain) -> None:
    with relays(base_chain, 3) as [(_, a_url), (b, b_url), (slow, slow_url)]:

        async def scenario() -> None:
            rpc, session = await rpc_over([a_url, b_url, slow_url], base_chain.chain_id)
            try:
                await rpc.verify_chain_id()
                slow.delay = 3.0
                t0 = time.monotonic()
                heads = await rpc.request_all("eth_blockNumber", [])
                assert time.monotonic() - t0 < 1.5
                assert len(heads) == 2  # the majority answered; the slow one had its grace
                b.mode = "down"  # one of three left fast, one slow: no majority in time is still no answer
                slow.delay = 0.0
                slow.mode = "down"
                with pytest.raises(ChainUnavailable) as exc:
                    await rpc.request_all("eth_blockNumber", [])
                assert exc.value.reason == "rpc_no_quorum"
            finally:
                await rpc.aclose()
                await session.close()

        asyncio.run(scenario())


def test_an_rpc_url_that_hangs_does_not_hold_the_start_for_the_rpc_timeout(base_chain: DevChain) -> None:
    with relays(base_chain, 1) as [(hanging, hanging_url)]:
        hanging.mode = "hang"

        async def scenario() -> None:
            rpc, session = await rpc_over([hanging_url, base_chain.url], base_chain.chain_id)  # 5 s timeout
            try:
                t0 = time.monotonic()
                await rpc.verify_chain_id()
                assert time.monotonic() - t0 < 2.5
                assert rpc.endpoint_states() == ["unverified", "ok"]
            finally:
                await rpc.aclose()
                await session.close()

        asyncio.run(scenario())
