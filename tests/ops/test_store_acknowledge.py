"""`x402-gateway store acknowledge` (README "Operations", docs/threat-model.md T30) lets the gateways take payments
again after the receipt store lost its records, and never takes them down itself: run on a store that lost nothing,
or a second time once the gateways took the first acknowledgement, it leaves the store's identity marker alone (a
marker the running gateways never saw acknowledged reads to them as a new loss: 503 ``store_identity_lost``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from gateway.storage import open_store
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url


def acknowledge_cli(tmp_path: Path, store_url: str) -> str:
    """Run the real command on a config file naming ``store_url``; its stdout (exit code 0 required)."""
    config = tmp_path / "ack.toml"
    config.write_text(
        f"""
[upstream]
url = "http://127.0.0.1:9"
[store]
url = "{store_url}"
[payment]
pay_to = "0x{"11" * 20}"
[networks.base]
rpc_urls = ["http://127.0.0.1:9"]
[[routes]]
route = "POST /paid"
price = "0.10"
"""
    )
    env = dict(os.environ, X402_RELAYER_KEY="0x" + "ab" * 32)
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "store", "acknowledge", "-c", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def marker(store_url: str) -> str | None:
    async def read() -> str | None:
        store = open_store(store_url)
        try:
            return await store.identity()
        finally:
            await store.aclose()

    return asyncio.run(read())


def paid_request_served(gw: GatewayUnderTest, payer: LocalAccount) -> bool:
    name, value = gw.sign(payer, httpx.post(gw.url + "/paid"))
    return httpx.post(gw.url + "/paid", headers={name: value}, timeout=30).status_code == 200


def store_check(gw: GatewayUnderTest) -> str:
    return str(httpx.get(gw.url + "/readyz").json()["checks"]["store"])


def until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_acknowledging_a_store_that_lost_nothing_leaves_its_identity_and_payments_alone(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(2_000_000)
    store_url = sqlite_url(tmp_path)
    with running_gateway(base_chain, store_url=store_url, store={"heartbeat_seconds": 1.0}) as gw:
        assert paid_request_served(gw, payer)
        healthy = marker(store_url)
        assert healthy is not None and not healthy.startswith("lost:")

        out = acknowledge_cli(tmp_path, store_url)

        assert marker(store_url) == healthy  # a new marker would be a loss to the running gateway
        assert "nothing to acknowledge" in out, out
        assert store_check(gw) == "ok"
        assert paid_request_served(gw, payer)


def test_a_second_acknowledgement_after_a_loss_does_not_lose_the_store_again(
    base_chain: DevChain, redis_url: str, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(2_000_000)
    with running_gateway(base_chain, store_url=redis_url, store={"heartbeat_seconds": 1.0}) as gw:
        assert paid_request_served(gw, payer)
        client = redis.Redis.from_url(redis_url)
        client.flushall()  # the store loses its records
        client.close()
        assert until(lambda: store_check(gw) == "identity_lost")

        assert "acknowledged: the store had lost its records" in acknowledge_cli(tmp_path, redis_url)
        assert until(lambda: store_check(gw) == "ok")
        accepted = marker(redis_url)

        out = acknowledge_cli(tmp_path, redis_url)  # the operator runs it again, to be sure

        assert marker(redis_url) == accepted
        assert "nothing to acknowledge" in out, out
        assert store_check(gw) == "ok"
        assert paid_request_served(gw, payer)
